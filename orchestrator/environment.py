"""What the numbers were measured on: versions, CPU model and ISA, git SHA, threads."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_info() -> Dict[str, str]:
    from . import cpu

    return cpu.tags()


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags() -> Dict[str, str]:
    tags = {f"version.{p}": pkg_version(p) for p in ("torch", "transformers", "datasets", "mlflow", "hydra-core")}
    tags["version.python"] = platform.python_version()
    tags.update(cpu_info())
    tags["git_sha"] = git_sha()
    tags["host"] = platform.node()
    tags.update(thread_environment())
    return tags


# what decides how many cores the model's kernels use and where their threads sit
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY",
                    "KMP_BLOCKTIME", "ONEDNN_MAX_CPU_ISA", "LD_PRELOAD")


def available_cpus() -> List[int]:
    """The CPUs this process may run on (its affinity mask; all of them where the OS has no such call)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return list(range(os.cpu_count() or 1))


def thread_environment() -> Dict[str, str]:
    tags = {f"env.{k}": os.environ[k] for k in THREAD_VARIABLES if k in os.environ}
    cpus = available_cpus()
    tags["cpu.affinity"] = ",".join(map(str, cpus))
    tags["cpu.available"] = str(len(cpus))
    return tags


# set by hydra/launcher=isolated for each job process it starts (hydra_plugins/orchestrator_launcher); this module
# imports nothing heavy, so the launcher shares these names without loading torch while Hydra scans plugins
ISOLATED_ENV = "ORCH_ISOLATED_JOB"
SPAWNED_AT_ENV = "ORCH_JOB_SPAWNED_AT"


# where a cluster ran the job: SLURM's variables in each array task; the ORCH_RAY_* ones are set by hydra/launcher=ray
CLUSTER_TAGS = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
                "SLURM_ARRAY_TASK_ID": "slurm.array_task_id", "SLURMD_NODENAME": "slurm.node",
                "SLURM_JOB_PARTITION": "slurm.partition", "ORCH_RAY_NODE_ID": "ray.node_id",
                "ORCH_RAY_TASK_ID": "ray.task_id"}


def process_tags() -> Dict[str, str]:
    """Which OS process measured the run, whether it was a fresh one of its own (hydra/launcher=isolated and the
    cluster launchers), and which SLURM job / Ray node ran it."""
    tags = {"process.pid": str(os.getpid()), "process.isolated": str(os.environ.get(ISOLATED_ENV) == "1").lower()}
    tags.update({tag: os.environ[var] for var, tag in CLUSTER_TAGS.items() if os.environ.get(var)})
    return tags


def process_startup_s(run_started: float) -> Optional[float]:
    """Seconds from the isolated launcher starting this job's process to the run starting in it."""
    spawned = os.environ.get(SPAWNED_AT_ENV)
    if os.environ.get(ISOLATED_ENV) != "1" or not spawned:
        return None
    try:
        return max(run_started - float(spawned), 0.0)
    except ValueError:
        return None


def busy_cores_warning(load: Optional[float], available: int, threads: int) -> Optional[str]:
    """One line when other work holds cores this run's threads need. OpenMP's barriers make every batch wait for
    its slowest thread, so a thread that shares its core with a busy process slows the whole run by far more than
    its share: on the 2-core Xeon one busy-loop process took the default run from 563 to 33 sentences/s."""
    if not threads_wait_on_busy_cores(load, available, threads):
        return None
    return (f"other processes keep {load:.1f} of {available} core(s) busy while this run uses {threads} thread(s): "
            "each batch waits for the thread that is not running; "
            f"runtime.threads={threads_that_fit(load, available, threads)} times it on the cores left "
            "(timings are of a shared machine either way)")


def threads_wait_on_busy_cores(load: Optional[float], available: int, threads: int) -> bool:
    """Other work holds a core this run's threads need (the cores left over by the threads absorb part of it)."""
    return load is not None and load >= 0.75 + max(available - threads, 0)


def threads_that_fit(load: float, available: int, threads: int) -> int:
    """The thread count that leaves the cores other work keeps busy to it (one at least)."""
    return max(1, min(threads, available - round(load)))


class OthersBusy:
    """The cores other processes kept busy while ``pid`` ran: the machine's busy CPU time minus that process's and
    this one's (once, when they are the same), over the wall time between :meth:`start` and :meth:`read`. The race
    takes one per timed round (the launcher waits in ``select`` meanwhile): a load that arrives after the jobs'
    start, where their own sample (``cores_busy_at_start``) was taken, still shows. Kernel CPU times tick every 10
    ms, so a window shorter than ``min_s`` says nothing (None), as does a machine without /proc."""

    def __init__(self, pid: int, min_s: float = 0.2):
        self.pid, self.min_s = pid, min_s
        self._t0: Optional[tuple] = None

    def _now(self) -> Optional[tuple]:
        try:
            import psutil

            machine = psutil.cpu_times()
            busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
            # guest time is counted in user time already (Linux): not twice
            busy -= getattr(machine, "guest", 0.0) + getattr(machine, "guest_nice", 0.0)
            own = sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in {os.getpid(), self.pid})
            return time.monotonic(), busy, own
        except Exception:  # the process ended, or no /proc
            return None

    def start(self) -> bool:
        """Open the window; False where nothing can be measured (the read will say None)."""
        self._t0 = self._now()
        return self._t0 is not None

    def read(self) -> Optional[float]:
        t1 = self._now()
        if self._t0 is None or t1 is None or t1[0] - self._t0[0] < self.min_s:
            return None
        wall = t1[0] - self._t0[0]
        return max(0.0, ((t1[1] - self._t0[1]) - (t1[2] - self._t0[2])) / wall)
