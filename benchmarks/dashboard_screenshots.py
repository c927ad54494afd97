"""Screenshots of the MLflow UI after a sweep, as a user opens it: does the dashboard tell the story at a glance?

    python benchmarks/dashboard_screenshots.py --out /tmp/shots                 # tiny model, 5-job engine sweep
    python benchmarks/dashboard_screenshots.py --out /tmp/shots --store sqlite:////path/mlflow.db   # an existing store

What it does, with real parts only:
1. (without --store) makes a tiny BERT in a scratch folder (tests/conftest.py's make_tiny_model) and a 64-pair STS
   file, starts ``mlflow server`` on 127.0.0.1 (sqlite backend, its own artifact folder) and runs
   ``orchestrator -m recipe=... model.name_or_path=<tiny> tracking.uri=http://127.0.0.1:<port>``;
   with --store it serves that store instead and shows its newest sweep.
2. Opens four views in headless Chromium (Debian's ``chromium``; ``apt-get install -y chromium``) and saves PNGs:
   ``1-runs.png`` (the experiment: the classic runs list, the parent's winner tag and recommended_* columns),
   ``2-parent.png`` (the parent run's page: its description with the recommendation and the table of jobs),
   ``3-charts.png`` (the chart view of the sweep's jobs: speedup/throughput per job),
   ``4-parent-metrics.png`` (the parent's metrics: job<N>_speedup ...).
3. Checks what a script can check (the experiment's kind tag, the parent's description and metrics through the
   REST API) and exits 1 naming what is missing. The PNGs are for a person to look at.

Exit status 0: the sweep ran and the pages were shot. Needs no network beyond 127.0.0.1.

Not part of the test suite (a sweep plus headless Chromium takes minutes): run it by hand after a change to what the
dashboard shows. The suite checks the same tags and metrics without a browser: a sweep into a real `mlflow server`
(tests/test_distributed.py, check_server_picture) and the parent run's note and metrics (tests/test_dashboard.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = "eager_fp32,onnxruntime_fp32,onnxruntime_int8,openvino_fp32,openvino_int8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(work: Path) -> tuple:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import WORDS, make_tiny_model, write_tsv  # the tests' own generators (no download)

    model = make_tiny_model(work / "my-bert")
    rnd = random.Random(0)
    rows = [(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))),
             " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 12))), round(rnd.uniform(0, 5), 1))
            for _ in range(64)]
    data = write_tsv(work / "pairs.tsv", ("sentence1", "sentence2", "score"), rows)
    return model, data


def start_server(store: str, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", store, "--artifacts-destination", str(artifacts),
                             "--workers", "1"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise SystemExit("mlflow server did not answer /health within 180 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def api(url: str, path: str, body: dict = None) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def shoot(chromium: str, url: str, out: Path, width: int = 1680, height: int = 1050, wait_ms: int = 40000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{out}: {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--store", help="serve this existing MLflow store (sqlite:///...) instead of running a sweep")
    parser.add_argument("--recipes", default=RECIPES, help=f"the sweep's recipes (default {RECIPES})")
    parser.add_argument("--experiment", default="orchestrator")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("error: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dashboard-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = args.store or f"sqlite:///{work / 'server.db'}"
    server = start_server(store, work / "server-artifacts", port, work / "server.log")
    try:
        if not args.store:
            model, data = make_inputs(work)
            sweep_dir = work / "sweep"
            cmd = [sys.executable, "-m", "orchestrator", "-m", f"recipe={args.recipes}", f"model.name_or_path={model}",
                   "dataset.path=csv", f"dataset.data_files={data}", "runtime=quick", "runtime.padding=dynamic",
                   "runtime.sort_by_length=true", f"tracking.uri={url}", f"tracking.experiment={args.experiment}",
                   f"hydra.sweep.dir={sweep_dir}"]
            print("$", " ".join(cmd), flush=True)
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=1800)
            (args.out / "sweep.log").write_text(proc.stdout + proc.stderr)
            print(proc.stdout[-3000:])
            if proc.returncode != 0:
                print(f"error: the sweep exited {proc.returncode}; see {args.out / 'sweep.log'}", file=sys.stderr)
                return 1
        exp = api(url, f"experiments/get-by-name?experiment_name={urllib.parse.quote(args.experiment)}")["experiment"]
        exp_id = exp["experiment_id"]
        runs = api(url, "runs/search", {"experiment_ids": [exp_id], "filter": "tags.sweep = 'true'",
                                        "order_by": ["attributes.start_time DESC"], "max_results": 1})["runs"]
        if not runs:
            print("error: no sweep parent run in the experiment", file=sys.stderr)
            return 1
        parent = runs[0]
        parent_id = parent["info"]["run_id"]
        children = api(url, "runs/search", {"experiment_ids": [exp_id],
                                            "filter": f"tags.mlflow.parentRunId = '{parent_id}'",
                                            "max_results": 100})["runs"]
        problems = []
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        if tags.get("mlflow.experimentKind") != "custom_model_development":
            problems.append("the experiment has no mlflow.experimentKind=custom_model_development tag")
        ptags = {t["key"]: t["value"] for t in parent["data"].get("tags", [])}
        pmetrics = {m["key"] for m in parent["data"].get("metrics", [])}
        if not ptags.get("mlflow.note.content", "").startswith("### "):
            problems.append("the parent run has no markdown description")
        if not any(k.endswith("_speedup") and k.startswith("job") for k in pmetrics):
            problems.append("the parent run has no job<N>_speedup metrics")
        print(f"winner: {ptags.get('winner')}")

        base = f"{url}/#/experiments/{exp_id}"
        # MLflow 3.17 opens on its GenAI views unless the sidebar's switch says "Model training" (a per-browser
        # setting, saved after the first click); the query parameter is that click for a fresh browser profile
        ml = "workflowType=machine_learning"
        # a filter and a sort other than by date make MLflow list the jobs flat instead of folded under the parent
        search = urllib.parse.quote(f"tags.mlflow.parentRunId = '{parent_id}'")
        jobs = f"searchFilter={search}&orderByKey={urllib.parse.quote('metrics.`summary/speedup`')}&orderByAsc=false"
        shoot(chromium, base, args.out / "0-first-open.png")
        shoot(chromium, f"{base}/runs?{ml}", args.out / "1-runs.png")
        shoot(chromium, f"{base}/runs/{parent_id}?{ml}", args.out / "2-parent.png", height=1400)
        shoot(chromium, f"{base}/runs?{ml}&compareRunsMode=CHART&{jobs}", args.out / "3-charts.png",
              height=1400)
        shoot(chromium, f"{base}/runs?{ml}&compareRunsMode=TABLE&{jobs}",
              args.out / "3b-jobs-table.png")
        shoot(chromium, f"{base}/runs/{parent_id}/model-metrics?{ml}", args.out / "4-parent-metrics.png",
              height=1400)
        ids = json.dumps([c["info"]["run_id"] for c in children])
        shoot(chromium, f"{url}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments="
                        f"{urllib.parse.quote(json.dumps([exp_id]))}&{ml}", args.out / "5-compare.png", height=1400)
        for p in problems:
            print(f"missing: {p}", file=sys.stderr)
        return 1 if problems else 0
    finally:
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
