"""One run: validate -> load -> parity reference -> precision + stack -> accuracy pass -> timing pass -> track.

``run(cfg)`` knows nothing about the CLI: tests and notebooks call it with a composed config. Whatever was measured
before a failure is logged, the MLflow run ends FAILED (KILLED on interrupt) with an ``error`` tag, and the
exception propagates for the caller to report.
"""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from . import data, feature_cache, flops, measure, pipeline
from .config import RunConfig, to_run_config, validate
from .environment import available_cpus, environment_tags, ipex_fusions_for
from .errors import OrchestratorError, RunInterrupted
from .interrupts import interruptible
from .plugin import PluginContext
from .registry import tasks as task_registry
from .report import print_results
from .tracking import Tracker, flatten

log = logging.getLogger(__name__)


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


def _run_name(rc: RunConfig, choices: Dict[str, Any]) -> str:
    if rc.tracking.run_name:
        return rc.tracking.run_name
    model = choices.get("model") or Path(rc.model.name_or_path).name
    dataset = choices.get("dataset") or Path(str(rc.dataset.data_files or rc.dataset.path)).stem
    stack = "+".join(rc.optimization) or "eager"
    return f"{model}-{dataset}-{rc.precision.name}-{stack}"


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


def config_digest(container: Dict[str, Any]) -> str:
    """Identity of what a run measures: the config without where results go or how progress is shown."""
    import hashlib

    keep = {k: v for k, v in container.items() if k not in ("tracking", "resume")}
    keep["runtime"] = {k: v for k, v in keep.get("runtime", {}).items() if k not in ("progress", "timeout_s")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Results(dict):
    """Everything known about the run so far; written to results.json whatever happens."""

    def metrics(self, values: Dict[str, float], tracker: Tracker) -> None:
        self.setdefault("metrics", {}).update(values)
        tracker.log_metrics(values)


def _quiet_libraries() -> None:
    """Per-file progress bars of transformers/datasets drown the run's own output."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run(cfg: DictConfig | RunConfig) -> Dict[str, Any]:
    rc = to_run_config(cfg)
    _quiet_libraries()
    container = OmegaConf.to_container(OmegaConf.structured(rc), resolve=True)
    hydra = _hydra_info()
    run_dir = hydra.get("output_dir") or Path("outputs/runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_name = _run_name(rc, hydra.get("choices", {}))
    stack = list(rc.optimization)

    tags = environment_tags()
    tags.update({
        "task": rc.dataset.task,
        "stack": "+".join(stack) or "eager",
        "precision": rc.precision.name,
        "overrides": " ".join(hydra.get("overrides", [])),
    })
    if hydra.get("job_num") is not None and hydra.get("mode") == "RunMode.MULTIRUN":
        tags["job_num"] = str(hydra["job_num"])
    digest = config_digest(container)
    tags["config_digest"] = digest
    tracker = Tracker(rc.tracking, run_name)
    if rc.resume:
        previous = tracker.find_finished(digest)
        if previous is not None:
            return _skip(previous, run_name, rc, container, run_dir)
    tracker.start(flatten(container), tags)
    results = Results(run_name=run_name, status="RUNNING", stack="+".join(stack), precision=rc.precision.name,
                      task=rc.dataset.task, config=container, run_dir=str(run_dir), run_id=tracker.run_id,
                      tracking_uri=rc.tracking.uri if rc.tracking.enabled else None, metrics={})
    predictions: List[dict] = []
    metric_names: List[str] = []
    try:
        with interruptible(rc.runtime.timeout_s):
            _measure(rc, hydra, tracker, results, run_dir, predictions, metric_names)
        results["status"] = "FINISHED"
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit, RunInterrupted))
        results["status"] = "KILLED" if interrupted else "FAILED"
        message = str(e) if isinstance(e, OrchestratorError) else f"{type(e).__name__}: {e}"
        results["error"] = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        tracker.set_tags({"error": results["error"]})
        raise
    finally:
        _finish(results, tracker, run_dir, predictions, rc, metric_names)
    return results


def _skip(previous, run_name: str, rc: RunConfig, container: Dict[str, Any], run_dir: Path) -> Dict[str, Any]:
    """resume=true and this exact config already FINISHED: reuse that run's results instead of measuring again."""
    results = Results(run_name=run_name, status="FINISHED", stack="+".join(rc.optimization),
                      precision=rc.precision.name, task=rc.dataset.task, config=container, run_dir=str(run_dir),
                      run_id=previous.info.run_id, resumed_from=previous.info.run_id,
                      tracking_uri=rc.tracking.uri, metrics=dict(previous.data.metrics))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log.info("resume: identical config already FINISHED in MLflow run %s; skipped", previous.info.run_id)
    print(f"{run_name}: skipped (resume=true), identical config FINISHED in MLflow run {previous.info.run_id}")
    return results


def _measure(rc: RunConfig, hydra: Dict[str, Any], tracker: Tracker, results: "Results", run_dir: Path,
             predictions: List[dict], metric_names: List[str]) -> None:
    """The measured part of a run; fills ``results``/``predictions``/``metric_names`` as it goes."""
    validate(rc)  # inside the try: an invalid run is still recorded, as FAILED with the reason
    task_cls = task_registry.get(rc.dataset.task)
    metric_names.extend(task_cls.metric_names)
    results.metrics(_set_threads(rc), tracker)
    torch.manual_seed(rc.runtime.seed)
    random.seed(rc.runtime.seed)
    plugins = pipeline.build_plugins(rc.optimization)
    with measure.PeakRSS() as rss, ipex_fusions_for(list(rc.optimization)) as ipex_state:
        t0 = time.perf_counter()
        model, tokenizer, hf_config = pipeline.load_model(rc.model, task_cls)
        results.metrics({"model_load_s": time.perf_counter() - t0}, tracker)

        t0 = time.perf_counter()
        dataset = data.load(rc.dataset)
        task = task_cls(rc.dataset, rc.runtime, tokenizer, hf_config)
        task.check_columns(dataset.column_names)
        tracker.log_dataset(dataset, name=hydra.get("choices", {}).get("dataset") or rc.dataset.path,
                            source=str(rc.dataset.data_files or rc.dataset.path))
        t1 = time.perf_counter()
        features, cached = feature_cache.featurize(task, dataset)
        t2 = time.perf_counter()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        r = rc.runtime
        batches = measure.make_batches(features.rows, r.batch_size, pad_id, r.padding, r.max_length,
                                       r.sort_by_length, r.pad_to_multiple_of)
        t3 = time.perf_counter()
        results.metrics({"examples": float(len(dataset)), "features": float(len(features)),
                         "dataset_load_s": t1 - t0, "featurize_s": t2 - t1, "features_cached": float(cached),
                         "collate_s": t3 - t2, "padding_pct": measure.padding_pct(features.rows, batches),
                         "batch_shapes": float(measure.batch_shapes(batches))}, tracker)

        # eager fp32 reference on a fixed sample, before precision and stack touch the model
        n_par = min(r.parity_samples, len(features))
        par_batches = measure.make_batches(features.rows[:n_par], r.batch_size, pad_id, r.padding,
                                           r.max_length, False, r.pad_to_multiple_of) if n_par else []
        reference, _ = measure.run_all(measure.forward_fn(model, task.head, None), par_batches, n_par)
        flop_coef = _flop_coefficients(model, batches, pad_id)

        t0 = time.perf_counter()
        model = pipeline.apply_precision(model, rc.precision)
        ac = pipeline.autocast_dtype(rc.precision)
        ctx = PluginContext(task=task.name, dtype=pipeline.DTYPES[rc.precision.dtype], autocast_dtype=ac,
                            example_batch=batches[0].inputs, threads=torch.get_num_threads(),
                            calibration_batches=_calibration_batches(rc, task, pad_id))
        model, record = pipeline.apply_stack(model, plugins, ctx, r.on_plugin_error)
        results["applied"] = record.applied
        results["fallbacks"] = record.fallbacks
        stack_tags = {f"plugin.{n}.{k}": v for n, d in record.details.items() for k, v in d.items()}
        stack_tags.update({f"plugin.{n}.fallback": why for n, why in record.fallbacks.items()})
        stack_tags["stack.applied"] = "+".join(record.applied) or "eager"
        if ipex_state is None and "ipex" not in record.applied and "intel_extension_for_pytorch" in sys.modules:
            ipex_state = "on"  # ipex was asked for but fell back: IPEX's process-wide passes stayed on
        if ipex_state is not None:
            stack_tags["ipex.loaded_in_process"] = "true"
            stack_tags["ipex.fusions"] = ipex_state
            if ipex_state == "off":
                log.info("intel_extension_for_pytorch was imported earlier in this process: its TorchScript "
                         "fusion passes are off for this run (%s)", stack_tags["stack.applied"])
            else:
                log.warning("intel_extension_for_pytorch is loaded in this process and its TorchScript fusions "
                            "stay on (%s): they also apply to this run's stack (%s); run ipex and non-ipex stacks "
                            "in separate processes to compare them",
                            "ipex fell back" if ipex_state == "on" else "this version has no switch",
                            stack_tags["stack.applied"])
        tracker.set_tags(stack_tags)
        results["tags"] = stack_tags
        size = measure.model_size_mb(model)
        results.metrics({"stack_apply_s": time.perf_counter() - t0,
                         **{f"plugin_{n}_s": s for n, s in record.seconds.items()},
                         **({"model_size_mb": size} if size is not None else {})}, tracker)

        step = measure.forward_fn(model, task.head, ac)
        if n_par:
            candidate, _ = measure.run_all(step, par_batches, n_par)
            diff, agree = task.parity(reference, candidate)
            results.metrics({"parity_max_abs_diff": diff, "parity_agreement": agree}, tracker)

        t0 = time.perf_counter()
        outputs, lat = measure.run_all(step, batches, len(features), desc="accuracy pass", progress=r.progress)
        forward_s = sum(lat)
        t1 = time.perf_counter()
        task_metrics, preds = task.evaluate(dataset, features, outputs)
        predictions.extend(preds)
        post_s = time.perf_counter() - t1
        for name, content in task.artifacts(predictions).items():  # e.g. QA's full predictions.json
            (run_dir / name).write_text(json.dumps(content, indent=2, default=str))
            tracker.log_artifact(run_dir / name)
        acc_s = t1 - t0 + post_s
        m = results["metrics"]
        eval_s = m["featurize_s"] + m["collate_s"] + acc_s
        results.metrics({**task_metrics, "accuracy_pass_s": acc_s, "postprocess_s": post_s,
                         "accuracy_pass_forward_s": forward_s, "eval_s": eval_s,
                         # the whole evaluation, tokenization to metric: features/s over the dataset
                         "eval_throughput": len(features) / eval_s if eval_s > 0 else 0.0,
                         # everything but the model forward: tokenize, collate, batch loop, postprocess, metric
                         "eval_overhead_pct": 100.0 * max(eval_s - forward_s, 0.0) / eval_s if eval_s > 0 else 0.0},
                        tracker)

        timing = measure.timing_pass(step, batches, r.warmup, r.min_iterations, r.min_duration_s,
                                     r.max_iterations, progress=r.progress,
                                     order=measure.timing_order(len(batches), r.seed))
        results.metrics(timing.metrics(), tracker)
        if flop_coef is not None:
            int8 = "quantize" in record.applied or record.details.get("ipex", {}).get("int8", "none") != "none"
            compute = "int8" if int8 else ("bf16" if torch.bfloat16 in (ctx.dtype, ac) else "fp32")
            flop_metrics, peak_note = _flop_metrics(flop_coef, batches, timing, compute)
            results.metrics(flop_metrics, tracker)
            tracker.set_tags({"peak.compute": compute, "peak.formula": peak_note})
    results.metrics({"peak_rss_mb": rss.peak_mb}, tracker)


def _flop_coefficients(model, batches, pad_id: int):
    """FLOPs-per-row coefficients of the eager model (None when counting fails: never fails the run)."""
    if not batches:
        return None
    try:
        return flops.coefficients(model, list(batches[0].inputs), pad_id)
    except RunInterrupted:  # a timeout/signal that lands while counting must still end the run
        raise
    except Exception as e:  # an exotic model the counter cannot run on single rows
        log.warning("FLOPs not counted: %s: %s", type(e).__name__, str(e).strip().splitlines()[0] if str(e) else "")
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


def _calibration_batches(rc: RunConfig, task, pad_id: int) -> List[Dict[str, torch.Tensor]]:
    """Batches from dataset.calibration_split (e.g. the train split) for plugins that calibrate."""
    if not rc.dataset.calibration_split:
        return []
    import dataclasses

    cfg = dataclasses.replace(rc.dataset, split=rc.dataset.calibration_split,
                              max_samples=rc.dataset.calibration_samples)
    features = task.featurize(data.load(cfg))
    r = rc.runtime
    return [b.inputs for b in measure.make_batches(features.rows, r.batch_size, pad_id, r.padding, r.max_length,
                                                   False, r.pad_to_multiple_of)]


def _finish(results: Results, tracker: Tracker, run_dir: Path, predictions: List[dict], rc: RunConfig,
            metric_names: List[str]) -> None:
    results["tracking_error"] = tracker.error
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if predictions and rc.tracking.prediction_samples:
        sample = predictions[:rc.tracking.prediction_samples]
        (run_dir / "predictions_sample.json").write_text(json.dumps(sample, indent=2, default=str))
    tracker.log_artifact(run_dir / "results.json")
    tracker.log_artifact(run_dir / "predictions_sample.json")
    tracker.log_artifact(run_dir / ".hydra", "hydra")
    tracker.end(results["status"])
    results["tracking_error"] = tracker.error
    print_results(results, metric_names)
