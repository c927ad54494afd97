"""Console output: one results table per run."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

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


def results_table(results: Dict[str, Any], task_metrics: List[str]) -> Table:
    """One run, one row per figure: narrow enough for any terminal."""
    m = results.get("metrics", {})
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in task_metrics:
        table.add_row(key, _fmt(m.get(key), "{:.2f}"))
    for key, head, fmt in PERF_COLUMNS:
        table.add_row(head, _fmt(m.get(key), fmt))
    return table


def print_results(results: Dict[str, Any], task_metrics: List[str], console: Optional[Console] = None) -> None:
    console = console or Console(stderr=False)
    console.print(f"{results.get('run_name', 'run')}: stack={results.get('stack') or 'eager'} "
                  f"precision={results.get('precision', '?')} [{results.get('status', '?')}]")
    console.print(results_table(results, task_metrics))
    if results.get("error"):
        # escaped: an error quoting optimization=[a,b] must not be read as rich markup; one line, unwrapped
        console.print(f"[red]error:[/red] {escape(str(results['error']))}", soft_wrap=True)
    if results.get("tracking_error"):
        console.print(f"[yellow]MLflow tracking failed[/yellow] ({escape(str(results['tracking_error']))}); "
                      f"results are in {results.get('run_dir')}/results.json")
    elif results.get("run_id"):
        console.print(f"MLflow run {results['run_id']} in {results.get('tracking_uri')}")
