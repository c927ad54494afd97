"""SingleStream: one sample per query, the next issued when the last completes; the figure is the p90 latency as
LoadGen's early-stopping estimate (what MLPerf reports for SingleStream)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from .base import FigureOfMerit, Scenario, ScenarioOptions


@dataclass
class SingleStreamOptions(ScenarioOptions):
    # early stopping needs 64 queries for its p90 estimate; LoadGen's default minimum is 100
    min_query_count: int = 100
    # LoadGen's single_stream_expected_latency hint: it generates queries for twice min_duration at this latency;
    # null: half the warm-up estimate (a faster SUT would run out of queries before min_duration: INVALID)
    expected_latency_ms: Optional[float] = None


class SingleStream(Scenario):
    name = "single_stream"
    loadgen_scenario = "SingleStream"
    Options = SingleStreamOptions
    figure_of_merit = FigureOfMerit("single_stream_p90_ms", "ms", False,
                                    "LoadGen SingleStream: early-stopping estimate of the 90th percentile latency")

    @classmethod
    def validate_options(cls, options: Any) -> None:
        super().validate_options(options)
        cls.require(options.expected_latency_ms is None or options.expected_latency_ms > 0, "expected_latency_ms",
                    options.expected_latency_ms, "must be > 0 or null (from the warm-up)")

    def batch_limit(self, options) -> int:
        return 1

    def configure(self, settings, options, estimate, n_rows: int) -> None:
        hint_s = options.expected_latency_ms / 1000.0 if options.expected_latency_ms else 0.5 * estimate.latency_s
        settings.single_stream_expected_latency_ns = max(1000, int(hint_s * 1e9))

    def too_short_retry(self, settings, metrics: Dict[str, float]) -> bool:
        settings.single_stream_expected_latency_ns = max(1000, settings.single_stream_expected_latency_ns // 4)
        return True

    def figure(self, metrics: Dict[str, float]):
        estimate = metrics.get("loadgen_early_stopping_p90_ms") or metrics.get("loadgen_latency_p90_ms", float("nan"))
        metrics[self.figure_of_merit.name] = estimate
        return super().figure(metrics)
