"""Sweep summaries: one row per job (from MLflow and/or the jobs' results.json), a table, CSV/markdown, a plot.

Used by the sweep callback at the end of a multirun and by ``orchestrator-report`` afterwards.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

COLUMNS = ["job", "stack", "precision", "metric", "value", "throughput", "speedup", "latency_p50_ms",
           "latency_p99_ms", "parity_max_abs_diff", "parity_agreement", "eval_throughput", "peak_fraction_pct",
           "status", "run_id"]


def _primary(task: Optional[str]) -> Optional[str]:
    if not task:
        return None
    from .registry import tasks

    try:
        return tasks.get(task).primary_metric
    except Exception:
        return None


def _row(job: str, status: str, task: Optional[str], stack: str, precision: str, metrics: Dict[str, float],
         run_id: Optional[str]) -> Dict[str, Any]:
    metric = _primary(task)
    return {"job": job, "stack": stack or "eager", "precision": precision, "metric": metric,
            "value": metrics.get(metric) if metric else None, "throughput": metrics.get("throughput"),
            "speedup": None, "latency_p50_ms": metrics.get("latency_p50_ms"),
            "latency_p99_ms": metrics.get("latency_p99_ms"), "parity_max_abs_diff": metrics.get("parity_max_abs_diff"),
            "parity_agreement": metrics.get("parity_agreement"), "eval_throughput": metrics.get("eval_throughput"),
            "peak_fraction_pct": metrics.get("peak_fraction_pct"), "status": status, "run_id": run_id}


def rows_from_mlflow(client, parent_id: str) -> List[Dict[str, Any]]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000)
    rows = []
    for r in runs:
        t = r.data.tags
        rows.append(_row(t.get("job_num", r.info.run_name), r.info.status, t.get("task"), t.get("stack", "eager"),
                         t.get("precision", "?"), r.data.metrics, r.info.run_id))
    return rows


def rows_from_dir(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Jobs as their run directories record them; a job dir without results.json was killed before the end."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: p.name):
        res = job_dir / "results.json"
        if not res.exists():
            rows.append(_row(job_dir.name, "MISSING", None, "?", "?", {}, None))
            continue
        data = json.loads(res.read_text())
        rows.append(_row(job_dir.name, data.get("status", "?"), data.get("task"), data.get("stack", ""),
                         data.get("precision", "?"), data.get("metrics", {}), data.get("run_id")))
    return rows


def merge_rows(tracked: List[Dict[str, Any]], local: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """MLflow rows win; local jobs whose run never reached MLflow are added from their results.json."""
    known = {r["run_id"] for r in tracked}
    by_job = {str(r["job"]): r for r in tracked}
    rows = list(tracked)
    for r in local:
        if r["run_id"] in known and r["run_id"] is not None:
            continue
        if str(r["job"]) in by_job:
            continue
        rows.append(r)
    return sorted(rows, key=lambda r: (len(str(r["job"])), str(r["job"])))


def add_speedups(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Speedup vs the eager fp32 job of the same task metric (the sweep's baseline), when there is one."""
    base = next((r for r in rows if r["stack"] == "eager" and r["precision"] == "fp32" and r["throughput"]), None)
    for r in rows:
        if base and r["throughput"]:
            r["speedup"] = r["throughput"] / base["throughput"]
    return base


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}"
    return str(v)


HEADERS = {"throughput": "rows/s", "latency_p50_ms": "p50 ms", "latency_p99_ms": "p99 ms",
           "parity_max_abs_diff": "parity |Δ|", "parity_agreement": "agree", "eval_throughput": "eval rows/s",
           "peak_fraction_pct": "% peak"}


def table(rows: List[Dict[str, Any]], title: Optional[str] = None) -> Table:
    t = Table(title=title, title_justify="left")
    shown = [c for c in COLUMNS if c != "run_id"]
    for c in shown:
        t.add_column(HEADERS.get(c, c), justify="right" if c not in ("stack", "precision", "metric", "status")
                     else "left", no_wrap=True)
    for r in rows:
        t.add_row(*[_fmt(r[c]) for c in shown])
    return t


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], base: Optional[Dict[str, Any]], path: Path) -> Optional[Path]:
    done = [r for r in rows if r["throughput"] and r["value"] is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in done:
        label = f"{r['stack']}/{r['precision']}"
        is_base = r is base
        ax1.scatter(r["throughput"], r["value"], marker="*" if is_base else "o", s=160 if is_base else 50,
                    color="black" if is_base else None)
        ax1.annotate(label + (" (baseline)" if is_base else ""), (r["throughput"], r["value"]), fontsize=8,
                     xytext=(4, 4), textcoords="offset points")
    ax1.set_xlabel("throughput (rows/s)")
    ax1.set_ylabel(done[0]["metric"] or "metric")
    ax1.set_title("speed vs accuracy")
    if base:
        ax1.axhline(base["value"], color="grey", linestyle=":", linewidth=1)
        ax1.axvline(base["throughput"], color="grey", linestyle=":", linewidth=1)
    speed = [r for r in done if r["speedup"]]
    ax2.bar([f"{r['stack']}\n{r['precision']}" for r in speed], [r["speedup"] for r in speed],
            color=["black" if r is base else "tab:blue" for r in speed])
    ax2.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax2.set_ylabel("speedup vs eager fp32")
    ax2.set_title("throughput ratio")
    ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize_sweep(client, parent_id: Optional[str], sweep_dir: Optional[Path]) -> Dict[str, Any]:
    """Rows for the sweep, files in the sweep dir, and (with a parent run) everything logged to it."""
    tracked = rows_from_mlflow(client, parent_id) if client is not None and parent_id else []
    local = rows_from_dir(sweep_dir) if sweep_dir is not None and sweep_dir.is_dir() else []
    rows = merge_rows(tracked, local)
    base = add_speedups(rows)
    failed = sum(r["status"] != "FINISHED" for r in rows)
    out: Dict[str, Any] = {"rows": rows, "failed": failed, "parent_id": parent_id, "files": []}
    if sweep_dir is not None and sweep_dir.is_dir():
        import pandas as pd

        csv = sweep_dir / "summary.csv"
        pd.DataFrame(rows, columns=COLUMNS).to_csv(csv, index=False)
        md = sweep_dir / "summary.md"
        md.write_text(markdown(rows))
        png = plot(rows, base, sweep_dir / "summary.png")
        out["files"] = [p for p in (csv, md, png) if p is not None]
    if client is not None and parent_id:
        import pandas as pd

        client.log_table(parent_id, data=pd.DataFrame(rows, columns=COLUMNS), artifact_file="summary_table.json")
        for p in out["files"]:
            client.log_artifact(parent_id, str(p))
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        client.log_batch(parent_id, metrics=[Metric("n_jobs", float(len(rows)), ts, 0),
                                             Metric("failed_jobs", float(failed), ts, 0)])
        client.set_terminated(parent_id, "FAILED" if failed else "FINISHED")
    return out


def print_summary(summary: Dict[str, Any], console: Optional[Console] = None) -> None:
    # a sweep table is wide: do not squeeze it into 80 columns when stdout is not a terminal
    console = console or Console(width=max(Console().width, 140))
    rows = summary["rows"]
    title = f"sweep summary: {len(rows)} jobs, {summary['failed']} not finished"
    if summary.get("parent_id"):
        title += f" (MLflow parent run {summary['parent_id']})"
    console.print(title)
    console.print(table(rows))


def report_main(argv: Optional[List[str]] = None) -> int:
    """``orchestrator-report <parent run id | sweep dir>``: print a sweep's summary table again."""
    parser = argparse.ArgumentParser(prog="orchestrator-report", description=report_main.__doc__)
    parser.add_argument("target", help="MLflow parent run id of a sweep, or a sweep directory (outputs/multirun/...)")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    args = parser.parse_args(argv)
    path = Path(args.target)
    if path.is_dir():
        rows = merge_rows([], rows_from_dir(path))
        parent = None
    else:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            rows = rows_from_mlflow(MlflowClient(args.tracking_uri), args.target)
        except MlflowException as e:
            print(f"error: {args.target!r} is neither a sweep directory nor a run in {args.tracking_uri}: "
                  f"{str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        rows = merge_rows(rows, [])
        parent = args.target
    add_speedups(rows)
    print_summary({"rows": rows, "failed": sum(r["status"] != "FINISHED" for r in rows), "parent_id": parent})
    return 0
