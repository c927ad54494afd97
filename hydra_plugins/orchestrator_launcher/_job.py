"""The job side of ``hydra/launcher=isolated``: ``python -m hydra_plugins.orchestrator_launcher._job IN OUT``.

Reads what ``run_job`` needs from IN (written by the sweep process), runs the one job, writes its JobReturn to OUT.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def main(job_in: str, job_out: str) -> int:
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
