"""Console output: one results table per run."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .naming import latency_unit, throughput_unit

# (metric key, column title, format)
PERF_COLUMNS = [
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    # MLPerf's single-stream figure (runtime=single_stream tells the user to read it)
    ("latency_p90_ms", "p90 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("throughput", "rows/s", "{:.1f}"),
    ("eval_throughput", "eval rows/s", "{:.1f}"),
    ("eval_overhead_pct", "eval overhead %", "{:.1f}"),
    ("peak_fraction_pct", "% of peak", "{:.1f}"),
    ("parity_max_abs_diff", "parity max|Δ|", "{:.2e}"),
    ("parity_agreement", "agreement (sample)", "{:.1%}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("stack_apply_s", "optimize s", "{:.2f}"),
]


def _fmt(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _with_unit(head: str, results: Dict[str, Any]) -> str:
    """A latency is per batch of runtime.batch_size rows; rows/s says what a row is (sentences, QA features)."""
    if head.startswith("p") and head.endswith(" ms"):
        batch = ((results.get("config") or {}).get("runtime") or {}).get("batch_size")
        return f"{head[:-3]} {latency_unit(batch)}"
    if head.endswith("rows/s"):
        return head[:-len("rows/s")] + throughput_unit([results.get("task")])
    return head


def results_table(results: Dict[str, Any], task_metrics: List[str]) -> Table:
    """One run, one row per figure: narrow enough for any terminal."""
    m = results.get("metrics", {})
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in task_metrics:
        table.add_row(key, _fmt(m.get(key), "{:.2f}"))
    scenario = results.get("scenario") or {}
    figure = scenario.get("figure") or {}
    if figure:  # a LoadGen scenario: its figure of merit first, with its unit and LoadGen's verdict
        table.add_row(f"{scenario.get('name')}: {figure.get('name')}",
                      f"{_fmt(figure.get('value'), '{:.2f}')} {figure.get('unit', '')}".strip())
        table.add_row("LoadGen result", "VALID" if scenario.get("valid") else "INVALID")
    for key, head, fmt in PERF_COLUMNS:
        if figure and m.get(key) is None:
            continue  # the closed-loop timing pass did not run: no row of dashes for it
        table.add_row(_with_unit(head, results), _fmt(m.get(key), fmt))
    return table


def print_results(results: Dict[str, Any], task_metrics: List[str], console: Optional[Console] = None) -> None:
    """The run's table; nothing for a run its config refused (its one error line is all there is to say)."""
    if results.get("refused"):
        return
    console = console or Console(stderr=False)
    console.print(f"{results.get('run_name', 'run')}: stack={results.get('stack') or 'eager'} "
                  f"precision={results.get('precision', '?')} [{results.get('status', '?')}]")
    measured = results.get("metrics") or {}
    if any(measured.get(k) is not None for k in [*task_metrics, *(key for key, _, _ in PERF_COLUMNS)]):
        console.print(results_table(results, task_metrics))  # a run that failed before any figure: no dashes
    # an error is not repeated here: the CLI (or a sweep's log) says it once, in its one line
    if results.get("tracking_error"):
        console.print(f"[yellow]MLflow tracking failed[/yellow] ({escape(str(results['tracking_error']))}); "
                      f"results are in {results.get('run_dir')}/results.json")
    elif results.get("run_id"):
        console.print(f"MLflow run {results['run_id']} in {results.get('tracking_uri')}")
