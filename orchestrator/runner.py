"""One run: validate -> load -> parity reference -> precision + stack -> accuracy pass -> timing pass -> track.

``run(cfg)`` knows nothing about the CLI: tests and notebooks call it with a composed config. Whatever was measured
before a failure is logged, the MLflow run ends FAILED (KILLED on interrupt) with an ``error`` tag, and the
exception propagates for the caller to report.
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
from .environment import available_cpus, environment_tags, pkg_version, process_startup_s, process_tags
from .errors import RunInterrupted
from .errors import describe as describe_error
from .interrupts import interruptible
from .plugin import PluginContext
from .registry import tasks as task_registry
from .report import print_results
from .tracking import Tracker, flatten

log = logging.getLogger(__name__)

DECISIONS_FILE = "decisions.json"


def _hydra_info() -> Dict[str, Any]:
    """Run dir, choices and overrides when running under Hydra; empty outside it (Python API, tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    return {
        "output_dir": Path(hc.runtime.output_dir),
        "choices": dict(hc.runtime.choices),
        "overrides": list(hc.overrides.task),
        "job_num": hc.job.get("num"),
        "mode": str(hc.mode),
    }


# MLflow's runs list shows ~18 characters of a name: the keys swept most often get short names there
SHORT_KEYS = {"runtime.batch_size": "bs", "runtime.max_length": "len", "runtime.pad_to_multiple_of": "pad",
              "dataset.max_samples": "n", "model.name_or_path": "model", "dataset.data_files": "data"}


def _run_name(rc: RunConfig, hydra: Dict[str, Any], stack: Optional[str] = None) -> str:
    """What tells the run apart first (the values its sweep varies, stack, precision), then model and data:
    MLflow's runs list shows ~14-18 characters of a name."""
    if rc.tracking.run_name:
        return rc.tracking.run_name
    choices = hydra.get("choices", {})
    model = choices.get("model") or Path(rc.model.name_or_path).name
    dataset = choices.get("dataset") or Path(str(rc.dataset.data_files or rc.dataset.path)).stem
    parts = [f"{k}={v}" for k, v in hydra.get("swept", {}).items()]
    parts += [stack or "+".join(rc.optimization) or "eager", rc.precision.name, model, dataset]
    return "-".join(parts)


def swept_values(hydra: Dict[str, Any]) -> Dict[str, str]:
    """This job's values of the keys its sweep varies, by short name (the key's last part unless two share it),
    leaving out what the run name says anyway (stack, precision, model, data)."""
    if hydra.get("mode") != "RunMode.MULTIRUN":
        return {}
    from .sweep import job_swept_keys, override_values

    given = override_values(hydra.get("overrides", []))
    keys = [k.lstrip("+~") for k in job_swept_keys()]
    keys = [k for k in keys if k not in ("optimization", "precision", "model", "dataset") and k in given]
    last = [SHORT_KEYS.get(k, k.rsplit(".", 1)[-1]) for k in keys]
    # a path's last part tells swept models or files apart; the whole path is in the tag overrides
    value = {k: Path(given[k].rstrip("/")).name if "/" in given[k] else given[k] for k in keys}
    return {(short if last.count(short) == 1 else k): value[k] for k, short in zip(keys, last)}


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
    keep = {k: v for k, v in container.items() if k not in ("tracking", "resume", "summary")}
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
            if k not in ("optimization", "precision", "tracking", "resume", "summary", "requires")}
    like["runtime"] = {k: v for k, v in runtime.items() if k not in skip_runtime}
    return {"workload": _digest(workload), "baseline_key": _digest(like)}


class Results(dict):
    """Everything known about the run so far; written to results.json whatever happens."""


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


def run(cfg: DictConfig | RunConfig) -> Dict[str, Any]:
    rc = to_run_config(cfg)
    check_tracking(rc)  # nothing to record a bad destination in: refuse before any directory or run exists
    started = time.time()
    _quiet_libraries()
    container = OmegaConf.to_container(OmegaConf.structured(rc), resolve=True)
    hydra = _hydra_info()
    hydra["swept"] = swept_values(hydra)
    run_dir = hydra.get("output_dir") or Path("outputs/runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = _run_name(rc, hydra)
    stack = "+".join(rc.optimization) or "eager"
    keys = comparison_keys(container)

    tags = environment_tags()
    tags.update({
        "task": rc.dataset.task,
        # the stack that ran; set again once the stack is applied (a plugin that fell back is not in it)
        "stack": stack,
        "stack.requested": stack,
        "precision": rc.precision.name,
        "overrides": " ".join(hydra.get("overrides", [])),
        **process_tags(),
        **keys,
        "run_dir": str(Path(run_dir).resolve()),
    })
    if hydra.get("job_num") is not None and hydra.get("mode") == "RunMode.MULTIRUN":
        tags["job_num"] = str(hydra["job_num"])
    digest = config_digest(container)
    tags["config_digest"] = digest
    if hydra["swept"]:
        tags["swept"] = " ".join(f"{k}={v}" for k, v in hydra["swept"].items())
    tracker = Tracker(rc.tracking, run_name)
    results = Results(run_name=run_name, status="RUNNING", stack=stack, stack_requested=stack,
                      precision=rc.precision.name, task=rc.dataset.task, config=container, run_dir=str(run_dir),
                      run_id=None, tracking_uri=rc.tracking.uri if rc.tracking.enabled else None,
                      keys=keys, overrides=tags["overrides"], cpu_model=tags.get("cpu.model"),
                      # every tag, for orchestrator-import when the store missed the run
                      metrics={}, tags=dict(tags))
    measured = Measurement(rc, hydra, tracker, results, run_dir)
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
            skipped = _skip(previous, run_name, rc, container, run_dir)
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
        raise
    finally:
        if skipped is None:
            _finish(results, tracker, run_dir, measured, rc)
    return results


def _skip(previous, run_name: str, rc: RunConfig, container: Dict[str, Any], run_dir: Path) -> Dict[str, Any]:
    """resume=true and this exact config already FINISHED: reuse that run's results instead of measuring again."""
    tags = previous.data.tags
    results = Results(run_name=previous.info.run_name or run_name, status="FINISHED",
                      stack=tags.get("stack", "+".join(rc.optimization) or "eager"),
                      stack_requested=tags.get("stack.requested", "+".join(rc.optimization) or "eager"),
                      precision=rc.precision.name, task=rc.dataset.task, config=container, run_dir=str(run_dir),
                      run_id=previous.info.run_id, resumed_from=previous.info.run_id,
                      tracking_uri=rc.tracking.uri, keys=comparison_keys(container),
                      overrides=tags.get("overrides", ""), cpu_model=tags.get("cpu.model"),
                      metrics=dict(previous.data.metrics))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log.info("resume: identical config already FINISHED in MLflow run %s; skipped", previous.info.run_id)
    print(f"{run_name}: skipped (resume=true), identical config FINISHED in MLflow run {previous.info.run_id}")
    return results


class Measurement:
    """The measured part of a run as named phases; each records what it measured as soon as it has it.

    validate -> load -> featurize + batch -> eager reference -> precision + stack -> parity -> accuracy pass ->
    timing pass -> FLOPs. ``record`` is the one place a figure goes to results.json *and* MLflow.
    """

    def __init__(self, rc: RunConfig, hydra: Dict[str, Any], tracker: Tracker, results: Results, run_dir: Path):
        self.rc, self.hydra, self.tracker, self.results, self.run_dir = rc, hydra, tracker, results, run_dir
        self.predictions: List[dict] = []
        self.metric_names: List[str] = []
        self.task_cls = None

    def record(self, values: Dict[str, float]) -> None:
        self.results.setdefault("metrics", {}).update(values)
        self.tracker.log_metrics(values)

    def tag(self, tags: Dict[str, str]) -> None:
        self.results.setdefault("tags", {}).update(tags)
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
            timing = self.timing_pass()
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
        self.tracker.log_dataset(self.dataset, name=self.hydra.get("choices", {}).get("dataset") or rc.dataset.path,
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
        applied = "+".join(record.applied) or "eager"
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
            name = _run_name(rc, self.hydra, applied)
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

    def timing_pass(self) -> measure.TimingResult:
        r = self.rc.runtime
        log.info("timing pass: %d round(s) of at least %g s", r.repeats, r.min_duration_s)
        timing = measure.timing_rounds(self.step, self.batches, r.repeats, r.warmup, r.min_iterations,
                                       r.min_duration_s, r.max_iterations, r.seed, progress=r.progress)
        self.record(timing.metrics())
        for k, thr in enumerate(stats.round_throughputs(timing.rounds())):
            self.tracker.log_metrics({"round_throughput": thr}, step=k)  # MLflow history: one point per round
        return timing

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


def _finish(results: Results, tracker: Tracker, run_dir: Path, measured: Measurement, rc: RunConfig) -> None:
    results["tracking_error"] = tracker.error
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    predictions = measured.predictions
    if predictions and rc.tracking.prediction_samples:
        sample = predictions[:rc.tracking.prediction_samples]
        (run_dir / "predictions_sample.json").write_text(json.dumps(sample, indent=2, default=str))
    if predictions and measured.task_cls is not None:
        # every example's decision, in dataset order: what a sweep compares with its eager fp32 job
        (run_dir / DECISIONS_FILE).write_text(json.dumps(measured.task_cls.decisions(predictions), default=str))
    tracker.log_artifact(run_dir / "results.json")
    tracker.log_artifact(run_dir / "predictions_sample.json")
    tracker.log_artifact(run_dir / DECISIONS_FILE)
    tracker.log_artifact(run_dir / ".hydra", "hydra")
    tracker.end(results["status"])
    results["tracking_error"] = tracker.error
    print_results(results, measured.metric_names)
