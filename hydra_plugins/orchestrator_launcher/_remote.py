"""What the cluster launchers (``submitit_slurm``, ``ray``) share: each job in a fresh process of its own on the
node that runs it, and a job the cluster lost (cancelled, killed, node gone) recorded as such.

On the node, :func:`run_isolated` runs ``python -m hydra_plugins.orchestrator_launcher._job`` on the job's pickled
``run_job`` payload, exactly as ``hydra/launcher=isolated`` does on one machine, and reads the ``JobReturn`` back.
When no ``JobReturn`` comes back — the process died, SLURM cancelled the job before it started, a Ray worker
crashed — :func:`record_lost_job` ends the job's MLflow child run (creating one under the sweep's parent if the job
never got that far) with status KILLED or FAILED and the reason, and writes the job's ``results.json``, so the sweep
summary lists it as not finished and ``orchestrator`` exits 1. ``resume=true`` then re-runs only such jobs (they
never reached FINISHED).

Nothing heavy at import time: Hydra imports every plugin module when it scans for plugins.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf

from orchestrator.environment import ISOLATED_ENV, SPAWNED_AT_ENV

log = logging.getLogger(__name__)

# environment of the launching process that a job must see even where the cluster does not pass it on (Ray
# workers, sbatch --export=NONE): where to track and under which parent run
FORWARDED_PREFIXES = ("ORCH_", "MLFLOW_")


def forwarded_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and k != ISOLATED_ENV}


def job_payload(hydra_context: Any, task_function: Any, sweep_config: DictConfig) -> bytes:
    import cloudpickle
    from hydra.core.singleton import Singleton

    return cloudpickle.dumps({"hydra_context": hydra_context, "task_function": task_function,
                              "config": sweep_config, "singleton_state": Singleton.get_state()})


def _die_with_parent() -> None:  # in the child, before exec: a job never outlives the task that runs it
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_passing_sigterm(proc: subprocess.Popen) -> int:
    """Wait for the job's process, passing a SIGTERM this process gets on to it. SLURM's ``scancel`` signals the
    processes its process tracking finds; with ``proctrack/linuxproc`` that missed the job's process now and then
    (seen: 1 cancel in 8 on one node), and submitit's own handler here only logs SIGTERM ("Bypassing signal"), so
    the job ran to the end and its run ended FINISHED. The job ends its run on the first SIGTERM and ignores a
    second one of the same stop (orchestrator/interrupts.py), so a job that gets both is fine. The handler there
    was (submitit's, a Ray worker's) still runs after; with none (the default action) this process dies and the job
    gets its parent-death SIGTERM."""
    old = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(old):
        return proc.wait()

    def on_term(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        old(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, old)


def run_isolated(payload: bytes, work_dir: Path, env: Optional[Dict[str, str]] = None,
                 python: Optional[str] = None) -> "tuple[Optional[JobReturn], str]":
    """Run one job in a fresh process here; (its JobReturn, "") or (None, why there is none)."""
    import cloudpickle

    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".job-", dir=work_dir) as tmp:
        job_in, job_out = Path(tmp, "job.pkl"), Path(tmp, "return.pkl")
        job_in.write_bytes(payload)
        full_env = {**os.environ, **(env or {}), ISOLATED_ENV: "1", SPAWNED_AT_ENV: repr(time.time())}
        proc = subprocess.Popen([python or sys.executable, "-m", "hydra_plugins.orchestrator_launcher._job",
                                 str(job_in), str(job_out)], env=full_env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        wait_passing_sigterm(proc)
        if job_out.is_file():
            try:
                return cloudpickle.loads(job_out.read_bytes()), ""
            except Exception as e:
                return None, f"its result could not be read back ({type(e).__name__}: {e})"
        rc = proc.returncode
        how = f"signal {signal.Signals(-rc).name}" if rc is not None and rc < 0 else f"exit code {rc}"
        return None, f"its process ended ({how}) before the job returned"


def job_dir(config: DictConfig) -> Path:
    return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def _stack(config: DictConfig) -> str:
    from orchestrator.records import stack_label

    opt = config.get("optimization")
    return stack_label(list(opt.keys()) if isinstance(opt, DictConfig) else list(opt or []))


def parent_id_for(config: DictConfig) -> Optional[str]:
    """The sweep's parent run, as the job would have learnt it (orchestrator/context.py)."""
    from orchestrator.context import PARENT_RUN_ENV, _from_sweep
    from orchestrator.records import PARENT_RUN_FILE

    return _from_sweep(PARENT_RUN_ENV, Path(str(config.hydra.sweep.dir)) / PARENT_RUN_FILE) or None


def record_lost_job(config: DictConfig, idx: int, overrides: Sequence[str], status: str, reason: str) -> JobReturn:
    """A job that returned nothing: its MLflow run and results.json say ``status`` (KILLED/FAILED) and why; the
    returned JobReturn is COMPLETED with a failed result, as the task function reports failed jobs, so the sweep
    goes on to its summary."""
    from orchestrator.records import lost_record

    log.error("job %d: %s (%s)", idx, reason, status)
    stack = _stack(config)
    precision = str(OmegaConf.select(config, "precision.name", default="?"))
    task = OmegaConf.select(config, "dataset.task", default=None)
    where = job_dir(config)
    run_id, measured = _end_mlflow_run(config, idx, overrides, status, reason, stack, precision, task, where)
    record = lost_record(where, status=status, reason=reason, stack=stack, precision=precision, task=task,
                         overrides=overrides, run_id=run_id, measured=measured)
    if record is not None:  # None: the job itself recorded its end, which is never overwritten
        try:
            (where / ".hydra").mkdir(parents=True, exist_ok=True)  # the summary reads job dirs that have one
            overrides_file = where / ".hydra" / "overrides.yaml"
            if not overrides_file.exists():
                overrides_file.write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
            record.write(where)
        except OSError as e:
            log.error("job %d: could not write %s (%s)", idx, where / "results.json", e)
    return JobReturn(overrides=list(overrides), cfg=config, hydra_cfg=config, status=JobStatus.COMPLETED,
                     _return_value={"status": status, "error": reason}, working_dir=str(where))


def _end_mlflow_run(config: DictConfig, idx: int, overrides: Sequence[str], status: str, reason: str, stack: str,
                    precision: str, task: Optional[str], where: Path) -> "tuple[Optional[str], Dict[str, float]]":
    """End the job's RUNNING child run (or create one, ended, if the job never started it); returns its id and
    the metrics it had logged."""
    tracking = config.get("tracking")
    parent = parent_id_for(config)
    if not tracking or not tracking.get("enabled") or not parent:
        return None, {}
    try:
        from orchestrator.tracking import connect

        client = connect(tracking)  # bounded: a store that is down costs seconds here, not minutes
        exp_id = client.get_run(parent).info.experiment_id
        runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and tags.job_num = '{idx}'")
        for r in runs:
            if r.info.status == "RUNNING":
                client.set_tag(r.info.run_id, "error", reason[:5000])
                client.set_terminated(r.info.run_id, status)
        if runs:
            return runs[0].info.run_id, dict(runs[0].data.metrics)
        run = client.create_run(exp_id, run_name=f"job{idx}-{stack}-{precision}",
                                tags={"mlflow.parentRunId": parent, "job_num": str(idx), "stack": stack,
                                      "stack.requested": stack, "precision": precision, "task": str(task),
                                      "overrides": " ".join(overrides), "error": reason[:5000],
                                      "run_dir": str(where.resolve())})
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id, {}
    except Exception as e:  # tracking must not stop the sweep; results.json still says what happened
        from orchestrator.errors import first_line

        log.error("job %d: could not record it in MLflow (%s: %s)", idx, type(e).__name__, first_line(e))
        return None, {}


def lost_status(state: str) -> str:
    """KILLED for a job stopped from outside (cancelled, time limit, preempted); FAILED for anything else."""
    return "KILLED" if state.upper().startswith(("CANCELLED", "TIMEOUT", "PREEMPTED", "DEADLINE")) else "FAILED"


class SweepLauncher(Launcher):
    """What the project's own launchers (isolated, ray) share: Hydra's ``setup``, the start of ``launch`` and
    composing a job's config. Abstract (no ``launch``), so Hydra's plugin scan does not list it."""
    config: Optional[DictConfig] = None
    task_function: Any = None
    hydra_context: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def start_sweep(self) -> Path:
        """Hydra's globals and logging in the launching process; the sweep directory, created."""
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        return sweep_dir

    def job_config(self, idx: int, overrides: Sequence[str]) -> DictConfig:
        """One job's composed config, numbered as Hydra's own launchers number them."""
        from omegaconf import open_dict

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg


def sweep_configs(launcher: SweepLauncher, job_overrides: Sequence[Sequence[str]],
                  initial_job_idx: int) -> List[DictConfig]:
    """Every job's composed config, up front."""
    return [launcher.job_config(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
