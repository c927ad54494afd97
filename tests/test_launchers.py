"""Sweeps through Hydra launcher plugins: parallel jobs in other processes still nest under one MLflow parent run.

joblib (loky workers) and submitit_local (subprocesses) inherit the parent run id through the environment; a job
that does not finds it through <sweep dir>/mlflow_parent_run_id (the fallback in JobContext.from_hydra).
Each test skips when its launcher plugin is not installed (`pip install -e '.[launchers]'`). SLURM and Ray run
for real in tests/test_distributed.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import CONF_DIR, mlflow_store, run_cli, runs_of, sqlite_uri
from orchestrator.sweep import parallel_warning, unpaired_note
from orchestrator.context import PARENT_RUN_ENV, JobContext
from orchestrator.records import PARENT_RUN_FILE


def parent_run_id():
    return JobContext.from_hydra().parent_run_id


def needs_plugin(module: str, install: str):
    present = importlib.util.find_spec(f"hydra_plugins.{module}") is not None
    return pytest.mark.skipif(not present, reason=f"launcher plugin not installed ({install})")


def sweep(tmp_path: Path, model: Path, data: Path, *launcher: str, fresh_store: bool = False):
    # fresh: the store is then created while the sweep starts (the first-use race parallel workers could meet)
    uri = sqlite_uri(tmp_path / "store.db") if fresh_store else mlflow_store(tmp_path / "store.db")
    proc = run_cli("-m", f"model.name_or_path={model}", f"dataset.data_files={data}", "runtime=quick",
                   # one process per raced job: these tests are about launchers, not process replicas
                   "optimization=[],[jit]", "race.processes=1", *launcher, cwd=tmp_path,
                   env={"ORCH_TRACKING_URI": uri})
    return proc, uri


def check_parent_and_children(proc, uri: str):
    """One FINISHED parent, two FINISHED children nested under it, the summary logged; returns (parent, sweep dir)."""
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    client, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2, [(r.info.run_name, r.data.tags) for r in runs]
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert sorted(c.data.tags["stack"] for c in children) == ["eager", "jit"]
    assert all(c.info.status == "FINISHED" and c.data.metrics["throughput"] > 0 for c in children)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_jobs"] == 2 and parent.data.metrics["failed_jobs"] == 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "summary.png", "summary_table.json"} <= artifacts
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    assert (sweep_dir / PARENT_RUN_FILE).read_text().strip() == parent.info.run_id
    assert len((sweep_dir / "summary.csv").read_text().splitlines()) == 3
    assert "sweep summary: 2 jobs, 0 not finished" in proc.stdout
    return parent, sweep_dir


@pytest.mark.slow
@needs_plugin("hydra_joblib_launcher", "pip install -e '.[launchers]'")
def test_joblib_parallel_jobs_nest_under_one_parent(tmp_path, tiny_encoder, sts_file):
    proc, uri = sweep(tmp_path, tiny_encoder, sts_file, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      fresh_store=True)
    parent, _ = check_parent_and_children(proc, uri)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert "n_jobs=2 jobs at once" in out and "use hydra.launcher.n_jobs=1" in out
    # the store was created once, by the callback, before the workers started (no first-use race)
    assert out.count("Creating initial MLflow database tables") <= 1


@pytest.mark.slow
@needs_plugin("hydra_submitit_launcher", "pip install -e '.[launchers]'")
def test_submitit_local_jobs_nest_under_one_parent(tmp_path, tiny_encoder, sts_file):
    proc, uri = sweep(tmp_path, tiny_encoder, sts_file, "hydra/launcher=submitit_local",
                      "hydra.launcher.timeout_min=10")
    _, sweep_dir = check_parent_and_children(proc, uri)
    assert (sweep_dir / ".submitit").is_dir()  # the jobs really went through submitit
    assert "submitit_local starts every job of the sweep at once" in proc.stdout + proc.stderr


def _hydra_cfg(tmp_path: Path, *overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_parent_run_id_falls_back_to_the_sweep_dir_file(tmp_path, monkeypatch):
    """A job without the environment variable (Ray, SLURM with --export=NONE) reads the id the callback wrote."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / PARENT_RUN_FILE).write_text("abc123\n")
    hc = HydraConfig.instance()

    def as_job(mode: RunMode) -> None:
        cfg = _hydra_cfg(tmp_path, "hydra.sweep.dir=sweep")
        cfg.hydra.runtime.cwd = str(tmp_path)  # a relative sweep dir resolves against the launching directory
        cfg.hydra.mode = mode
        hc.set_config(cfg)

    try:
        as_job(RunMode.RUN)
        assert parent_run_id() is None  # a single run never nests under a stale sweep
        as_job(RunMode.MULTIRUN)
        assert parent_run_id() == "abc123"
        monkeypatch.setenv(PARENT_RUN_ENV, "from-env")
        assert parent_run_id() == "from-env"  # the environment wins
        monkeypatch.delenv(PARENT_RUN_ENV)
        (tmp_path / "sweep" / PARENT_RUN_FILE).unlink()
        assert parent_run_id() is None
    finally:
        hc.cfg = None
    assert parent_run_id() is None  # outside Hydra (Python API, tests)


def test_parallel_launchers_warn_about_timings(tmp_path):
    def launcher(*overrides):
        return _hydra_cfg(tmp_path, *overrides).hydra.launcher

    assert parallel_warning(launcher()) is None  # the basic launcher runs jobs one after the other
    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher"):
        assert "use hydra.launcher.n_jobs=1" in parallel_warning(launcher("hydra/launcher=joblib"))  # n_jobs=-1
        assert "n_jobs=2" in parallel_warning(launcher("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"))
        assert parallel_warning(launcher("hydra/launcher=joblib", "hydra.launcher.n_jobs=1")) is None
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher"):
        assert "at once" in parallel_warning(launcher("hydra/launcher=submitit_local"))
        assert parallel_warning(launcher("hydra/launcher=submitit_slurm")) is None  # SLURM allocates the cores
    # the project's own Ray launcher (hydra_plugins/orchestrator_launcher/ray_launcher.py) composes without Ray
    assert "hydra.launcher.num_cpus=<cores per node>" in parallel_warning(launcher("hydra/launcher=ray"))


def test_launchers_that_do_not_race_say_their_speedups_are_unpaired(tmp_path):
    """Issue 28: Ray and SLURM keep one job per node; they say in one line that their speedups are unpaired."""
    assert unpaired_note(_hydra_cfg(tmp_path)) is None  # isolated, raced: the default
    off = unpaired_note(_hydra_cfg(tmp_path, "race.mode=off"))
    assert off.startswith("race.mode=off times the jobs one after another: speedups are unpaired")
    launchers = ["ray"] + (["submitit_slurm"] if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher")
                           else [])
    for name in launchers:
        note = unpaired_note(_hydra_cfg(tmp_path, f"hydra/launcher={name}"))
        assert note.startswith(f"hydra/launcher={name} times each job on its own, not raced: speedups are unpaired")
        assert "\n" not in note


def test_a_job_payload_carries_no_mlflow_client_of_the_sweep(tmp_path):
    """The isolated, Ray and SLURM launchers pickle Hydra's callbacks into each job's payload: the sweep's MLflow
    client must not travel with them (unpickling it imported MLflow's client in every job process, the race's
    extra processes that record nothing included)."""
    import subprocess
    import sys

    import cloudpickle
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import MlflowSweepCallback

    callback = MlflowSweepCallback()
    callback.client, callback.parent_id = MlflowClient(sqlite_uri(tmp_path / "m.db")), "abc"
    blob = tmp_path / "payload.pkl"
    blob.write_bytes(cloudpickle.dumps({"callbacks": [callback]}))
    code = ("import sys, cloudpickle; p = cloudpickle.loads(open(sys.argv[1], 'rb').read()); c = p['callbacks'][0]; "
            "print(c.client, c.parent_id, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["None", "abc", "False"], out.stderr[-2000:]
    assert callback.client is not None  # the sweep's own callback keeps its client
