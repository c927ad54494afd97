"""``hydra/launcher=isolated``: every job of a sweep in a fresh Python process of its own, one after the other.

Why: a job run in the same process as the jobs before it inherits their state. oneDNN keeps the kernels it built
for every input shape, TorchScript/inductor keep their caches, IPEX registers fusion passes process-wide, the
allocator keeps its arenas and inter-op threads can be set once. A later job then skips work an earlier one paid
for, and its timings are not what a user running it alone would get. A fresh process per job, run alone, gives each
job the whole CPU and nothing from its predecessors.

How: the sweep process composes each job's config (as Hydra's basic launcher does), pickles what ``run_job`` needs
(cloudpickle, as the joblib launcher hands jobs to its workers) and runs ``python -m
hydra_plugins.orchestrator_launcher._job`` on it, then reads the job's ``JobReturn`` back. The job process gets the
sweep's environment (so it nests under the sweep's MLflow parent run) plus ``ORCH_ISOLATED_JOB=1`` and the time it
was started, from which the run logs ``process_startup_s``.

Signals: the job runs in its own process group, so a terminal's Ctrl-C reaches the sweep process only, which passes
it on: one Ctrl-C ends the current job (its run ends KILLED) and the sweep goes on; a second within 2 s stops the
sweep. SIGTERM is passed on too, and the sweep stops after that job has ended KILLED.
"""

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides
from omegaconf import DictConfig

from orchestrator.environment import ISOLATED_ENV, SPAWNED_AT_ENV

from ._remote import SweepLauncher, job_payload

log = logging.getLogger(__name__)

DOUBLE_INTERRUPT_S = 2.0
# after the sweep is stopped, how long a job may take to record itself KILLED before it is killed outright
GRACE_S = 60.0


@dataclass
class IsolatedLauncherConf:
    _target_: str = "hydra_plugins.orchestrator_launcher.isolated_launcher.IsolatedLauncher"
    # the interpreter that runs each job; null: the one running the sweep
    python: Optional[str] = None
    # extra environment for every job process (e.g. ONEDNN_MAX_CPU_ISA: AVX2, OMP_NUM_THREADS: "2")
    env: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="isolated", node=IsolatedLauncherConf,
                             provider="cpu-inference-orchestrator")


class SweepStopped(Exception):
    pass


class IsolatedLauncher(SweepLauncher):
    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.python = python or sys.executable
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self._last_interrupt = 0.0

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = self.start_sweep()
        log.info(f"Launching {len(job_overrides)} jobs, each in a fresh process (hydra/launcher=isolated)")
        runs: List[JobReturn] = []
        for idx, overrides in enumerate(job_overrides):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.job_config(idx, overrides)
            runs.append(self._run_one(idx, list(overrides), sweep_config, sweep_dir))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    # -- one job ------------------------------------------------------------------------------------------------
    def _run_one(self, idx: int, overrides: List[str], sweep_config: DictConfig, sweep_dir: Path) -> JobReturn:
        with tempfile.TemporaryDirectory(prefix=f".isolated-{idx}-", dir=sweep_dir) as tmp:
            job_in, job_out = Path(tmp, "job.pkl"), Path(tmp, "return.pkl")
            job_in.write_bytes(job_payload(self.hydra_context, self.task_function, sweep_config))
            env = {**os.environ, **self.env, ISOLATED_ENV: "1", SPAWNED_AT_ENV: repr(time.time())}
            proc = subprocess.Popen([self.python, "-m", "hydra_plugins.orchestrator_launcher._job", str(job_in),
                                     str(job_out)], env=env, start_new_session=True)
            stop = self._wait(proc, idx)
            ret = self._read_return(job_out, proc.returncode, idx, overrides, sweep_config, proc.pid)
        if stop is not None:
            raise stop
        return ret

    def _wait(self, proc: subprocess.Popen, idx: int) -> Optional[BaseException]:
        """Wait for the job, passing Ctrl-C and SIGTERM on; returns what should stop the sweep afterwards."""
        stop: Optional[BaseException] = None
        interrupted = False

        def on_term(signum, frame):
            nonlocal stop
            log.error("SIGTERM: ending job %d (KILLED), then stopping the sweep", idx)
            stop = SystemExit(128 + signal.SIGTERM)
            _signal(proc, signal.SIGTERM)

        old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
        try:
            while True:
                try:
                    proc.wait(timeout=None if stop is None else GRACE_S)
                    return stop
                except subprocess.TimeoutExpired:
                    log.error("job %d did not end %g s after it was stopped; killing it", idx, GRACE_S)
                    proc.kill()
                except KeyboardInterrupt:
                    now = time.monotonic()
                    # not the second of a double Ctrl-C: it would land in the job's own shutdown (its atexit
                    # handlers) and print a traceback there while the job is already ending KILLED
                    if not (interrupted and now - self._last_interrupt < DOUBLE_INTERRUPT_S):
                        _signal(proc, signal.SIGINT)
                    interrupted = True
                    if now - self._last_interrupt < DOUBLE_INTERRUPT_S:
                        log.error("second Ctrl-C: stopping the sweep after job %d", idx)
                        stop = KeyboardInterrupt()
                    else:
                        log.warning("Ctrl-C: ending job %d (KILLED); Ctrl-C again within %g s stops the sweep",
                                    idx, DOUBLE_INTERRUPT_S)
                    self._last_interrupt = now
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)

    @staticmethod
    def _read_return(path: Path, returncode: Optional[int], idx: int, overrides: List[str],
                     config: DictConfig, pid: Optional[int] = None) -> JobReturn:
        import cloudpickle

        from ._remote import record_lost_job

        if path.is_file():
            try:
                return cloudpickle.loads(path.read_bytes())
            except Exception as e:  # an unpicklable return value: report, keep the sweep going
                return record_lost_job(config, idx, overrides, "FAILED",
                                       f"its result could not be read back ({type(e).__name__}: {e})")
        # the job could not close its own run (kill -9, the OOM killer): this process outlives it and does. The
        # job ends COMPLETED with a failed result, as orchestrator's task function reports failed jobs: the sweep
        # goes on and its summary lists the job
        if returncode is not None and returncode < 0:
            return record_lost_job(config, idx, overrides, "KILLED",
                                   f"killed by signal {signal.Signals(-returncode).name} (process {pid})")
        return record_lost_job(config, idx, overrides, "FAILED",
                               f"its process {pid} ended (exit code {returncode}) before the job returned")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
