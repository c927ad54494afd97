"""Runs MLflow lacks or holds in part, put there afterwards; runs a dead process left RUNNING, closed.

``orchestrator-import <run dir | sweep dir>`` reads each run's ``results.json`` (written whatever happened to the
store) and gives MLflow what it lacks: the run itself, params, metrics, tags, artifacts, its status, and for a sweep
the parent run with its jobs nested under it and the summary. A second import adds nothing: runs are found again by
their run id or their run directory (tag ``run_dir``), and only missing params, metrics, tags and artifacts are
logged.

Files are hostile: a damaged results.json is named in one line and skipped (the other jobs go on), metric names
MLflow would take as paths are refused and said, links that leave a run folder are not followed, and no path is
ever put into an MLflow filter string (runs are matched in Python). Runs left RUNNING by a dead process are closed
on the way (orchestrator/reconcile.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import describe
from .records import (PARENT_RUN_FILE, RESULTS_FILE, RUN_ARTIFACTS, TERMINAL, RecordError, job_dirs, read_record,
                      running_process, sweep_run_name, tracking_of)
from .reconcile import reconcile_sweep

log = logging.getLogger(__name__)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


# -- import --------------------------------------------------------------------------------------------------------
def _find(client, exp_id: str, record, run_dir: Path):
    if record.get("run_id"):
        try:
            return client.get_run(record["run_id"])
        except Exception:  # recorded for another store, or never created
            pass
    # matched in Python: a path may hold quotes an MLflow filter string cannot carry
    where = str(run_dir.resolve())
    for run in _all_runs(client, exp_id):
        if run.data.tags.get("run_dir") == where:
            return run
    return None


def _all_runs(client, exp_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], "", max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs += list(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


def _files_inside(folder: Path, root: Path) -> List[Path]:
    """Every file under ``folder`` that stays inside ``root`` (links that leave it are refused, not followed)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            log.warning("%s: a link (to %s) is not imported: it leaves the run folder", p, p.resolve())
            continue
        if p.is_file() and p.resolve().is_relative_to(root.resolve()):
            out.append(p)
    return out


def import_run(client, exp_id: str, run_dir: Path, parent_id: Optional[str] = None,
               own_store: bool = True) -> Tuple[Optional[str], str]:
    """One run folder into MLflow; returns (run id, what was done) — 'nothing to add' on a second import.
    ``own_store``: the store the run was made for (then its results.json learns the run id; another store's
    import leaves the run's files as they are). RecordError for a damaged results.json."""
    from mlflow.entities import Metric, Param, RunTag

    from .tracking import MAX_PARAM_LEN, flatten

    res = run_dir / RESULTS_FILE
    if res.is_symlink():
        raise RecordError(f"{res}: a link, not the run's own file; skipped")
    if not res.is_file():
        return None, "no results.json (its process died before the run ended): nothing to import"
    record = read_record(res)
    if record.get("resumed_from"):
        return record["resumed_from"], f"reused run {record['resumed_from']} (resume=true): nothing to add"
    if record.get("refused"):  # as when it ran: a config refused before any run gets no MLflow run
        return None, f"refused by its config before any run ({record.get('error')}): nothing to import"
    if record.get("status") not in TERMINAL:
        pid = running_process(run_dir)
        if pid:
            return None, f"still running (process {pid}): not imported"
        # its process died before it could record its end (kill -9 of the sweep): it ends KILLED, never RUNNING
        record["status"] = "KILLED"
        record.setdefault("error", "its process ended before the run did (found RUNNING by orchestrator-import)")
    ended = res.stat().st_mtime
    run = _find(client, exp_id, record, run_dir)
    done = []
    if run is None:
        hydra_dir = run_dir / ".hydra"
        started = hydra_dir.stat().st_mtime if hydra_dir.is_dir() else ended
        run = client.create_run(exp_id, run_name=record.get("run_name"), start_time=_ms(started),
                                tags={"imported": "true"})
        done.append("created")
    run_id = run.info.run_id
    try:
        have_tags, have_params, have_metrics = run.data.tags, run.data.params, run.data.metrics
        tags = [RunTag(k, v[:MAX_PARAM_LEN]) for k, v in record.mlflow_tags(run_dir, parent_id).items()
                if k not in have_tags]
        params = [Param(k, v) for k, v in flatten(record.get("config") or {}).items() if k not in have_params]
        metrics = [Metric(k, v, _ms(ended), 0) for k, v in record.numeric_metrics().items() if k not in have_metrics]
        bad = record.bad_metrics()
        if bad:
            done.append(f"refused {len(bad)} invalid metric(s): {', '.join(repr(b) for b in bad[:3])}")
        for i in range(0, max(len(tags), len(params), len(metrics)), 100):  # MLflow's log_batch limits
            client.log_batch(run_id, metrics=metrics[i:i + 100], params=params[i:i + 100], tags=tags[i:i + 100])
        for what, items in (("metrics", metrics), ("params", params), ("tags", tags)):
            if items:
                done.append(f"+{len(items)} {what}")
        if own_store and (record.get("run_id") != run_id or record.get("tracking_error")):
            # found again by its id next time, even from a moved folder; and no longer missing from the store
            record["run_id"] = run_id
            if record.get("tracking_error"):
                record["tracking_error_before_import"] = record.pop("tracking_error")
            record.write(run_dir)
        have = {a.path for a in client.list_artifacts(run_id)}
        added = 0
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_symlink():
                log.warning("%s: a link (to %s) is not imported: it leaves the run folder", path, path.resolve())
            elif path.is_file() and name not in have:
                client.log_artifact(run_id, str(path))
                added += 1
        hydra_dir = run_dir / ".hydra"
        if hydra_dir.is_dir() and not hydra_dir.is_symlink() and "hydra" not in have:
            for f in _files_inside(hydra_dir, run_dir):
                sub = f.parent.relative_to(hydra_dir)
                client.log_artifact(run_id, str(f), "hydra" if sub == Path(".") else f"hydra/{sub.as_posix()}")
            added += 1
        if added:
            done.append(f"+{added} artifacts")
        status = record.get("status")
        if status in TERMINAL and run.info.status not in TERMINAL:
            client.set_terminated(run_id, status, end_time=_ms(ended))
            done.append(f"{run.info.status} -> {status}" if "created" not in done else status)
    except BaseException:
        # never leave a run this import created or found RUNNING behind: it has no process to close it later
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, record.get("status") if record.get("status") in TERMINAL else "FAILED")
        raise
    return run_id, ", ".join(done) or "nothing to add"


def _parent(client, exp_id: str, sweep_dir: Path, overrides: str, own_store: bool) -> Tuple[str, bool]:
    id_file = sweep_dir / PARENT_RUN_FILE
    if id_file.is_file() and not id_file.is_symlink():
        try:
            return client.get_run(id_file.read_text().strip()).info.run_id, False
        except Exception:  # recorded for another store
            pass
    where = str(sweep_dir.resolve())
    for run in _all_runs(client, exp_id):
        if run.data.tags.get("sweep") == "true" and run.data.tags.get("sweep.dir") == where:
            return run.info.run_id, False
    started = min((p.stat().st_mtime for p in sweep_dir.iterdir()), default=time.time())
    run = client.create_run(exp_id, run_name=sweep_run_name(sweep_dir),
                            start_time=_ms(started), tags={"sweep": "true", "sweep.dir": where,
                                                           "sweep.overrides": overrides, "imported": "true"})
    if own_store:
        id_file.write_text(run.info.run_id + "\n")
    return run.info.run_id, True


def import_sweep(client, exp_id: str, sweep_dir: Path, overrides: str = "",
                 own_store: bool = True) -> Tuple[str, List[str]]:
    """A sweep folder: its parent run, every job under it, runs left RUNNING closed, the summary logged. A job
    whose results.json is damaged is named in one line and skipped; the others go on."""
    from .summary import summarize_sweep

    parent_id, created = _parent(client, exp_id, sweep_dir, overrides, own_store)
    lines = [f"parent run {parent_id}: {'created' if created else 'found'}"]
    changed = created
    try:
        for job in job_dirs(sweep_dir):
            try:
                run_id, done = import_run(client, exp_id, job, parent_id, own_store)
            except RecordError as e:
                lines.append(f"job {job.name}: skipped: {e}")
                continue
            changed |= not done.startswith(("nothing", "no results", "reused"))
            lines.append(f"job {job.name}: {'run ' + run_id + ': ' if run_id else ''}{done}")
        try:  # the parent is closed by its summary below
            lines += reconcile_sweep(client, parent_id, "orchestrator-import", parent_too=False)
        except Exception as e:
            lines.append(f"runs left RUNNING could not be checked ({describe(e)})")
    finally:
        if changed or client.get_run(parent_id).info.status not in TERMINAL:
            summarize_sweep(client, parent_id, sweep_dir, write_files=own_store)
            lines.append(f"parent run {parent_id}: summary logged, {client.get_run(parent_id).info.status}")
    return parent_id, lines


def main(argv: Optional[List[str]] = None) -> int:
    """``orchestrator-import <run dir | sweep dir>``: put runs MLflow lacks (or holds in part) into it."""
    parser = argparse.ArgumentParser(prog="orchestrator-import", description=main.__doc__)
    parser.add_argument("target", help="a run directory (outputs/runs/...) or a sweep directory (outputs/multirun/...)")
    parser.add_argument("--tracking-uri", help="default: the tracking.uri the runs were made with")
    parser.add_argument("--experiment", help="default: the tracking.experiment the runs were made with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    target = Path(args.target)
    single = (target / RESULTS_FILE).is_file() or (target / ".hydra").is_dir()
    jobs = [] if single or not target.is_dir() else job_dirs(target)
    if not single and not jobs:
        print(f"error: {args.target}: neither a run directory (with results.json) nor a sweep directory (with job "
              "directories holding .hydra/)", file=sys.stderr)
        return 2
    tracking = tracking_of(target if single else jobs[0], args.tracking_uri, args.experiment)
    own = tracking_of(target if single else jobs[0]).uri == tracking.uri
    from .tracking import open_store

    try:
        client, exp_id = open_store(tracking)
        if single:
            run_id, done = import_run(client, exp_id, target, own_store=own)
            print(f"{target}: {'run ' + run_id + ': ' if run_id else ''}{done}")
        else:
            overrides = ""
            try:
                from omegaconf import OmegaConf

                overrides = " ".join(OmegaConf.load(target / "multirun.yaml").hydra.overrides.task)
            except Exception:  # a sweep dir without Hydra's multirun.yaml: the parent just lacks the tag
                pass
            parent_id, lines = import_sweep(client, exp_id, target, overrides, own)
            for line in lines:
                print(line)
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"error: import into {tracking.uri} failed: {describe(e)}", file=sys.stderr)
        return 1
    print(f"imported {target} into {tracking.uri} (experiment {tracking.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
