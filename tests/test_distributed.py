"""Sweeps beyond one process tree, for real: a live SLURM cluster (submitit_slurm) and Ray (a local cluster and a
private instance), each logging to a real `mlflow server`.

SLURM: `bash .ci/slurm` (root, Debian) brings up a single-node cluster with accounting on loopback; without it the
SLURM tests skip. Ray: `pip install -e '.[ray]'` (in the `test` extra); every Ray process these tests start must
listen on loopback only — a guard polls `ss -ltnp` and kills them at once (by pid) if one does not.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import List, Optional

import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port, kill_tree, run_cli, start_cli, start_process

pytestmark = pytest.mark.slow

LOOPBACK = ("127.", "[::1]", "[::ffff:127.", "::1")


# -- a real tracking server (the session's) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server.url  # the session's (tests/conftest.py); each test here logs to an experiment of its own


def start_sweep(tmp_path: Path, *args: str, env: Optional[dict] = None) -> subprocess.Popen:
    out, err = open(tmp_path / "sweep.out", "w"), open(tmp_path / "sweep.err", "w")
    with out, err:  # the child has its own copies
        return start_cli("-m", *args, cwd=tmp_path, env=env, stdout=out, stderr=err)


def finish_sweep(proc: subprocess.Popen, tmp_path: Path, timeout: float) -> "tuple[int, str, str]":
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"the sweep hung (> {timeout:.0f} s): {(tmp_path / 'sweep.err').read_text()[-3000:]}")
    return proc.returncode, (tmp_path / "sweep.out").read_text(), (tmp_path / "sweep.err").read_text()


def sweep_picture(url: str, experiment: str):
    """(client, parent, children) of the newest sweep in the experiment."""
    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("sweep") == "true")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, sorted(children, key=lambda r: int(r.data.tags["job_num"]))


def check_where_it_ran(child) -> None:
    tags = child.data.tags
    assert tags["host"] == platform.node()
    assert tags["cpu.model"] and "cpu.isa.avx2" in tags
    assert tags["process.isolated"] == "true" and "process_startup_s" in child.data.metrics


def summary_rows(sweep_dir: Path) -> List[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# -- SLURM ------------------------------------------------------------------------------------------------------
def slurm_state() -> Optional[str]:
    """None when a SLURM node answers; otherwise why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (sinfo not found): `bash .ci/slurm` installs and starts a loopback cluster (root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s: start the cluster with `bash .ci/slurm`"
    if out.returncode != 0 or not any(s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split()):
        return f"no usable SLURM node ({(out.stdout + out.stderr).strip()[:200]}): `bash .ci/slurm`"
    return None


needs_slurm = pytest.mark.skipif(slurm_state() is not None, reason=str(slurm_state()))


def slurm_args(model: Path, data: Path, url: str, *extra: str) -> List[str]:
    # job 0 is quick; job 1's timing pass lasts 12 s, long enough to be cancelled in the middle of it
    return [f"model.name_or_path={model}", f"dataset.data_files={data}", "runtime=quick", "runtime.repeats=1",
            "runtime.max_iterations=null", "runtime.min_duration_s=0,12", "tracking=server", f"tracking.uri={url}",
            "tracking.experiment=slurm", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=5", *extra]


@pytest.fixture(scope="module")
def slurm_cancelled(tmp_path_factory, server, tiny_encoder, sts_file):
    """A 2-job SLURM sweep whose job 1 is cancelled with scancel while it measures."""
    tmp = tmp_path_factory.mktemp("slurm")
    proc = start_sweep(tmp, *slurm_args(tiny_encoder, sts_file, server))
    client = MlflowClient(server)
    cancelled, cancelled_at = None, None
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        exp = client.get_experiment_by_name("slurm")
        runs = client.search_runs([exp.experiment_id], "tags.job_num = '1'") if exp else []
        # its accuracy pass logged: in its 12 s timing pass, inside the run's SIGTERM handling (a cancel that
        # landed right after the model load once ran into submitit's own handler, under load 8, and was ignored)
        if runs and "spearman" in runs[0].data.metrics:
            cancelled = f"{runs[0].data.tags['slurm.array_job_id']}_{runs[0].data.tags['slurm.array_task_id']}"
            subprocess.run(["scancel", cancelled], check=True)
            cancelled_at = time.time()
            break
        time.sleep(0.5)
    rc, out, err = finish_sweep(proc, tmp, timeout=180)
    assert cancelled, f"job 1 never started measuring: {err[-3000:]}"
    return {"dir": tmp, "rc": rc, "out": out, "err": err, "cancelled": cancelled, "cancelled_at": cancelled_at}


@needs_slurm
def test_slurm_jobs_are_array_tasks_nested_under_the_parent(server, slurm_cancelled):
    _, parent, children = sweep_picture(server, "slurm")
    assert len(children) == 2, slurm_cancelled["err"][-3000:]
    assert [c.data.tags["job_num"] for c in children] == ["0", "1"]
    # one sbatch array, one task per job, each job in a fresh process of its own on the node SLURM chose
    assert {c.data.tags["slurm.array_job_id"] for c in children} == {slurm_cancelled["cancelled"].split("_")[0]}
    assert [c.data.tags["slurm.array_task_id"] for c in children] == ["0", "1"]
    assert all(c.data.tags["slurm.node"] and c.data.tags["slurm.job_id"] for c in children)
    for c in children:
        check_where_it_ran(c)
    assert children[0].info.status == "FINISHED" and children[0].data.metrics["throughput"] > 0
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                            slurm_cancelled["cancelled"].split("_")[0]], capture_output=True, text=True).stdout
    assert "_0|COMPLETED" in sacct and "_1|CANCELLED" in sacct, sacct


@needs_slurm
def test_slurm_cancelled_job_ends_killed_in_mlflow_and_the_summary(server, slurm_cancelled):
    client, parent, children = sweep_picture(server, "slurm")
    killed = children[1]
    assert killed.info.status == "KILLED" and "SIGTERM" in killed.data.tags["error"], (
        f"{killed.info.status} {(killed.info.end_time or 0) / 1000 - slurm_cancelled['cancelled_at']:.2f} s after "
        f"scancel: {killed.data.tags.get('error')}")
    assert "model_load_s" in killed.data.metrics  # what it measured before the signal is kept
    # no hang, the summary is written and the exit code says a job did not finish
    assert slurm_cancelled["rc"] == 1
    assert "1 sweep job(s) did not finish" in slurm_cancelled["err"]
    assert "sweep summary: 2 jobs, 1 not finished" in slurm_cancelled["out"]
    assert parent.info.status == "FAILED" and parent.data.metrics["failed_jobs"] == 1
    assert {"summary.csv", "summary_table.json", "summary.md"} <= {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    rows = summary_rows(Path(parent.data.tags["sweep.dir"]))
    assert [r["status"] for r in rows] == ["FINISHED", "KILLED"]


@needs_slurm
def test_slurm_resume_reruns_only_the_cancelled_job(server, slurm_cancelled, tiny_encoder, sts_file, tmp_path):
    proc = start_sweep(tmp_path, *slurm_args(tiny_encoder, sts_file, server, "resume=true"))
    rc, out, err = finish_sweep(proc, tmp_path, timeout=240)
    assert rc == 0, err[-3000:]
    _, parent, children = sweep_picture(server, "slurm")
    # only job 1 ran (a new run under the new parent); job 0 reused its FINISHED run from the first sweep
    assert [c.data.tags["job_num"] for c in children] == ["1"] and children[0].info.status == "FINISHED"
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    first = json.loads((sweep_dir / "0" / "results.json").read_text())
    assert first["resumed_from"] and first["resumed_from"] != children[0].info.run_id
    assert "resumed_from" not in json.loads((sweep_dir / "1" / "results.json").read_text())
    assert "sweep summary: 2 jobs, 0 not finished" in out
    assert [r["status"] for r in summary_rows(sweep_dir)] == ["FINISHED", "FINISHED"]


def test_a_job_the_cluster_lost_is_recorded_and_summarised(server, tmp_path, monkeypatch):
    """The path for a job that never returns (cancelled while pending, killed after KillWait, a Ray worker or node
    gone): the launching process ends its RUNNING child run, or creates one if the job never started, and writes
    its results.json, so the summary counts it and the sweep exits 1."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from conftest import CONF_DIR
    from hydra_plugins.orchestrator_launcher import _remote
    from orchestrator.config import register_configs
    from orchestrator.summary import summarize_sweep
    from orchestrator.context import PARENT_RUN_ENV

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True,
                          overrides=["tracking=server", f"tracking.uri={server}", "tracking.experiment=lost",
                                     f"hydra.sweep.dir={tmp_path / 'sweep'}", "optimization=[jit]"])
    finally:
        GlobalHydra.instance().clear()
    client = MlflowClient(server)
    exp_id = client.create_experiment("lost")
    parent = client.create_run(exp_id, run_name="sweep-lost", tags={"sweep": "true"}).info.run_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent)
    # job 0 started its run and was killed hard; job 1 never started
    running = client.create_run(exp_id, tags={"mlflow.parentRunId": parent, "job_num": "0"}).info.run_id
    for idx, reason in ((0, "its process ended (signal SIGKILL) before the job returned"),
                        (1, "SLURM job 7_1 ended CANCELLED by 0 before the job returned")):
        with open_dict(cfg):
            cfg.hydra.job.num = idx
        ret = _remote.record_lost_job(cfg, idx, ["optimization=[jit]"], _remote.lost_status(reason.split()[4])
                                      if idx else "FAILED", reason)
        assert ret.return_value["status"] in ("FAILED", "KILLED")
    assert client.get_run(running).info.status == "FAILED"
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and tags.job_num = '1'")
    assert len(children) == 1 and children[0].info.status == "KILLED"
    assert children[0].data.tags["stack"] == "jit" and "CANCELLED" in children[0].data.tags["error"]
    assert json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())["status"] == "KILLED"
    summary = summarize_sweep(client, parent, tmp_path / "sweep")
    assert summary["failed"] == 2 and [r["status"] for r in summary["rows"]] == ["FAILED", "KILLED"]
    assert client.get_run(parent).info.status == "FAILED"


# -- Ray --------------------------------------------------------------------------------------------------------
def _listeners() -> List["tuple[str, set]"]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        pids = {int(p) for p in __import__("re").findall(r"pid=(\d+)", line)}
        rows.append((parts[3], pids))
    return rows


class LoopbackGuard:
    """Polls `ss -ltnp` while Ray runs: any socket of `root` or its descendants listening beyond loopback kills
    them all (by pid) at once and fails the test afterwards."""

    def __init__(self, root_pid: int):
        import psutil

        self.root = psutil.Process(root_pid)
        self.violation: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self):
        import psutil

        try:
            return [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def check(self) -> None:
        tree = self._tree()
        pids = {p.pid for p in tree}
        for address, owners in _listeners():
            if owners & pids and not address.startswith(LOOPBACK):
                self.violation = f"{address} (pids {sorted(owners & pids)})"
                for p in tree:
                    try:
                        p.kill()
                    except Exception:
                        pass
                return

    def _run(self) -> None:
        while not self._stop.is_set() and self.violation is None:
            self.check()
            self._stop.wait(0.5)

    def __enter__(self) -> "LoopbackGuard":
        self.check()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        assert self.violation is None, f"a Ray process listened beyond loopback: {self.violation}; Ray stopped"


def ray_missing() -> Optional[str]:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[ray]')"
    if shutil.which("ss") is None:
        return "ss (iproute2) is missing: Ray's listeners could not be checked"
    return None


needs_ray = pytest.mark.skipif(ray_missing() is not None, reason=str(ray_missing()))
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block` on 127.0.0.1 (single-node mode) with token authentication (its own token, as a
    user's cluster would have; the sweep gets RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH); stopped at the end: SIGTERM to
    `ray start` (it stops what it started), its process group killed only if that does not end it."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    token = Path(temp) / "auth_token"
    token.write_text(uuid.uuid4().hex)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    log = open(Path(temp) / "head.log", "w")
    proc = start_process(["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                          "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                         cwd=Path(temp), env={**os.environ, **RAY_ENV, **auth}, stdout=log, stderr=subprocess.STDOUT)
    try:
        guard = LoopbackGuard(proc.pid)
        deadline = time.time() + 90
        while True:
            guard.check()
            assert guard.violation is None, f"Ray listened beyond loopback: {guard.violation}; Ray stopped"
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {(Path(temp) / 'head.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the Ray head did not listen within 90 s")
                time.sleep(0.5)
        time.sleep(2)  # the raylet registers after the GCS listens
        yield f"127.0.0.1:{port}", proc.pid, auth
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops what it started (~2 s)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def ray_args(model: Path, data: Path, url: str, experiment: str, *extra: str) -> List[str]:
    return [f"model.name_or_path={model}", f"dataset.data_files={data}", "runtime=quick", "optimization=[],[jit]",
            "tracking=server", f"tracking.uri={url}", f"tracking.experiment={experiment}", "hydra/launcher=ray",
            *extra]


def check_ray_picture(url: str, experiment: str, out: str, rc: int, err: str) -> None:
    assert rc == 0, err[-3000:]
    client, parent, children = sweep_picture(url, experiment)
    assert len(children) == 2 and sorted(c.data.tags["stack"] for c in children) == ["eager", "jit"]
    for c in children:
        assert c.info.status == "FINISHED" and c.data.metrics["throughput"] > 0
        assert c.data.tags["ray.node_id"] and c.data.tags["ray.task_id"]
        check_where_it_ran(c)
    assert len({c.data.tags["process.pid"] for c in children}) == 2
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_jobs"] == 2
    assert parent.data.metrics["failed_jobs"] == 0
    assert {"summary.csv", "summary.png", "summary_table.json"} <= {a.path for a in client.list_artifacts(
        parent.info.run_id)}
    assert "sweep summary: 2 jobs, 0 not finished" in out
    assert len(summary_rows(Path(parent.data.tags["sweep.dir"]))) == 2


@needs_ray
def test_ray_sweep_on_a_local_cluster(server, ray_cluster, tiny_encoder, sts_file, tmp_path):
    address, head_pid, auth = ray_cluster
    proc = start_sweep(tmp_path, *ray_args(tiny_encoder, sts_file, server, "ray-cluster",
                                           f"hydra.launcher.address={address}"), env=auth)
    with LoopbackGuard(head_pid):  # the workers of this sweep are the head's descendants
        rc, out, err = finish_sweep(proc, tmp_path, timeout=300)
    assert f"jobs run on the Ray cluster at {address}" in out + err
    check_ray_picture(server, "ray-cluster", out, rc, err)


@needs_ray
def test_ray_sweep_on_a_private_instance(mlflow_server, tiny_encoder, sts_file, tmp_path):
    """Also the sweep the tracking server's own checks read (what the UI's dashboard shows, the checks
    benchmarks/dashboard_screenshots.py makes before it shoots the pages): one sweep serves both."""
    server = mlflow_server.url
    proc = start_sweep(tmp_path, *ray_args(tiny_encoder, sts_file, server, "ray-private",
                                           "+hydra.launcher.init.num_cpus=2"))
    with LoopbackGuard(proc.pid):  # ray.init(address="local") starts its daemons as the sweep's children
        rc, out, err = finish_sweep(proc, tmp_path, timeout=300)
    assert "jobs run on a private Ray instance on 127.0.0.1" in out + err
    check_ray_picture(server, "ray-private", out, rc, err)
    check_server_picture(server, mlflow_server.artifacts, "ray-private", tmp_path)


def check_server_picture(url: str, artifacts: Path, experiment: str, cwd: Path) -> None:
    """A sweep logged to a real `mlflow server` (sqlite backend, artifact folder), read back through it."""
    client, parent, children = sweep_picture(url, experiment)
    for child in children:
        assert {"spearman", "throughput", "latency_p50_ms", "parity_max_abs_diff"} <= set(child.data.metrics)
        assert child.data.params["runtime.batch_size"] == "32"
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"results.json", "predictions_sample.json", "hydra"} <= names
    assert {"summary.csv", "summary.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the dashboard: the experiment opens on the runs view, the parent's description names the outcome, and every
    # job has its figures on the parent
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["mlflow.note.content"].startswith("### ") and tags["winner"]
    assert all(f"job{c.data.tags['job_num']}_throughput" in metrics for c in children)
    assert any(k.startswith("job") and k.endswith("_speedup") for k in metrics), sorted(metrics)
    # artifacts went through the server into its own folder, not into the client's working directory
    assert any((Path(artifacts) / exp.experiment_id).rglob("results.json"))
    assert not (cwd / "mlartifacts").exists()


@needs_ray
def test_ray_unreachable_address_is_one_line(tmp_path):
    port = free_port()
    proc = run_cli("-m", "tracking=off", "hydra/launcher=ray", f"hydra.launcher.address=127.0.0.1:{port}",
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines == [f"error: hydra.launcher.address=127.0.0.1:{port}: no Ray cluster answers there (Connection "
                     "refused); start one with `ray start --head` or use address=null for a private instance"], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
