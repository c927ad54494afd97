"""The four MLPerf LoadGen scenarios through the real CLI, per CPU (issue 24).

For each workload and recipe it runs ``orchestrator -m scenario=offline,single_stream,multi_stream`` and the
workload's server preset (``experiment=sts_server`` / ``sst2_server``: max QPS with p99 <= the preset's bound), then
reads each job's results.json and keeps the LoadGen summaries it quotes under
``benchmarks/results/scenarios/<cpu-slug>/`` (with ``results.json``: every figure, LoadGen's verdict, the CPU, the
versions and the load average before and after each sweep).

Workloads: ``sts`` the embedded default (MiniLM on the STS smoke pairs, ``experiment=sts_server`` for the server),
``sst2`` the shared fine-tuned MiniLM on SST-2 dev (``experiment=sst2_minilm`` / ``sst2_server``; needs ../shared
or ORCH_SHARED_DIR, skipped with the reason otherwise).

    python benchmarks/scenarios.py                                   # sts and sst2, eager_fp32 and openvino_bf16
    python benchmarks/scenarios.py --workloads sts --recipes eager_fp32,openvino_int8
    python benchmarks/scenarios.py --dry                             # print the commands only

CI-sized LoadGen durations (the scenarios' defaults; not MLPerf-compliant). Extra arguments are overrides for
every sweep (e.g. ``scenario.compliant=true`` is not: it does not fit the other scenarios' keys; use it with
``--scenarios``). Figures from a shared machine are what the load average says they are.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchestrator import cpu  # noqa: E402

WORKLOADS = {
    # name: (overrides for offline/single/multi-stream, overrides for the server preset, needs ../shared)
    "sts": ([], ["experiment=sts_server"], False),
    "sst2": (["experiment=sst2_minilm"], ["experiment=sst2_server"], True),
}
SCENARIOS = ("offline", "single_stream", "multi_stream")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f}/{five:.1f}/{fifteen:.1f}"


def cpu_slug() -> str:
    """The CPU's model name, plus amx when it has it (a generic 'Intel Xeon Processor' names no generation)."""
    name = re.sub(r"\((r|tm)\)", "", cpu.model_name().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown-cpu"
    if "amx_tile" in cpu.flags():
        slug += "-amx"
    return f"{slug}-{os.cpu_count()}cpu"


def shared_dir() -> Path:
    return Path(os.environ.get("ORCH_SHARED_DIR", str(REPO.parent / "shared")))


def sweep(workdir: Path, args: List[str]) -> Dict[str, Any]:
    """One multirun; each job's results.json and run directory."""
    sweep_dir = workdir / f"sweep-{time.time_ns()}"
    cmd = [sys.executable, "-m", "orchestrator", "-m", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
           "runtime.progress=false", f"hydra.sweep.dir={sweep_dir}", *args]
    load_before = load()
    t0 = time.perf_counter()
    env = {**os.environ, "ORCH_SHARED_DIR": str(shared_dir())}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    jobs = []
    for res in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)):
        jobs.append((res.parent, json.loads(res.read_text())))
    return {"cmd": " ".join(cmd[2:]), "rc": proc.returncode, "wall_s": time.perf_counter() - t0, "jobs": jobs,
            "load_before": load_before, "load_after": load(),
            "stderr_tail": [line for line in proc.stderr.strip().splitlines() if line][-3:]}


def summary_of(run_dir: Path, scenario: str) -> Optional[Path]:
    """The LoadGen summary the figure comes from: the scenario's run, or the server's verifying run that passed
    (else its last run)."""
    base = run_dir / "loadgen" / scenario
    if scenario != "server":
        for name in (f"{scenario}_retry", scenario):
            p = run_dir / "loadgen" / name / "mlperf_log_summary.txt"
            if p.is_file():
                return p
        return None
    table = base / "server_search.json"
    if table.is_file():
        trials = json.loads(table.read_text())["trials"]
        chosen = [t for t in trials if t["verifying"] and t["valid"]] or trials[-1:]
        if chosen and chosen[-1].get("log_dir"):
            p = Path(chosen[-1]["log_dir"])
            p = p if p.is_absolute() else run_dir / p
            if not (p / "mlperf_log_summary.txt").is_file():  # a log_dir relative to the job's cwd
                p = base / p.name
            if (p / "mlperf_log_summary.txt").is_file():
                return p / "mlperf_log_summary.txt"
    found = sorted(base.glob("*verify*/mlperf_log_summary.txt"))
    return found[-1] if found else None


def row(workload: str, recipe: str, run_dir: Path, res: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    sc = res.get("scenario") or {}
    m = res.get("metrics", {})
    name = sc.get("name", "?")
    fig = sc.get("figure") or {}
    r = {"workload": workload, "recipe": recipe, "scenario": name, "figure": fig.get("name"),
         "value": fig.get("value"), "unit": fig.get("unit"), "valid": sc.get("valid"), "reason": sc.get("reason"),
         "compliant": sc.get("compliant"), "task_metrics": {k: v for k, v in m.items() if k in
                                                            ("spearman", "pearson", "accuracy", "macro_f1")},
         "p99_ms": m.get("loadgen_latency_p99_ms"), "p90_ms": m.get("loadgen_latency_p90_ms"),
         "latency_bound_ms": m.get("server_latency_bound_ms"), "server_p99_ms": m.get("server_p99_ms"),
         "server_runs": m.get("server_search_runs"), "server_search_s": m.get("server_search_s"),
         "sut_mean_batch": m.get("sut_mean_batch"), "threads": m.get("threads"),
         "precision": (res.get("precision") or {}).get("compute") if isinstance(res.get("precision"), dict)
         else res.get("compute")}
    summary = summary_of(run_dir, name)
    if summary is not None:
        dest = out_dir / f"{workload}_{recipe}_{name}_mlperf_log_summary.txt"
        shutil.copyfile(summary, dest)
        r["summary"] = dest.name
        result_line = next((ln for ln in summary.read_text().splitlines() if ln.startswith("Result is")), "")
        r["loadgen_result"] = result_line.split(":", 1)[-1].strip()
    return r


def fmt(r: Dict[str, Any]) -> str:
    v = r.get("value")
    value = "-" if v is None else f"{v:.4g} {r.get('unit', '')}"
    extra = ""
    if r["scenario"] == "server":
        extra = f" (bound {r.get('latency_bound_ms'):g} ms, p99 {r.get('server_p99_ms') or float('nan'):.3g} ms, " \
                f"{int(r.get('server_runs') or 0)} runs)" if r.get("latency_bound_ms") else ""
    verdict = "VALID" if r.get("valid") else f"not valid: {r.get('reason')}"
    return f"{r['workload']:5} {r['recipe']:15} {r['scenario']:14} {value:>18}{extra}  {verdict}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="sts,sst2")
    ap.add_argument("--recipes", default="eager_fp32,openvino_bf16")
    ap.add_argument("--scenarios", default="offline,single_stream,multi_stream,server")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/scenarios/<cpu-slug>")
    ap.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                    help="OMP_WAIT_POLICY for the runs (default: inherited). passive: OpenMP threads sleep instead "
                         "of spinning, which a loaded machine needs (docs/scenarios.md, Threads)")
    ap.add_argument("--dry", action="store_true")
    args, overrides = ap.parse_known_args()
    if args.omp_wait_policy:  # libgomp reads it when torch loads it: the job processes inherit it
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    out_dir = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "scenarios" / cpu_slug()
    chosen = [s for s in args.scenarios.split(",") if s]
    closed = [s for s in chosen if s in SCENARIOS]
    env = {"cpu": cpu.model_name(), "slug": cpu_slug(), "cpus": os.cpu_count(),
           "isa": sorted(f for f in cpu.flags() if f.startswith(("avx512", "amx", "avx_vnni"))),
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_start": load(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins)")}
    try:
        import torch
        env["torch"] = torch.__version__
        import openvino
        env["openvino"] = openvino.__version__
    except ImportError:  # the figures say which versions they were measured with, when it can
        pass
    rows: List[Dict[str, Any]] = []
    skipped: List[str] = []
    runs: List[Dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="scenarios-bench-"))
    if not args.dry:
        out_dir.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every sweep: an interrupted benchmark keeps what it measured
        env["load_now"] = load()
        env["updated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (out_dir / "results.json").write_text(json.dumps({"environment": env, "rows": rows, "sweeps": runs,
                                                          "skipped": skipped}, indent=2, default=str))
    for workload in [w for w in args.workloads.split(",") if w]:
        base, server, needs_shared = WORKLOADS[workload]
        if needs_shared and not (shared_dir() / "models" / "minilm-sst2").is_dir():
            skipped.append(f"{workload}: no {shared_dir() / 'models' / 'minilm-sst2'} (set ORCH_SHARED_DIR)")
            print(f"skip {skipped[-1]}", file=sys.stderr)
            continue
        for recipe in [r for r in args.recipes.split(",") if r]:
            common = [f"recipe={recipe}", "runtime.threads=2", *overrides]
            plans = []
            if closed:
                plans.append([*base, f"scenario={','.join(closed)}", *common])
            if "server" in chosen:
                plans.append([*server, *common])
            for plan in plans:
                if args.dry:
                    print("orchestrator -m " + " ".join(plan))
                    continue
                s = sweep(workdir, plan)
                runs.append({k: v for k, v in s.items() if k != "jobs"})
                print(f"[{s['wall_s']:.0f} s, load {s['load_before']} -> {s['load_after']}, rc {s['rc']}] "
                      f"{s['cmd']}", file=sys.stderr)
                if not s["jobs"]:
                    print("  no job finished: " + " | ".join(s["stderr_tail"]), file=sys.stderr)
                for run_dir, res in s["jobs"]:
                    r = row(workload, recipe, run_dir, res, out_dir)
                    r["load"] = f"{s['load_before']} -> {s['load_after']}"
                    rows.append(r)
                    print("  " + fmt(r), file=sys.stderr)
                write()
    if args.dry:
        return 0
    env["load_end"] = load()
    env["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write()
    print(f"\n{env['cpu']} ({env['slug']}), torch {env.get('torch')}, openvino {env.get('openvino')}, "
          f"OMP_WAIT_POLICY {env['OMP_WAIT_POLICY']}; load {env['load_start']} at the start, {env['load_end']} at the end")
    for r in rows:
        print(fmt(r))
    for s in skipped:
        print(f"skipped {s}")
    print(f"written: {out_dir.relative_to(REPO) if out_dir.is_relative_to(REPO) else out_dir}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
