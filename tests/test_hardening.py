"""Issue 19's weak spots that are covered so far: an empty experiment name, sweeps started in the same second."""
from __future__ import annotations

import pytest

from conftest import run_cli


def test_an_empty_experiment_name_is_one_line_exit_2(compose, tmp_path):
    """In process (the CLI prints what the run raises; tests/test_configs.py runs that path end to end)."""
    from orchestrator.cli import exit_code, one_line
    from orchestrator.runner import run

    with pytest.raises(Exception) as e:
        run(compose("tracking.experiment=", "runtime=quick"))
    assert exit_code(e.value) == 2
    assert f"error: {one_line(e.value)}" == (
        "error: tracking.experiment='': must be a non-empty MLflow experiment name (tracking=off runs untracked)")
    # refused before any MLflow store or run exists
    assert not list(tmp_path.rglob("*.db")) and not list(tmp_path.rglob("results.json"))


def test_two_sweeps_started_in_the_same_second_get_their_own_directories(tmp_path):
    """The sweep directory as the CLI resolves it (Hydra's config, with its `now` resolver), twice in a row."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR
    from orchestrator.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            dirs = [str(compose(config_name="config", return_hydra_config=True).hydra.sweep.dir) for _ in range(2)]
    finally:
        GlobalHydra.instance().clear()
    assert all(d.startswith("outputs/multirun/") for d in dirs) and dirs[0] != dirs[1]


@pytest.mark.slow
def test_help_says_what_the_tool_does_with_examples_and_where_results_land(tmp_path):
    out = run_cli("--help", cwd=tmp_path, timeout=300).stdout
    assert out.startswith("orchestrator: run a transformers model on a dataset with an optimization stack")
    assert "orchestrator -m sweep=engines experiment=sst2_minilm" in out and "Results: outputs/runs/" in out
    assert "optimization: " in out.split("== Configuration groups ==", 1)[1]  # Hydra's group list follows


# -- the suite's own child processes (tests/conftest.py): green when started in the background --------------------
def test_a_child_gets_sigint_at_its_default_when_the_suite_runs_with_it_ignored(tmp_path):
    """`nohup pytest &` from a script starts the suite with SIGINT ignored; the CLI under test must still turn a
    Ctrl-C into KeyboardInterrupt, which Python does only for a process that starts with SIGINT at its default."""
    import signal
    import sys

    from conftest import finish, start_process

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = start_process([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is "
                              "signal.default_int_handler)"], cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)
    assert finish(proc, timeout=120).stdout.strip() == "True"


def test_a_child_that_outlives_its_timeout_is_killed_with_everything_it_started(tmp_path):
    """As the isolated launcher does, the child starts a grandchild in a session of its own; a timeout kills both."""
    import os
    import sys

    from conftest import finish, start_process, wait_for

    code = ("import subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            "print(g.pid, flush=True)\n"
            "time.sleep(600)\n")
    proc = start_process([sys.executable, "-c", code], cwd=tmp_path)
    grandchild = int(proc.stdout.readline())
    with pytest.raises(pytest.fail.Exception, match="did not end within 1 s"):
        finish(proc, timeout=1)
    assert proc.poll() is not None

    def gone():
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            return True
        # killed but not yet reaped by init: a zombie counts as gone
        with open(f"/proc/{grandchild}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")

    wait_for(gone, "the grandchild to be killed", 30)
