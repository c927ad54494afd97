"""MLflow logging for one run: params (flattened config), metrics as they are measured, tags, artifacts, status.

Tracking must never cost a measurement: if the store cannot be reached the run goes on, ``results.json`` is
written to the run directory, and the failure is reported loudly once.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional
from urllib.parse import urlparse

from .errors import ConfigError, OrchestratorError, RunInterrupted, describe, first_line
from .interrupts import critical

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
# left in a plugin's folder of the run for the exports that went to MLflow (Tracker.log_export)
STORED_NOTE = "STORED_IN_MLFLOW.txt"


def flatten(d: Dict[str, Any]) -> Dict[str, str]:
    import pandas as pd

    flat = pd.json_normalize(d, sep=".").to_dict(orient="records")[0] if d else {}
    out = {}
    for k, v in flat.items():
        if isinstance(v, float) and v != v:  # NaN from empty nested dicts
            continue
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        out[k] = text[:MAX_PARAM_LEN]
    return out


def sqlite_path(uri: str) -> Optional[Path]:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def default_artifact_location(uri: str) -> Optional[str]:
    db = sqlite_path(uri)
    if db is None:
        return None  # a server decides (its --artifacts-destination / default-artifact-root)
    return (db.resolve().parent / "mlartifacts").as_uri()


def check_uri(uri: str) -> None:
    scheme = urlparse(uri).scheme
    valid = ("sqlite", "http", "https", "postgresql", "mysql", "databricks", "file")
    if scheme not in valid:
        raise ConfigError(f"tracking.uri={uri!r}: unsupported scheme {scheme!r}; valid: {', '.join(valid)} "
                          "(e.g. sqlite:///path/to/mlflow.db or http://127.0.0.1:5000)")
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        # MLflow 3 keeps its file store in maintenance mode and refuses to start a run in it
        raise ConfigError(f"tracking.uri={uri}: MLflow 3 refuses a file store (./mlruns); use a database, e.g. "
                          f"tracking.uri=sqlite:///{urlparse(uri).path.rstrip('/') or '.'}/mlflow.db (or set "
                          "MLFLOW_ALLOW_FILE_STORE=true to use the file store anyway)")


def check_reachable(uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a server that is not there: MLflow's HTTP client retries with backoff for minutes."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import socket

    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"tracking server {uri} is unreachable ({e.strerror or e})") from e


class StoreUnusable(OrchestratorError):
    """The tracking store cannot take a run (checked before MLflow is asked: its own errors come after minutes of
    retries and pages of tracebacks)."""


# MLflow's HTTP client settings (mlflow.environment_variables), read on every request. MLflow takes them from the
# environment only (no client argument), so this is the one place the project writes os.environ for MLflow: set
# from the tracking config before any client exists, and inherited by the job processes a sweep starts
HTTP_SETTINGS = {"http_timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT", "http_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "http_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "http_backoff_jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"}


def apply_http_settings(cfg) -> None:
    """Bound every call to a tracking server: MLflow's defaults (120 s a request, 7 retries, backoff factor 2)
    hold a run for minutes on each call while a server is down."""
    for key, var in HTTP_SETTINGS.items():
        value = getattr(cfg, key, None)
        if value is not None:
            os.environ[var] = str(value)


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_store(uri: str, min_free_mb: float = 0.0) -> None:
    """A sqlite store must be a file in a writable folder with room to grow; say which of these fails, in one line."""
    import shutil
    import tempfile

    db = sqlite_path(uri)
    if db is None:
        return
    where = f"tracking.uri={uri}"
    if db.is_dir():
        raise StoreUnusable(f"{where}: {db} is a directory; the sqlite store must be a file "
                            f"(e.g. sqlite:///{db / 'mlflow.db'})")
    folder = next((p for p in [db.parent, *db.parent.parents] if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise StoreUnusable(f"{where}: {folder} is a file, not a folder; the store's folder cannot be created there")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        if db.exists():
            with open(db, "r+b") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head and head != SQLITE_MAGIC:
                raise StoreUnusable(f"{where}: {db} exists but is not an sqlite database")
        # sqlite writes its journal beside the store: the folder must be writable too
        tempfile.TemporaryFile(dir=db.parent).close()
    except OSError as e:
        raise StoreUnusable(f"{where}: {e.filename or db.parent} is not writable ({e.strerror or e})") from e
    free_mb = shutil.disk_usage(db.parent).free / 2**20
    if free_mb < min_free_mb:
        raise StoreUnusable(f"{where}: only {free_mb:.0f} MB free on the disk of {db.parent}; the store needs "
                            f"tracking.min_free_mb={min_free_mb:g} (a full disk leaves runs RUNNING)")


def connect(cfg):
    """An MlflowClient for the tracking config, after the checks that fail in seconds instead of in MLflow's
    retries: the store (sqlite), the server's port (http), MLflow's HTTP bounds."""
    from mlflow.tracking import MlflowClient

    check_uri(cfg.uri)
    apply_http_settings(cfg)
    check_store(cfg.uri, float(getattr(cfg, "min_free_mb", 0.0) or 0.0))
    check_reachable(cfg.uri)
    # a new sqlite store announces its schema setup in two INFO lines on stderr, ahead of the run's own output
    # (and of its one error line, when there is one)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=cfg.uri)


def open_store(cfg):
    """:func:`connect`, and the id of the config's experiment (created on first use)."""
    client = connect(cfg)
    return client, ensure_experiment(client, cfg.experiment,
                                     cfg.artifact_location or default_artifact_location(cfg.uri))


# MLflow 3.x opens an experiment on the GenAI "Overview" (traces) unless its kind says otherwise; this kind opens
# the classic runs view, where a sweep's runs, metrics and charts are
EXPERIMENT_KIND = "custom_model_development"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def ensure_experiment(client, name: str, artifact_location: Optional[str]) -> str:
    """The experiment's id, created on first use with the kind that opens MLflow's runs view (an experiment whose
    kind someone chose keeps it)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            # another process of the same sweep created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
        return exp_id
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        try:  # an experiment made before this tag: the UI would open it on the GenAI overview
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as e:
            log.warning("could not tag experiment %s with %s (%s)", name, EXPERIMENT_KIND_TAG, first_line(e))
    return exp.experiment_id


class Tracker:
    """A thin, failure-tolerant wrapper over MlflowClient for exactly one run."""

    def __init__(self, cfg, run_name: str, parent_id: Optional[str] = None):
        self.cfg = cfg
        self.run_name = run_name
        self.parent_id = parent_id  # the sweep's parent run, for a job of a sweep
        self.client = None
        self._exp_id: Optional[str] = None
        self.run_id: Optional[str] = None
        self.error: Optional[str] = None
        self.monitor = None
        if cfg.enabled:
            check_uri(cfg.uri)

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.error is None

    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.active and what != "start":
            return None
        try:
            with critical():  # never interrupt a store write halfway: the run could not be closed after it
                return self._retry_transient(fn, *args, **kwargs)
        except RunInterrupted:  # a timeout/signal landing inside a logging call still ends the run
            raise
        except Exception as e:  # tracking problems are reported, never fatal to the measurement
            self.error = f"{what}: {describe(e)}"
            log.error("MLflow tracking failed (%s); the run goes on untracked and its results are kept in "
                      "results.json of the run directory", self.error)
            return None

    @staticmethod
    def _retry_transient(fn, *args, **kwargs):
        """Parallel jobs (joblib, submitit) share one store: a write can meet another job's sqlite lock, and two
        jobs logging the same dataset race to insert it (MLflow's get-or-create is not atomic; the retry finds
        the row). Retry those instead of giving up tracking for the rest of the run."""
        import time

        transient = ("database is locked", "UNIQUE constraint failed: datasets")
        for delay in (0.5, 1.0, 2.0, 4.0):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not any(t in str(e) for t in transient):
                    raise
                log.warning("MLflow store busy with another job (%s); retrying in %.1f s",
                            first_line(e, 120), delay)
                time.sleep(delay)
        return fn(*args, **kwargs)

    def _connect(self) -> str:
        """Client and experiment id (the experiment is created on first use); opened once per run."""
        if self.client is None or self._exp_id is None:
            self.client, self._exp_id = open_store(self.cfg)
        return self._exp_id

    def connect(self) -> None:
        """Open the store now (its client's imports and schema check take seconds) rather than in :meth:`start`:
        a raced job does it before its turn. A store that cannot be opened is reported by :meth:`start`."""
        if not self.cfg.enabled:
            return
        try:
            self._connect()
        except Exception as e:
            log.debug("MLflow store not opened ahead of the run (%s); start() tries again", e)
            self.client = self._exp_id = None

    def find_finished(self, digest: str) -> Optional[Any]:
        """The newest FINISHED run of this experiment with the same config digest (for resume), if any."""
        if not self.cfg.enabled:
            return None
        try:
            exp_id = self._connect()
            from .reconcile import close_stale

            # an earlier try of this config whose process died must not stay RUNNING beside the new one
            close_stale(self.client, self.client.search_runs(
                [exp_id], f"tags.config_digest = '{digest}' and attributes.status = 'RUNNING'", max_results=100),
                "resume")
            runs = self.client.search_runs([exp_id], f"tags.config_digest = '{digest}' and "
                                                     "attributes.status = 'FINISHED'",
                                           max_results=1, order_by=["attributes.start_time DESC"])
        except Exception as e:
            log.warning("resume: could not query the tracking store (%s); running the job", e)
            return None
        return runs[0] if runs else None

    def start(self, params: Dict[str, str], tags: Dict[str, str]) -> None:
        if not self.cfg.enabled:
            return

        def _start():
            exp_id = self._connect()
            all_tags = dict(tags)
            if self.parent_id:
                all_tags["mlflow.parentRunId"] = self.parent_id
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=all_tags)
            self.run_id = run.info.run_id
            self.log_params(params)
            if self.cfg.system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(self.run_id, tracking_uri=self.cfg.uri,
                                                    sampling_interval=self.cfg.system_metrics_interval_s)
                self.monitor.start()

        self._guard("start", _start)

    def log_params(self, params: Dict[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        self._guard("log_params", self.client.log_batch, self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        if not self.active or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._guard("log_metrics", self.client.log_batch, self.run_id,
                    metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None])

    def rename(self, name: str) -> None:
        self.run_name = name
        if self.active:
            self._guard("rename", self.client.update_run, self.run_id, name=name)

    def set_tags(self, tags: Dict[str, str]) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        self._guard("set_tags", self.client.log_batch, self.run_id,
                    tags=[RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        if not self.active or not path.exists():
            return
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._guard("log_artifact", fn, self.run_id, str(path), artifact_path)

    def log_export(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """A large file a plugin produced (an exported model graph or IR) stored once: logged to MLflow
        and then removed from the run folder, where a note says where it went. Kept when the run is untracked or
        the upload fails (the run folder then holds the only copy). An engine's ``log_model: false``
        (``optimization.<engine>.log_model=false``) keeps its export in the run folder only: the plugin then
        lists no artifact and nothing comes here."""
        path = Path(path)
        if not self.active or not path.is_file():
            return
        self._guard("log_export", self.client.log_artifact, self.run_id, str(path), artifact_path)
        if not self.active:
            return
        where = f"{artifact_path}/{path.name}" if artifact_path else path.name
        try:
            path.unlink()
            with open(path.parent / STORED_NOTE, "a") as note:
                note.write(f"{path.name}: stored once, as MLflow artifact {where} of run {self.run_id} "
                           f"({self.cfg.uri}); the engine's log_model=false keeps its export here instead\n")
        except OSError as e:
            log.warning("could not remove %s after logging it to MLflow (%s); it is stored twice", path, e)

    def log_dataset(self, dataset, name: str, source: str) -> None:
        if not self.active:
            return

        def _log():
            import mlflow.data
            from mlflow.entities import DatasetInput, InputTag

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # schema-inference hints about integer columns
                ds = mlflow.data.from_huggingface(dataset, path=source, name=name)
                entity = ds._to_mlflow_entity()
            tags = [InputTag("mlflow.data.context", "eval")]
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(entity, tags=tags)])

        self._guard("log_dataset", _log)

    def end(self, status: str) -> None:
        if self.monitor is not None:
            self._guard("system_metrics", self.monitor.finish)
            self.monitor = None
        if not self.active:
            return
        self._guard("end", self.client.set_terminated, self.run_id, status)
