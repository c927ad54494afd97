"""A real `mlflow server` on loopback (sqlite backend, artifact folder): a sweep logs to it, MlflowClient reads it,
and the experiment and parent run carry what the UI's dashboard shows (the checks benchmarks/dashboard_screenshots.py
makes before it shoots the pages)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli, runs_of

pytestmark = pytest.mark.slow


def test_sweep_against_a_real_tracking_server(tmp_path, mlflow_server, tiny_encoder, sts_file):
    url, artifacts = mlflow_server.url, mlflow_server.artifacts  # the session's server, in its own folder
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "tracking=server", f"tracking.uri={url}", "tracking.experiment=server-sweep",
                   "optimization=[],[jit]", "race.processes=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = runs_of(url, "server-sweep")
    parent = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and len(children) == 2
    assert parent[0].info.status == "FINISHED" and parent[0].data.metrics["failed_jobs"] == 0
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"spearman", "throughput", "latency_p50_ms", "parity_max_abs_diff"} <= set(child.data.metrics)
        assert child.data.params["runtime.batch_size"] == "32"
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"results.json", "predictions_sample.json", "hydra"} <= names
    assert {"summary.csv", "summary.png"} <= {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    # the dashboard, read back through the server: the experiment opens on the runs view, the parent's description
    # names the outcome, and every job has its figures on the parent
    exp = client.get_experiment_by_name("server-sweep")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags, metrics = parent[0].data.tags, parent[0].data.metrics
    assert tags["mlflow.note.content"].startswith("### ") and tags["winner"]
    jobs = sorted(c.data.tags["job_num"] for c in children)
    assert all(f"job{j}_throughput" in metrics for j in jobs)
    assert any(k.startswith("job") and k.endswith("_speedup") for k in metrics), sorted(metrics)
    # artifacts went through the server into its own folder, not into the client's working directory
    assert any((Path(artifacts) / exp.experiment_id).rglob("results.json"))
    assert not (tmp_path / "mlartifacts").exists()
