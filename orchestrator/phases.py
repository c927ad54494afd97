"""The measured part of a run, as phases: each a function from the value objects before it to the next one.

    preflight(rc) -> Checked                       config alone: ranges, choices, stack order, every plugin's check()
    load(checked) -> Loaded                        model, tokenizer, config (transformers)
    prepare(checked, loaded) -> Prepared           task, dataset, features, batches
    reference(checked, loaded, prepared) -> Reference          eager fp32 outputs on the parity sample
    optimize(checked, loaded, prepared) -> Optimized           precision + plugin stack: the step that runs
    parity(...), evaluate(...) -> Evaluated, time_step(...) -> TimingResult, count_flops(...)

Every figure goes through one :class:`Recorder`, to results.json *and* MLflow, as soon as it is measured, so a run
that fails later keeps it. Plugins are built once (preflight) and see one kind of context at ``check`` (the config's
precision, threads and stack: no model, no batch) and one at ``apply`` (that plus the example batch, calibration
batches, the model's config and tokenizer, the run folder).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import cpu, data, devdata, feature_cache, flops, measure, pipeline, stats
from .config import RunConfig, validated
from .context import JobContext
from .environment import OthersBusy, available_cpus, busy_cores_warning, pkg_version
from .errors import MeasuredFailure, RunInterrupted
from .errors import describe as describe_error
from .plugin import Plugin, PluginContext
from .records import DECISIONS_FILE, RunRecord, stack_label
from .tracking import Tracker

log = logging.getLogger(__name__)

# timed_equals_evaluated: how many timed batches are checked, and the tolerance relative to the outputs' scale
TEST01_BATCHES = 4
TEST01_TOLERANCE = 1e-3


class Recorder:
    """The one place a run's figures, tags and files go: its record (results.json) and its MLflow run."""

    def __init__(self, record: RunRecord, tracker: Tracker, run_dir: Path):
        self.results, self.tracker, self.run_dir = record, tracker, run_dir

    @classmethod
    def unrecorded(cls, rc: RunConfig, run_dir: Path, run_name: str) -> "Recorder":
        """For a build that is timed but never recorded (a race's extra process, a benchmark): the phases write to
        a record no one reads and a tracker that is never started, so nothing reaches results.json or MLflow."""
        record = RunRecord.new(run_name=run_name, stack=stack_label(rc.optimization), precision=rc.precision.name,
                               task=rc.dataset.task, config={}, run_dir=run_dir, tracking_uri=None, keys={},
                               overrides="", tags={})
        return cls(record, Tracker(rc.tracking, "", None), run_dir)

    def record(self, values: Dict[str, float]) -> None:
        self.results.record(values)
        self.tracker.log_metrics(values)

    def tag(self, tags: Dict[str, str]) -> None:
        self.results.tag(tags)
        self.tracker.set_tags(tags)

    def history(self, name: str, points: Dict[int, float]) -> None:
        """A metric's history in MLflow, one point per step (e.g. per timing round)."""
        for step, value in sorted(points.items()):
            self.tracker.log_metrics({name: value}, step=int(step))

    def write_artifact(self, name: str, content: Any) -> Path:
        path = self.run_dir / name
        path.write_text(json.dumps(content, indent=2, default=str))
        self.tracker.log_artifact(path)
        return path


# -- value objects ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checked:
    """The config is runnable here: its task class and its plugins, built once and checked."""
    rc: RunConfig
    task_cls: Any
    plugins: List[Plugin]
    early_fallbacks: Dict[str, str]  # plugins dropped by check() under on_plugin_error=fallback, with why
    thread_metrics: Dict[str, float]
    scenario: Any = None  # the chosen LoadGen scenario (an instance) and its parsed options, or None
    scenario_options: Any = None
    busy: Optional["BusyCores"] = None  # the other processes' CPU use, sampled from preflight on
    code_import_s: Optional[float] = None  # pipeline.import_code

    def batches_of(self, rows, pad_id: int, sort: bool) -> List[measure.Batch]:
        r = self.rc.runtime
        return measure.make_batches(rows, r.batch_size, pad_id, r.padding, r.max_length, sort, r.pad_to_multiple_of)


@dataclass(frozen=True)
class Loaded:
    model: Any
    tokenizer: Any
    hf_config: Any


@dataclass(frozen=True)
class Prepared:
    task: Any
    dataset: Any
    features: Any
    batches: List[measure.Batch]
    pad_id: int


@dataclass(frozen=True)
class Reference:
    n_rows: int
    batches: List[measure.Batch]
    outputs: List[Any]
    flop_coef: Any


@dataclass(frozen=True)
class Optimized:
    model: Any
    step: Callable
    compute: str  # the precision the arithmetic runs in (fp32, bf16, int8)
    applied: List[str]
    fallbacks: Dict[str, str]
    weights: Optional[str] = None  # the stored weights' precision when not the arithmetic's (int8 weight-only)


@dataclass
class Evaluated:
    outputs: List[Any]
    predictions: List[dict] = field(default_factory=list)


# -- phases ------------------------------------------------------------------------------------------------------------
def set_threads(rc: RunConfig) -> Dict[str, float]:
    if rc.runtime.threads:
        available = len(available_cpus())
        if rc.runtime.threads > available:
            log.warning("runtime.threads=%d is more than the %d cores this process may use: threads will compete "
                        "for cores and timings get worse and noisier", rc.runtime.threads, available)
        torch.set_num_threads(rc.runtime.threads)
    if rc.runtime.interop_threads:
        try:
            torch.set_num_interop_threads(rc.runtime.interop_threads)
        except RuntimeError:  # settable once per process; later jobs of a sweep keep the first value
            log.warning("runtime.interop_threads could not be changed after first use in this process; using %d",
                        torch.get_num_interop_threads())
    return {"threads": float(torch.get_num_threads()), "interop_threads": float(torch.get_num_interop_threads())}


class BusyCores:
    """Cores other processes keep busy as a run starts: the whole machine's CPU use minus this process's, over a
    window that opens at preflight and is read once the model is loaded (so the sample costs a run no wall time;
    the subtraction keeps the load's own work out). Not the load average: that lags a minute and would count a
    sweep's previous job. The sampler is the one the race takes per timed round (environment.OthersBusy)."""

    def __init__(self, window_s: float = 0.5):
        self.window_s = window_s
        self._sample = OthersBusy(os.getpid())
        self.restart()

    def restart(self) -> None:
        """Open the window again: a raced job waited for its turn after preflight while another job ran."""
        self.t0 = time.monotonic()
        self._measurable = self._sample.start()

    def read(self) -> Optional[float]:
        if not self._measurable:  # no /proc (a sandbox): nothing to say, and nothing to wait for
            return None
        time.sleep(max(0.0, self.window_s - (time.monotonic() - self.t0)))
        return self._sample.read()


def busy_at_start(checked: Checked, rec: Recorder) -> None:
    """The cores other work held while this run started, recorded, and one warning when its threads need them."""
    busy = checked.busy.read() if checked.busy is not None else None
    if busy is None:
        return
    available = len(available_cpus())
    why = busy_cores_warning(busy, available, torch.get_num_threads())
    if why:
        log.warning("%s", why)
    # the sweep's summary repeats the warning where it explains a missing recommendation
    rec.record({"cores_busy_at_start": busy, "cores_available": float(available)})


def check_context(rc: RunConfig) -> PluginContext:
    """What a plugin's check() sees: the config's precision, threads and calibration split (no model, no batch)."""
    return PluginContext(task=rc.dataset.task, dtype=pipeline.DTYPES[rc.precision.dtype],
                         autocast_dtype=pipeline.autocast_dtype(rc.precision), example_batch={},
                         threads=torch.get_num_threads(), calibration_split=rc.dataset.calibration_split)


def preflight(rc: RunConfig, evaluates: bool = True) -> Checked:
    """Everything the config alone can show to be wrong: ranges, choices, the stack's order and every plugin's
    check() (an unavailable plugin costs no model load and no MLflow run). Then the code the measured phases would
    import on first use (``evaluates``: the task's metric library too; a race's extra process runs no accuracy
    pass)."""
    rc, task_cls, plugins = validated(rc)
    thread_metrics = set_threads(rc)
    busy = BusyCores()
    ctx = check_context(rc)
    # an unavailable plugin costs no load (or, under on_plugin_error=fallback, is dropped now and recorded)
    plugins, early_fallbacks = pipeline.check_stack(plugins, ctx, rc.runtime.on_plugin_error)
    # a preset's ../shared paths on a machine without them: one line for all of them, nothing loaded
    calibrates = rc.dataset.calibration_split and any(p.wants_calibration() for p in plugins)
    devdata.check_present({"model.name_or_path": rc.model.name_or_path,
                           "dataset.data_files": rc.dataset.data_files,
                           **({"dataset.calibration_data_files": rc.dataset.calibration_data_files}
                              if calibrates else {})})
    warn_hardware(rc, plugins, ctx)
    scenario, options = None, None
    if rc.scenario:
        from . import scenarios

        cls = scenarios.get(str(rc.scenario.get("name")))
        cls.check()  # LoadGen installed: one line naming the extra otherwise
        scenario, options = cls(), cls.parse_options(rc.scenario)
    # last: a config refused above costs no import
    code_s = pipeline.import_code(rc.model, task_cls, metrics=evaluates)
    return Checked(rc, task_cls, plugins, early_fallbacks, thread_metrics, scenario, options, busy, code_s)


def load(checked: Checked, rec: Recorder) -> Loaded:
    rc = checked.rc
    log.info("loading model %s", rc.model.name_or_path)
    t0 = time.perf_counter()
    model, tokenizer, hf_config = pipeline.load_model(rc.model, checked.task_cls)
    rec.record({"model_load_s": time.perf_counter() - t0})
    report = getattr(model, "load_report", None)
    if report is not None:  # transformers' loading info, kept out of the console
        rec.write_artifact("load_report.json", report)
        if report.get("random_head"):
            rec.results["random_head"] = True
            rec.tag({"model.random_head": "true"})
            log.warning("model.allow_random_head=true: the %s head is newly initialized; its accuracy is not "
                        "meaningful, its speed is", checked.task_cls.name)
    return Loaded(model, tokenizer, hf_config)


def prepare(checked: Checked, loaded: Loaded, rec: Recorder, dataset_name: Optional[str]) -> Prepared:
    """Dataset, features, batches; ``dataset_name``: its config-group choice, for MLflow's dataset input."""
    rc = checked.rc
    log.info("loading data %s", rc.dataset.data_files or rc.dataset.path)
    t0 = time.perf_counter()
    # the task refuses a runtime.max_length above the model's limit before any data is read
    task = checked.task_cls(rc.dataset, rc.runtime, loaded.tokenizer, loaded.hf_config)
    dataset = data.load(rc.dataset)
    task.check_data(dataset)  # columns and gold values, before the model runs
    rec.tracker.log_dataset(dataset, name=dataset_name or rc.dataset.path,
                            source=str(rc.dataset.data_files or rc.dataset.path))
    t1 = time.perf_counter()
    log.info("tokenizing %d examples (max_length %d, padding %s)", len(dataset), rc.runtime.max_length,
             rc.runtime.padding)
    features, cached = feature_cache.featurize(task, dataset)
    t2 = time.perf_counter()
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    batches = checked.batches_of(features.rows, pad_id, rc.runtime.sort_by_length)
    t3 = time.perf_counter()
    rec.record({"examples": float(len(dataset)), "features": float(len(features)),
                "dataset_load_s": t1 - t0, "featurize_s": t2 - t1, "features_cached": float(cached),
                "collate_s": t3 - t2, "padding_pct": measure.padding_pct(features.rows, batches),
                "batch_shapes": float(measure.batch_shapes(batches))})
    return Prepared(task, dataset, features, batches, pad_id)


def reference(checked: Checked, loaded: Loaded, prepared: Prepared) -> Reference:
    """Eager fp32 outputs on a fixed sample, before precision and stack touch the model."""
    n = min(checked.rc.runtime.parity_samples, len(prepared.features))
    batches = checked.batches_of(prepared.features.rows[:n], prepared.pad_id, False) if n else []
    outputs, _ = measure.run_all(measure.forward_fn(loaded.model, prepared.task.head, None), batches, n)
    return Reference(n, batches, outputs, _flop_coefficients(loaded.model, prepared.batches, prepared.pad_id))


def calibration_batches(checked: Checked, prepared: Prepared) -> List[Dict[str, torch.Tensor]]:
    """Batches from dataset.calibration_split (e.g. the train split), loaded only for plugins that calibrate."""
    rc = checked.rc
    if not rc.dataset.calibration_split or not any(p.wants_calibration() for p in checked.plugins):
        return []
    rows = prepared.task.featurize(data.load_calibration(rc.dataset)).rows
    return [b.inputs for b in checked.batches_of(rows, prepared.pad_id, False)]


def optimize(checked: Checked, loaded: Loaded, prepared: Prepared, rec: Recorder,
             tag_fns: List[Callable[[List[str]], Dict[str, str]]]) -> Optimized:
    """Precision, then the plugin stack in order. Its tags say what ran (a plugin that fell back is not named)."""
    rc = checked.rc
    log.info("applying precision=%s and stack %s", rc.precision.name,
             "+".join(p.name for p in checked.plugins) or "eager (none)")
    t0 = time.perf_counter()
    model = pipeline.apply_precision(loaded.model, rc.precision)
    autocast = pipeline.autocast_dtype(rc.precision)
    ctx = PluginContext(task=prepared.task.name, dtype=pipeline.DTYPES[rc.precision.dtype],
                        autocast_dtype=autocast, example_batch=prepared.batches[0].inputs,
                        threads=torch.get_num_threads(), calibration_batches=calibration_batches(checked, prepared),
                        calibration_split=rc.dataset.calibration_split,
                        hf_config=loaded.hf_config, tokenizer=loaded.tokenizer, run_dir=rec.run_dir)
    model, stack = pipeline.apply_stack(model, checked.plugins, ctx, rc.runtime.on_plugin_error)
    fallbacks = {**checked.early_fallbacks, **stack.fallbacks}
    applied = stack_label(stack.applied)
    rec.results["applied"] = stack.applied
    rec.results["fallbacks"] = fallbacks
    tags = {f"plugin.{n}.{k}": v for n, d in stack.details.items() for k, v in d.items()}
    tags.update({f"plugin.{n}.fallback": why for n, why in fallbacks.items()})
    tags["stack.applied"] = applied
    if fallbacks:
        # the run is labelled with what ran: a fallback never carries the name of the plugin that did not run
        tags["stack"] = applied
        tags["stack.fallback"] = ",".join(fallbacks)
        rec.results["stack"] = applied
    for fn in tag_fns:
        tags.update(fn(stack.applied))
    tags.update({f"version.{pkg}": pkg_version(pkg) for p in checked.plugins if p.name in stack.applied
                 for pkg in p.packages})
    rec.tag(tags)
    reported = {f"plugin_{n}_{k}": v for n, m in stack.metrics.items() for k, v in m.items()}
    size = measure.model_size_mb(model)
    if size is None:  # no torch parameters (an exported graph, a session): the plugin's own figure, if any
        size = next((m["model_size_mb"] for m in stack.metrics.values() if "model_size_mb" in m), None)
    rec.record({"stack_apply_s": time.perf_counter() - t0,
                **{f"plugin_{n}_s": s for n, s in stack.seconds.items()}, **reported,
                **({"model_size_mb": size} if size is not None else {})})
    if size is None:
        rec.tag({"model_size": "unknown (no torch parameters; no plugin reported model_size_mb)"})
    for name, paths in stack.artifacts.items():
        for path in paths:
            rec.tracker.log_export(Path(path), f"plugins/{name}")  # stored once: in MLflow, not twice
    compute = next((c for c in reversed(stack.compute) if c), None) or \
        ("bf16" if torch.bfloat16 in (ctx.dtype, autocast) else "fp32")
    rec.results["compute"] = compute
    rec.tag({"precision.compute": compute})
    weights = next((w for w in reversed(stack.weights) if w), None)
    if weights == compute:
        weights = None
    if weights:
        rec.results["weights"] = weights
        rec.tag({"precision.weights": weights})
    return Optimized(model, measure.forward_fn(model, prepared.task.head, autocast), compute, stack.applied,
                     fallbacks, weights)


def parity(prepared: Prepared, ref: Reference, opt: Optimized, rec: Recorder) -> None:
    """Max |delta| and agreement vs the eager fp32 reference on the first parity_samples rows (a sample; sweep
    summaries compare every example, agreement_vs_baseline)."""
    if not ref.n_rows:
        return
    candidate, _ = measure.run_all(opt.step, ref.batches, ref.n_rows)
    diff, agree = prepared.task.parity(ref.outputs, candidate)
    rec.record({"parity_max_abs_diff": diff, "parity_agreement": agree})


def evaluate(checked: Checked, prepared: Prepared, opt: Optimized, rec: Recorder) -> Evaluated:
    """The accuracy pass: every feature once, the task's metric, its artifacts and every decision."""
    m = rec.results["metrics"]
    log.info("accuracy pass: %d features in %d batches", len(prepared.features), len(prepared.batches))
    t0 = time.perf_counter()
    if checked.scenario is not None:
        # LoadGen's accuracy mode is the evaluation: every row served once, in the scenario's query pattern
        acc = checked.scenario.accuracy(opt.step, prepared.features.rows, _collate(checked, prepared),
                                        checked.scenario_options, rec.run_dir / "loadgen")
        outputs, lat = acc.outputs, [acc.metrics.get("loadgen_accuracy_wall_s", time.perf_counter() - t0)]
        rec.record(acc.metrics)
        _log_loadgen(rec, acc.artifacts)
    else:
        outputs, lat = measure.run_all(opt.step, prepared.batches, len(prepared.features), desc="accuracy pass",
                                       progress=checked.rc.runtime.progress)
    forward_s = sum(lat)
    t1 = time.perf_counter()
    task_metrics, predictions = prepared.task.evaluate(prepared.dataset, prepared.features, outputs)
    post_s = time.perf_counter() - t1
    for name, content in prepared.task.artifacts(predictions).items():  # e.g. QA's full predictions.json
        rec.write_artifact(name, content)
    acc_s = t1 - t0 + post_s
    eval_s = m["featurize_s"] + m["collate_s"] + acc_s
    rec.record({**task_metrics, "accuracy_pass_s": acc_s, "postprocess_s": post_s,
                "accuracy_pass_forward_s": forward_s, "eval_s": eval_s,
                # the whole evaluation, tokenization to metric: features/s over the dataset
                "eval_throughput": len(prepared.features) / eval_s if eval_s > 0 else 0.0,
                # everything but the model forward: tokenize, collate, batch loop, postprocess, metric
                "eval_overhead_pct": 100.0 * max(eval_s - forward_s, 0.0) / eval_s if eval_s > 0 else 0.0})
    evaluated = Evaluated(outputs, predictions)
    write_decisions(checked, evaluated, rec.run_dir)  # before timing: a race judges the gate from it meanwhile
    return evaluated


def write_decisions(checked: Checked, evaluated: Optional[Evaluated], run_dir: Path) -> None:
    """Every example's decision, in dataset order: what a sweep compares with its eager fp32 job."""
    if evaluated is None or not evaluated.predictions or (run_dir / DECISIONS_FILE).is_file():
        return
    decisions = checked.task_cls.decisions(evaluated.predictions)
    (run_dir / DECISIONS_FILE).write_text(json.dumps(decisions, default=str))


def _collate(checked: Checked, prepared: Prepared) -> Callable:
    from . import scenarios

    return scenarios.collate_with(prepared.pad_id, checked.rc.runtime)


def _log_loadgen(rec: Recorder, paths) -> None:
    """LoadGen's logs as run artifacts, each under the folder of the LoadGen run it belongs to."""
    root = rec.run_dir / "loadgen"
    for p in paths:
        p = Path(p)
        try:
            sub = p.parent.relative_to(root).as_posix()
        except ValueError:
            sub = ""
        rec.tracker.log_artifact(p, f"loadgen/{sub}".rstrip("/."))


class ScenarioInvalid(MeasuredFailure):
    """The scenario's LoadGen result is not VALID (e.g. no rate meets the latency bound): measured, not a crash."""


def run_scenario(checked: Checked, prepared: Prepared, opt: Optimized, rec: Recorder, job: JobContext) -> None:
    """The timing pass as a LoadGen scenario: its figure of merit, LoadGen's verdict and logs. A result that is not
    VALID is recorded in full, then ends the run in one line (exit status 1)."""
    sc = checked.scenario
    if job.race is not None:  # LoadGen times a scenario job alone: it takes no part in the sweep's rounds
        job.race.abort(f"scenario={sc.name} is timed by LoadGen, alone")
    log.info("timing pass: scenario %s through MLPerf LoadGen", sc.name)
    result = sc.run(opt.step, prepared.features.rows, _collate(checked, prepared), checked.scenario_options,
                    rec.run_dir / "loadgen")
    rec.record(result.metrics)
    rec.tag({**result.details, "scenario": sc.name, "scenario.valid": str(result.valid).lower()})
    rec.results["scenario"] = {"name": result.scenario, "figure": result.figure._asdict(), "valid": result.valid,
                               "reason": result.reason, "compliant": result.compliant}
    _log_loadgen(rec, result.artifacts)
    if not result.valid:
        raise ScenarioInvalid(f"scenario={sc.name}: {result.reason}")


def time_step(checked: Checked, prepared: Prepared, opt: Optimized, evaluated: Evaluated, rec: Recorder,
              job: JobContext, rss_mb: Callable[[], float]) -> Optional[measure.TimingResult]:
    """The timing pass: a LoadGen scenario when one is chosen; else alone (runtime.repeats rounds), or raced
    against the sweep's other jobs when the launcher races them (job.race), then the check that what was timed is
    what was evaluated."""
    if checked.scenario is not None:
        run_scenario(checked, prepared, opt, rec, job)
        return None
    r = checked.rc.runtime
    audit = measure.TimedOutputs(prepared.batches, TEST01_BATCHES, r.seed)
    step = audit.wrap(opt.step)
    race = job.race
    # the rounds completed so far: an interrupted run (Ctrl-C, SIGTERM, a lost launcher) still records them
    done = measure.TimingResult([], 0, 0.0)
    try:
        timing = _time(checked, prepared, rec, job, rss_mb, step, done)
    except BaseException:
        if done.latencies_s:
            try:
                rec.tag({"timing.partial": f"the run ended after {len(set(done.round_ids))} timing round(s): "
                                           "these figures are from them alone"})
                _record_timing(rec, done)
            except Exception as e:  # what ended the run is what it reports
                log.debug("the completed timing rounds could not be recorded: %s", e)
        raise
    if race is not None:
        rec.record(race.metrics())
        rec.results["race"] = dict(race.outcome)
        rec.tag({f"race.{k}": str(v) for k, v in race.outcome.items() if not isinstance(v, (dict, list))})
        for name, points in race.history().items():  # one point per race round
            rec.history(name, points)
    _record_timing(rec, timing)
    timed_equals_evaluated(prepared, evaluated, audit, rec)
    return timing


def _record_timing(rec: Recorder, timing: measure.TimingResult) -> None:
    rec.record(timing.metrics())
    rounds = sorted(set(timing.round_ids))
    rec.history("round_throughput", dict(zip(rounds, stats.round_throughputs(timing.rounds()))))


def _time(checked: Checked, prepared: Prepared, rec: Recorder, job: JobContext, rss_mb: Callable[[], float],
          step: Callable, done: measure.TimingResult) -> measure.TimingResult:
    """The rounds, raced (the launcher says when) or alone; each completed round is added to ``done``."""
    r, race = checked.rc.runtime, job.race
    if race is None:
        log.info("timing pass: %d round(s) of at least %g s", r.repeats, r.min_duration_s)
        return measure.timing_rounds(step, prepared.batches, r.repeats, r.warmup, r.min_iterations,
                                     r.min_duration_s, r.max_iterations, r.seed, progress=r.progress, out=done)
    # the launcher times the sweep's jobs in interleaved rounds: this job serves its rounds until told to stop
    metric = checked.task_cls.primary_metric
    race.ready({"run_dir": str(rec.run_dir.resolve()), "job": job.job_num, "metric": metric,
                "value": rec.results["metrics"].get(metric), "status": "ok", "rss_mb": rss_mb(),
                "decisions_file": str((rec.run_dir / DECISIONS_FILE).resolve())})
    log.info("timing pass: raced against the sweep's other jobs, in interleaved rounds")
    return race.timing(step, prepared.batches, r, checked.rc.race.round_s, out=done,
                       warmup=checked.rc.race.warmup)


def timed_equals_evaluated(prepared: Prepared, evaluated: Evaluated, audit: measure.TimedOutputs,
                           rec: Recorder) -> None:
    """MLPerf's TEST01 idea: the outputs of sampled timed batches equal the accuracy pass's for those rows (every
    decision the same, max |delta| within TEST01_TOLERANCE of the outputs' scale). An engine that caches or changes
    shapes between the passes cannot pass silently: a mismatch is recorded (metric timed_equals_evaluated = 0,
    tag timed_equals_evaluated.reason) and fails the sweep's accuracy gate."""
    if not audit.outputs:
        return
    ids = sorted(audit.outputs)
    rows = [i for k in ids for i in prepared.batches[k].rows]
    timed = [audit.outputs[k][j] for k in ids for j in range(len(prepared.batches[k].rows))]
    expected = [evaluated.outputs[i] for i in rows]
    diff, agree = prepared.task.parity(expected, timed)
    scale = max(float(max(t.detach().float().abs().max() for t in expected)), 1.0)
    ok = agree >= 1.0 and diff <= TEST01_TOLERANCE * scale
    rec.record({"timed_equals_evaluated": float(ok), "timed_vs_evaluated_max_abs_diff": diff,
                "timed_vs_evaluated_agreement": agree})
    if not ok:
        reason = (f"timed outputs differ from the evaluated ones on {len(rows)} sampled rows of {len(ids)} timed "
                  f"batches (agreement {agree:.1%}, max |delta| {diff:.3g}): the timed computation is not the one "
                  "whose accuracy was measured")
        rec.results["timed_equals_evaluated"] = reason
        rec.tag({"timed_equals_evaluated.reason": reason})
        log.error("%s", reason)


def count_flops(prepared: Prepared, ref: Reference, opt: Optimized, timing: Optional[measure.TimingResult],
                rec: Recorder) -> None:
    if ref.flop_coef is None or timing is None:
        return
    flop_metrics, peak_note = _flop_metrics(ref.flop_coef, prepared.batches, timing, opt.compute)
    rec.record(flop_metrics)
    rec.tag({"peak.compute": opt.compute, "peak.formula": peak_note})


def warn_hardware(rc: RunConfig, plugins, ctx: PluginContext) -> None:
    """One line when the run asks for arithmetic this CPU does not have natively: it runs, emulated or on a slower
    path, and would otherwise just look slow."""
    bf16 = rc.precision.dtype == "bfloat16" or (rc.precision.autocast and rc.precision.autocast_dtype == "bfloat16")
    if bf16 and not cpu.has("bf16"):
        faster = "precision=fp32, or an int8 recipe (this CPU has VNNI)," if cpu.has("vnni") else "precision=fp32"
        log.warning("precision=%s asks for bf16, but this CPU (%s) has neither AVX512-BF16 nor AMX: bf16 is emulated "
                    "and usually slower than fp32 here; %s is faster", rc.precision.name, cpu.describe(), faster)
    int8 = [p.name for p in plugins if p.compute_precision(ctx) == "int8"]
    if int8 and not cpu.has("vnni"):
        log.warning("optimization=%s computes in int8, but this CPU (%s) has no VNNI (AVX512-VNNI, AVX-VNNI or AMX): "
                    "int8 dot products take the older multi-instruction path and gain less than on a VNNI CPU; "
                    "compare with the fp32 engines (recipe=onnxruntime_fp32, openvino_fp32; sweep=engines) here",
                    "+".join(int8), cpu.describe())


def _flop_coefficients(model, batches, pad_id: int):
    """FLOPs-per-row coefficients of the eager model (None when counting fails: never fails the run)."""
    if not batches:
        return None
    try:
        return flops.coefficients(model, list(batches[0].inputs), pad_id)
    except RunInterrupted:  # a timeout/signal that lands while counting must still end the run
        raise
    except Exception as e:  # an exotic model the counter cannot run on single rows
        log.warning("FLOPs not counted: %s", describe_error(e))
        return None


def _flop_metrics(coef, batches, timing: measure.TimingResult, compute: str) -> Tuple[Dict[str, float], str]:
    """FLOPs per feature as executed (padding included), achieved GFLOP/s in the timing pass, share of peak."""
    per_batch = [flops.batch_flops(coef, b.size, b.inputs["input_ids"].shape[1]) for b in batches]
    rows = sum(b.size for b in batches)
    out = {"gflops_per_feature": sum(per_batch) / rows / 1e9 if rows else 0.0}
    note = ""
    timed = sum(per_batch[k] for k in timing.batch_ids)
    busy = sum(timing.latencies_s)
    if busy > 0:
        out["achieved_gflops"] = timed / busy / 1e9
        peak = flops.peak_gflops(compute, torch.get_num_threads())
        if peak is not None:
            out["peak_gflops"] = peak[0]
            out["peak_fraction_pct"] = 100.0 * out["achieved_gflops"] / peak[0]
            note = peak[1]
    return out, note
