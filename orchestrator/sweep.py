"""Multirun sweeps in MLflow: one parent run per sweep, every job nested under it, a summary at the end.

Registered as a Hydra callback in conf/config.yaml. The parent run id reaches the jobs through an environment
variable, which local, joblib (loky) and submitit workers inherit from the process that launches them, and through
the file ``<sweep dir>/mlflow_parent_run_id`` for jobs started without that environment (see docs/sweeps.md).
"""
from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .errors import first_line
from .tracking import (PARENT_RUN_ENV, PARENT_RUN_FILE, check_reachable, check_uri, default_artifact_location,
                       ensure_experiment, sqlite_path)

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


# jobs of the last sweep in this process that did not finish / that fell back without the user asking for it on
# the command line; the CLI turns them into its exit status
last_failed_jobs = 0
last_unasked_fallbacks: list = []


def fallback_asked(overrides) -> bool:
    """runtime.on_plugin_error=fallback given on the command line (not only inherited from a preset)."""
    return any(str(o).lstrip("+~").startswith("runtime.on_plugin_error=") and "fallback" in str(o) for o in overrides)


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.client = None
        self.parent_id: Optional[str] = None
        self.sweep_dir: Optional[Path] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = config.get("tracking")
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        warning = parallel_warning(config.hydra.get("launcher"))
        if warning:
            log.warning(warning)
        (self.sweep_dir / PARENT_RUN_FILE).unlink(missing_ok=True)  # never a stale id from an earlier sweep here
        if not tracking or not tracking.enabled:
            return
        try:
            from mlflow.tracking import MlflowClient

            check_uri(tracking.uri)
            db = sqlite_path(tracking.uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            check_reachable(tracking.uri)
            # created once here, before any job: concurrent first use of a sqlite store races
            self.client = MlflowClient(tracking_uri=tracking.uri)
            exp_id = ensure_experiment(self.client, tracking.experiment,
                                       tracking.artifact_location or default_artifact_location(tracking.uri))
            overrides = list(config.hydra.overrides.task)
            from .environment import environment_tags

            run = self.client.create_run(exp_id, run_name=f"sweep-{self.sweep_dir.parent.name}-{self.sweep_dir.name}",
                                         tags={**environment_tags(), "sweep": "true",
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
            log.error("MLflow sweep run could not be created (%s: %s); jobs are tracked without a parent",
                      type(e).__name__, first_line(e))
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
        os.environ.pop(PARENT_RUN_ENV, None)
        from .summary import print_summary, summarize_sweep

        gate = config.get("summary") or {}
        try:
            summary = summarize_sweep(self.client, self.parent_id, self.sweep_dir,
                                      min_accuracy_ratio=float(gate.get("min_accuracy_ratio", 0.99)),
                                      min_agreement=float(gate.get("min_agreement", 0.95)))
        except Exception as e:
            log.error("sweep summary failed: %s: %s", type(e).__name__, e)
            if self.client is not None and self.parent_id:
                self.client.set_terminated(self.parent_id, "FAILED")
            raise
        print_summary(summary)
        global last_failed_jobs, last_unasked_fallbacks
        last_failed_jobs = summary["failed"]
        asked = fallback_asked(list(config.hydra.overrides.task))
        last_unasked_fallbacks = [] if asked else list(summary["fell_back"])
