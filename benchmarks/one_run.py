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


def run_here(overrides: List[str]) -> Dict:
    """Compose ``overrides`` on this checkout's conf/ and run it in this process; the same result dict.

    The feature cache is cleared first, so the run tokenizes like a fresh process would (what ``--in-process``
    benchmark modes rely on; in a fresh process it is empty anyway).
    """
    sys.path.insert(0, str(REPO))  # this checkout's orchestrator, also from the IPEX venv
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator import feature_cache
    from orchestrator.config import register_configs
    from orchestrator.runner import run

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    feature_cache.clear()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        res = run(cfg)
    return {"metrics": res["metrics"], "run_dir": str(Path(res["run_dir"]).resolve()),
            "whole_s": time.perf_counter() - t0, "pid": os.getpid()}


def main() -> int:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    try:
        res = run_here(json.loads(sys.argv[1]))
    except Exception as e:  # noqa: BLE001 - one line for the parent to show, as the CLI does
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(PREFIX + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
