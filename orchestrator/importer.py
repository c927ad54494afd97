"""Runs MLflow lacks or holds in part, put there afterwards; runs a dead process left RUNNING, closed.

``orchestrator-import <run dir | sweep dir>`` reads each run's ``results.json`` (written whatever happened to the
store) and gives MLflow what it lacks: the run itself, params, metrics, tags, artifacts, its status, and for a sweep
the parent run with its jobs nested under it and the summary. A second import adds nothing: runs are found again by
their run id or their run directory (tag ``run_dir``), and only missing params, metrics, tags and artifacts are
logged.

Reconciliation: a run whose ``process.pid`` is gone from this host (``host`` tag) while MLflow still says RUNNING
was killed with nothing left to close it (``kill -9`` of the sweep process too, a lost store; a job process that
dies alone is recorded by its launcher, ``_remote.record_lost_job``). ``resume=true``, ``orchestrator-report`` and
this import close such runs, with the status its results.json recorded, else KILLED, and say so.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

from .errors import describe

log = logging.getLogger(__name__)

TERMINAL = ("FINISHED", "FAILED", "KILLED")
RESULTS = "results.json"
# what a run directory holds for MLflow besides the hydra/ configs (plugins' own files are logged by the run)
ARTIFACTS = ("results.json", "predictions_sample.json", "decisions.json", "load_report.json", "predictions.json")


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# -- reconciliation ------------------------------------------------------------------------------------------------
def dead_process(run) -> Optional[str]:
    """Why the process that owns this RUNNING run is known to be gone, or None (alive, or not checkable here)."""
    import psutil

    tags = run.data.tags
    pid, host = tags.get("process.pid"), tags.get("host")
    if not pid or not pid.isdigit() or host != platform.node():
        return None
    try:
        proc = psutil.Process(int(pid))
        # a pid the kernel gave to a newer process: the run's own process is gone
        if proc.create_time() <= run.info.start_time / 1000 + 1.0:
            return None
        return f"process {pid} on {host} is gone (its pid now belongs to a newer process)"
    except psutil.NoSuchProcess:
        return f"process {pid} on {host} is gone"
    except psutil.Error:
        return None


def _results_of(run) -> Dict[str, Any]:
    path = Path(run.data.tags.get("run_dir") or "/nonexistent") / RESULTS
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def close_stale(client, runs, who: str) -> List[str]:
    """Close the RUNNING runs among ``runs`` whose process is gone; one log line each. Returns the lines."""
    said = []
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        why = dead_process(run)
        if why is None:
            continue
        recorded = _results_of(run)
        status = recorded.get("status") if recorded.get("status") in TERMINAL else "KILLED"
        error = recorded.get("error") or f"{why} and left the run RUNNING (closed by {who})"
        if run.data.tags.get("error") is None:
            client.set_tag(run.info.run_id, "error", error[:5000])
        client.set_tag(run.info.run_id, "reconciled", f"{who}: {why}"[:5000])
        client.set_terminated(run.info.run_id, status)
        line = f"{who}: MLflow run {run.info.run_id} ({run.info.run_name}) was RUNNING but {why}: marked {status}"
        log.warning(line)
        said.append(line)
    return said


def reconcile_experiment(client, experiment_id: str, who: str) -> List[str]:
    """Every run of the experiment left RUNNING by a dead process of this host (resume=true before a sweep)."""
    try:
        runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
        return close_stale(client, runs, who)
    except Exception as e:  # reconciliation must never cost the sweep
        log.error("%s: runs left RUNNING could not be checked (%s)", who, describe(e))
        return []


def reconcile_sweep(client, parent_id: str, who: str, parent_too: bool = True) -> List[str]:
    """The sweep's jobs (and parent) left RUNNING by a dead process of this host."""
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                              "attributes.status = 'RUNNING'", max_results=10000)
    return close_stale(client, [*runs, parent] if parent_too else runs, who)


# -- import --------------------------------------------------------------------------------------------------------
def _tags_of(data: Dict[str, Any], run_dir: Path, parent_id: Optional[str]) -> Dict[str, str]:
    tags = {str(k): str(v) for k, v in (data.get("tags") or {}).items()}
    keys = data.get("keys") or {}
    tags.update({k: str(v) for k, v in {
        "task": data.get("task"), "stack": data.get("stack"), "stack.requested": data.get("stack_requested"),
        "precision": data.get("precision"), "overrides": data.get("overrides"), "cpu.model": data.get("cpu_model"),
        "workload": keys.get("workload"), "baseline_key": keys.get("baseline_key"), "error": data.get("error"),
        "run_dir": str(run_dir.resolve())}.items() if v not in (None, "")})
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
        tags.setdefault("job_num", run_dir.name)
    return tags


def _find(client, exp_id: str, data: Dict[str, Any], run_dir: Path):
    if data.get("run_id"):
        try:
            return client.get_run(data["run_id"])
        except Exception:  # recorded for another store, or never created
            pass
    runs = client.search_runs([exp_id], f"tags.run_dir = '{run_dir.resolve()}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def import_run(client, exp_id: str, run_dir: Path, parent_id: Optional[str] = None) -> Tuple[Optional[str], str]:
    """One run directory into MLflow; returns (run id, what was done) — 'nothing to add' on a second import."""
    from mlflow.entities import Metric, Param, RunTag

    from .tracking import MAX_PARAM_LEN, flatten

    res = run_dir / RESULTS
    if not res.is_file():
        return None, "no results.json (its process died before the run ended): nothing to import"
    data = json.loads(res.read_text())
    if data.get("resumed_from"):
        return data["resumed_from"], f"reused run {data['resumed_from']} (resume=true): nothing to add"
    if data.get("refused"):  # as when it ran: a config refused before any run gets no MLflow run
        return None, f"refused by its config before any run ({data.get('error')}): nothing to import"
    ended = res.stat().st_mtime
    run = _find(client, exp_id, data, run_dir)
    done = []
    if run is None:
        hydra_dir = run_dir / ".hydra"
        started = hydra_dir.stat().st_mtime if hydra_dir.is_dir() else ended
        run = client.create_run(exp_id, run_name=data.get("run_name"), start_time=_ms(started),
                                tags={"imported": "true"})
        done.append("created")
    run_id = run.info.run_id
    have_tags, have_params, have_metrics = run.data.tags, run.data.params, run.data.metrics
    tags = [RunTag(k, v[:MAX_PARAM_LEN]) for k, v in _tags_of(data, run_dir, parent_id).items()
            if k not in have_tags]
    params = [Param(k, v) for k, v in flatten(data.get("config") or {}).items() if k not in have_params]
    metrics = [Metric(k, float(v), _ms(ended), 0) for k, v in (data.get("metrics") or {}).items()
               if k not in have_metrics and isinstance(v, (int, float))]
    for i in range(0, max(len(tags), len(params), len(metrics)), 100):  # MLflow's log_batch limits
        client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100], tags=tags[i:i + 100])
    for what, items in (("metrics", metrics), ("params", params), ("tags", tags)):
        if items:
            done.append(f"+{len(items)} {what}")
    if data.get("run_id") != run_id or data.get("tracking_error"):
        # found again by its id next time, even from a moved directory; and no longer missing from the store
        data["run_id"] = run_id
        if data.get("tracking_error"):
            data["tracking_error_before_import"] = data.pop("tracking_error")
        res.write_text(json.dumps(data, indent=2, default=str))
    have = {a.path for a in client.list_artifacts(run_id)}
    added = 0
    for name in ARTIFACTS:
        if (run_dir / name).is_file() and name not in have:
            client.log_artifact(run_id, str(run_dir / name))
            added += 1
    if (run_dir / ".hydra").is_dir() and "hydra" not in have:
        client.log_artifacts(run_id, str(run_dir / ".hydra"), "hydra")
        added += 1
    if added:
        done.append(f"+{added} artifacts")
    status = data.get("status")
    if status in TERMINAL and run.info.status not in TERMINAL:
        client.set_terminated(run_id, status, end_time=_ms(ended))
        done.append(f"{run.info.status} -> {status}" if "created" not in done else status)
    return run_id, ", ".join(done) or "nothing to add"


def _parent(client, exp_id: str, sweep_dir: Path, overrides: str) -> Tuple[str, bool]:
    from .tracking import PARENT_RUN_FILE

    id_file = sweep_dir / PARENT_RUN_FILE
    if id_file.is_file():
        try:
            return client.get_run(id_file.read_text().strip()).info.run_id, False
        except Exception:  # recorded for another store
            pass
    runs = client.search_runs([exp_id], f"tags.sweep = 'true' and tags.`sweep.dir` = '{sweep_dir.resolve()}'",
                              max_results=1)
    if runs:
        return runs[0].info.run_id, False
    started = min((p.stat().st_mtime for p in sweep_dir.iterdir()), default=time.time())
    from .sweep import sweep_run_name

    run = client.create_run(exp_id, run_name=sweep_run_name(sweep_dir),
                            start_time=_ms(started), tags={"sweep": "true", "sweep.dir": str(sweep_dir.resolve()),
                                                           "sweep.overrides": overrides, "imported": "true"})
    id_file.write_text(run.info.run_id + "\n")
    return run.info.run_id, True


def job_dirs(sweep_dir: Path) -> List[Path]:
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()),
                  key=lambda p: (len(p.name), p.name))


def import_sweep(client, exp_id: str, sweep_dir: Path, overrides: str = "") -> Tuple[str, List[str]]:
    """A sweep directory: its parent run, every job under it, runs left RUNNING closed, the summary logged."""
    from .summary import summarize_sweep

    parent_id, created = _parent(client, exp_id, sweep_dir, overrides)
    lines = [f"parent run {parent_id}: {'created' if created else 'found'}"]
    changed = created
    for job in job_dirs(sweep_dir):
        run_id, done = import_run(client, exp_id, job, parent_id)
        changed |= not done.startswith(("nothing", "no results", "reused"))
        lines.append(f"job {job.name}: {'run ' + run_id + ': ' if run_id else ''}{done}")
    try:  # the parent is closed by its summary below
        lines += reconcile_sweep(client, parent_id, "orchestrator-import", parent_too=False)
    except Exception as e:
        lines.append(f"runs left RUNNING could not be checked ({describe(e)})")
    if changed or client.get_run(parent_id).info.status not in TERMINAL:
        summarize_sweep(client, parent_id, sweep_dir)
        lines.append(f"parent run {parent_id}: summary logged, {client.get_run(parent_id).info.status}")
    return parent_id, lines


def _tracking_of(run_dir: Path, uri: Optional[str], experiment: Optional[str]):
    """The tracking settings the run was made with (its .hydra/config.yaml), a relative sqlite path resolved
    against the directory the run was started from; the command line's --tracking-uri/--experiment win."""
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


def main(argv: Optional[List[str]] = None) -> int:
    """``orchestrator-import <run dir | sweep dir>``: put runs MLflow lacks (or holds in part) into it."""
    parser = argparse.ArgumentParser(prog="orchestrator-import", description=main.__doc__)
    parser.add_argument("target", help="a run directory (outputs/runs/...) or a sweep directory (outputs/multirun/...)")
    parser.add_argument("--tracking-uri", help="default: the tracking.uri the runs were made with")
    parser.add_argument("--experiment", help="default: the tracking.experiment the runs were made with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    target = Path(args.target)
    single = (target / RESULTS).is_file() or (target / ".hydra").is_dir()
    jobs = [] if single or not target.is_dir() else job_dirs(target)
    if not single and not jobs:
        print(f"error: {args.target}: neither a run directory (with results.json) nor a sweep directory (with job "
              "directories holding .hydra/)", file=sys.stderr)
        return 2
    tracking = _tracking_of(target if single else jobs[0], args.tracking_uri, args.experiment)
    from .tracking import open_store

    try:
        client, exp_id = open_store(tracking)
        if single:
            run_id, done = import_run(client, exp_id, target)
            print(f"{target}: {'run ' + run_id + ': ' if run_id else ''}{done}")
        else:
            overrides = ""
            try:
                from omegaconf import OmegaConf

                overrides = " ".join(OmegaConf.load(target / "multirun.yaml").hydra.overrides.task)
            except Exception:  # a sweep dir without Hydra's multirun.yaml: the parent just lacks the tag
                pass
            parent_id, lines = import_sweep(client, exp_id, target, overrides)
            for line in lines:
                print(line)
    except Exception as e:
        print(f"error: import into {tracking.uri} failed: {describe(e)}", file=sys.stderr)
        return 1
    print(f"imported {target} into {tracking.uri} (experiment {tracking.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
