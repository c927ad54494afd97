"""Offline: every sample in one query, served in batches as fast as the stack can; the figure is samples/s."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from .base import FigureOfMerit, Scenario, ScenarioOptions

# mlperf.conf: Offline's min_query_count (samples) is the dataset size, at most this many
OFFLINE_MAX_MIN_SAMPLES = 24576


@dataclass
class OfflineOptions(ScenarioOptions):
    # samples in LoadGen's one query, at least; null: every row once (MLPerf: the dataset, at most 24576)
    min_query_count: Optional[int] = None
    # LoadGen's offline_expected_qps: it sizes the query to last min_duration at this rate; null: 1.5x the warm-up
    # estimate (a run that still ends early is retried once at 1.5x the rate it measured)
    expected_qps: Optional[float] = None


class Offline(Scenario):
    name = "offline"
    loadgen_scenario = "Offline"
    Options = OfflineOptions
    figure_of_merit = FigureOfMerit("offline_samples_per_second", "samples/s", True,
                                    "LoadGen Offline: samples per second over its one query")

    @classmethod
    def validate_options(cls, options: Any) -> None:
        super().validate_options(options)
        cls.require(options.expected_qps is None or options.expected_qps > 0, "expected_qps", options.expected_qps,
                    "must be > 0 or null (from the warm-up)")

    def configure(self, settings, options, estimate, n_rows: int) -> None:
        settings.offline_expected_qps = options.expected_qps or 1.5 * estimate.throughput
        if options.compliant:
            settings.min_query_count = min(OFFLINE_MAX_MIN_SAMPLES, n_rows)
        else:
            settings.min_query_count = options.min_query_count or n_rows

    def too_short_retry(self, settings, metrics: Dict[str, float]) -> bool:
        measured = metrics.get("loadgen_samples_per_second", 0.0)
        settings.offline_expected_qps = max(2.0 * settings.offline_expected_qps, 1.5 * measured)
        return True

    def figure(self, metrics: Dict[str, float]):
        metrics[self.figure_of_merit.name] = metrics.get("loadgen_samples_per_second", float("nan"))
        return super().figure(metrics)
