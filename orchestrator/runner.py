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
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import measure, naming, phases
from .config import RunConfig, check_tracking, to_run_config
from .context import JobContext
from .environment import environment_tags, process_startup_s, process_tags
from .errors import RunInterrupted
from .errors import describe as describe_error
from .interrupts import interruptible, shielded
from .plugin import process_states
from .records import (DECISIONS_FILE, comparison_keys, config_digest, PREDICTIONS_SAMPLE_FILE, RESULTS_FILE, RunRecord, discard_run_dir,
                      refuse_taken_run_dir,
                      stack_label)
from .report import print_results
from .tracking import Tracker, flatten

log = logging.getLogger(__name__)


def _run_name(rc: RunConfig, ctx: JobContext, stack: Optional[str] = None) -> str:
    """What tells the run apart first (the values its sweep varies, stack, precision), then model and data:
    MLflow's runs list shows ~14-18 characters of a name."""
    return naming.run_name(rc, ctx, stack)


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
    if ctx.race is not None and getattr(ctx.race, "process", 0):
        return _extra_process(rc, ctx)
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
    rec = phases.Recorder(results, tracker, run_dir)
    state = _State()
    startup = process_startup_s(started)  # set when hydra/launcher=isolated started this process
    skipped, checked, waiting = None, False, False
    try:
        # what the config alone shows to be wrong is refused before any MLflow run exists (results.json still
        # says why, for the sweep's summary); what goes wrong later ends the run FAILED. Outside the timeout:
        # runtime.timeout_s bounds the measurement, and a run it stops must be in MLflow as KILLED
        state.checked = phases.preflight(rc)
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
        tracker.connect()
        if ctx.race is not None:  # raced: what came before ran beside another job's start-up; what follows, alone
            waiting = True
            _wait_for_turn(ctx.race, run_dir)
            waiting = False
            if state.checked.busy is not None:
                state.checked.busy.restart()  # the cores others use as its turn starts, not while it waited
        tracker.start(flatten(container), tags)
        results["run_id"] = tracker.run_id
        results.write(run_dir)  # RUNNING, with its process: a sweep resumed meanwhile sees this job is alive
        log.info("run %s: results in %s%s", run_name, run_dir,
                 f", MLflow run {tracker.run_id} ({rc.tracking.uri})" if tracker.run_id else " (untracked)")
        if startup is not None:
            rec.record({"process_startup_s": startup})
        if state.checked.code_import_s is not None:
            rec.record({"code_import_s": state.checked.code_import_s})
        with interruptible(rc.runtime.timeout_s):
            _measure(state.checked, rec, ctx, state)
        results["status"] = "FINISHED"
    except BaseException as e:
        if waiting:  # ended before its turn: nothing ran, nothing is recorded (_wait_for_turn)
            raise
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit, RunInterrupted))
        results["status"] = "KILLED" if interrupted else "FAILED"
        results["error"] = describe_error(e)
        if not checked and not interrupted:
            results["refused"] = True  # by its config, before any MLflow run: none is owed (summary, import)
        raise
    finally:
        if skipped is None and not waiting:
            # a SIGTERM from here on (a second one of the same stop, or a late one) waits until the run is closed
            with shielded(redeliver=results.get("status") != "KILLED"):
                if results.get("error"):
                    tracker.set_tags({"error": results["error"]})
                    if ctx.race is not None:
                        ctx.race.abort(results["error"])  # the race goes on without this job
                if results.get("refused") and not ctx.in_sweep:
                    discard_run_dir(run_dir)  # a single run its config refused: one error line, nothing left behind
                else:
                    _finish(rec, state, rc)
    return results


def _wait_for_turn(worker, run_dir: Path) -> None:
    """A raced job waits for its turn to prepare (orchestrator.race.RaceWorker.wait_turn). Ended while it waits —
    its group turned out full (the launcher ends it with SIGTERM and starts it again later), the sweep stopped, its
    launcher died, Ctrl-C — it leaves nothing behind, as a job that never started: no record, no MLflow run (not
    created yet), Hydra's files gone from its folder; it exits 143 / 130 / 1."""
    import sys

    from .race import RaceLost

    try:
        with interruptible(None):  # the interrupt policy's SIGTERM: RunInterrupted, its exit status 143
            worker.wait_turn()
    except BaseException as e:
        discard_run_dir(run_dir)
        if isinstance(e, RunInterrupted):
            raise SystemExit(e.exit_status) from None
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(130) from None
        if isinstance(e, RaceLost):
            sys.stderr.write(f"error: {e}\n")
            raise SystemExit(1) from None
        raise


@contextlib.contextmanager
def _measured_process(checked: phases.Checked, rec: phases.Recorder):
    """What every process that times a stack sets up (a job's own and a race's extra ones alike): its thread
    settings recorded, the seeds, the process-wide state the stack's plugins guard and the peak-RSS sampler.
    Yields (the sampler, the plugins' tag functions)."""
    rc = checked.rc
    rec.record(checked.thread_metrics)
    torch.manual_seed(rc.runtime.seed)
    random.seed(rc.runtime.seed)
    with measure.PeakRSS() as rss, contextlib.ExitStack() as hooks:
        entered = [hooks.enter_context(cm) for cm in process_states(list(rc.optimization))]
        yield rss, [f for f in entered if f is not None]


def _extra_process(rc: RunConfig, ctx: JobContext) -> Dict[str, Any]:
    """One of a raced job's extra processes (race.processes > 1): the job's load, precision and stack in a process
    of its own, then the race's timing rounds; nothing is recorded here (the job's process 0 records the job, its
    rounds averaged over all its processes). No parity or accuracy pass: process 0 checked both for this config."""
    worker = ctx.race
    run_dir = Path(ctx.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rec = phases.Recorder.unrecorded(rc, run_dir, f"process {worker.process}")
    try:
        checked = phases.preflight(rc, evaluates=False)
        _wait_for_turn(worker, run_dir)  # "prepare" came with its start; a sweep stopped meanwhile ends it here
        with _measured_process(checked, rec) as (rss, tag_fns):
            loaded = phases.load(checked, rec)
            prepared = phases.prepare(checked, loaded, rec, ctx.choices.get("dataset"))
            opt = phases.optimize(checked, loaded, prepared, rec, tag_fns)
            worker.ready({"job": ctx.job_num, "process": worker.process, "status": "ok", "rss_mb": rss.peak_mb})
            log.info("process %d of job %s: timed in the race's rounds", worker.process, ctx.job_num)
            worker.timing(opt.step, prepared.batches, rc.runtime, rc.race.round_s, warmup=rc.race.warmup)
    except BaseException as e:
        worker.abort(describe_error(e))
        raise
    return {"status": "FINISHED", "process": worker.process}


def _measure(checked: phases.Checked, rec: phases.Recorder, ctx: JobContext, state: "_State") -> None:
    """The measured phases in order (orchestrator/phases.py), inside the process-wide state the stack's plugins
    guard and the peak-RSS sampler."""
    rc = checked.rc
    with _measured_process(checked, rec) as (rss, tag_fns):
        loaded = phases.load(checked, rec)
        phases.busy_at_start(checked, rec)
        prepared = phases.prepare(checked, loaded, rec, ctx.choices.get("dataset"))
        ref = phases.reference(checked, loaded, prepared)
        opt = phases.optimize(checked, loaded, prepared, rec, tag_fns)
        # the run is named after what ran: the stack that applied, the precision its arithmetic ran in
        name = naming.run_name(rc, ctx, stack_label(opt.applied), opt.compute, opt.weights)
        if name != rec.results["run_name"]:
            rec.results["run_name"] = name
            rec.tracker.rename(name)
        phases.parity(prepared, ref, opt, rec)
        state.evaluated = phases.evaluate(checked, prepared, opt, rec)
        timing = phases.time_step(checked, prepared, opt, state.evaluated, rec, ctx, lambda: rss.peak_mb)
        phases.count_flops(prepared, ref, opt, timing, rec)
    rec.record({"peak_rss_mb": rss.peak_mb})


class _State:
    """What the run's end needs of the phases that got that far."""
    checked: Optional[phases.Checked] = None
    evaluated: Optional[phases.Evaluated] = None


def _finish(rec: phases.Recorder, state: _State, rc: RunConfig) -> None:
    results, tracker, run_dir = rec.results, rec.tracker, rec.run_dir
    results["tracking_error"] = tracker.error
    results.write(run_dir)
    predictions = state.evaluated.predictions if state.evaluated is not None else []
    if predictions and rc.tracking.prediction_samples:
        sample = predictions[:rc.tracking.prediction_samples]
        (run_dir / PREDICTIONS_SAMPLE_FILE).write_text(json.dumps(sample, indent=2, default=str))
    if state.checked is not None:
        phases.write_decisions(state.checked, state.evaluated, run_dir)
    for path in sorted(run_dir.glob("*_export.log")):  # an engine's full export/conversion log, kept on failure
        tracker.log_artifact(path, "plugins")
    tracker.log_artifact(run_dir / RESULTS_FILE)
    tracker.log_artifact(run_dir / PREDICTIONS_SAMPLE_FILE)
    tracker.log_artifact(run_dir / DECISIONS_FILE)
    tracker.log_artifact(run_dir / ".hydra", "hydra")
    tracker.end(results["status"])
    results["tracking_error"] = tracker.error
    print_results(results, state.checked.task_cls.metric_names if state.checked is not None else [])
