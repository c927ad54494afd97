"""Sweep summaries: one row per job (from MLflow and/or the jobs' results.json), a table, CSV/markdown, a plot.

Used by the sweep callback at the end of a multirun and by ``orchestrator-report`` afterwards.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from . import verdict
from .errors import describe, first_line
from .config import SummaryConfig, TrackingConfig
from .records import (COLUMNS, DECISIONS_FILE, EAGER, RACE_FILE, PARENT_RUN_FILE, TERMINAL, job_dirs, override_values, row_of_dir,
                      row_of_run, task_class, tracking_of)

log = logging.getLogger(__name__)

# what the console shows of the rows' columns (the files have all); the swept keys' columns follow precision
SHOWN = ["job", "stack", "precision", "metric", "value", "accuracy_delta", "throughput", "speedup",
         "speedup_ci", "noise", "agreement_vs_baseline", "gate", "latency_p50_ms", "latency_p90_ms", "fallback",
         "status"]


def rows_from_mlflow(client, parent_id: str) -> List[Dict[str, Any]]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000)
    return [row_of_run(r) for r in runs]


def rows_from_dir(sweep_dir: Path) -> List[Dict[str, Any]]:
    """Jobs as their run folders record them; a job folder without results.json was killed before the end, one
    whose results.json is damaged is named (DAMAGED) and its figures are not used."""
    rows = [row_of_dir(job_dir) for job_dir in job_dirs(sweep_dir)]
    for r in rows:
        if r.get("record_error"):
            log.error("%s", r["record_error"])
    return rows


def merge_rows(tracked: List[Dict[str, Any]], local: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per job. MLflow's row is the base; what only the job's results.json has fills it in (a run that lost
    its store midway), and a results.json that ended (FINISHED, FAILED, KILLED) beats an MLflow run still marked
    RUNNING: that run's process lost the store before it could close the run. Jobs that never reached MLflow come
    from their results.json alone."""
    by_run = {r["run_id"]: r for r in local if r.get("run_id")}
    by_job = {str(r["job"]): r for r in local}
    used = set()
    rows = []
    for t in tracked:
        own = by_run.get(t["run_id"]) or by_job.get(str(t["job"]))
        if own is None:
            rows.append(t)
            continue
        used.add(id(own))
        if t["status"] not in TERMINAL and own["status"] in TERMINAL:
            rows.append({**t, **{k: v for k, v in own.items() if v is not None}, "run_id": t["run_id"]})
        else:
            rows.append({**t, **{k: v for k, v in own.items() if t.get(k) is None and v is not None}})
    rows += [r for r in local if id(r) not in used]
    return sorted(rows, key=lambda r: (len(str(r["job"])), str(r["job"])))


def add_swept(rows: List[Dict[str, Any]]) -> List[str]:
    """The keys whose command-line values differ between the jobs (besides stack and precision, shown anyway):
    each row's values in ``swept`` (key -> value), in the order the overrides give them."""
    parsed = [override_values(str(r.get("overrides") or "").split()) for r in rows]
    # resume=true continues a sweep; it is not a setting its jobs differ in
    keys = list(dict.fromkeys(k for p in parsed for k in p if k not in ("optimization", "precision", "resume")))
    swept = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    for r, p in zip(rows, parsed):
        r["swept"] = {k: p.get(k) for k in swept} or None
    return swept


def swept_columns(rows: List[Dict[str, Any]]) -> List[str]:
    return list(dict.fromkeys(k for r in rows for k in (r.get("swept") or {})))


SCENARIO_COLUMNS = ["scenario", "figure", "figure_value", "figure_unit"]


def columns(rows: List[Dict[str, Any]], base: List[str]) -> List[str]:
    """``base`` with one column per swept key after precision, and a scenario's figure of merit (name, value,
    unit) when jobs ran LoadGen scenarios."""
    at = base.index("precision") + 1
    extra = [c for c in SCENARIO_COLUMNS if c not in base] if any(r.get("figure") for r in rows) else []
    return base[:at] + swept_columns(rows) + extra + [c for c in base[at:] if c not in extra]


def value(r: Dict[str, Any], c: str) -> Any:
    swept = r.get("swept") or {}
    return swept.get(c) if c in swept else r.get(c)


def decisions_loader(client) -> Any:
    """Each run's decisions.json: from its run directory, else from its MLflow artifacts."""

    def load(r: Dict[str, Any]) -> Optional[list]:
        path = Path(r["run_dir"]) / DECISIONS_FILE if r.get("run_dir") else None
        try:
            if path is not None and path.is_file():
                return json.loads(path.read_text())
            if client is not None and r.get("run_id"):
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    local = client.download_artifacts(r["run_id"], DECISIONS_FILE, tmp)
                    return json.loads(Path(local).read_text())
        except Exception:  # a run without the file (older, failed): agreement is simply not known
            return None
        return None

    return load


def assess(rows: List[Dict[str, Any]], client=None, gate: Optional[SummaryConfig] = None) -> Optional[str]:
    """Speedups with intervals, gate, agreement, Pareto front (in place); returns the recommendation line.
    ``gate``: the thresholds (summary.* of the config; their defaults live in SummaryConfig only)."""
    gate = gate or SummaryConfig()
    min_accuracy_ratio, min_agreement = gate.min_accuracy_ratio, gate.min_agreement
    add_swept(rows)
    verdict.assess(rows, min_accuracy_ratio, min_agreement, task_class, decisions_loader(client))
    verdict.mark_pareto(rows)
    return verdict.recommend(rows)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.2f}"
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in v.items())
    return str(v)


def _cell(r: Dict[str, Any], c: str) -> str:
    if c == "speedup_ci":
        lo, hi = r.get("speedup_ci_low"), r.get("speedup_ci_high")
        return "-" if lo is None or hi is None else f"{lo:.2f}-{hi:.2f}"
    if c == "agreement_vs_baseline" and r.get(c) is not None:
        return f"{r[c]:.1%}"
    if c == "accuracy_delta" and r.get(c) is not None:
        return f"{r[c]:+.2f}"
    if c == "gate" and r.get("gate") == "fail":
        return f"fail: {r.get('gate_reason')}"
    return _fmt(value(r, c))


HEADERS = {"throughput": "rows/s", "latency_p50_ms": "p50 ms", "latency_p90_ms": "p90 ms",
           "latency_p99_ms": "p99 ms",
           "parity_max_abs_diff": "parity |Δ|", "parity_agreement": "agree (sample)", "eval_throughput": "eval rows/s",
           "peak_fraction_pct": "% peak", "accuracy_delta": "Δ metric", "speedup_ci": "95% CI",
           "agreement_vs_baseline": "agree (all)", "fallback": "fell back", "figure_value": "value",
           "figure_unit": "unit"}


def table(rows: List[Dict[str, Any]], title: Optional[str] = None) -> Table:
    t = Table(title=title, title_justify="left")
    shown = columns(rows, SHOWN)
    swept = swept_columns(rows)
    for c in shown:
        t.add_column(HEADERS.get(c, c), justify="left" if c in ("stack", "precision", "metric", "status", "gate",
                                                                 "noise", "fallback") or c in swept else "right",
                     no_wrap=c != "gate")
    for r in rows:
        t.add_row(*[_cell(r, c) for c in shown])
    return t


def markdown(rows: List[Dict[str, Any]], header: str = "") -> str:
    lines = [header, ""] if header else []
    cols = columns(rows, COLUMNS)
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(value(r, c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """Speed vs accuracy with the Pareto front and the recommended job; speedups with their intervals."""
    done = [r for r in rows if r.get("throughput") and r.get("value") is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # wider for many jobs, so that every bar keeps a readable label
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(13.0, 7.0 + 0.6 * len(done)), 5.5))
    recommended = next((r for r in done if r.get("recommended")), None)
    for i, r in enumerate(done):
        is_base = r.get("gate") == "baseline"
        marker = "*" if is_base else ("X" if r.get("gate") == "fail" else "o")
        ax1.scatter(r["throughput"], r["value"], marker=marker, s=170 if is_base else 60,
                    color="black" if is_base else ("tab:red" if r.get("gate") == "fail" else "tab:blue"), zorder=3)
        ax1.scatter([], [], marker="none", label=f"{r['job']}: {verdict.label(r)}"
                    + (" (baseline)" if is_base else "") + (" (gate fail)" if r.get("gate") == "fail" else ""))
    front = sorted((r for r in done if r.get("pareto")), key=lambda r: r["throughput"])
    if len(front) > 1:
        ax1.plot([r["throughput"] for r in front], [r["value"] for r in front], color="tab:green", linewidth=1.2,
                 linestyle="--", label="Pareto front", zorder=2)
    if recommended is not None:
        ax1.scatter(recommended["throughput"], recommended["value"], s=420, facecolors="none",
                    edgecolors="tab:green", linewidths=2, label=f"recommended: job {recommended['job']}", zorder=4)
    ax1.ticklabel_format(axis="both", style="plain", useOffset=False)
    values = [r["value"] for r in done]
    span = max(values) - min(values)
    mid = (max(values) + min(values)) / 2
    # a 0.003-point wobble must not fill the axis and look like an accuracy loss: show at least 2 points
    if span < 2.0:
        ax1.set_ylim(mid - 1.0, mid + 1.0)
    _number_points(ax1, done)
    ax1.set_xlabel("throughput (rows/s)")
    ax1.set_ylabel(done[0]["metric"] or "metric")
    ax1.set_title("speed vs accuracy")
    ax1.legend(fontsize=7, loc="best", handlelength=1, framealpha=0.8, markerscale=0.5)
    _throughput_bars(ax2, done)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# where a point's number goes, in points from it: the next free slot when other numbers are close
_SLOTS = [(5, 5), (5, -12), (-13, 5), (-13, -12), (5, 16), (-13, 16), (16, -4), (-24, -4)]


def _number_points(ax, done: List[Dict[str, Any]]) -> None:
    """Job numbers beside the points (names are in the legend). Points closer than ~4 % of the axes take
    different slots around themselves, so numbers of coinciding points do not print over each other."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: List[tuple] = []
    for r in sorted(done, key=lambda r: r["throughput"]):
        fx, fy = (r["throughput"] - x0) / ((x1 - x0) or 1), (r["value"] - y0) / ((y1 - y0) or 1)
        near = sum(abs(fx - px) < 0.04 and abs(fy - py) < 0.04 for px, py in placed)
        placed.append((fx, fy))
        ax.annotate(str(r["job"]), (r["throughput"], r["value"]), fontsize=8, xytext=_SLOTS[near % len(_SLOTS)],
                    textcoords="offset points")


def _natural(v: Any) -> tuple:
    """Sort swept values as numbers when they are (batch sizes 1, 8, 16, not '1', '16', '8')."""
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def _bar_label(r: Dict[str, Any]) -> str:
    swept = {k.rsplit(".", 1)[-1]: v for k, v in (r.get("swept") or {}).items()}
    lines = [f"{k}={v}" for k, v in swept.items()] + [f"{r['stack']}/{r['precision']}", f"job {r['job']}"]
    return "\n".join(lines)


def bar_layout(done: List[Dict[str, Any]]) -> List[tuple]:
    """(x, label, row) per bar: grouped by the swept values (numbers in numeric order), a gap between groups of
    the first swept key, eager before the stacks within a group."""
    keys = swept_columns(done)
    order = sorted(done, key=lambda r: ([_natural((r.get("swept") or {}).get(k)) for k in keys],
                                        r["stack"] != EAGER, str(r["stack"]), str(r["precision"])))
    bars, x, previous = [], 0.0, object()
    for r in order:
        group = (r.get("swept") or {}).get(keys[0]) if keys else None
        if bars and group != previous:
            x += 0.6
        bars.append((x, _bar_label(r), r))
        previous, x = group, x + 1.0
    return bars


def _throughput_bars(ax, done: List[Dict[str, Any]]) -> None:
    """One bar per job (rows/s, 95 % interval), labelled with its swept values; the speedup over its eager fp32
    baseline written on the bar. Throughput, not speedup, is the height: in a sweep of batch sizes every job is its
    own baseline and every speedup would read 1.0."""
    bars = bar_layout(done)
    xs = [x for x, _, _ in bars]
    order = [r for _, _, r in bars]
    err = [[max(r["throughput"] - (r.get("throughput_ci_low") or r["throughput"]), 0) for r in order],
           [max((r.get("throughput_ci_high") or r["throughput"]) - r["throughput"], 0) for r in order]]
    ax.bar(xs, [r["throughput"] for r in order], yerr=err, capsize=3, width=0.8,
           color=["black" if r.get("gate") == "baseline" else
                  ("tab:red" if r.get("gate") == "fail" else "tab:blue") for r in order])
    for xi, r in zip(xs, order):
        if r.get("speedup") is not None and r.get("gate") != "baseline":
            ax.annotate(f"{r['speedup']:.2f}x", (xi, r["throughput"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [label for _, label, _ in bars], fontsize=7)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_ylabel("throughput (rows/s, 95% interval)")
    ax.set_title("throughput per job (black: eager fp32 baseline; on the bars: speedup vs it)", fontsize=9)


def frame(rows: List[Dict[str, Any]]):
    """The rows as a flat table (one column per swept key) for CSV and MLflow."""
    import pandas as pd

    cols = columns(rows, COLUMNS)
    return pd.DataFrame([{c: value(r, c) for c in cols} for r in rows], columns=cols)


def cpu_header(rows: List[Dict[str, Any]]) -> str:
    """Which CPU(s) the jobs ran on (a cluster sweep may span several)."""
    from collections import Counter

    models = Counter(r.get("cpu_model") for r in rows if r.get("cpu_model"))
    if not models:
        from . import cpu

        return f"CPU: {cpu.describe()} (this machine)"
    if len(models) == 1:
        return f"CPU: {next(iter(models))}"
    return "CPUs: " + "; ".join(f"{m} ({n} jobs)" for m, n in models.most_common())


def summarize_sweep(client, parent_id: Optional[str], sweep_dir: Optional[Path], gate: Optional[SummaryConfig] = None,
                    stopped: Optional[str] = None, write_files: bool = True) -> Dict[str, Any]:
    """Rows for the sweep, files in the sweep dir, and (with a parent run) everything logged to it. A store that
    cannot be read or written costs the MLflow part only: the rows then come from the jobs' results.json.
    ``stopped``: why the sweep ended early (its parent run ends KILLED with that reason)."""
    tracked, store_error = [], None
    if client is not None and parent_id:
        try:
            tracked = rows_from_mlflow(client, parent_id)
        except Exception as e:
            store_error = describe(e)
            log.error("sweep summary: the tracking store could not be read (%s); the summary comes from the jobs' "
                      "results.json", store_error)
    local = rows_from_dir(sweep_dir) if sweep_dir is not None and sweep_dir.is_dir() else []
    rows = merge_rows(tracked, local)
    store = client if store_error is None else None
    out = summary_of(rows, parent_id, assess(rows, store, gate))
    header, recommendation = out["cpu"], out["recommendation"]
    if write_files and sweep_dir is not None and sweep_dir.is_dir():
        csv = sweep_dir / "summary.csv"
        frame(rows).to_csv(csv, index=False)
        md = sweep_dir / "summary.md"
        md.write_text(markdown(rows, f"{header}\n\n{recommendation}"))
        png = plot(rows, sweep_dir / "summary.png", f"{header}   {recommendation or ''}"[:180])
        out["files"] = [p for p in (csv, md, png) if p is not None]
    race = sweep_dir / RACE_FILE if sweep_dir is not None else None
    if race is not None and race.is_file() and not race.is_symlink():
        out["files"].append(race)  # the race's log (rounds, orders, eliminations, why it ended), for the parent
        try:
            out["race_stopped"] = str(json.loads(race.read_text()).get("stopped") or "")
        except (OSError, ValueError, AttributeError):
            pass
    if store is not None and parent_id:
        try:
            log_to_parent(store, parent_id, out, stopped)
        except Exception as e:
            store_error = describe(e)
            log.error("sweep summary: could not be logged to MLflow parent run %s (%s); orchestrator-import %s "
                      "puts the sweep into MLflow later", parent_id, store_error, sweep_dir)
    out["store_error"] = store_error
    return out


def log_to_parent(client, parent_id: str, out: Dict[str, Any], stopped: Optional[str] = None) -> None:
    """The summary table, files, counts and recommendation on the sweep's parent run, which then ends: KILLED when
    the sweep was stopped, FAILED when a job did not finish, else FINISHED."""
    import time

    from mlflow.entities import Metric, RunTag

    rows = out["rows"]
    client.log_table(parent_id, data=frame(rows), artifact_file="summary_table.json")
    for p in out["files"]:
        client.log_artifact(parent_id, str(p))
    ts = int(time.time() * 1000)
    tags = [RunTag("recommendation", (out["recommendation"] or "")[:5000]), RunTag("summary.cpu", out["cpu"])]
    if stopped:
        tags.append(RunTag("error", stopped))
    if out.get("race_stopped"):
        tags.append(RunTag("race.stopped", out["race_stopped"][:5000]))
    client.log_batch(parent_id, metrics=[Metric("n_jobs", float(len(rows)), ts, 0),
                                         Metric("failed_jobs", float(out["failed"]), ts, 0),
                                         Metric("fallback_jobs", float(len(out["fell_back"])), ts, 0)], tags=tags)
    client.set_terminated(parent_id, "KILLED" if stopped else ("FAILED" if out["failed"] else "FINISHED"))


def summary_of(rows: List[Dict[str, Any]], parent_id: Optional[str], recommendation: Optional[str]) -> Dict[str, Any]:
    """What print_summary shows, for assessed rows (the sweep callback and orchestrator-report alike)."""
    return {"rows": rows, "failed": sum(r["status"] != "FINISHED" for r in rows), "parent_id": parent_id,
            "files": [], "recommendation": recommendation, "cpu": cpu_header(rows),
            "fell_back": [r["job"] for r in rows if r.get("fallback")],
            # jobs MLflow holds nothing or only part of (orchestrator-import puts them there); a job its config
            # refused before any run is meant to have none
            "untracked": [r["job"] for r in rows
                          if not r.get("refused") and (r.get("tracking_error") or not r.get("run_id"))],
            "random_head": [r["job"] for r in rows if r.get("random_head")]}


def print_summary(summary: Dict[str, Any], console: Optional[Console] = None) -> None:
    # a sweep table is wide: do not squeeze it into 80 columns when stdout is not a terminal
    console = console or Console(width=max(Console().width, 200))
    rows = summary["rows"]
    title = f"sweep summary: {len(rows)} jobs, {summary['failed']} not finished"
    if summary.get("parent_id"):
        title += f" (MLflow parent run {summary['parent_id']})"
    console.print(title)
    console.print(summary["cpu"], highlight=False)
    console.print(table(rows))
    if summary.get("fell_back"):
        console.print(f"[yellow]fell back[/yellow]: job(s) {', '.join(map(str, summary['fell_back']))} ran without "
                      "a plugin that could not apply (runtime.on_plugin_error=fallback); their rows show the stack "
                      "that ran")
    if summary.get("random_head"):
        console.print(f"[yellow]random head[/yellow]: job(s) {', '.join(map(str, summary['random_head']))} ran with a "
                      "newly initialized task head (model.allow_random_head=true): their accuracy means nothing")
    if summary.get("recommendation"):
        console.print(summary["recommendation"], highlight=False, soft_wrap=True)
    if summary.get("files"):
        files = [Path(f) for f in summary["files"]]
        console.print(f"summary files: {files[0].parent.resolve()}/ ({', '.join(f.name for f in files)})",
                      highlight=False, soft_wrap=True)


def report_main(argv: Optional[List[str]] = None) -> int:
    """``orchestrator-report <parent run id | sweep dir>``: print a sweep's summary table again; runs of the sweep
    that a dead process left RUNNING are closed on the way (KILLED, or what their results.json says)."""
    gate, tracking_default = SummaryConfig(), TrackingConfig()
    parser = argparse.ArgumentParser(prog="orchestrator-report", description=report_main.__doc__)
    parser.add_argument("target", help="MLflow parent run id of a sweep, or a sweep directory (outputs/multirun/...)")
    parser.add_argument("--tracking-uri", default=None, help="default: for a sweep directory the store its jobs "
                        f"used, else {tracking_default.uri}")
    parser.add_argument("--min-accuracy-ratio", type=float, default=gate.min_accuracy_ratio,
                        help=f"accuracy gate (default {gate.min_accuracy_ratio})")
    parser.add_argument("--min-agreement", type=float, default=gate.min_agreement,
                        help=f"agreement gate (default {gate.min_agreement})")
    args = parser.parse_args(argv)
    gate = SummaryConfig(min_accuracy_ratio=args.min_accuracy_ratio, min_agreement=args.min_agreement)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .reconcile import reconcile_sweep
    from .tracking import connect, open_store

    path = Path(args.target)
    client, parent, tracked = None, None, []
    if path.is_dir():
        jobs = job_dirs(path)
        if not jobs:
            print(f"error: {args.target}: not a sweep directory (no job folders holding .hydra/)", file=sys.stderr)
            return 2
        local = rows_from_dir(path)
        id_file = path / PARENT_RUN_FILE
        if id_file.is_file() and not id_file.is_symlink():
            tracking = tracking_of(jobs[0], args.tracking_uri)
            try:
                client, _ = open_store(tracking)
                parent = id_file.read_text().strip()
                reconcile_sweep(client, parent, "orchestrator-report")
                tracked = rows_from_mlflow(client, parent)
            except Exception as e:  # the jobs' results.json still make the table
                log.error("the sweep's MLflow runs could not be read from %s (%s); the table comes from the jobs' "
                          "results.json", tracking.uri, describe(e))
                client, parent = None, None
        rows = merge_rows(tracked, local)
    else:
        from mlflow.exceptions import MlflowException

        uri = args.tracking_uri or tracking_default.uri
        try:
            client = connect(SimpleNamespace(uri=uri))
        except Exception as e:
            print(f"error: {uri}: {describe(e)}", file=sys.stderr)
            return 1
        try:
            reconcile_sweep(client, args.target, "orchestrator-report")
            rows = rows_from_mlflow(client, args.target)
        except MlflowException as e:
            print(f"error: {args.target!r} is neither a sweep directory nor a run in {uri}: "
                  f"{first_line(e)}", file=sys.stderr)
            return 2
        # jobs that never reached MLflow are in the sweep directory the parent names, when it is still there
        sweep_dir = Path(client.get_run(args.target).data.tags.get("sweep.dir") or "/nonexistent")
        rows = merge_rows(rows, rows_from_dir(sweep_dir) if sweep_dir.is_dir() else [])
        parent = args.target
    print_summary(summary_of(rows, parent, assess(rows, client, gate)))
    return 0
