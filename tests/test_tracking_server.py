"""A real `mlflow server` on loopback (sqlite backend, artifact folder): a sweep logs to it, MlflowClient reads it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "false"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url, tmp_path / "server-artifacts"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_sweep_against_a_real_tracking_server(tmp_path, mlflow_server, tiny_encoder, sts_file):
    url, artifacts = mlflow_server
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "tracking=server", f"tracking.uri={url}", "optimization=[],[jit]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("orchestrator")
    runs = client.search_runs([exp.experiment_id])
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
    # artifacts went through the server into its own folder, not into the client's working directory
    assert any(Path(artifacts).rglob("results.json"))
    assert not (tmp_path / "mlartifacts").exists()
