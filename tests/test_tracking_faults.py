"""Tracking faults as a user meets them (issues 18 and 19): a bad store, a server that dies mid-sweep, a job killed
with -9, a sweep stopped with two Ctrl-C; orchestrator-import and the reconciliation of runs left RUNNING.

Real MLflow throughout: sqlite stores, and a real ``mlflow server`` on 127.0.0.1 where a server is needed.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import (MlflowServer, finish, measuring, mlflow_store, run_cli, run_tool, runs_of, sqlite_uri,
                      start_cli, tiny_sts_overrides, wait_for)
from orchestrator import importer

pytestmark = pytest.mark.slow

# a job that runs until it is stopped: its accuracy pass is logged within seconds, its timing pass never ends
ENDLESS = ["runtime.min_duration_s=600", "runtime.max_iterations=null"]


def import_cli(*args: str, cwd: Path):
    return run_cli(*args, cwd=cwd, tool="orchestrator-import", timeout=300)


def report_cli(*args: str, cwd: Path):
    return run_cli(*args, cwd=cwd, tool="orchestrator-report", timeout=300)


def first_err(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("W1", "I1"))]
    return lines[0] if lines else ""


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- a store that cannot take a run -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untracked_run(tmp_path_factory, tiny_encoder, sts_file):
    """One run whose sqlite store is a directory: it measures, goes untracked and exits 1 (shared by the tests of
    that exit and of orchestrator-import, which puts it into MLflow afterwards)."""
    tmp = tmp_path_factory.mktemp("untracked")
    store = tmp / "store"
    store.mkdir()
    uri = sqlite_uri(store)
    proc = run_cli(*tiny_sts_overrides(tiny_encoder, sts_file, uri), cwd=tmp, timeout=300)
    return tmp, store, uri, proc


def test_a_store_that_is_a_directory_costs_no_retries_the_run_goes_untracked_exit_1(untracked_run):
    tmp_path, store, uri, proc = untracked_run
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert first_err(proc).startswith(f"error: MLflow tracking failed (start: tracking.uri={uri}: {store} is a "
                                      "directory; the sqlite store must be a file (e.g. sqlite:///")
    assert "Traceback" not in proc.stdout + proc.stderr
    results = json.loads(next(tmp_path.glob("outputs/runs/*/*/results.json")).read_text())
    assert results["status"] == "FINISHED" and "spearman" in results["metrics"]


def test_a_full_disk_is_refused_up_front_and_no_run_is_left_running(tmp_path, tiny_encoder, sts_file, compose):
    """In process: the run's record says what the CLI's error line prints (the line itself: the directory-store
    test below runs the CLI)."""
    from orchestrator.runner import run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # more free space than any disk has: what a full disk looks like to the check
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, uri), "tracking.min_free_mb=1e12"))
    assert results["status"] == "FINISHED" and "spearman" in results["metrics"]  # measured, untracked
    error = results["tracking_error"]
    assert error.startswith(f"start: tracking.uri={uri}: only ") and \
        "tracking.min_free_mb=1e+12 (a full disk leaves runs RUNNING)" in error, error
    assert not (tmp_path / "mlflow.db").exists()  # MLflow was never asked: no store, no RUNNING run


def test_http_bounds_are_config_options_checked_in_one_line(cli_error):
    assert cli_error("tracking.http_max_retries=50", "runtime=quick") == (
        "error: tracking.http_max_retries=50: must be 0-10", 2)


def test_import_puts_an_untracked_run_into_mlflow_once(untracked_run):
    tmp_path, _, _, proc = untracked_run
    assert proc.returncode == 1
    run_dir = next(tmp_path.glob("outputs/runs/*/*"))
    uri = sqlite_uri(tmp_path / "later.db")
    first = import_cli(str(run_dir), "--tracking-uri", uri, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert ": created, +" in first.stdout
    client, runs = runs_of(uri)
    assert len(runs) == 1
    run = runs[0]
    results = json.loads((run_dir / "results.json").read_text())
    # another store than the run's own: the run's folder is left as it was (no run id for a store it never saw)
    assert run.info.status == "FINISHED" and results["run_id"] is None
    assert set(results["metrics"]) <= set(run.data.metrics) and "spearman" in run.data.metrics
    assert run.data.params["runtime.batch_size"] == "32" and run.data.tags["stack"] == "eager"
    assert run.data.tags["process.pid"] and run.data.tags["run_dir"] == str(run_dir.resolve())
    assert {"results.json", "decisions.json", "hydra"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    second = run_tool(importer.main, str(run_dir), "--tracking-uri", uri)  # the store's answer, in process
    assert second.returncode == 0 and "nothing to add" in second.stdout
    _, again = runs_of(uri)
    assert len(again) == 1 and again[0].data.metrics == run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "spearman")) == 1


def test_import_of_something_else_is_one_line_exit_2(tmp_path):
    proc = import_cli(str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert first_err(proc).startswith(f"error: {tmp_path}: neither a run directory (with results.json) nor a sweep")


# -- a tracking server that dies mid-sweep ------------------------------------------------------------------------
def test_a_server_killed_mid_sweep_costs_no_results_and_import_completes_the_sweep(tmp_path, tiny_encoder,
                                                                                   sts_file):
    server = MlflowServer(tmp_path).start()
    url = server.url
    sweep_dir = tmp_path / "sweep"
    store = server.store  # the server's own store, read directly while it is down
    try:
        proc = start_cli("-m", f"model.name_or_path={tiny_encoder}", "dataset.path=csv",
                         f"dataset.data_files={sts_file}", "runtime=quick", "tracking=server", f"tracking.uri={url}",
                         f"hydra.sweep.dir={sweep_dir}", "runtime.max_iterations=null",
                         "runtime.min_duration_s=0,1,0",
                         # job 1 stays RUNNING while job 2 prepares and through the race's rounds (the window to
                         # kill the server in: job 2's preparation + 6 x 1 s: rounds of runtime.min_duration_s); the
                         # race itself is tests/test_race.py's
                         "race.processes=1", "race.max_rounds=6", "race.round_s=null",
                         # a refused connection is not retried (the bounds themselves are tested above)
                         "tracking.http_max_retries=0", cwd=tmp_path)
        wait_for(lambda: measuring(store, "1"), "job 1 to measure")
        server.kill()  # -9, mid-job
        done = finish(proc, timeout=600)
    finally:
        server.kill()
    out, err = done.stdout, done.stderr
    assert done.returncode == 1, out[-6000:] + err[-3000:]
    assert "Traceback" not in out + err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")][0].startswith("error: MLflow tracking failed (")
    assert f"orchestrator-import {sweep_dir} puts the sweep into MLflow" in err
    # every job measured everything; the summary comes from their results.json, all FINISHED
    for job in "012":
        res = json.loads((sweep_dir / job / "results.json").read_text())
        assert res["status"] == "FINISHED" and "throughput" in res["metrics"]
    assert "3 jobs, 0 not finished" in out
    _, runs = runs_of(store)
    assert [r.info.status for r in runs if r.data.tags.get("job_num") == "1"] == ["RUNNING"]  # stranded

    server.start()  # the same store, the same port
    try:
        first = import_cli(str(sweep_dir), cwd=tmp_path)  # tracking.uri from the jobs' own config
        assert first.returncode == 0, first.stderr[-2000:]
        assert "job 1: run " in first.stdout and "RUNNING -> FINISHED" in first.stdout
        client, runs = runs_of(url)
        parent = next(r for r in runs if r.data.tags.get("sweep") == "true")
        jobs = {r.data.tags["job_num"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert sorted(jobs) == ["0", "1", "2"]
        assert all(r.info.status == "FINISHED" and "throughput" in r.data.metrics for r in jobs.values())
        assert parent.info.status == "FINISHED" and parent.data.metrics["n_jobs"] == 3
        second = run_tool(importer.main, str(sweep_dir))  # the store's answer, in process
        assert second.returncode == 0 and "created" not in second.stdout and " +" not in second.stdout
        assert len(runs_of(url)[1]) == len(runs)
    finally:
        server.kill()


# -- a job killed with -9; runs left RUNNING by dead processes -----------------------------------------------------
def test_a_job_killed_with_sigkill_ends_killed_in_mlflow_and_results_json(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "mlflow.db")  # the store exists first: polling a sqlite file mid-creation races
    sweep_dir = tmp_path / "sweep"
    proc = start_cli("-m", *tiny_sts_overrides(tiny_encoder, sts_file, uri), f"hydra.sweep.dir={sweep_dir}",
                     "runtime.max_iterations=null", "runtime.min_duration_s=600,0", "race.mode=off", cwd=tmp_path)
    run = wait_for(lambda: measuring(uri, "0"), "job 0 to measure")
    pid = int(run.data.tags["process.pid"])
    os.kill(pid, signal.SIGKILL)
    done = finish(proc, timeout=600)
    out, err = done.stdout, done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "Traceback" not in out + err
    client, runs = runs_of(uri)
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["error"] == f"killed by signal SIGKILL (process {pid})"
    res = json.loads((sweep_dir / "0" / "results.json").read_text())
    assert res["status"] == "KILLED" and res["error"] == killed.data.tags["error"] and "spearman" in res["metrics"]
    assert not [r for r in runs if r.info.status == "RUNNING"]  # job 1 and the parent ended too
    assert "2 jobs, 1 not finished" in out


def test_report_and_resume_close_runs_whose_process_died(tmp_path, tiny_encoder, sts_file, compose, caplog):
    uri = mlflow_store(tmp_path / "mlflow.db")
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *tiny_sts_overrides(tiny_encoder, sts_file, uri), "runtime.max_iterations=null", "race.processes=1"]
    proc = start_cli(*args, f"hydra.sweep.dir={sweep_dir}", "runtime.min_duration_s=600", "race.round_s=null",
                     cwd=tmp_path)
    run = wait_for(lambda: measuring(uri, "0"), "job 0 to measure")
    job_pid = int(run.data.tags["process.pid"])
    proc.kill()  # the sweep process and its job, -9: nothing is left to close their runs
    os.kill(job_pid, signal.SIGKILL)
    finish(proc, timeout=60)
    wait_for(lambda: pid_gone(job_pid), "the job process to go", 30)
    _, runs = runs_of(uri)
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]  # the zombies

    report = report_cli(str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "was RUNNING but process" in report.stdout + report.stderr and "marked KILLED" in report.stderr
    _, runs = runs_of(uri)
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    assert all(r.data.tags["reconciled"].startswith("orchestrator-report: process ") for r in runs)

    # a single run killed the same way: resume=true closes it before measuring the config again
    single = start_cli(*tiny_sts_overrides(tiny_encoder, sts_file, uri), *ENDLESS, cwd=tmp_path)
    zombie = wait_for(lambda: measuring(uri), "the run to measure")
    single.kill()
    finish(single, timeout=60)
    # the run that closes it, in process (what is under test is the store's record, not the CLI's output)
    from orchestrator.errors import RunInterrupted
    from orchestrator.runner import run

    with caplog.at_level("INFO"), pytest.raises(RunInterrupted):
        run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, uri), "runtime.min_duration_s=600",
                    "runtime.max_iterations=null", "resume=true", "runtime.timeout_s=1"))
    assert f"resume: MLflow run {zombie.info.run_id}" in caplog.text
    client, _ = runs_of(uri)
    closed = client.get_run(zombie.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["error"].startswith(
        f"process {zombie.data.tags['process.pid']} on ")


# -- two Ctrl-C ----------------------------------------------------------------------------------------------------
def test_two_ctrl_c_stop_the_sweep_with_one_line_and_a_partial_summary(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "mlflow.db")
    sweep_dir = tmp_path / "sweep"
    proc = start_cli("-m", *tiny_sts_overrides(tiny_encoder, sts_file, uri), f"hydra.sweep.dir={sweep_dir}",
                     "runtime.max_iterations=null", "runtime.min_duration_s=0,600,0", "race.mode=off", cwd=tmp_path)
    wait_for(lambda: measuring(uri, "1"), "job 1 to measure")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    done = finish(proc, timeout=300)
    out, err = done.stdout, done.stderr
    assert done.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-4000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: sweep stopped (Ctrl-C) after 2 job(s), summarized above; the same command with resume=true runs "
        "the rest"]
    assert "sweep summary: 2 jobs, 1 not finished" in out
    assert (sweep_dir / "summary.csv").is_file() and not (sweep_dir / "2").exists()
    _, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("sweep") == "true")
    assert parent.info.status == "KILLED" and parent.data.tags["error"] == "the sweep was stopped (Ctrl-C)"
    assert sorted(r.info.status for r in runs if r is not parent) == ["FINISHED", "KILLED"]


def test_ctrl_c_of_a_single_run_is_one_line_exit_130_and_the_run_ends_killed(tmp_path, tiny_encoder, sts_file):
    uri = mlflow_store(tmp_path / "mlflow.db")
    proc = start_cli(*tiny_sts_overrides(tiny_encoder, sts_file, uri), *ENDLESS, cwd=tmp_path)
    run = wait_for(lambda: measuring(uri), "the run to measure")
    proc.send_signal(signal.SIGINT)
    done = finish(proc, timeout=300)
    out, err = done.stdout, done.stderr
    assert done.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-4000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: interrupted (Ctrl-C); a run under way ends KILLED with what it measured"]
    client, _ = runs_of(uri)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
