"""MultiStream: queries of 8 samples, the next issued when the last completes; the figure is the per-query p99
latency as LoadGen's early-stopping estimate (what MLPerf reports for MultiStream)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..errors import DatasetError
from .base import FigureOfMerit, Scenario, ScenarioOptions


@dataclass
class MultiStreamOptions(ScenarioOptions):
    samples_per_query: int = 8
    # early stopping needs 662 queries for its p99 estimate (also mlperf.conf's MultiStream minimum)
    min_query_count: int = 662
    # LoadGen's multi_stream_expected_latency hint (per query); null: half the warm-up estimate
    expected_latency_ms: Optional[float] = None


class MultiStream(Scenario):
    name = "multi_stream"
    loadgen_scenario = "MultiStream"
    Options = MultiStreamOptions
    figure_of_merit = FigureOfMerit("multi_stream_p99_ms", "ms", False,
                                    "LoadGen MultiStream: early-stopping estimate of the 99th percentile query latency")

    @classmethod
    def validate_options(cls, options: Any) -> None:
        super().validate_options(options)
        cls.require(options.samples_per_query >= 1, "samples_per_query", options.samples_per_query, "must be >= 1")
        cls.require(options.expected_latency_ms is None or options.expected_latency_ms > 0, "expected_latency_ms",
                    options.expected_latency_ms, "must be > 0 or null (from the warm-up)")

    def batch_limit(self, options) -> int:
        return options.max_batch or options.samples_per_query

    def settings(self, lg, options, estimate, n_rows: int):
        if n_rows < options.samples_per_query:
            raise DatasetError(f"scenario=multi_stream: {n_rows} rows cannot fill one query of "
                               f"scenario.samples_per_query={options.samples_per_query}")
        return super().settings(lg, options, estimate, n_rows)

    def configure(self, settings, options, estimate, n_rows: int) -> None:
        settings.multi_stream_samples_per_query = options.samples_per_query
        if options.expected_latency_ms:
            hint_s = options.expected_latency_ms / 1000.0
        else:
            hint_s = 0.5 * options.samples_per_query / estimate.throughput
        settings.multi_stream_expected_latency_ns = max(1000, int(hint_s * 1e9))

    def too_short_retry(self, settings, metrics: Dict[str, float]) -> bool:
        settings.multi_stream_expected_latency_ns = max(1000, settings.multi_stream_expected_latency_ns // 4)
        return True

    def figure(self, metrics: Dict[str, float]):
        estimate = (metrics.get("loadgen_early_stopping_p99_ms")
                    or metrics.get("loadgen_query_latency_p99_ms", float("nan")))
        metrics[self.figure_of_merit.name] = estimate
        return super().figure(metrics)
