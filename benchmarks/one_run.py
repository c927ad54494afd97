"""One orchestrator run in a fresh process, for the benchmarks: ``python benchmarks/one_run.py '<json overrides>'``.

Prints the run's metrics and run directory as one JSON line prefixed ``RESULT``. Why a fresh process per measured
run: state that outlives a run would favour whichever run comes later in a long benchmark process — oneDNN's
primitive cache (in bf16 every new batch shape costs tens of ms of kernel creation, and a later run with the same
shapes skips it), IPEX's process-wide TorchScript passes, our feature cache. The peers run as fresh processes too.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
PREFIX = "RESULT "


def run_fresh(overrides: List[str], cwd: Path | None = None) -> Dict:
    """Run ``overrides`` in a new interpreter (this one's: the same venv); the child's result dict."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(overrides)],
                          capture_output=True, text=True, cwd=cwd or os.getcwd(), env=dict(os.environ))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)), None)
    if proc.returncode or line is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"run {' '.join(overrides)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(line[len(PREFIX):])


def main() -> int:
    overrides = json.loads(sys.argv[1])
    sys.path.insert(0, str(REPO))  # this checkout's orchestrator, also from the IPEX venv
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    from hydra import compose, initialize_config_dir

    from orchestrator.config import register_configs
    from orchestrator.runner import run

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            res = run(cfg)
    except Exception as e:  # noqa: BLE001 - one line for the parent to show, as the CLI does
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    whole = time.perf_counter() - t0
    print(PREFIX + json.dumps({"metrics": res["metrics"], "run_dir": str(Path(res["run_dir"]).resolve()),
                               "whole_s": whole, "pid": os.getpid()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
