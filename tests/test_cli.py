"""The CLI as a user runs it: the offline default, a multirun sweep with its parent run and summary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import mlflow_store, run_cli, run_tool, runs_of, sqlite_uri
from orchestrator import importer
from orchestrator.summary import report_main

pytestmark = pytest.mark.slow


def test_default_run_offline(tmp_path):
    """`orchestrator` with no arguments: real MiniLM, embedded smoke set, one MLflow run in outputs/mlflow.db."""
    proc = run_cli(cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "spearman" in proc.stdout and "[FINISHED]" in proc.stdout
    client, runs = runs_of(sqlite_uri(tmp_path / "outputs" / "mlflow.db"))
    assert len(runs) == 1
    m = runs[0].data.metrics
    assert runs[0].info.status == "FINISHED"
    assert m["examples"] == 150 and 60 < m["spearman"] < 95  # a sanity band, not a benchmark
    assert m["parity_agreement"] == 1.0 and m["throughput"] > 0
    results = next(tmp_path.glob("outputs/runs/*/*/results.json"))
    assert json.loads(results.read_text())["run_id"] == runs[0].info.run_id


def test_sweep_creates_parent_children_and_summary(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "store.db")
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "optimization=[],[jit]", "dataset.max_samples=12,0",
                   "race.processes=1",  # the sweep's records are under test, not a job's process replicas
                   cwd=tmp_path, env={"ORCH_TRACKING_URI": uri})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "job 1 failed: dataset.max_samples=0: must be >= 1" in proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: 2 sweep job(s) did not finish; see the summary above"
    client, runs = runs_of(uri)
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    # max_samples=0 is refused by the config alone: those two jobs have no MLflow run, the summary counts them
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    statuses = sorted((c.data.tags["stack"], c.data.params["dataset.max_samples"], c.info.status) for c in children)
    assert statuses == [("eager", "12", "FINISHED"), ("jit", "12", "FINISHED")]
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["n_jobs"] == 4 and parent.data.metrics["failed_jobs"] == 2
    assert "optimization=[],[jit]" in parent.data.tags["sweep.overrides"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "summary.png", "summary_table.json"} <= artifacts
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    csv = (sweep_dir / "summary.csv").read_text().splitlines()
    header = csv[0].split(",")
    # the swept key besides stack and precision gets its own column
    assert len(csv) == 5 and header[:6] == ["job", "stack", "precision", "dataset.max_samples", "metric", "value"]
    assert {"throughput", "speedup", "speedup_ci_low", "speedup_ci_high", "gate", "agreement_vs_baseline"} <= set(header)

    # the report and the import of this sweep, in process (both tools run through their console scripts in
    # tests/test_tracking_faults.py)
    report = run_tool(report_main, parent.info.run_id, "--tracking-uri", uri)
    assert report.returncode == 0, report.stderr
    assert "4 jobs, 2 not finished" in report.stdout and "FAILED" in report.stdout
    # importing the sweep adds nothing: the refused jobs are meant to have no MLflow run
    imported = run_tool(importer.main, str(sweep_dir), "--tracking-uri", uri)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.count("refused by its config before any run") == 2
    assert len(runs_of(uri)[1]) == 3


@pytest.mark.slow  # four LoadGen runs, the server's with its max-QPS search: ~2 min on 2 cores
def test_sweep_preset_expands_into_jobs(tmp_path, tiny_encoder, sts_file):
    """sweep=scenario (conf/sweep/scenario.yaml since 73f96bd): one job per MLPerf LoadGen scenario."""
    uri = mlflow_store(tmp_path / "store.db")
    proc = run_cli("-m", "sweep=scenario", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}",
                   "dataset.max_samples=12", "runtime.warmup=0", "runtime.min_iterations=1",
                   "runtime.min_duration_s=0", "hydra/launcher=basic",
                   # every scenario's option: short LoadGen runs (the expansion is under test, not the figures)
                   "++scenario.min_duration_s=0.2", "++scenario.warmup_batches=1",
                   # and each LoadGen run cut at 2 s (then INVALID): under load the server's search would otherwise
                   # spend its whole budget descending to rates where a run takes minutes
                   "++scenario.max_duration_s=2",
                   cwd=tmp_path, env={"ORCH_TRACKING_URI": uri})
    _, runs = runs_of(uri)
    children = {c.data.params["scenario.name"]: c for c in runs if c.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == ["multi_stream", "offline", "server", "single_stream"], proc.stderr[-2000:]
    # every job measured its scenario; on a busy machine LoadGen may find a run not VALID: a measured failure
    # (FAILED, its reason starting with the scenario), never a crash
    for s, c in children.items():
        assert c.info.status == "FINISHED" or c.data.tags.get("error", "").startswith(f"scenario={s}: "), \
            (s, c.data.tags.get("error"))
    # the server's max-QPS search can find no VALID rate on a busy machine: a measured failure, exit 1
    failed = [s for s, c in children.items() if c.info.status != "FINISHED"]
    if not failed:
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        assert all("VALID" in children[s].data.tags.get("error", "") or "INVALID" in children[s].data.tags.get(
            "error", "") or children[s].data.tags.get("error", "").startswith(f"scenario={s}: ") for s in failed)
        assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == (
            f"error: {len(failed)} sweep job(s) did not finish; see the summary above")


def test_sweep_stopped_by_its_launcher_leaves_no_running_parent(tmp_path, tiny_encoder, sts_file):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    uri = mlflow_store(tmp_path / "store.db")
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "optimization=[],[jit]", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0", cwd=tmp_path,
                   env={"ORCH_TRACKING_URI": uri})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: ValueError: n_jobs == 0 in Parallel has no meaning"
    _, runs = runs_of(uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"].startswith("the sweep stopped before its end")
