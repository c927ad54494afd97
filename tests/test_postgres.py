"""MLflow on a PostgreSQL backend store: a throwaway server on loopback, a 2-job sweep, the runs read back.

PostgreSQL comes from Debian's packages (`bash .ci/postgres`); the test runs its own cluster in a temporary directory,
as the `postgres` user when run as root (the server refuses root), on 127.0.0.1 and a free port, and removes it.
It skips with the reason when the binaries or the driver are absent or the server cannot start. The driver is psycopg 3
(`psycopg[binary]`): SQLAlchemy 2.1, which MLflow uses, maps a plain postgresql:// URI to it, no longer to psycopg2.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import free_port, run_cli

pytestmark = pytest.mark.slow


def pg_bindir() -> Optional[Path]:
    """$ORCH_PG_BINDIR, else the newest Debian /usr/lib/postgresql/<v>/bin, else initdb on PATH."""
    candidates = [os.environ.get("ORCH_PG_BINDIR", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    candidates.append(str(Path(shutil.which("initdb")).parent) if shutil.which("initdb") else "")
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "postgres").is_file():
            return Path(c)
    return None


@pytest.fixture()
def postgres_uri():
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not found: install Debian's postgresql "
                    "(bash .ci/postgres) or set ORCH_PG_BINDIR")
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install 'psycopg[binary]'); "
                                                    "MLflow (SQLAlchemy 2.1) needs it for postgresql:// URIs")
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the PostgreSQL server as")
    base = Path(tempfile.mkdtemp(prefix="orch-pg-"))  # not tmp_path: the postgres user cannot enter pytest's 0700 dirs
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user is not None else {}
    data, log_path = base / "data", base / "postgres.log"
    proc = None
    try:
        init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                               "-E", "UTF8", "--locale=C"], capture_output=True, text=True, timeout=120, **as_user)
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
        port = free_port()
        log = open(log_path, "w")
        proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                                 "-k", str(base)], stdout=log, stderr=subprocess.STDOUT, **as_user)
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                pytest.skip(f"PostgreSQL did not start: {log_path.read_text().strip().splitlines()[-1:]}")
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                       connect_timeout=2, autocommit=True)
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    pytest.skip(f"PostgreSQL did not accept connections within 60 s: "
                                f"{log_path.read_text().strip().splitlines()[-1:]}")
                time.sleep(0.5)
        with conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, stop cleanly
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_sweep_on_a_postgresql_store(tmp_path, postgres_uri, tiny_encoder, sts_file):
    from mlflow.tracking import MlflowClient

    artifacts = tmp_path / "artifacts"
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "optimization=[],[jit]", f"tracking.artifact_location={artifacts.as_uri()}",
                   "hydra/launcher=basic",  # the store is under test here; isolation is tested with sqlite/server
                   cwd=tmp_path,
                   env={"ORCH_TRACKING_URI": postgres_uri})
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    client = MlflowClient(postgres_uri)
    exp = client.get_experiment_by_name("orchestrator")
    assert exp is not None and exp.artifact_location == artifacts.as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_jobs"] == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert sorted(c.data.tags["stack"] for c in children) == ["eager", "jit"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"spearman", "throughput", "latency_p50_ms", "parity_max_abs_diff"} <= set(child.data.metrics)
        assert child.data.params["runtime.batch_size"] == "32"
        assert "results.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"summary.csv", "summary_table.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert any(artifacts.rglob("results.json"))

    report = run_cli(parent.info.run_id, "--tracking-uri", postgres_uri, cwd=tmp_path, tool="orchestrator-report",
                     timeout=300)
    assert report.returncode == 0, report.stderr
    assert "2 jobs, 0 not finished" in report.stdout
