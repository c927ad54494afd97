"""The run record: the one owner of what a run writes and how others read it back.

A run's record is ``results.json`` in its run folder, written whatever happens (the only copy of an untracked run).
Everything that writes or reads it goes through here: the runner (a new or a reused run), the launchers (a job that
died before writing it: :meth:`RunRecord.lost`), the importer (its MLflow tags: :meth:`RunRecord.mlflow_tags`), the
sweep summary (one row per job: :func:`summary_row`, :func:`row_of_run`) and reconciliation (the status a dead
run recorded). So are the names of the files in a run or sweep folder and the order jobs are listed in.

Files are treated as hostile: a damaged or wrong-shaped results.json is refused by :func:`read_record` with one line
naming the file, never a traceback.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from .errors import OrchestratorError

RESULTS_FILE = "results.json"
DECISIONS_FILE = "decisions.json"  # every example's decision, dataset order: what a sweep compares
PREDICTIONS_SAMPLE_FILE = "predictions_sample.json"
PARENT_RUN_FILE = "mlflow_parent_run_id"  # the sweep's parent run id, in the sweep folder
SWEPT_KEYS_FILE = "swept_keys"  # the keys a sweep varies, in the sweep folder
RACE_FILE = "race.json"  # the race's log (orchestrator/race.py), in the sweep folder
# what a run folder holds for MLflow besides the hydra/ configs (plugins' own files are logged by the run)
RUN_ARTIFACTS = (RESULTS_FILE, PREDICTIONS_SAMPLE_FILE, DECISIONS_FILE, "load_report.json", "predictions.json")
TERMINAL = ("FINISHED", "FAILED", "KILLED")
EAGER = "eager"  # the label of the empty stack

# MLflow's rule for metric/param/tag names, without its path-like escapes
_VALID_NAME = re.compile(r"^[\w\-. /]+$")


class RecordError(OrchestratorError):
    """A results.json that cannot be read or has the wrong shape (named in one line, skipped by readers)."""


def stack_label(names: Iterable[str]) -> str:
    return "+".join(map(str, names)) or EAGER


def valid_name(name: str) -> bool:
    """A metric/tag name MLflow accepts and that cannot name a path outside the run (``../x``)."""
    return bool(_VALID_NAME.match(name)) and ".." not in name.split("/") and not name.startswith("/")


def override_values(overrides: Iterable[Any]) -> Dict[str, str]:
    """``key=value`` overrides as key -> value, without Hydra's ``+``/``~`` prefixes."""
    pairs = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
    return {k.lstrip("+~"): v for k, v in pairs.items()}


def sweep_run_name(sweep_dir: Path) -> str:
    """The parent run's name, the time first: MLflow's runs list shows ~18 characters of a name."""
    return f"sweep-{sweep_dir.name[:8]} {sweep_dir.parent.name}"


def job_dirs(sweep_dir: Path) -> List[Path]:
    """A sweep's job folders (those Hydra gave a ``.hydra/``), in job order (0, 1, ..., 10)."""
    try:
        found = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.is_symlink() and (p / ".hydra").is_dir()]
    except OSError:
        return []
    return sorted(found, key=lambda p: (len(p.name), p.name))


def refuse_taken_run_dir(run_dir: Path, resume: bool) -> None:
    """A run folder that already holds another run's record is never overwritten (for an untracked run that file
    is the only copy); resume=true continues a sweep's own jobs in place."""
    from .errors import ConfigError

    if not resume and (Path(run_dir) / RESULTS_FILE).exists():
        raise ConfigError(f"hydra.run.dir={run_dir}: the folder already holds a run ({RESULTS_FILE}); it is never "
                          "overwritten: choose another folder (or leave hydra.run.dir at its default)")


def running_process(run_dir: Path) -> Optional[str]:
    """The pid of the live process on this host whose run this folder's record says is RUNNING, else None."""
    import platform

    import psutil

    path = Path(run_dir) / RESULTS_FILE
    record = try_read(path) if path.is_file() else None
    tags = (record or {}).get("tags") or {}
    pid = str(tags.get("process.pid", ""))
    if not record or record.get("status") != "RUNNING" or tags.get("host") != platform.node() or not pid.isdigit():
        return None
    try:  # the pid must be the run's own process, not a newer one that got its number
        return pid if psutil.Process(int(pid)).create_time() <= path.stat().st_mtime + 1.0 else None
    except psutil.Error:
        return None


def alive_jobs(sweep_dir: Path) -> List[str]:
    """Jobs of a sweep folder whose record says RUNNING in a process that is still alive on this host."""
    return [f"{job.name} (process {pid})" for job in job_dirs(sweep_dir)
            for pid in [running_process(job)] if pid]


def refuse_taken_sweep_dir(sweep_dir: Path, resume: bool) -> None:
    """A sweep folder that already holds a sweep's jobs is never merged into or overwritten; resume=true is the
    one way to continue a sweep, and not while a job of it is still running on this host."""
    from .errors import ConfigError

    if resume:
        alive = alive_jobs(sweep_dir)
        if alive:
            raise ConfigError(f"resume=true: job(s) {', '.join(alive)} of the sweep in {sweep_dir} are still running "
                              "on this host; wait for them or stop them first (two processes would time side by "
                              "side)")
        return
    taken = [p.name for p in job_dirs(sweep_dir) if (p / RESULTS_FILE).exists()]
    if taken or (Path(sweep_dir) / PARENT_RUN_FILE).exists():
        raise ConfigError(f"hydra.sweep.dir={sweep_dir}: the folder already holds a sweep (jobs "
                          f"{', '.join(taken[:5]) or 'none finished'}); it is never merged into or overwritten: "
                          "choose another folder, or add resume=true to continue that sweep")


def refuse_changed_overrides(sweep_dir: Path, overrides: List[str]) -> None:
    """resume=true continues the sweep in ``sweep_dir`` as it was launched: other overrides would mix the rows of
    two sweeps in one summary."""
    from omegaconf import OmegaConf

    from .errors import ConfigError

    try:
        before = list(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task)
    except Exception:  # no earlier launch recorded there: nothing to compare with
        return

    def plain(items):
        return sorted(str(o) for o in items if not str(o).lstrip("+~").startswith("resume="))

    was, now = plain(before), plain(overrides)
    if was != now:
        raise ConfigError(f"resume=true: the sweep in {sweep_dir} was launched with {' '.join(was) or 'no overrides'},"
                          f" not {' '.join(now) or 'no overrides'}; resume it with the same overrides, or start a new "
                          "sweep (another hydra.sweep.dir)")


def discard_run_dir(run_dir: Path) -> None:
    """Remove what a run its config refused left in its folder (Hydra's .hydra/ and log, the record), and the
    folder when nothing else is in it: a refused single run leaves nothing behind but its one error line."""
    import shutil

    run_dir = Path(run_dir)
    for name in (RESULTS_FILE, ".hydra"):
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for log_file in run_dir.glob("*.log"):
        if log_file.stat().st_size == 0 or log_file.name in ("orchestrator.log", "cli.log", "__main__.log"):
            log_file.unlink()
    try:
        run_dir.rmdir()  # only when empty: a folder the user pointed at keeps everything else
    except OSError:
        pass


# -- what a run measures, and whom it is compared with -----------------------------------------------------------
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
    if container.get("scenario"):  # a scenario's jobs are compared with each other only (their own figure)
        workload["scenario"] = container["scenario"]
    skip_runtime = ("progress", "timeout_s", "on_plugin_error")
    like = {k: v for k, v in container.items()
            if k not in ("optimization", "precision", "tracking", "resume", "summary", "requires", "race")}
    like["runtime"] = {k: v for k, v in runtime.items() if k not in skip_runtime}
    return {"workload": _digest(workload), "baseline_key": _digest(like)}


class RunRecord(dict):
    """Everything known about a run so far, as written to results.json (a dict: callers and older files agree)."""

    @classmethod
    def new(cls, *, run_name: str, stack: str, precision: str, task: Optional[str], config: Dict[str, Any],
            run_dir: Path, tracking_uri: Optional[str], keys: Dict[str, str], overrides: str,
            tags: Dict[str, str]) -> "RunRecord":
        return cls(run_name=run_name, status="RUNNING", stack=stack, stack_requested=stack, precision=precision,
                   task=task, config=config, run_dir=str(run_dir), run_id=None, tracking_uri=tracking_uri,
                   keys=keys, overrides=overrides, cpu_model=tags.get("cpu.model"),
                   # every tag, for orchestrator-import when the store missed the run
                   metrics={}, tags=dict(tags))

    @classmethod
    def reused(cls, previous: Any, *, run_name: str, stack: str, precision: str, task: Optional[str],
               config: Dict[str, Any], run_dir: Path, tracking_uri: str, keys: Dict[str, str]) -> "RunRecord":
        """resume=true: the FINISHED MLflow run ``previous`` of the same config stands for this job."""
        tags = previous.data.tags
        return cls(run_name=previous.info.run_name or run_name, status="FINISHED",
                   stack=tags.get("stack", stack), stack_requested=tags.get("stack.requested", stack),
                   precision=precision, task=task, config=config, run_dir=str(run_dir),
                   run_id=previous.info.run_id, resumed_from=previous.info.run_id, tracking_uri=tracking_uri,
                   keys=keys, overrides=tags.get("overrides", ""), cpu_model=tags.get("cpu.model"),
                   metrics=dict(previous.data.metrics))

    def record(self, metrics: Dict[str, float]) -> None:
        self.setdefault("metrics", {}).update(metrics)

    def tag(self, tags: Dict[str, str]) -> None:
        self.setdefault("tags", {}).update(tags)

    def write(self, run_dir: Optional[Path] = None) -> Path:
        path = Path(run_dir or self["run_dir"]) / RESULTS_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self, indent=2, default=str))
        tmp.replace(path)  # a reader never sees half a record
        return path

    # -- what others read -----------------------------------------------------------------------------------------
    def mlflow_tags(self, run_dir: Path, parent_id: Optional[str]) -> Dict[str, str]:
        """The MLflow tags this record stands for (orchestrator-import of a run the store missed)."""
        tags = {str(k): str(v) for k, v in (self.get("tags") or {}).items() if valid_name(str(k))}
        keys = self.get("keys") or {}
        tags.update({k: str(v) for k, v in {
            "task": self.get("task"), "stack": self.get("stack"), "stack.requested": self.get("stack_requested"),
            "precision": self.get("precision"), "overrides": self.get("overrides"),
            "cpu.model": self.get("cpu_model"), "workload": keys.get("workload"),
            "baseline_key": keys.get("baseline_key"), "error": self.get("error"),
            "run_dir": str(run_dir.resolve())}.items() if v not in (None, "")})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
            tags.setdefault("job_num", run_dir.name)
        return tags

    def numeric_metrics(self) -> Dict[str, float]:
        """Metrics whose name and value MLflow can take (the rest are said by the importer, never logged)."""
        return {k: float(v) for k, v in (self.get("metrics") or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and valid_name(str(k))}

    def bad_metrics(self) -> List[str]:
        return [str(k) for k, v in (self.get("metrics") or {}).items()
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and valid_name(str(k)))]

    def row(self, job: str, run_dir: Path) -> Dict[str, Any]:
        keys = self.get("keys") or {}
        return summary_row(job, str(self.get("status", "?")), self.get("task"), str(self.get("stack") or ""),
                           shown_precision(str(self.get("precision", "?")), self.get("compute"), self.get("weights")),
                           self.numeric_metrics(), self.get("run_id"),
                           stack_requested=self.get("stack_requested"),
                           fallback=",".join(self.get("fallbacks") or {}) or None,
                           workload=keys.get("workload"), baseline_key=keys.get("baseline_key"),
                           run_dir=str(run_dir), overrides=self.get("overrides", ""),
                           cpu_model=self.get("cpu_model"), random_head=self.get("random_head") or None,
                           tracking_error=self.get("tracking_error"), refused=self.get("refused"),
                           reused_run=self.get("resumed_from"), **race_fields(self.get("race")),
                           **scenario_fields((self.get("scenario") or {}).get("name"), self.numeric_metrics(),
                                             (self.get("scenario") or {}).get("valid")))


# the shape a results.json must have for anything to trust it: key -> accepted types
_SHAPE = {"status": (str,), "metrics": (dict,), "tags": (dict,), "keys": (dict,), "config": (dict,),
          "run_id": (str, type(None)), "stack": (str,), "precision": (str,), "task": (str, type(None)),
          "overrides": (str,), "fallbacks": (dict, list, type(None))}


def read_record(path: Path) -> RunRecord:
    """A results.json (or the run folder holding one) as a RunRecord; RecordError, one line, when it is damaged."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror or e})") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]}); skipped") from e
    if not isinstance(data, dict):
        raise RecordError(f"{path}: a results.json must hold an object, not {type(data).__name__}; skipped")
    for key, types in _SHAPE.items():
        if key in data and not isinstance(data[key], types):
            raise RecordError(f"{path}: '{key}' must be {' or '.join(t.__name__ for t in types)}, not "
                              f"{type(data[key]).__name__}; skipped")
    return RunRecord(data)


def try_read(path: Path) -> Optional[RunRecord]:
    """read_record, or None when the file is absent or damaged (for callers that only enrich what they have)."""
    try:
        return read_record(path)
    except RecordError:
        return None


def lost_record(where: Path, *, status: str, reason: str, stack: str, precision: str, task: Optional[str],
                overrides: Sequence[str], run_id: Optional[str], measured: Dict[str, float]) -> Optional[RunRecord]:
    """The record of a job that returned nothing (killed, cancelled, crashed), merged into what the job itself
    wrote; None when the job had already recorded its own end (never overwrite that)."""
    path = where / RESULTS_FILE
    existing = try_read(path) if path.is_file() else RunRecord()
    data = existing if existing is not None else RunRecord()
    if data.get("status") not in (None, "RUNNING"):
        return None
    data.update({"status": status, "error": reason, "stack": data.get("stack", stack),
                 "stack_requested": data.get("stack_requested", stack), "precision": precision, "task": task,
                 "overrides": " ".join(overrides), "run_id": data.get("run_id") or run_id, "run_dir": str(where),
                 # what the run had logged before it was lost: a killed job keeps its measurements
                 "metrics": {**measured, **(data.get("metrics") or {})}})
    return data


# -- summary rows ----------------------------------------------------------------------------------------------------
COLUMNS = ["job", "stack", "precision", "metric", "value", "accuracy_delta", "throughput", "throughput_ci_low",
           "throughput_ci_high", "speedup", "speedup_ci_low", "speedup_ci_high", "noise", "agreement_vs_baseline",
           "gate", "gate_reason", "pareto", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
           "parity_max_abs_diff", "parity_agreement", "eval_throughput", "peak_fraction_pct", "status",
           "stack_requested", "fallback", "random_head", "cpu_model", "baseline_job", "run_id", "reused_run",
           "rounds", "stopped", "scenario", "figure", "figure_value", "figure_unit", "scenario_valid"]
_ROW_METRICS = ("throughput", "throughput_ci_low", "throughput_ci_high", "latency_p50_ms", "latency_p90_ms",
                "latency_p99_ms", "parity_max_abs_diff", "parity_agreement", "eval_throughput", "peak_fraction_pct",
                "timed_equals_evaluated", "threads", "cores_busy_at_start", "cores_busy_in_rounds",
                "cores_available")


def task_class(task: Optional[str]):
    if not task:
        return None
    from .registry import tasks

    try:
        return tasks.get(task)
    except Exception:
        return None


def shown_precision(precision: str, compute: Optional[str], weights: Optional[str] = None) -> str:
    """What a row calls its precision: the arithmetic that ran when a stack changed it (an int8 recipe on fp32
    weights is int8, not fp32), else the precision config's name (bf16_autocast stays itself); weights stored in
    another precision than the arithmetic (weight-only int8 compression) are said after it: ``fp32+int8w``."""
    shown = compute if precision == "fp32" and compute and compute != "fp32" else precision
    return f"{shown}+{weights}w" if weights and weights != (compute or shown) else shown


def summary_row(job: str, status: str, task: Optional[str], stack: str, precision: str, metrics: Dict[str, float],
                run_id: Optional[str], **extra: Any) -> Dict[str, Any]:
    """One job's row in a sweep summary, whichever source it comes from."""
    cls = task_class(task)
    metric = cls.primary_metric if cls is not None else None
    row: Dict[str, Any] = {c: None for c in COLUMNS}
    row.update({"job": job, "stack": stack or EAGER, "precision": precision, "metric": metric,
                "value": metrics.get(metric) if metric else None, "status": status, "run_id": run_id, "task": task})
    for key in _ROW_METRICS:
        row[key] = metrics.get(key)
    row.update(extra)
    row["stack_requested"] = row.get("stack_requested") or row["stack"]
    return row


def scenario_fields(name: Optional[str], metrics: Dict[str, float], valid: Any) -> Dict[str, Any]:
    """A LoadGen scenario job's figure of merit (its scenario declares name, unit and direction) and verdict;
    nothing for a job timed by the closed-loop pass."""
    if not name:
        return {}
    from . import scenarios

    try:
        fom = scenarios.get(str(name)).figure_of_merit
    except Exception:  # a scenario no longer installed: its figure is not known here
        return {"scenario": str(name)}
    value = metrics.get(fom.name)
    return {"scenario": str(name), "figure": fom.name, "figure_value": value, "figure_unit": fom.unit,
            "higher_is_better": fom.higher_is_better,
            "scenario_valid": valid if isinstance(valid, bool) else str(valid).lower() == "true"}


def race_fields(race: Any) -> Dict[str, Any]:
    """A raced job's per-round throughputs (race round -> rows/s, what paired speedups are taken from) and why its
    race ended; nothing for a job timed alone."""
    if not isinstance(race, dict):
        return {}
    rounds = race.get("throughputs") if isinstance(race.get("throughputs"), dict) else {}
    try:
        per_round = {int(k): float(v) for k, v in rounds.items()}
    except (TypeError, ValueError):
        per_round = {}
    return {"race_rounds": per_round or None, "stopped": race.get("stopped"), "rounds": race.get("rounds"),
            # the race's process-level spread when then, and how many processes the rounds average over
            "race_processes": race.get("processes") or 1, "race_process_sd": race.get("process_sd"),
            "race_process_dof": race.get("process_dof") or 0}


def row_of_run(run: Any) -> Dict[str, Any]:
    """A job's row from its MLflow run (tags set by the runner)."""
    t = run.data.tags
    return summary_row(t.get("job_num", run.info.run_name), run.info.status, t.get("task"), t.get("stack", EAGER),
                       shown_precision(t.get("precision", "?"), t.get("precision.compute"), t.get("precision.weights")),
                       run.data.metrics,
                       run.info.run_id,
                       stack_requested=t.get("stack.requested"), fallback=t.get("stack.fallback"),
                       workload=t.get("workload"), baseline_key=t.get("baseline_key"), run_dir=t.get("run_dir"),
                       overrides=t.get("overrides", ""), cpu_model=t.get("cpu.model"),
                       random_head=t.get("model.random_head") == "true" or None,
                       **scenario_fields(t.get("scenario"), run.data.metrics, t.get("scenario.valid")))


def row_of_dir(job_dir: Path) -> Dict[str, Any]:
    """A job's row from its folder; MISSING without results.json (killed before the end), DAMAGED when unreadable."""
    path = job_dir / RESULTS_FILE
    if not path.exists():
        return summary_row(job_dir.name, "MISSING", None, "?", "?", {}, None, run_dir=str(job_dir))
    try:
        return read_record(path).row(job_dir.name, job_dir)
    except RecordError as e:
        return summary_row(job_dir.name, "DAMAGED", None, "?", "?", {}, None, run_dir=str(job_dir),
                           record_error=str(e))


def tracking_of(run_dir: Path, uri: Optional[str] = None, experiment: Optional[str] = None):
    """The tracking settings a run was made with (its .hydra/config.yaml), a relative sqlite path resolved
    against the directory the run was started from; given ``uri``/``experiment`` win."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from .config import TrackingConfig

    cfg = OmegaConf.to_container(OmegaConf.structured(TrackingConfig))
    try:
        saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml").get("tracking") or {}
        cfg.update(OmegaConf.to_container(saved, resolve=True) if saved else {})
        cwd = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd
    except Exception:  # no saved config (or one that does not resolve here): the defaults
        cwd = None
    if uri:
        cfg["uri"] = uri
    elif cwd and cfg["uri"].startswith("sqlite:///") and not cfg["uri"].startswith("sqlite:////"):
        cfg["uri"] = "sqlite:///" + str(Path(cwd) / cfg["uri"][len("sqlite:///"):])
    if experiment:
        cfg["experiment"] = experiment
    return SimpleNamespace(**cfg)
