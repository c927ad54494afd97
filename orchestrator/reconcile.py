"""Runs a dead process left RUNNING, closed: the one place reconciliation lives.

A run whose ``process.pid`` is gone from this host (``host`` tag) while MLflow still says RUNNING was killed with
nothing left to close it (``kill -9`` of the sweep process too, a lost store; a job process that dies alone is
recorded by its launcher). ``resume=true``, ``orchestrator-report`` and ``orchestrator-import`` close such runs, with
the status its results.json recorded, else KILLED, and say so.
"""
from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import List, Optional

from .errors import describe
from .records import RESULTS_FILE, TERMINAL, try_read

log = logging.getLogger(__name__)


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


def _recorded(run) -> dict:
    """What the run's own results.json says (nothing when absent or damaged)."""
    path = Path(run.data.tags.get("run_dir") or "/nonexistent") / RESULTS_FILE
    return (try_read(path) or {}) if path.is_file() else {}


def close_stale(client, runs, who: str) -> List[str]:
    """Close the RUNNING runs among ``runs`` whose process is gone; one log line each. Returns the lines."""
    said = []
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        why = dead_process(run)
        if why is None:
            continue
        recorded = _recorded(run)
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
