"""Issue 19's weak spots that are covered so far: an empty experiment name, sweeps started in the same second."""
from __future__ import annotations

import subprocess
import sys

from conftest import run_cli


def test_an_empty_experiment_name_is_one_line_exit_2(tmp_path):
    proc = run_cli("tracking.experiment=", "runtime=quick", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: tracking.experiment='': must be a non-empty MLflow experiment name (tracking=off runs untracked)")
    # refused before any MLflow store or run exists (Hydra itself has made the run directory by then)
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("results.json"))


def test_two_sweeps_started_in_the_same_second_get_their_own_directories(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator", "--cfg", "hydra", "--resolve", "-p", "hydra.sweep.dir"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dirs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(d.startswith("outputs/multirun/") for d in dirs) and dirs[0] != dirs[1]


def test_help_says_what_the_tool_does_with_examples_and_where_results_land(tmp_path):
    out = run_cli("--help", cwd=tmp_path, timeout=120).stdout
    assert out.startswith("orchestrator: run a transformers model on a dataset with an optimization stack")
    assert "orchestrator -m sweep=engines experiment=sst2_minilm" in out and "Results: outputs/runs/" in out
    assert "optimization: " in out.split("== Configuration groups ==", 1)[1]  # Hydra's group list follows
