"""The job side of ``hydra/launcher=isolated``: ``python -m hydra_plugins.orchestrator_launcher._job IN OUT``.

Reads what ``run_job`` needs from IN (written by the sweep process), runs the one job, writes its JobReturn to OUT.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _die_with_the_sweep() -> None:
    """A job never outlives its sweep: SIGTERM (the run ends KILLED) when the sweep process dies, however it dies.
    Set here rather than in a preexec_fn (unsafe in a threaded sweep process); a sweep that died before this line
    ran is caught by the parent check."""
    sweep_pid = os.environ.pop("ORCH_SWEEP_PID", None)  # popped: what this job starts is not its child
    if not sys.platform.startswith("linux") or not sweep_pid:
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(sweep_pid):
        sys.stderr.write(f"error: the sweep process {sweep_pid} that started this job is gone\n")
        sys.exit(1)


def main(job_in: str, job_out: str) -> int:
    from orchestrator.interrupts import restore_sigint

    restore_sigint()  # a job started under an ignored SIGINT must still end on Ctrl-C
    _die_with_the_sweep()
    import cloudpickle
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    payload = cloudpickle.loads(Path(job_in).read_bytes())
    setup_globals()
    Singleton.set_state(payload["singleton_state"])
    HydraConfig.instance().set_config(payload["config"])
    ret = run_job(hydra_context=payload["hydra_context"], task_function=payload["task_function"],
                  config=payload["config"], job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    try:
        blob = cloudpickle.dumps(ret)
    except Exception as e:  # keep the status; the sweep only needs a readable value
        ret.return_value = RuntimeError(f"{type(ret._return_value).__name__}: {ret._return_value} ({e})")
        blob = cloudpickle.dumps(ret)
    tmp = Path(job_out + ".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, job_out)  # the sweep never reads half a file
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
