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
from .naming import throughput_unit
from .records import (COLUMNS, DECISIONS_FILE, EAGER, RACE_FILE, PARENT_RUN_FILE, TERMINAL, job_dirs, override_values, row_of_dir,
                      row_of_run, task_class, tracking_of, valid_name)

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
    swept = swept_columns(rows)
    # a column once: a swept `scenario` key is the scenario column already
    extra = ([c for c in SCENARIO_COLUMNS if c not in base and c not in swept]
             if any(r.get("figure") for r in rows) else [])
    return base[:at] + swept + extra + [c for c in base[at:] if c not in extra and c not in swept]


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
    verdict.assess(rows, min_accuracy_ratio, min_agreement, task_class, decisions_loader(client), gate.min_effect)
    verdict.mark_pareto(rows)
    return verdict.recommend(rows, gate.min_effect)


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


# a latency percentile is the time of one batch (runtime.batch_size rows)
HEADERS = {"throughput": "rows/s", "latency_p50_ms": "p50 ms/batch", "latency_p90_ms": "p90 ms/batch",
           "latency_p99_ms": "p99 ms/batch",
           "parity_max_abs_diff": "parity |Δ|", "parity_agreement": "agree (sample)", "eval_throughput": "eval rows/s",
           "peak_fraction_pct": "% peak", "accuracy_delta": "Δ metric", "speedup_ci": "95% CI",
           "agreement_vs_baseline": "agree (all)", "fallback": "fell back", "figure_value": "value",
           "figure_unit": "unit"}


def table(rows: List[Dict[str, Any]], title: Optional[str] = None) -> Table:
    t = Table(title=title, title_justify="left")
    shown = columns(rows, SHOWN)
    swept = swept_columns(rows)
    # rows/s says what a row is: sentences (2 per STS pair), QA features (question+context windows), ...
    headers = {**HEADERS, "throughput": throughput_unit(r.get("task") for r in rows)}
    for c in shown:
        t.add_column(headers.get(c, c), justify="left" if c in ("stack", "precision", "metric", "status", "gate",
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


def metric_label(rows: List[Dict[str, Any]]) -> str:
    """The task metric's axis label with its scale: every task reports its metric on 0-100 (accuracy %, F1 x100,
    Spearman x100), higher is better."""
    metric = next((r["metric"] for r in rows if r.get("metric")), None) or "task metric"
    return f"{metric} (0-100 scale, higher is better)"


def figure(rows: List[Dict[str, Any]], title: str = ""):
    """The summary figure (None without a finished row): speed vs accuracy on top, its legend beside it, one
    throughput bar per job below across the whole width. Labels are placed so that none overlaps another at any job
    count up to at least 24 (tests/test_dashboard.py lays 24 out and checks their boxes)."""
    done = [r for r in rows if r.get("throughput") and r.get("value") is not None]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = throughput_unit(r.get("task") for r in done)
    # wide enough that every bar keeps a readable, vertical label; tall enough for a legend line per job
    width = max(13.0, 4.0 + 0.42 * len(done))
    fig = plt.figure(figsize=(width, 10.0 + 0.12 * max(0, len(done) - 12)))
    grid = fig.add_gridspec(2, 2, width_ratios=[1.5, 1.0], height_ratios=[1.0, 1.0])
    ax1, legend_ax, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    recommended = next((r for r in done if r.get("recommended")), None)
    handles = []
    for r in done:
        is_base = r.get("gate") == "baseline"
        marker = "*" if is_base else ("X" if r.get("gate") == "fail" else "o")
        ax1.scatter(r["throughput"], r["value"], marker=marker, s=170 if is_base else 60,
                    color="black" if is_base else ("tab:red" if r.get("gate") == "fail" else "tab:blue"), zorder=3)
        handles.append(ax1.scatter([], [], marker="none", label=f"{r['job']}: {verdict.label(r)}"
                                   + (" (baseline)" if is_base else "") + (" (gate fail)" if r.get("gate") == "fail"
                                                                            else "")))
    front = sorted((r for r in done if r.get("pareto")), key=lambda r: r["throughput"])
    if len(front) > 1:
        handles += ax1.plot([r["throughput"] for r in front], [r["value"] for r in front], color="tab:green",
                            linewidth=1.2, linestyle="--", label="Pareto front", zorder=2)
    if recommended is not None:
        handles.append(ax1.scatter(recommended["throughput"], recommended["value"], s=420, facecolors="none",
                                   edgecolors="tab:green", linewidths=2, zorder=4,
                                   label=f"recommended: job {recommended['job']} ({verdict.label(recommended)})"))
    ax1.ticklabel_format(axis="both", style="plain", useOffset=False)
    values = [r["value"] for r in done]
    span = max(values) - min(values)
    mid = (max(values) + min(values)) / 2
    # a 0.003-point wobble must not fill the axis and look like an accuracy loss: show at least 2 points
    if span < 2.0:
        ax1.set_ylim(mid - 1.0, mid + 1.0)
    xs = [r["throughput"] for r in done]
    pad = (max(xs) - min(xs)) * 0.08 or max(xs) * 0.05
    ax1.set_xlim(min(xs) - pad, max(xs) + pad)
    ax1.set_xlabel(f"throughput ({unit})")
    ax1.set_ylabel(metric_label(done))
    ax1.set_title("speed vs accuracy (numbers: jobs, named in the legend)", fontsize=9)
    legend_ax.axis("off")
    legend_ax.legend(handles=handles, fontsize=7 if len(done) <= 16 else 6, loc="upper left", handlelength=1,
                     frameon=False, markerscale=0.5, title="job: stack/precision that ran, swept values",
                     title_fontsize=7)
    _throughput_bars(ax2, done, unit)
    if title:
        import textwrap

        # the recommendation is long: wrapped to the figure's width (about 12 characters an inch at 9 pt), 3 lines
        lines = textwrap.wrap(title, width=int(width * 12))
        fig.suptitle("\n".join(lines[:3]) + (" ..." if len(lines) > 3 else ""), fontsize=9)
    fig.tight_layout()
    _number_points(fig, ax1, done)
    return fig


def plot(rows: List[Dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """Speed vs accuracy with the Pareto front and the recommended job; throughput bars with their intervals and
    speedups (:func:`figure`), saved as a PNG."""
    fig = figure(rows, title)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rings(max_radius: int = 90):
    """Offsets (points) around a point, nearest first: where its number may go."""
    yield 5, 5
    for radius in range(12, max_radius, 9):
        for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)):
            yield int(dx * radius) + (0 if dx >= 0 else -6), int(dy * radius)


def _overlaps(box, boxes, pad: float = 1.0) -> bool:
    return any(box.x0 < b.x1 + pad and b.x0 < box.x1 + pad and box.y0 < b.y1 + pad and b.y0 < box.y1 + pad
               for b in boxes)


def _number_points(fig, ax, done: List[Dict[str, Any]]) -> None:
    """Job numbers beside the points (names are in the legend). Each number takes the nearest place around its
    point where its box (as the renderer draws it) meets no other number and no marker and stays in the axes; a
    number moved away gets a thin line to its point."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    points_px = fig.dpi / 72.0
    # the markers themselves, as small boxes the numbers keep off
    from matplotlib.transforms import Bbox

    placed = [Bbox.from_bounds(*(to_px((r["throughput"], r["value"])) - 5 * points_px), 10 * points_px,
                               10 * points_px) for r in done]
    for r in sorted(done, key=lambda r: (r["throughput"], r["value"])):
        xy = (r["throughput"], r["value"])
        for dx, dy in _rings():
            text = ax.annotate(str(r["job"]), xy, fontsize=8, xytext=(dx, dy), textcoords="offset points")
            box = text.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not _overlaps(box, placed):
                placed.append(box)
                if abs(dx) + abs(dy) > 12:  # moved away: a thin line back to its point (a text-less annotation)
                    ax.annotate("", xy, xytext=(dx + 3, dy + 4), textcoords="offset points",
                                arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.5, shrinkA=4, shrinkB=3))
                break
            text.remove()
        else:  # nowhere free within reach (more coinciding points than places): the legend still names it
            log.debug("no free place for job %s's number", r["job"])


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


# more bars than this and their labels are turned upright: side by side they would run into each other
_FLAT_LABELS = 8


def _throughput_bars(ax, done: List[Dict[str, Any]], unit: str = "rows/s") -> None:
    """One bar per job (throughput, 95 % interval), labelled with its swept values; the speedup over its eager fp32
    baseline written above the bar's interval (never through it). Throughput, not speedup, is the height: in a
    sweep of batch sizes every job is its own baseline and every speedup would read 1.0."""
    bars = bar_layout(done)
    xs = [x for x, _, _ in bars]
    order = [r for _, _, r in bars]
    lows = [max(r["throughput"] - (r.get("throughput_ci_low") or r["throughput"]), 0) for r in order]
    highs = [max((r.get("throughput_ci_high") or r["throughput"]) - r["throughput"], 0) for r in order]
    ax.bar(xs, [r["throughput"] for r in order], yerr=[lows, highs], capsize=3, width=0.8,
           color=["black" if r.get("gate") == "baseline" else
                  ("tab:red" if r.get("gate") == "fail" else "tab:blue") for r in order])
    upright = len(order) > _FLAT_LABELS
    for xi, r, high in zip(xs, order, highs):
        if r.get("speedup") is not None and r.get("gate") != "baseline":
            ax.annotate(f"{r['speedup']:.2f}x", (xi, r["throughput"] + high), xytext=(0, 4),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7,
                        rotation=90 if upright else 0)
    top = max(r["throughput"] + h for r, h in zip(order, highs))
    ax.set_ylim(0, top * (1.25 if upright else 1.12))  # room for the speedups above the tallest interval
    labels = [label if not upright else label.replace("\n", "  ") for _, label, _ in bars]
    ax.set_xticks(xs, labels, fontsize=7, rotation=90 if upright else 0)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.set_ylabel(f"throughput ({unit}, 95% interval)")
    ax.set_xlabel("job (swept values, stack/precision that ran)")
    ax.set_title("throughput per job (black: eager fp32 baseline; above the bars: speedup vs it)", fontsize=9)


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
    out["gate"] = gate or SummaryConfig()
    header, recommendation = out["cpu"], out["recommendation"]
    if write_files and sweep_dir is not None and sweep_dir.is_dir():
        csv = sweep_dir / "summary.csv"
        frame(rows).to_csv(csv, index=False)
        md = sweep_dir / "summary.md"
        # the answer first (the parent run's description has it with a narrow table of the jobs)
        best = winner(out)
        md.write_text(markdown(rows, f"### {'Recommended: ' + best if best else 'No recommendation'}\n\n{header}"
                                     f"\n\n{recommendation}"))
        png = plot(rows, sweep_dir / "summary.png", f"{header}   {recommendation or ''}")
        out["files"] = [p for p in (csv, md, png) if p is not None]
    race = sweep_dir / RACE_FILE if sweep_dir is not None else None
    if race is not None and race.is_file() and not race.is_symlink():
        out["files"].append(race)  # the race's log (rounds, orders, eliminations, why it ended), for the parent
        try:
            log_ = json.loads(race.read_text())
            out["race_stopped"] = str(log_.get("stopped") or "")
            sd, dof = log_.get("process_sd"), log_.get("process_dof") or 0
            processes = (log_.get("config") or {}).get("processes", 1)
            # what every raced interval was widened by (orchestrator/stats.py, process-level variation)
            out["race_processes"] = (f"{processes} processes per job; spread between processes {100 * sd:.1f} % "
                                     f"({dof} dof), in every interval" if sd is not None
                                     else f"{processes} process(es) per job; spread between processes not measured")
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    if store is not None and parent_id:
        out["ui"] = ui_link(store, parent_id)
    out["stored"] = storage(sweep_dir, store, [r["run_id"] for r in rows if r.get("run_id")]
                            + ([parent_id] if parent_id else []))
    if store is not None and parent_id:
        try:
            log_to_parent(store, parent_id, out, stopped)
        except Exception as e:
            store_error = describe(e)
            log.error("sweep summary: could not be logged to MLflow parent run %s (%s); orchestrator-import %s "
                      "puts the sweep into MLflow later", parent_id, store_error, sweep_dir)
    out["store_error"] = store_error
    return out


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 2)


def storage(sweep_dir: Optional[Path], client, run_ids: List[str]) -> Dict[str, Optional[float]]:
    """How much the sweep stored: MB in its run folders (every file under the sweep directory) and MB of MLflow
    artifacts of its runs (the parent's and each job's); None for a part that cannot be read."""
    local = None
    if sweep_dir is not None and Path(sweep_dir).is_dir():
        local = _mb(sum(p.stat().st_size for p in Path(sweep_dir).rglob("*") if p.is_file() and not p.is_symlink()))
    tracked = None
    if client is not None and run_ids:
        def size(run_id: str, path: Optional[str] = None) -> int:
            return sum(size(run_id, a.path) if a.is_dir else (a.file_size or 0)
                       for a in client.list_artifacts(run_id, path))

        try:
            tracked = _mb(sum(size(r) for r in run_ids))
        except Exception as e:  # sizes are a courtesy: a store that cannot list them costs the line only
            log.warning("sweep summary: MLflow artifact sizes could not be read (%s)", describe(e))
    return {"run_folders_mb": local, "mlflow_mb": tracked}


def ui_link(client, parent_id: str) -> Optional[str]:
    """Where the MLflow UI shows this sweep's jobs side by side: the runs view (not the GenAI one MLflow 3.17 opens
    by default), the sweep's jobs listed flat (a filter and a sort by their speedup), best first."""
    from urllib.parse import quote, urlparse

    try:
        exp_id = client.get_run(parent_id).info.experiment_id
    except Exception:
        return None
    uri = str(getattr(client, "tracking_uri", "") or "")
    served = urlparse(uri).scheme in ("http", "https")  # else a local store: `mlflow ui` serves it on its default
    base = uri.rstrip("/") if served else "http://127.0.0.1:5000"
    jobs = quote(f"tags.mlflow.parentRunId = '{parent_id}'")
    query = (f"workflowType=machine_learning&searchFilter={jobs}"
             f"&orderByKey={quote('metrics.`summary/speedup`')}&orderByAsc=false&compareRunsMode=CHART")
    link = f"{base}/#/experiments/{exp_id}/runs?{query}"
    return link if served else f"{link}  (after: mlflow ui --backend-store-uri {uri})"


def stored_line(stored: Optional[Dict[str, Optional[float]]]) -> str:
    if not stored:
        return ""
    parts = [f"{stored['run_folders_mb']:.1f} MB in the run folders" if stored.get("run_folders_mb") is not None
             else None,
             f"{stored['mlflow_mb']:.1f} MB in MLflow artifacts" if stored.get("mlflow_mb") is not None else None]
    parts = [p for p in parts if p]
    return f"the sweep stored {' and '.join(parts)}" if parts else ""


# the compact table of the parent run's description: what decides, one line per job
NOTE_COLUMNS = [("job", "job"), ("label", "what ran"), ("value", "metric"), ("accuracy_delta", "Δ metric"),
                ("throughput", "throughput"), ("speedup", "speedup"), ("speedup_ci", "95% CI"),
                ("gate", "gate"), ("status", "status")]


def winner(out: Dict[str, Any]) -> Optional[str]:
    """One short line for the recommended job: 'job 4 (<stack>/int8): 1.83x [95% 1.70-1.95], spearman -0.12'."""
    best = next((r for r in out["rows"] if r.get("recommended")), None)
    if best is None:
        return None
    delta = best.get("accuracy_delta")
    return (f"job {best['job']} ({verdict.label(best)}): {verdict._interval(best)}"
            + (f", {best['metric']} {delta:+.2f}" if delta is not None else ""))


def dashboard_note(out: Dict[str, Any]) -> str:
    """The parent run's description (MLflow's ``mlflow.note.content``, shown as markdown on the run's page): the
    winner with its speedup, interval and accuracy cost, the whole recommendation, a table of every job, the CPU and
    how much the sweep stored."""
    rows = out["rows"]
    best = winner(out)
    lines = [f"### Recommended: {best}" if best else "### No recommendation", "",
             out.get("recommendation") or "", "", f"{out['cpu']}; {len(rows)} jobs, {out['failed']} not finished", ""]
    unit = throughput_unit(r.get("task") for r in rows)
    metric = next((r["metric"] for r in rows if r.get("metric")), "metric")
    heads = {"value": metric, "throughput": unit}
    lines.append("| " + " | ".join(heads.get(c, h) for c, h in NOTE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(NOTE_COLUMNS))
    for r in rows:
        cells = []
        for c, _ in NOTE_COLUMNS:
            text = verdict.label(r) if c == "label" else _cell(r, c)
            if c == "speedup" and r.get("speedup") is not None:
                text += "x"
            if c == "job" and r.get("recommended"):
                text = f"**{text}** (recommended)"
            cells.append(text.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    stored = stored_line(out.get("stored"))
    gate = out.get("gate") or SummaryConfig()
    lines += ["", f"Speedup: throughput over the eager fp32 job's, 95% interval; gate: keeps >= "
              f"{gate.min_accuracy_ratio:.0%} of its metric and agrees with it on >= {gate.min_agreement:.0%} of "
              "examples (summary.min_accuracy_ratio, summary.min_agreement)."
              + (f" {stored[0].upper() + stored[1:]}." if stored else ""),
              "Charts: each job's verdict is in the section `summary/` of its run's metrics (speedup, interval, "
              "accuracy_delta, gate_pass), every job's figures are metrics of this run (`job<N>_speedup`, ...); "
              "files: summary.png, summary.md, summary_table.json (Artifacts)."]
    return "\n".join(lines)


def _finite(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def dashboard_metrics(out: Dict[str, Any]) -> Dict[str, float]:
    """The parent's metrics MLflow shows as columns and charts: one per job and figure (``job3_speedup``,
    ``job3_throughput``, ``job3_<metric>``), the recommended job's figures, the sweep's storage."""
    metrics: Dict[str, float] = {}
    for r in out["rows"]:
        job = str(r["job"])
        for key, name in (("speedup", "speedup"), ("throughput", "throughput"), ("value", r.get("metric")),
                          ("accuracy_delta", "accuracy_delta"), ("figure_value", r.get("figure"))):
            v = _finite(r.get(key))
            if v is not None and name and valid_name(f"job{job}_{name}"):
                metrics[f"job{job}_{name}"] = v
    best = next((r for r in out["rows"] if r.get("recommended")), None)
    if best is not None:
        for key in ("speedup", "speedup_ci_low", "speedup_ci_high", "accuracy_delta", "agreement_vs_baseline"):
            v = _finite(best.get(key))
            if v is not None:
                metrics[f"recommended_{key}"] = v
        job = _finite(best["job"])
        if job is not None:
            metrics["recommended_job"] = job
    for key, v in (out.get("stored") or {}).items():
        if _finite(v) is not None:
            metrics[f"stored_{key}"] = float(v)
    return metrics


# the section of MLflow's chart view where a job's verdict goes: the UI groups metrics by the prefix before "/"
VERDICT_SECTION = "summary"


def _log_verdicts(client, rows: List[Dict[str, Any]], ts: int) -> None:
    """Each job's own speedup, interval, accuracy cost and gate on its run, as metrics ``summary/<name>``: MLflow's
    chart view shows them in a section of their own, a bar per job, and its runs list sorts the jobs by them (a
    finished run stays finished)."""
    from mlflow.entities import Metric, RunTag

    for r in rows:
        if not r.get("run_id") or r.get("status") not in TERMINAL:
            continue
        figures = {k: _finite(r.get(k)) for k in ("speedup", "speedup_ci_low", "speedup_ci_high", "accuracy_delta",
                                                  "agreement_vs_baseline", "throughput")}
        if r.get("metric"):
            figures[str(r["metric"])] = _finite(r.get("value"))
        metrics = [Metric(f"{VERDICT_SECTION}/{k}", v, ts, 0) for k, v in figures.items()
                   if v is not None and valid_name(f"{VERDICT_SECTION}/{k}")]
        if r.get("gate") in ("pass", "fail", "baseline"):
            metrics.append(Metric(f"{VERDICT_SECTION}/gate_pass", 1.0 if r["gate"] in ("pass", "baseline") else 0.0, ts, 0))
        tags = [RunTag("gate", str(r.get("gate") or "-")), RunTag("label", verdict.label(r)[:5000])]
        if r.get("gate_reason"):
            tags.append(RunTag("gate_reason", str(r["gate_reason"])[:5000]))
        note = f"**{verdict.label(r)}** (job {r['job']})"
        if r.get("speedup") is not None and r.get("gate") != "baseline":
            note += f": {verdict._interval(r)} vs eager fp32 (job {r.get('baseline_job')})"
        if r.get("gate_reason"):
            note += f"; gate {r.get('gate')}: {r['gate_reason']}"
        tags.append(RunTag("mlflow.note.content", note))
        try:
            client.log_batch(r["run_id"], metrics=metrics, tags=tags)
        except Exception as e:  # a job run deleted meanwhile: the parent still gets its summary
            log.warning("sweep summary: job %s's verdict could not be logged to its run (%s)", r["job"], describe(e))


def log_to_parent(client, parent_id: str, out: Dict[str, Any], stopped: Optional[str] = None) -> None:
    """The summary on the sweep's parent run, which then ends: KILLED when the sweep was stopped, FAILED when a job
    did not finish, else FINISHED. What the MLflow UI shows without opening artifacts: the run's description
    (winner, speedup with interval, accuracy cost, a table of every job), a tag ``winner``, metrics per job
    (``job<N>_speedup``, ...) and of the recommended job; each job's own run gets its speedup and gate."""
    import time

    from mlflow.entities import Metric, RunTag

    rows = out["rows"]
    client.log_table(parent_id, data=frame(rows), artifact_file="summary_table.json")
    for p in out["files"]:
        client.log_artifact(parent_id, str(p))
    ts = int(time.time() * 1000)
    _log_verdicts(client, rows, ts)
    tags = [RunTag("recommendation", (out["recommendation"] or "")[:5000]), RunTag("summary.cpu", out["cpu"]),
            RunTag("mlflow.note.content", dashboard_note(out)),
            RunTag("winner", (winner(out) or "none: " + (out["recommendation"] or "no recommendation"))[:5000])]
    if stopped:
        tags.append(RunTag("error", stopped))
    if out.get("race_stopped"):
        tags.append(RunTag("race.stopped", out["race_stopped"][:5000]))
    if out.get("race_processes"):
        tags.append(RunTag("race.processes", out["race_processes"]))
    metrics = [Metric("n_jobs", float(len(rows)), ts, 0), Metric("failed_jobs", float(out["failed"]), ts, 0),
               Metric("fallback_jobs", float(len(out["fell_back"])), ts, 0)]
    metrics += [Metric(k, v, ts, 0) for k, v in dashboard_metrics(out).items()]
    for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(parent_id, metrics=metrics[i:i + 900], tags=tags if i == 0 else [])
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
    if summary.get("ui"):
        console.print(f"MLflow UI, the jobs side by side: {summary['ui']}", highlight=False, soft_wrap=True)
    if stored_line(summary.get("stored")):
        console.print(stored_line(summary.get("stored")), highlight=False, soft_wrap=True)
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
