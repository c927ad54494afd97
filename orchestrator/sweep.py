"""Multirun sweeps in MLflow: one parent run per sweep, every job nested under it, a summary at the end.

Registered as a Hydra callback in conf/config.yaml. The callback tells the jobs their parent run and the keys the
sweep varies (environment + files in the sweep folder; read by ``JobContext.from_hydra``, orchestrator/context.py).

Its result is a :class:`SweepOutcome`, which the CLI turns into its exit status. Hydra gives a callback no way to
return a value, so the outcome of the sweep that ended last in this process is kept in one place,
:func:`take_outcome`; the sweep under way (for a stop that skips ``on_multirun_end``) in :func:`stop_current`.
"""
from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .config import SummaryConfig
from .context import PARENT_RUN_ENV, SWEPT_KEYS_ENV
from .errors import describe
from .records import PARENT_RUN_FILE, SWEPT_KEYS_FILE, sweep_run_name
from .tracking import open_store

log = logging.getLogger(__name__)


def parallel_warning(launcher: Any) -> Optional[str]:
    """Why this launcher's timings cannot be trusted, when it runs jobs side by side on one machine."""
    target = str(launcher.get("_target_", "")) if launcher is not None else ""
    if target.endswith("JoblibLauncher") and launcher.get("n_jobs") != 1:
        return (f"hydra/launcher=joblib runs n_jobs={launcher.get('n_jobs')} jobs at once on this machine: they "
                "compete for cores and memory bandwidth, so latency, throughput and speedup are distorted. For timing "
                "sweeps use hydra.launcher.n_jobs=1")
    if target.endswith("submitit_launcher.LocalLauncher"):
        return ("hydra/launcher=submitit_local starts every job of the sweep at once on this machine: they compete "
                "for cores and memory bandwidth, so latency, throughput and speedup are distorted. For timing sweeps "
                "use the default launcher (hydra/launcher=isolated: one job at a time, each in a fresh process)")
    if target.endswith("ray_launcher.RayLauncher"):
        return ("hydra/launcher=ray runs jobs side by side (one per free CPU by default): on a shared node they "
                "compete for cores and memory bandwidth, so latency, throughput and speedup are distorted. For timing "
                "sweeps give each job a whole node (hydra.launcher.num_cpus=<cores per node>)")
    return None


def unpaired_note(config: DictConfig) -> Optional[str]:
    """One line when a sweep's jobs will not be raced: their speedups are then unpaired (each job's interval from
    its own rounds, blind to load that changed between jobs)."""
    hydra = config.get("hydra") or {}
    launcher = str(((hydra.get("runtime") or {}).get("choices") or {}).get("hydra/launcher") or "")
    mode = (config.get("race") or {}).get("mode", "on")
    mode = str(getattr(mode, "name", mode))  # the schema's enum, or a plain value
    if launcher == "isolated" and mode != "off":
        return None
    how = ("race.mode=off times the jobs one after another" if launcher == "isolated" else
           f"hydra/launcher={launcher or '?'} times each job on its own, not raced")
    return (f"{how}: speedups are unpaired (each job's interval comes from its own rounds and cannot see load that "
            "changed between jobs); paired speedups need the race on one machine (hydra/launcher=isolated, "
            "race.mode=on)")


def swept_keys(config: DictConfig) -> list:
    """Keys with more than one value in this sweep: sweep syntax on the command line and the sweeper's params
    (a sweep= preset), in the order given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [str(o) for o in config.hydra.overrides.task]
    params = config.hydra.get("sweeper", {}).get("params") or {}
    given += [f"{k}={v}" for k, v in params.items()]
    keys = []
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception:  # Hydra reports a bad override itself; names stay as they were
        return keys
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override() and len(list(o.sweep_string_iterator())) > 1 and key not in keys:
            keys.append(key)
    return keys


@dataclass
class SweepOutcome:
    """What the CLI needs of a sweep that ended: the jobs that did not finish, fell back unasked, or are missing
    from MLflow, and why the store failed."""
    sweep_dir: Optional[Path] = None
    failed_jobs: int = 0
    unasked_fallbacks: List[Any] = field(default_factory=list)
    untracked_jobs: List[Any] = field(default_factory=list)
    store_error: Optional[str] = None
    summary: Dict[str, Any] = field(default_factory=dict)


_outcome: Optional[SweepOutcome] = None
_current: Optional["MlflowSweepCallback"] = None


def take_outcome() -> Optional[SweepOutcome]:
    """The outcome of the sweep that ended last in this process (once), None after a single run."""
    global _outcome
    out, _outcome = _outcome, None
    return out


def sweep_under_way() -> bool:
    return _current is not None


def fallback_asked(overrides) -> bool:
    """runtime.on_plugin_error=fallback given on the command line (not only inherited from a preset)."""
    return any(str(o).lstrip("+~").startswith("runtime.on_plugin_error=") and "fallback" in str(o) for o in overrides)


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.client = None
        self.parent_id: Optional[str] = None
        self.sweep_dir: Optional[Path] = None
        self.config: Optional[DictConfig] = None

    def __getstate__(self) -> Dict[str, Any]:
        # the launchers that start jobs elsewhere (isolated, Ray, SLURM) pickle Hydra's callbacks into every job's
        # payload; Hydra calls no job hook of this one, and unpickling the sweep's MlflowClient made each job process
        # import MLflow's client (~1.3 s) before anything else, the race's extra processes that record nothing too
        return {**self.__dict__, "client": None, "config": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _current
        _current, self.config = self, config
        tracking = config.get("tracking")
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        warning = parallel_warning(config.hydra.get("launcher"))
        if warning:
            log.warning(warning)
        note = unpaired_note(config)
        if note:
            log.info(note)
        # a taken sweep folder was refused when the config was composed (hydra_patches.check_output_dir): Hydra
        # turns an exception raised here into a warning and launches anyway
        (self.sweep_dir / PARENT_RUN_FILE).unlink(missing_ok=True)  # never a stale id from an earlier sweep here
        keys = swept_keys(config)
        os.environ[SWEPT_KEYS_ENV] = " ".join(keys)
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            (self.sweep_dir / SWEPT_KEYS_FILE).write_text(" ".join(keys) + "\n")
        except OSError as e:
            log.warning("could not write %s (%s)", self.sweep_dir / SWEPT_KEYS_FILE, e)
        if not tracking or not tracking.enabled:
            return
        try:
            # created once here, before any job: concurrent first use of a sqlite store races; the HTTP bounds it
            # sets reach the job processes through the environment
            self.client, exp_id = open_store(tracking)
            if config.get("resume"):
                from .reconcile import reconcile_experiment

                reconcile_experiment(self.client, exp_id, "resume")
            overrides = list(config.hydra.overrides.task)
            from .environment import environment_tags, process_tags

            run = self.client.create_run(exp_id, run_name=sweep_run_name(self.sweep_dir),
                                         tags={**environment_tags(), **process_tags(), "sweep": "true",
                                               "sweep.overrides": " ".join(overrides),
                                               "sweep.dir": str(self.sweep_dir.resolve())})
            self.parent_id = run.info.run_id
            os.environ[PARENT_RUN_ENV] = self.parent_id
            # Hydra skips on_multirun_end when the launcher itself raises: never leave the parent RUNNING
            atexit.register(self._close_if_open)
            try:  # for jobs that do not inherit this environment (Ray workers, sbatch --export=NONE)
                self.sweep_dir.mkdir(parents=True, exist_ok=True)
                (self.sweep_dir / PARENT_RUN_FILE).write_text(self.parent_id + "\n")
            except OSError as e:
                log.warning("could not write %s (%s); jobs find the parent run through %s only",
                            self.sweep_dir / PARENT_RUN_FILE, e, PARENT_RUN_ENV)
            log.info("MLflow sweep run %s (%s)", self.parent_id, tracking.uri)
        except Exception as e:  # a tracking failure must not stop the sweep; jobs still write results.json
            log.error("MLflow sweep run could not be created (%s); jobs are tracked without a parent",
                      describe(e))
            self.parent_id = None

    def _close_if_open(self) -> None:
        if self.client is None or not self.parent_id:
            return
        try:
            if self.client.get_run(self.parent_id).info.status == "RUNNING":
                self.client.set_tag(self.parent_id, "error", "the sweep stopped before its end (launcher error or "
                                                             "interrupt); see the jobs' runs")
                self.client.set_terminated(self.parent_id, "FAILED")
        except Exception as e:  # at exit: report, never raise
            log.error("could not close the sweep's MLflow run %s: %s", self.parent_id, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.finish(config)

    def finish(self, config: DictConfig, stopped: Optional[str] = None) -> Dict[str, Any]:
        """The summary of the jobs that ran: at the sweep's end, or (``stopped``: why) when it was stopped early,
        which Hydra does not call on_multirun_end for."""
        global _current, _outcome
        _current = None
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEPT_KEYS_ENV, None)
        from .summary import print_summary, summarize_sweep

        gate = SummaryConfig(**{k: float(v) for k, v in (config.get("summary") or {}).items()})
        try:
            summary = summarize_sweep(self.client, self.parent_id, self.sweep_dir, gate, stopped=stopped)
        except Exception as e:
            log.error("sweep summary failed: %s: %s", type(e).__name__, e)
            if self.client is not None and self.parent_id:
                self.client.set_terminated(self.parent_id, "FAILED")
            raise
        print_summary(summary)
        tracking = config.get("tracking")
        wanted = bool(tracking and tracking.enabled)
        reasons = [summary.get("store_error")] + [r.get("tracking_error") for r in summary["rows"]]
        if not self.parent_id:
            reasons.append("the sweep's parent run could not be created")
        asked = fallback_asked(list(config.hydra.overrides.task))
        _outcome = SweepOutcome(sweep_dir=self.sweep_dir, failed_jobs=summary["failed"],
                                unasked_fallbacks=[] if asked else list(summary["fell_back"]),
                                untracked_jobs=list(summary["untracked"]) if wanted else [],
                                store_error=next((r for r in reasons if r), None) if wanted else None,
                                summary=summary)
        return summary


def stop_current(reason: str) -> Optional[Dict[str, Any]]:
    """A sweep stopped before its end (two Ctrl-C, SIGTERM): the summary of the jobs that ran; None outside one."""
    callback = _current
    if callback is None or callback.config is None:
        return None
    return callback.finish(callback.config, stopped=reason)
