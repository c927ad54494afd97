"""One run: validate -> load -> parity reference -> precision + stack -> accuracy pass -> timing pass -> track.

``run(cfg, ctx)`` knows nothing about the CLI or Hydra's globals: tests and notebooks call it with a composed config
and, optionally, a :class:`~orchestrator.context.JobContext` saying who the run is (folder, sweep, parent run).
Whatever was measured before a failure is logged, the MLflow run ends FAILED (KILLED on interrupt) with an ``error``
tag, and the exception propagates for the caller to report. The run's record (results.json) is a
:class:`~orchestrator.records.RunRecord`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from . import cpu, data, devdata, feature_cache, flops, measure, pipeline, stats
from .config import RunConfig, check_tracking, to_run_config, validate
from .context import JobContext
from .environment import available_cpus, environment_tags, pkg_version, process_startup_s, process_tags
from .errors import RunInterrupted
from .errors import describe as describe_error
from .interrupts import interruptible
from .plugin import PluginContext
from .records import (DECISIONS_FILE, PREDICTIONS_SAMPLE_FILE, RESULTS_FILE, RunRecord, refuse_taken_run_dir,
                      stack_label)
from .registry import tasks as task_registry
from .report import print_results
from .tracking import Tracker, flatten

log = logging.getLogger(__name__)

# timed_equals_evaluated: how many timed batches are checked, and the tolerance relative to the outputs' scale
TEST01_BATCHES = 4
TEST01_TOLERANCE = 1e-3


def _run_name(rc: RunConfig, ctx: JobContext, stack: Optional[str] = None) -> str:
    """What tells the run apart first (the values its sweep varies, stack, precision), then model and data:
    MLflow's runs list shows ~14-18 characters of a name."""
    if rc.tracking.run_name:
        return rc.tracking.run_name
    model = ctx.choices.get("model") or Path(rc.model.name_or_path).name
    dataset = ctx.choices.get("dataset") or Path(str(rc.dataset.data_files or rc.dataset.path)).stem
    parts = [f"{k}={v}" for k, v in ctx.swept_values().items()]
    parts += [stack or stack_label(rc.optimization), rc.precision.name, model, dataset]
    return "-".join(parts)


def _set_threads(rc: RunConfig) -> Dict[str, float]:
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


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_digest(container: Dict[str, Any]) -> str:
    """Identity of what a run measures: the config without where results go or how progress is shown."""
    # summary thresholds judge runs, they are not part of what a run measures
    keep = {k: v for k, v in container.items() if k not in ("tracking", "resume", "summary", "race")}
    # how jobs are timed is not what they measure; an A/A sweep's replicas are still distinct jobs
    replica = container.get("race", {}).get("replica", 0)
    if replica:
        keep["replica"] = replica
    keep["runtime"] = {k: v for k, v in keep.get("runtime", {}).items() if k not in ("progress", "timeout_s")}
    return _digest(keep)


def comparison_keys(container: Dict[str, Any]) -> Dict[str, str]:
    """Which runs a sweep summary compares: ``workload`` (same model, data, task settings and truncation: the
    accuracy gate's baseline must have it) and ``baseline_key`` (everything but the stack and precision: the
    like-for-like eager fp32 job a speedup is taken against)."""
    runtime = container.get("runtime", {})
    workload = {"model": container.get("model"), "dataset": container.get("dataset"),
                "max_length": runtime.get("max_length")}
    skip_runtime = ("progress", "timeout_s", "on_plugin_error")
    like = {k: v for k, v in container.items()
            if k not in ("optimization", "precision", "tracking", "resume", "summary", "requires", "race")}
    like["runtime"] = {k: v for k, v in runtime.items() if k not in skip_runtime}
    return {"workload": _digest(workload), "baseline_key": _digest(like)}


def _quiet_libraries() -> None:
    """Per-file progress bars of transformers/datasets drown the run's own output."""
    # transformers imports torchao whenever it is installed; torchao then warns that its CUDA-only kernels
    # (_C_mxfp8, _C_cutlass_90a) do not load and torch's pytree warns about its enums: nothing a CPU run uses
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(cfg: DictConfig | RunConfig, ctx: Optional[JobContext] = None) -> Dict[str, Any]:
    rc = to_run_config(cfg)
    check_tracking(rc)  # nothing to record a bad destination in: refuse before any directory or run exists
    started = time.time()
    _quiet_libraries()
    ctx = (ctx or JobContext()).with_run_dir()
    container = OmegaConf.to_container(OmegaConf.structured(rc), resolve=True)
    run_dir = Path(ctx.run_dir)
    refuse_taken_run_dir(run_dir, rc.resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = _run_name(rc, ctx)
    stack = stack_label(rc.optimization)
    keys = comparison_keys(container)

    tags = environment_tags()
    tags.update({
        "task": rc.dataset.task,
        # the stack that ran; set again once the stack is applied (a plugin that fell back is not in it)
        "stack": stack,
        "stack.requested": stack,
        "precision": rc.precision.name,
        "overrides": " ".join(ctx.overrides),
        **process_tags(),
        **keys,
        "run_dir": str(run_dir.resolve()),
    })
    if ctx.in_sweep:
        tags["job_num"] = str(ctx.job_num)
    digest = config_digest(container)
    tags["config_digest"] = digest
    swept = ctx.swept_values()
    if swept:
        tags["swept"] = " ".join(f"{k}={v}" for k, v in swept.items())
    tracker = Tracker(rc.tracking, run_name, parent_id=ctx.parent_run_id)
    results = RunRecord.new(run_name=run_name, stack=stack, precision=rc.precision.name, task=rc.dataset.task,
                            config=container, run_dir=run_dir,
                            tracking_uri=rc.tracking.uri if rc.tracking.enabled else None, keys=keys,
                            overrides=tags["overrides"], tags=tags)
    measured = Measurement(rc, ctx, tracker, results, run_dir)
    startup = process_startup_s(started)  # set when hydra/launcher=isolated started this process
    skipped, checked = None, False
    try:
        # what the config alone shows to be wrong is refused before any MLflow run exists (results.json still
        # says why, for the sweep's summary); what goes wrong later ends the run FAILED. Outside the timeout:
        # runtime.timeout_s bounds the measurement, and a run it stops must be in MLflow as KILLED
        measured.preflight()
        checked = True
        previous = tracker.find_finished(digest) if rc.resume else None
        if previous is not None:
            skipped = RunRecord.reused(previous, run_name=run_name, stack=stack, precision=rc.precision.name,
                                       task=rc.dataset.task, config=container, run_dir=run_dir,
                                       tracking_uri=rc.tracking.uri, keys=keys)
            skipped.write(run_dir)
            log.info("resume: identical config already FINISHED in MLflow run %s; skipped", previous.info.run_id)
            print(f"{run_name}: skipped (resume=true), identical config FINISHED in MLflow run "
                  f"{previous.info.run_id}")
            return skipped
        tracker.start(flatten(container), tags)
        results["run_id"] = tracker.run_id
        log.info("run %s: results in %s%s", run_name, run_dir,
                 f", MLflow run {tracker.run_id} ({rc.tracking.uri})" if tracker.run_id else " (untracked)")
        if startup is not None:
            measured.record({"process_startup_s": startup})
        with interruptible(rc.runtime.timeout_s):
            measured.run()
        results["status"] = "FINISHED"
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit, RunInterrupted))
        results["status"] = "KILLED" if interrupted else "FAILED"
        results["error"] = describe_error(e)
        if not checked and not interrupted:
            results["refused"] = True  # by its config, before any MLflow run: none is owed (summary, import)
        tracker.set_tags({"error": results["error"]})
        if ctx.race is not None:
            ctx.race.abort(results["error"])  # the race goes on without this job
        raise
    finally:
        if skipped is None:
            _finish(results, tracker, run_dir, measured, rc)
    return results


class Measurement:
    """The measured part of a run as named phases; each records what it measured as soon as it has it.

    validate -> load -> featurize + batch -> eager reference -> precision + stack -> parity -> accuracy pass ->
    timing pass -> FLOPs. ``record`` is the one place a figure goes to results.json *and* MLflow.
    """

    def __init__(self, rc: RunConfig, ctx: JobContext, tracker: Tracker, results: RunRecord, run_dir: Path):
        self.rc, self.job, self.tracker, self.results, self.run_dir = rc, ctx, tracker, results, run_dir
        self.predictions: List[dict] = []
        self.metric_names: List[str] = []
        self.task_cls = None

    def record(self, values: Dict[str, float]) -> None:
        self.results.record(values)
        self.tracker.log_metrics(values)

    def tag(self, tags: Dict[str, str]) -> None:
        self.results.tag(tags)
        self.tracker.set_tags(tags)

    def batches_of(self, rows, sort: bool) -> List[measure.Batch]:
        r = self.rc.runtime
        return measure.make_batches(rows, r.batch_size, self.pad_id, r.padding, r.max_length, sort,
                                    r.pad_to_multiple_of)

    # -- phases -------------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Everything the config alone can show to be wrong: ranges, choices, the stack's order and every
        plugin's check() (an unavailable plugin costs no model load and no MLflow run)."""
        rc = self.rc
        validate(rc)
        self.task_cls = task_registry.get(rc.dataset.task)
        self.metric_names.extend(self.task_cls.metric_names)
        self.thread_metrics = _set_threads(rc)
        ctx = PluginContext(task=rc.dataset.task, dtype=pipeline.DTYPES[rc.precision.dtype],
                            autocast_dtype=pipeline.autocast_dtype(rc.precision), example_batch={},
                            threads=torch.get_num_threads(), calibration_split=rc.dataset.calibration_split)
        # an unavailable plugin costs no load (or, under on_plugin_error=fallback, is dropped now and recorded)
        self.plugins, self.early_fallbacks = pipeline.check_stack(pipeline.build_plugins(rc.optimization), ctx,
                                                                  rc.runtime.on_plugin_error)
        # a preset's ../shared paths on a machine without them: one line for all of them, nothing loaded
        calibrates = rc.dataset.calibration_split and any(p.wants_calibration() for p in self.plugins)
        devdata.check_present({"model.name_or_path": rc.model.name_or_path,
                               "dataset.data_files": rc.dataset.data_files,
                               **({"dataset.calibration_data_files": rc.dataset.calibration_data_files}
                                  if calibrates else {})})
        _warn_hardware(rc, self.plugins, ctx)

    def run(self) -> None:
        rc = self.rc
        self.record(self.thread_metrics)
        torch.manual_seed(rc.runtime.seed)
        random.seed(rc.runtime.seed)
        plugins, early_fallbacks = self.plugins, self.early_fallbacks
        with measure.PeakRSS() as rss, contextlib.ExitStack() as process_hooks:
            stack = list(rc.optimization)
            # every plugin class loaded in this process may guard process-wide state around the run
            tag_fns = [process_hooks.enter_context(cls.process_state(stack)) for cls in pipeline.plugin_classes()]
            self.load()
            self.featurize()
            self.reference()
            self.apply_stack(plugins, early_fallbacks, [f for f in tag_fns if f is not None])
            self.parity()
            self.accuracy_pass()
            self.write_decisions()  # before timing: a race judges the accuracy gate from it while jobs are timed
            timing = self.timing_pass(rss)
            self.count_flops(timing)
        self.record({"peak_rss_mb": rss.peak_mb})

    def load(self) -> None:
        log.info("loading model %s", self.rc.model.name_or_path)
        t0 = time.perf_counter()
        self.model, self.tokenizer, self.hf_config = pipeline.load_model(self.rc.model, self.task_cls)
        self.record({"model_load_s": time.perf_counter() - t0})
        report = getattr(self.model, "load_report", None)
        if report is not None:  # transformers' loading info, kept out of the console
            (self.run_dir / "load_report.json").write_text(json.dumps(report, indent=2))
            self.tracker.log_artifact(self.run_dir / "load_report.json")
            if report.get("random_head"):
                self.results["random_head"] = True
                self.tag({"model.random_head": "true"})
                log.warning("model.allow_random_head=true: the %s head is newly initialized; its accuracy is not "
                            "meaningful, its speed is", self.task_cls.name)

    def featurize(self) -> None:
        rc = self.rc
        log.info("loading data %s", rc.dataset.data_files or rc.dataset.path)
        t0 = time.perf_counter()
        # the task refuses a runtime.max_length above the model's limit before any data is read
        self.task = self.task_cls(rc.dataset, rc.runtime, self.tokenizer, self.hf_config)
        self.dataset = data.load(rc.dataset)
        self.task.check_data(self.dataset)  # columns and gold values, before the model runs
        self.tracker.log_dataset(self.dataset, name=self.job.choices.get("dataset") or rc.dataset.path,
                                 source=str(rc.dataset.data_files or rc.dataset.path))
        t1 = time.perf_counter()
        log.info("tokenizing %d examples (max_length %d, padding %s)", len(self.dataset), rc.runtime.max_length,
                 rc.runtime.padding)
        self.features, cached = feature_cache.featurize(self.task, self.dataset)
        t2 = time.perf_counter()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = self.batches_of(self.features.rows, rc.runtime.sort_by_length)
        t3 = time.perf_counter()
        self.record({"examples": float(len(self.dataset)), "features": float(len(self.features)),
                     "dataset_load_s": t1 - t0, "featurize_s": t2 - t1, "features_cached": float(cached),
                     "collate_s": t3 - t2, "padding_pct": measure.padding_pct(self.features.rows, self.batches),
                     "batch_shapes": float(measure.batch_shapes(self.batches))})

    def reference(self) -> None:
        """Eager fp32 outputs on a fixed sample, before precision and stack touch the model."""
        self.n_par = min(self.rc.runtime.parity_samples, len(self.features))
        self.par_batches = self.batches_of(self.features.rows[:self.n_par], False) if self.n_par else []
        self.reference_outputs, _ = measure.run_all(measure.forward_fn(self.model, self.task.head, None),
                                                    self.par_batches, self.n_par)
        self.flop_coef = _flop_coefficients(self.model, self.batches, self.pad_id)

    def apply_stack(self, plugins, early_fallbacks: Dict[str, str], tag_fns) -> None:
        rc = self.rc
        log.info("applying precision=%s and stack %s", rc.precision.name,
                 "+".join(p.name for p in plugins) or "eager (none)")
        t0 = time.perf_counter()
        self.model = pipeline.apply_precision(self.model, rc.precision)
        self.autocast = pipeline.autocast_dtype(rc.precision)
        self.ctx = PluginContext(task=self.task.name, dtype=pipeline.DTYPES[rc.precision.dtype],
                                 autocast_dtype=self.autocast, example_batch=self.batches[0].inputs,
                                 threads=torch.get_num_threads(), calibration_batches=self.calibration_batches(plugins),
                                 calibration_split=rc.dataset.calibration_split,
                                 hf_config=self.hf_config, tokenizer=self.tokenizer, run_dir=self.run_dir)
        self.model, record = pipeline.apply_stack(self.model, plugins, self.ctx, rc.runtime.on_plugin_error)
        record.fallbacks = {**early_fallbacks, **record.fallbacks}
        applied = stack_label(record.applied)
        self.results["applied"] = record.applied
        self.results["fallbacks"] = record.fallbacks
        stack_tags = {f"plugin.{n}.{k}": v for n, d in record.details.items() for k, v in d.items()}
        stack_tags.update({f"plugin.{n}.fallback": why for n, why in record.fallbacks.items()})
        stack_tags["stack.applied"] = applied
        if record.fallbacks:
            # the run is labelled with what ran: a fallback never carries the name of the plugin that did not run
            stack_tags["stack"] = applied
            stack_tags["stack.fallback"] = ",".join(record.fallbacks)
            self.results["stack"] = applied
            name = _run_name(rc, self.job, applied)
            if name != self.results["run_name"]:
                self.results["run_name"] = name
                self.tracker.rename(name)
        for fn in tag_fns:
            stack_tags.update(fn(record.applied))
        stack_tags.update({f"version.{pkg}": pkg_version(pkg) for p in plugins if p.name in record.applied
                           for pkg in p.packages})
        self.tag(stack_tags)
        reported = {f"plugin_{n}_{k}": v for n, m in record.metrics.items() for k, v in m.items()}
        size = measure.model_size_mb(self.model)
        if size is None:  # no torch parameters (an exported graph, a session): the plugin's own figure, if any
            size = next((m["model_size_mb"] for m in record.metrics.values() if "model_size_mb" in m), None)
        self.record({"stack_apply_s": time.perf_counter() - t0,
                     **{f"plugin_{n}_s": s for n, s in record.seconds.items()}, **reported,
                     **({"model_size_mb": size} if size is not None else {})})
        if size is None:
            self.tag({"model_size": "unknown (no torch parameters; no plugin reported model_size_mb)"})
        for name, paths in record.artifacts.items():
            for path in paths:
                self.tracker.log_artifact(Path(path), f"plugins/{name}")
        self.compute = next((c for c in reversed(record.compute) if c), None) or \
            ("bf16" if torch.bfloat16 in (self.ctx.dtype, self.autocast) else "fp32")
        self.step = measure.forward_fn(self.model, self.task.head, self.autocast)

    def calibration_batches(self, plugins) -> List[Dict[str, torch.Tensor]]:
        """Batches from dataset.calibration_split (e.g. the train split), loaded only for plugins that calibrate."""
        if not self.rc.dataset.calibration_split or not any(p.wants_calibration() for p in plugins):
            return []
        rows = self.task.featurize(data.load_calibration(self.rc.dataset)).rows
        return [b.inputs for b in self.batches_of(rows, False)]

    def parity(self) -> None:
        """Max |delta| and agreement vs the eager fp32 reference on the first parity_samples rows (a sample;
        sweep summaries compare every example, agreement_vs_baseline)."""
        if not self.n_par:
            return
        candidate, _ = measure.run_all(self.step, self.par_batches, self.n_par)
        diff, agree = self.task.parity(self.reference_outputs, candidate)
        self.record({"parity_max_abs_diff": diff, "parity_agreement": agree})

    def accuracy_pass(self) -> None:
        m = self.results["metrics"]
        log.info("accuracy pass: %d features in %d batches", len(self.features), len(self.batches))
        t0 = time.perf_counter()
        outputs, lat = measure.run_all(self.step, self.batches, len(self.features), desc="accuracy pass",
                                       progress=self.rc.runtime.progress)
        self.evaluated = outputs  # what the timed batches must reproduce (timed_equals_evaluated)
        forward_s = sum(lat)
        t1 = time.perf_counter()
        task_metrics, preds = self.task.evaluate(self.dataset, self.features, outputs)
        self.predictions.extend(preds)
        post_s = time.perf_counter() - t1
        for name, content in self.task.artifacts(self.predictions).items():  # e.g. QA's full predictions.json
            (self.run_dir / name).write_text(json.dumps(content, indent=2, default=str))
            self.tracker.log_artifact(self.run_dir / name)
        acc_s = t1 - t0 + post_s
        eval_s = m["featurize_s"] + m["collate_s"] + acc_s
        self.record({**task_metrics, "accuracy_pass_s": acc_s, "postprocess_s": post_s,
                     "accuracy_pass_forward_s": forward_s, "eval_s": eval_s,
                     # the whole evaluation, tokenization to metric: features/s over the dataset
                     "eval_throughput": len(self.features) / eval_s if eval_s > 0 else 0.0,
                     # everything but the model forward: tokenize, collate, batch loop, postprocess, metric
                     "eval_overhead_pct": 100.0 * max(eval_s - forward_s, 0.0) / eval_s if eval_s > 0 else 0.0})

    def write_decisions(self) -> None:
        """Every example's decision, in dataset order: what a sweep compares with its eager fp32 job."""
        if self.predictions and self.task_cls is not None and not (self.run_dir / DECISIONS_FILE).is_file():
            decisions = self.task_cls.decisions(self.predictions)
            (self.run_dir / DECISIONS_FILE).write_text(json.dumps(decisions, default=str))

    def timing_pass(self, rss: Optional[measure.PeakRSS] = None) -> measure.TimingResult:
        r = self.rc.runtime
        race = self.job.race
        audit = measure.TimedOutputs(self.batches, TEST01_BATCHES, r.seed)
        step = audit.wrap(self.step)
        if race is not None:
            # the launcher times the sweep's jobs in interleaved rounds: this job serves its rounds until told to stop
            metric = self.task_cls.primary_metric
            race.ready({"run_dir": str(self.run_dir.resolve()), "job": self.job.job_num, "metric": metric,
                        "value": self.results["metrics"].get(metric), "status": "ok",
                        "rss_mb": rss.peak_mb if rss is not None else None,
                        "decisions_file": str((self.run_dir / DECISIONS_FILE).resolve())})
            log.info("timing pass: raced against the sweep's other jobs, in interleaved rounds")
            timing = race.timing(step, self.batches, r)
            self.record(race.metrics())
            self.results["race"] = dict(race.outcome)
            self.tag({f"race.{k}": str(v) for k, v in race.outcome.items()})
        else:
            log.info("timing pass: %d round(s) of at least %g s", r.repeats, r.min_duration_s)
            timing = measure.timing_rounds(step, self.batches, r.repeats, r.warmup, r.min_iterations,
                                           r.min_duration_s, r.max_iterations, r.seed, progress=r.progress)
        self.record(timing.metrics())
        self.timed_equals_evaluated(audit)
        rounds = sorted(set(timing.round_ids))
        for k, thr in zip(rounds, stats.round_throughputs(timing.rounds())):
            self.tracker.log_metrics({"round_throughput": thr}, step=k)  # MLflow history: one point per round
        return timing

    def timed_equals_evaluated(self, audit: measure.TimedOutputs) -> None:
        """MLPerf's TEST01 idea: the outputs of sampled timed batches equal the accuracy pass's for those rows
        (within the parity rule: every decision the same, max |delta| within TEST01_TOLERANCE of the output scale).
        An engine that caches or changes shapes between the passes cannot pass silently: a mismatch is recorded
        (metric timed_equals_evaluated = 0, tag timed_equals_evaluated.reason) and fails the sweep's gate."""
        if not audit.outputs:
            return
        ids = sorted(audit.outputs)
        rows = [i for k in ids for i in self.batches[k].rows]
        timed = [audit.outputs[k][j] for k in ids for j in range(len(self.batches[k].rows))]
        evaluated = [self.evaluated[i] for i in rows]
        diff, agree = self.task.parity(evaluated, timed)
        scale = max(float(max(t.detach().float().abs().max() for t in evaluated)), 1.0)
        ok = agree >= 1.0 and diff <= TEST01_TOLERANCE * scale
        self.record({"timed_equals_evaluated": float(ok), "timed_vs_evaluated_max_abs_diff": diff,
                     "timed_vs_evaluated_agreement": agree})
        if not ok:
            reason = (f"timed outputs differ from the evaluated ones on {len(rows)} sampled rows of "
                      f"{len(ids)} timed batches (agreement {agree:.1%}, max |delta| {diff:.3g}): the timed "
                      "computation is not the one whose accuracy was measured")
            self.results["timed_equals_evaluated"] = reason
            self.tag({"timed_equals_evaluated.reason": reason})
            log.error("%s", reason)

    def count_flops(self, timing: measure.TimingResult) -> None:
        if self.flop_coef is None:
            return
        flop_metrics, peak_note = _flop_metrics(self.flop_coef, self.batches, timing, self.compute)
        self.record(flop_metrics)
        self.tag({"peak.compute": self.compute, "peak.formula": peak_note})


def _warn_hardware(rc: RunConfig, plugins, ctx: PluginContext) -> None:
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


def _flop_metrics(coef, batches, timing: "measure.TimingResult", compute: str) -> Tuple[Dict[str, float], str]:
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


def _finish(results: RunRecord, tracker: Tracker, run_dir: Path, measured: Measurement, rc: RunConfig) -> None:
    results["tracking_error"] = tracker.error
    results.write(run_dir)
    predictions = measured.predictions
    if predictions and rc.tracking.prediction_samples:
        sample = predictions[:rc.tracking.prediction_samples]
        (run_dir / PREDICTIONS_SAMPLE_FILE).write_text(json.dumps(sample, indent=2, default=str))
    measured.write_decisions()
    tracker.log_artifact(run_dir / RESULTS_FILE)
    tracker.log_artifact(run_dir / PREDICTIONS_SAMPLE_FILE)
    tracker.log_artifact(run_dir / DECISIONS_FILE)
    tracker.log_artifact(run_dir / ".hydra", "hydra")
    tracker.end(results["status"])
    results["tracking_error"] = tracker.error
    print_results(results, measured.metric_names)
