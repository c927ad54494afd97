"""The contract between the runner and a scenario: how queries arrive, what is measured, which figure decides.

A scenario is a class registered under the entry-point group ``orchestrator.scenarios`` (built-ins the same way);
its ``Options`` dataclass is its config schema (``scenario=<name>``, ``scenario.<key>=...``: the one place its
defaults live). MLPerf's LoadGen drives every timing (:mod:`.loadgen`): the task's featurized rows are the query
sample library, the prepared model + head (``sut_step``: input tensors -> per-row float outputs) the system under
test. For each run the runner calls

1. ``check()`` (classmethod) before anything loads: LoadGen importable, else one line naming the extra;
2. ``parse_options(mapping)`` (classmethod) while the config is validated: a wrong value is a ConfigError;
3. ``accuracy(sut_step, rows, make_batches, options, log_dir)``: LoadGen's AccuracyOnly mode serves every row once
   in this scenario's query pattern; the responses LoadGen logged are the outputs the task's metric reads;
4. ``run(sut_step, rows, make_batches, options, log_dir)``: the performance run(s) -> :class:`ScenarioResult`.

``make_batches(rows, batch_size)`` collates a list of rows into :class:`~orchestrator.measure.Batch` es whose
``rows`` index that list (``batch_size`` None: the runtime's); :func:`orchestrator.scenarios.collate_with` builds it
from ``runtime`` (padding, max_length, sort_by_length, pad_to_multiple_of stay runtime settings).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, NamedTuple, Optional, Sequence

from ..errors import ConfigError, RunInterrupted, first_line
from . import loadgen

# runs retried after one that ended before min_duration because LoadGen's hint was off. More than one: on a loaded
# machine the rate can move several-fold between the warm-up and a run (the 2-core AMD EPYC with the test suite
# beside it: warm-up 181 samples/s, a first run 317, its retry 2453 — short again), and each retry at least doubles
# the hint, so three cover an 8x jump
SHORT_RETRIES = 3
NOT_COMPLIANT = "not MLPerf-compliant (CI durations; scenario.compliant=true applies the official minimums)"


class FigureOfMerit(NamedTuple):
    """What a scenario is judged by: the metric name, its unit and which way is better."""

    name: str
    unit: str
    higher_is_better: bool
    description: str = ""


class Figure(NamedTuple):
    name: str
    value: float
    unit: str
    higher_is_better: bool


@dataclass
class ScenarioResult:
    scenario: str
    # numbers for results.json/MLflow (flat, float); the figure's value is among them under figure.name
    metrics: Dict[str, float]
    figure: Figure
    # LoadGen's verdict on the run the figure comes from (VALID), and why not when it is not
    valid: bool
    reason: str
    # LoadGen's summary/detail logs (and the settings it ran with), to keep with the run
    artifacts: List[Path] = field(default_factory=list)
    compliant: bool = False
    # text worth a tag: LoadGen version, result line, early-stopping verdict, the compliance note
    details: Dict[str, str] = field(default_factory=dict)


@dataclass
class AccuracyResult:
    # one output per row, in row order: what LoadGen's accuracy log holds for that sample
    outputs: List[Any]
    metrics: Dict[str, float] = field(default_factory=dict)
    artifacts: List[Path] = field(default_factory=list)


@dataclass
class ScenarioOptions:
    """Settings every scenario has. Defaults fit CI and a laptop (seconds); ``compliant=true`` applies MLPerf's
    minimums from LoadGen's own mlperf.conf (600 s, the query counts) and the result stops saying it is not
    compliant."""

    # the registered scenario these options are for (filled in when the schema is stored: scenario=<name>)
    name: str = ""
    compliant: bool = False
    # LoadGen's min_duration and min_query_count for a performance run (compliant: the official values instead)
    min_duration_s: float = 1.0
    min_query_count: int = 100
    # LoadGen ends a run early past this (the run is then INVALID); null: no limit
    max_duration_s: Optional[float] = None
    # rows LoadGen keeps loaded for performance runs (it samples queries from them); null: every row
    performance_sample_count: Optional[int] = None
    # largest batch the SUT forms from the samples it has; null: runtime.batch_size
    max_batch: Optional[int] = None
    # batches run before LoadGen starts: kernels warm, and a first estimate of latency and throughput
    warmup_batches: int = 3


class Scenario:
    name: ClassVar[str] = ""
    # mlperf_loadgen.TestScenario member this scenario runs as
    loadgen_scenario: ClassVar[str] = ""
    Options: ClassVar[type] = ScenarioOptions
    figure_of_merit: ClassVar[FigureOfMerit] = FigureOfMerit("", "", True)

    # -- config ---------------------------------------------------------------------------------------------------
    @classmethod
    def check(cls) -> None:
        """Raise ConfigError (one line naming the extra) when LoadGen is not installed; nothing else loads."""
        loadgen.require(f"scenario={cls.name}")

    @classmethod
    def parse_options(cls, options: Any) -> Any:
        from omegaconf import OmegaConf

        if isinstance(options, cls.Options):
            parsed = options
        else:
            try:
                parsed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), options or {}))
            except RunInterrupted:
                raise
            except Exception as e:  # omegaconf keeps the key in full_key, not always in its first line
                key = getattr(e, "full_key", None)
                where = f"scenario.{key}" if key else "scenario"
                raise ConfigError(f"{where} (scenario={cls.name}): {first_line(e)}") from e
        cls.validate_options(parsed)
        return parsed

    @classmethod
    def validate_options(cls, options: Any) -> None:
        o = options
        cls.require(o.min_duration_s >= 0, "min_duration_s", o.min_duration_s, "must be >= 0 (seconds)")
        cls.require(o.min_query_count is None or o.min_query_count >= 1, "min_query_count", o.min_query_count,
                    "must be >= 1")
        cls.require(o.max_duration_s is None or o.max_duration_s > 0, "max_duration_s", o.max_duration_s,
                    "must be > 0 or null (no limit)")
        cls.require(o.performance_sample_count is None or o.performance_sample_count >= 1,
                    "performance_sample_count", o.performance_sample_count, "must be >= 1 or null (every row)")
        cls.require(o.max_batch is None or o.max_batch >= 1, "max_batch", o.max_batch,
                    "must be >= 1 or null (runtime.batch_size)")
        cls.require(o.warmup_batches >= 0, "warmup_batches", o.warmup_batches, "must be >= 0")

    @classmethod
    def require(cls, ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"scenario.{key}={value!r} (scenario={cls.name}): {rule}")

    # -- what a subclass decides ----------------------------------------------------------------------------------
    def batch_limit(self, options: Any) -> Optional[int]:
        """The largest batch the SUT forms (None: the runtime's batch size)."""
        return options.max_batch

    def batch_timeout_s(self, options: Any) -> float:
        """How long the SUT waits for more samples before it runs a partial batch (0: it runs what it has)."""
        return 0.0

    def configure(self, settings: Any, options: Any, estimate: "loadgen.Estimate", n_rows: int) -> None:
        """Scenario-specific LoadGen settings (the expected latency or QPS hint, samples per query, bounds)."""

    def figure(self, metrics: Dict[str, float]) -> Figure:
        fom = self.figure_of_merit
        return Figure(fom.name, float(metrics.get(fom.name, float("nan"))), fom.unit, fom.higher_is_better)

    def too_short_retry(self, settings: Any, metrics: Dict[str, float]) -> bool:
        """Adjust ``settings`` for one more run after LoadGen found the run shorter than min_duration (its hint
        was too pessimistic); False: no retry."""
        return False

    # -- the runs -------------------------------------------------------------------------------------------------
    def run(self, sut_step: Callable, rows: Sequence[Dict[str, List[int]]], make_batches: Callable,
            options: Any = None, log_dir: Path | str = ".") -> ScenarioResult:
        """One LoadGen performance run (retried, up to SHORT_RETRIES times, while it ends before min_duration because
        the hint was off)."""
        o = self.parse_options(options)
        lg = loadgen.require(f"scenario={self.name}")
        log_dir = Path(log_dir)
        estimate = loadgen.estimate(sut_step, rows, make_batches, self.batch_limit(o),
                                    o.warmup_batches)
        settings = self.settings(lg, o, estimate, len(rows))
        outcome = self.perf_run(lg, sut_step, rows, make_batches, o, settings, log_dir / self.name)
        for retry in range(1, SHORT_RETRIES + 1):
            if outcome.valid or not outcome.short or not self.too_short_retry(settings, outcome.metrics):
                break
            outcome = self.perf_run(lg, sut_step, rows, make_batches, o, settings,
                                    log_dir / (f"{self.name}_retry" + (str(retry) if retry > 1 else "")))
        return self.result(o, outcome, estimate)

    def accuracy(self, sut_step: Callable, rows: Sequence[Dict[str, List[int]]], make_batches: Callable,
                 options: Any = None, log_dir: Path | str = ".") -> AccuracyResult:
        """LoadGen's AccuracyOnly mode: every row served once in this scenario's query pattern; the outputs are
        read back from LoadGen's accuracy log (what it recorded as each sample's response)."""
        o = self.parse_options(options)
        lg = loadgen.require(f"scenario={self.name}")
        estimate = loadgen.estimate(sut_step, rows, make_batches, self.batch_limit(o), 0)
        settings = self.settings(lg, o, estimate, len(rows))
        settings.mode = lg.TestMode.AccuracyOnly
        out_dir = Path(log_dir) / f"{self.name}_accuracy"
        t0 = time.perf_counter()
        run = loadgen.run_test(lg, settings, sut_step, rows, make_batches, self.batch_limit(o),
                               self.batch_timeout_s(o), len(rows), out_dir)
        wall = time.perf_counter() - t0
        outputs = loadgen.read_accuracy_log(run.accuracy_log, run.shapes, len(rows))
        missing = [i for i, out in enumerate(outputs) if out is None]
        if missing:
            raise RuntimeError(f"LoadGen's accuracy log has no response for {len(missing)} of {len(rows)} rows "
                               f"(first: row {missing[0]}); see {run.accuracy_log}")
        return AccuracyResult(outputs, {"loadgen_accuracy_wall_s": wall,
                                        "loadgen_accuracy_samples": float(len(rows))}, run.artifacts)

    def settings(self, lg, options: Any, estimate: "loadgen.Estimate", n_rows: int):
        """LoadGen TestSettings: CI values, or (compliant) LoadGen's built-in mlperf.conf for this scenario."""
        s = lg.TestSettings()
        s.scenario = getattr(lg.TestScenario, self.loadgen_scenario)
        s.mode = lg.TestMode.PerformanceOnly
        if options.compliant:
            # the official minimums and seeds, from the mlperf.conf compiled into LoadGen ("*": no MLPerf model)
            s.FromConfig("", "*", self.loadgen_scenario, 0)
        else:
            s.min_duration_ms = int(round(options.min_duration_s * 1000))
            if options.min_query_count is not None:
                s.min_query_count = options.min_query_count
        if options.max_duration_s is not None:
            s.max_duration_ms = int(round(options.max_duration_s * 1000))
        if options.performance_sample_count is not None:
            s.performance_sample_count_override = min(options.performance_sample_count, n_rows)
        self.configure(s, options, estimate, n_rows)
        return s

    def perf_run(self, lg, sut_step, rows, make_batches, options, settings, out_dir: Path) -> "loadgen.Outcome":
        perf_count = min(options.performance_sample_count or len(rows), len(rows))
        run = loadgen.run_test(lg, settings, sut_step, rows, make_batches, self.batch_limit(options),
                               self.batch_timeout_s(options), perf_count, out_dir)
        return loadgen.outcome(run)

    def result(self, options: Any, outcome: "loadgen.Outcome", estimate: "loadgen.Estimate",
               extra: Optional[Dict[str, float]] = None) -> ScenarioResult:
        metrics = dict(outcome.metrics)
        metrics.update(extra or {})
        metrics["loadgen_compliant"] = float(bool(options.compliant))
        metrics["scenario_estimate_latency_ms"] = estimate.latency_s * 1000.0
        metrics["scenario_estimate_throughput"] = estimate.throughput
        fig = self.figure(metrics)
        metrics[fig.name] = fig.value
        details = dict(outcome.details)
        details["scenario"] = self.name
        better = "higher" if fig.higher_is_better else "lower"
        details["scenario.figure"] = f"{fig.name} ({fig.unit}, {better} is better)"
        if not options.compliant:
            details["scenario.compliance"] = NOT_COMPLIANT
        return ScenarioResult(self.name, metrics, fig, outcome.valid, outcome.reason, list(outcome.artifacts),
                              bool(options.compliant), details)
