"""The thin adapter over MLPerf's LoadGen (``mlperf_loadgen``, PyPI ``mlcommons-loadgen``).

The split is MLPerf's reference BERT harness's: settings (the scenario), a query sample library over the task's
featurized rows, a system under test. The SUT here never computes inside LoadGen's ``IssueQuery`` call: it queues
the samples and returns, and the thread that started the test (the one that loaded, warmed and evaluated the model)
forms batches from what is queued (up to ``max_batch``; with a batch timeout it waits that long for more, as a
server does) and completes every sample with its output bytes; LoadGen itself runs in a helper thread.

Why the caller's thread computes: torch's OpenMP runtime (libgomp) keeps one thread pool per thread that calls
into it, and its idle workers spin (GOMP_SPINCOUNT, 300000 pauses) only while the process's OpenMP threads do not
outnumber the CPUs. A second calling thread adds a second pool, which flips every pool to near-passive waiting:
on a 2-core machine at 2 threads, a step timed in a SUT thread of its own ran under other waiting rules than the
closed-loop pass and the warm-up (on a busy machine a tiny model took ~1 ms there and 30-130 ms in the main
thread, where the spinning workers lose their time slices). One calling thread keeps one pool and one regime.
LoadGen times from a query's scheduled issue to its completion and writes its own verdict (VALID/INVALID and why,
percentiles, early-stopping estimates) to ``mlperf_log_detail.txt``/``mlperf_log_summary.txt``; metrics are read
from the detail log, never recomputed.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

from ..errors import ConfigError, DatasetError, RunInterrupted
from ..interrupts import critical, deferring_sigint

log = logging.getLogger(__name__)

EXTRA = "loadgen"
# the extra pins this; a different LoadGen may log other keys
DISTRIBUTION = "mlcommons-loadgen"


def require(what: str):
    """``mlperf_loadgen``, or one line naming the extra that installs it."""
    try:
        import mlperf_loadgen
    except ImportError as e:
        raise ConfigError(f"{what} needs MLPerf LoadGen, which is not installed: pip install "
                          f"'cpu-inference-orchestrator[{EXTRA}]' (or pip install {DISTRIBUTION})") from e
    return mlperf_loadgen


# -- a first estimate, before LoadGen runs ------------------------------------------------------------------------
# rows the estimate draws its batches from
ESTIMATE_ROWS = 256


class Estimate(NamedTuple):
    """Seconds for one row alone and rows/s at the largest batch, from a few untimed-by-LoadGen batches: LoadGen's
    hints (expected latency, expected QPS, the server search's first rate) come from it."""

    latency_s: float
    throughput: float
    batch: int


def estimate(step: Callable, rows: Sequence[dict], make_batches: Callable, max_batch: Optional[int],
             warmup_batches: int) -> Estimate:
    """Warm the step on a few batches (first calls build kernels) and time one row and one full batch."""
    n = len(rows)
    if n == 0:
        raise DatasetError("the dataset has no rows for LoadGen to serve")
    # a seeded sample, and of its batches the one of median width: the first rows or a length-sorted first
    # batch would time the short end of the data
    sample = [rows[i] for i in sorted(random.Random(0).sample(range(n), min(n, ESTIMATE_ROWS)))]
    batches = sorted(make_batches(sample, max_batch), key=lambda b: (b.size, b.inputs["input_ids"].shape[1]))
    full = _median([b for b in batches if b.size == batches[-1].size])
    one = _median(make_batches(sample, 1))
    for _ in range(warmup_batches):
        step(full.inputs)
        step(one.inputs)
    latency = _best_of(step, one.inputs, 3)
    full_s = _best_of(step, full.inputs, 2)
    return Estimate(latency, full.size / full_s if full_s > 0 else float("inf"), full.size)


def _median(batches: List[Any]):
    return sorted(batches, key=lambda b: b.inputs["input_ids"].shape[1])[len(batches) // 2]


def _best_of(step: Callable, inputs, k: int) -> float:
    best = float("inf")
    for _ in range(k):
        t0 = time.perf_counter()
        step(inputs)
        best = min(best, time.perf_counter() - t0)
    return best


# -- the system under test ----------------------------------------------------------------------------------------
class BatchingSut:
    """LoadGen's SUT over ``step``: samples queue as they are issued; :meth:`serve`, called in the thread that
    runs the model everywhere else, batches and completes them until LoadGen's test ends.

    ``batch_timeout_s`` 0: it takes everything queued (an Offline query's thousands of samples are split into
    ``max_batch`` batches by ``make_batches``, which may sort them by length); > 0: it forms batches of at most
    ``max_batch``, waiting up to the timeout (from the oldest sample's arrival) for the batch to fill.
    A failing step does not hang LoadGen: the samples are completed empty and the error re-raised after the test.

    LoadGen waits for every issued sample; one never completed keeps its test (and :data:`ONE_TEST`) alive for good,
    and with it the next LoadGen test of the process. So an issued sample is never held only in a local variable of
    the serving thread, where an interrupt (SIGTERM, runtime.timeout_s, Ctrl-C) would drop it: it is in ``_pending``
    (appended by LoadGen's thread) or in ``_inflight`` until completed, each move between them and each completion
    inside :func:`~orchestrator.interrupts.critical`, and :meth:`abort` completes whatever is left in either.
    """

    def __init__(self, lg, step: Callable, rows: Sequence[dict], make_batches: Callable, max_batch: Optional[int],
                 batch_timeout_s: float):
        self.lg, self.step, self.rows, self.make_batches = lg, step, rows, make_batches
        self.max_batch = max_batch
        self.timeout = batch_timeout_s
        self.shapes: Dict[int, tuple] = {}
        self.batch_sizes: List[int] = []
        self.error: Optional[BaseException] = None
        # threads that called the step (the caller's alone, unless an interrupt handed the rest to a drainer)
        self.step_threads: set = set()
        self._pending: "collections.deque" = collections.deque()  # (arrival, id, index), issued, not yet taken
        self._inflight: Dict[int, tuple] = {}  # position -> (id, index): taken by serve(), not yet completed
        self._wake: "queue.SimpleQueue" = queue.SimpleQueue()  # a token per issue; None once the test ended
        self._ended = False
        self._drainer: Optional[threading.Thread] = None
        self._atomic: Callable = critical
        self.handle = lg.ConstructSUT(self.issue_queries, self.flush_queries)

    # LoadGen's callbacks (in LoadGen's thread, which never takes a signal): queue and return
    def issue_queries(self, samples) -> None:
        now = time.perf_counter()
        self._pending.extend((now, s.id, s.index) for s in samples)
        self._wake.put(True)

    def flush_queries(self) -> None:
        pass

    def test_ended(self) -> None:
        """LoadGen's test returned (every sample was completed): :meth:`serve` returns."""
        self._wake.put(None)

    def abort(self) -> None:
        """The serving thread was interrupted: complete what it had taken and everything issued from now on,
        without computing, in a daemon thread (the caller's thread is needed to propagate the interrupt), until
        the test ends."""
        if self._drainer is None:
            self._drainer = threading.Thread(target=self._drain, name="loadgen-sut-drain", daemon=True)
            self._drainer.start()

    def close(self) -> None:
        self.lg.DestroySUT(self.handle)

    def _wait(self, timeout: Optional[float] = None) -> None:
        """Until LoadGen issues more (or ends the test), at most ``timeout``; interruptible."""
        try:
            if self._wake.get(timeout=timeout) is None:
                self._ended = True
        except queue.Empty:
            pass

    def serve(self) -> None:
        # signals land in the main thread only, and critical()'s depth is the process's: elsewhere, nothing to hold
        if threading.current_thread() is not threading.main_thread():
            self._atomic = contextlib.nullcontext
        pending = self._pending
        while True:
            if not pending:
                if self._ended:
                    return
                self._wait()
                continue
            if self.timeout > 0 and self.max_batch:
                deadline = pending[0][0] + self.timeout
                while len(pending) < self.max_batch and not self._ended:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wait(remaining)
            with self._atomic():  # taken and recorded as in flight in one step
                take = len(pending) if self.timeout <= 0 or not self.max_batch else min(len(pending), self.max_batch)
                self._inflight = {k: pending.popleft()[1:] for k in range(take)}
            self._complete()

    def _complete(self) -> None:
        lg = self.lg
        items = list(self._inflight.values())
        if self.error is not None:  # the step failed before: the rest is completed empty
            self._complete_empty()
            return
        try:
            for b, offset in self._batches(items):
                self.step_threads.add(threading.get_ident())
                out = self.step(b.inputs)
                keep, responses, positions = [], [], [k + offset for k in b.rows]
                for r, k in enumerate(positions):
                    qid, idx = items[k]
                    # the response payload is the row's output: LoadGen logs it in accuracy mode (the evaluation)
                    arr = out[r].detach().float().contiguous().numpy()
                    keep.append(arr)
                    self.shapes[idx] = arr.shape
                    responses.append(lg.QuerySampleResponse(qid, arr.ctypes.data, arr.nbytes))
                with self._atomic():  # completed and no longer in flight in one step: never twice, never lost
                    lg.QuerySamplesComplete(responses)
                    for k in positions:
                        del self._inflight[k]
                self.batch_sizes.append(b.size)
        except _INTERRUPTS:
            raise  # a signal or the timeout, in the caller's thread: abort() completes what is in flight
        except BaseException as e:  # noqa: BLE001 - the step failed: LoadGen still waits for every sample
            if self.error is None:
                self.error = e
            self._complete_empty()

    def _complete_empty(self) -> None:
        with self._atomic():
            rest = [self.lg.QuerySampleResponse(qid, 0, 0) for qid, _ in self._inflight.values()]
            if rest:
                self.lg.QuerySamplesComplete(rest)
            self._inflight = {}

    def _drain(self) -> None:
        """abort()'s thread: what was in flight, then every sample as it is issued, completed empty. Not the main
        thread: no signal lands here, so it needs no critical() (whose depth the main thread shares)."""
        lg = self.lg
        rest = [lg.QuerySampleResponse(qid, 0, 0) for qid, _ in self._inflight.values()]
        self._inflight = {}
        while True:
            while self._pending:
                rest.append(lg.QuerySampleResponse(self._pending.popleft()[1], 0, 0))
            if rest:
                lg.QuerySamplesComplete(rest)
                rest = []
            if self._ended:
                return
            self._wait()

    def _batches(self, items: List[tuple]):
        """``(batch, offset of its rows in items)``, collated a chunk at a time: an Offline query's first
        results do not wait for all of it to be padded (and a length sort still groups rows within a chunk)."""
        chunk = max(1, (self.max_batch or len(items)) * _CHUNK_BATCHES)
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            for b in self.make_batches([self.rows[idx] for _, idx in part], self.max_batch):
                yield b, start


# batches collated at once from a large query
_CHUNK_BATCHES = 16


# raised in the caller's thread by a signal or runtime.timeout_s while it computes: not the step's failure
_INTERRUPTS = (KeyboardInterrupt, SystemExit, RunInterrupted)


# -- one LoadGen test ---------------------------------------------------------------------------------------------
@dataclass
class LoadgenRun:
    log_dir: Path
    detail: Dict[str, Any]
    errors: List[str]
    shapes: Dict[int, tuple]
    batch_sizes: List[int]
    wall_s: float
    scenario: str
    # threads that ran the step: the caller's (see the module's note)
    step_threads: set = field(default_factory=set)

    @property
    def summary_log(self) -> Path:
        return self.log_dir / "mlperf_log_summary.txt"

    @property
    def detail_log(self) -> Path:
        return self.log_dir / "mlperf_log_detail.txt"

    @property
    def accuracy_log(self) -> Path:
        return self.log_dir / "mlperf_log_accuracy.json"

    @property
    def artifacts(self) -> List[Path]:
        # a performance run leaves an accuracy log holding "[]": not worth keeping
        return [p for p in (self.summary_log, self.detail_log, self.accuracy_log)
                if p.is_file() and p.stat().st_size > (8 if p == self.accuracy_log else 0)]


# how long an interrupted test may take to wind down before the interrupt propagates
ABORT_WAIT_S = 5.0
# LoadGen's state is global: a second StartTest while one runs aborts the whole process ("Fatal Python error:
# Aborted"). An interrupted test may still be winding down in its daemon thread when the process goes on to another
# (the next job of an in-process sweep, the next test of a suite): LoadGen's thread holds this lock across StartTest,
# so the next test's thread waits for it. A lock taken by LoadGen's own thread, not a join() in the caller's: a
# signal that interrupts Thread.join() marks a still-running thread as stopped (CPython 3.11, bpo-45274's fix).
ONE_TEST = threading.Lock()


def run_test(lg, settings, step: Callable, rows: Sequence[dict], make_batches: Callable, max_batch: Optional[int],
             batch_timeout_s: float, performance_sample_count: int, log_dir: Path) -> LoadgenRun:
    """One ``StartTest`` with its logs in ``log_dir``. LoadGen runs in a helper thread; the caller's thread serves
    the SUT (the step runs where it ran for the warm-up, see the module's note) and keeps taking signals (Ctrl-C,
    SIGTERM, runtime.timeout_s): on one the rest of the test is completed without computing and the interrupt
    propagates; LoadGen's thread then finishes on its own (a daemon, it never holds the process)."""
    if ONE_TEST.locked():
        log.warning("waiting for the interrupted LoadGen test to wind down (LoadGen runs one test per process)")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt", "mlperf_log_accuracy.json"):
        (log_dir / name).unlink(missing_ok=True)
    n = len(rows)
    qsl = lg.ConstructQSL(n, min(performance_sample_count, n), _noop, _noop)
    sut = BatchingSut(lg, step, rows, make_batches, max_batch, batch_timeout_s)
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = str(log_dir)
    log_settings.log_output.copy_summary_to_stdout = False
    log_settings.enable_trace = False  # the trace is large and nothing here reads it
    finished = threading.Event()
    failure: List[BaseException] = []

    def start() -> None:
        try:
            # "" as the audit config: an audit.config lying in the working directory must not change the test
            with ONE_TEST:
                lg.StartTestWithLogSettings(sut.handle, qsl, settings, log_settings, "")
        except BaseException as e:  # noqa: BLE001
            failure.append(e)
        finally:
            finished.set()
            sut.test_ended()

    t0 = time.perf_counter()
    thread = threading.Thread(target=start, name="loadgen", daemon=True)
    try:
        # started inside the try: a signal can land in start()'s wait for the thread, and a LoadGen test nobody
        # serves never ends (it would hold ONE_TEST for good). Ctrl-C, too, waits for the SUT's critical steps
        with deferring_sigint():
            thread.start()
            sut.serve()
    except BaseException:
        # LoadGen cannot be cancelled: the SUT answers at once from now on, so a short test ends within moments
        # (a long one keeps issuing until its min_duration in this daemon thread; the process is ending anyway)
        sut.abort()
        finished.wait(ABORT_WAIT_S)
        raise
    finished.wait()
    wall = time.perf_counter() - t0
    sut.close()
    lg.DestroyQSL(qsl)
    if failure:
        raise failure[0]
    if sut.error is not None:
        raise sut.error
    detail, errors = parse_detail(log_dir / "mlperf_log_detail.txt")
    return LoadgenRun(log_dir, detail, errors, dict(sut.shapes), list(sut.batch_sizes), wall,
                      str(detail.get("effective_scenario", "")), set(sut.step_threads))


def _noop(samples) -> None:
    """QSL load/unload: the featurized rows are in memory already (MLPerf's BERT QSL does the same)."""


# -- reading LoadGen's logs ---------------------------------------------------------------------------------------
def parse_detail(path: Path) -> tuple:
    """``key -> value`` of every ``:::MLLOG`` record (the last one wins), and the error/warning messages."""
    values: Dict[str, Any] = {}
    errors: List[str] = []
    if not path.is_file():
        return values, [f"LoadGen wrote no detail log at {path}"]
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            rec = json.loads(line[len(":::MLLOG "):])
        except json.JSONDecodeError:
            continue
        key, value = rec.get("key"), rec.get("value")
        meta = rec.get("metadata") or {}
        if meta.get("is_error") or meta.get("is_warning"):
            errors.append(f"{key}: {value}")
        if key:
            values[key] = value
    return values, errors


_PERCENTILE = re.compile(r"^result_(\d+)\.(\d+)_percentile_(per_query_)?latency_ns$")
_NS_KEYS = {
    "result_min_latency_ns": "loadgen_latency_min_ms",
    "result_max_latency_ns": "loadgen_latency_max_ms",
    "result_mean_latency_ns": "loadgen_latency_mean_ms",
    "result_min_query_latency_ns": "loadgen_query_latency_min_ms",
    "result_max_query_latency_ns": "loadgen_query_latency_max_ms",
    "result_mean_query_latency_ns": "loadgen_query_latency_mean_ms",
    "early_stopping_latency_ss": "loadgen_early_stopping_p90_ms",
    "early_stopping_latency_ms": "loadgen_early_stopping_p99_ms",
    "effective_target_latency_ns": "loadgen_target_latency_ms",
}
_PLAIN_KEYS = {
    "result_samples_per_second": "loadgen_samples_per_second",
    "result_completed_samples_per_sec": "loadgen_completed_qps",
    "result_scheduled_samples_per_sec": "loadgen_scheduled_qps",
    "result_qps_with_loadgen_overhead": "loadgen_qps_with_overhead",
    "result_qps_without_loadgen_overhead": "loadgen_qps_without_overhead",
    "result_query_count": "loadgen_query_count",
    "result_overlatency_query_count": "loadgen_overlatency_queries",
    "effective_target_qps": "loadgen_target_qps",
    "effective_samples_per_query": "loadgen_samples_per_query",
    "effective_min_query_count": "loadgen_min_query_count",
    "effective_performance_sample_count": "loadgen_performance_sample_count",
}
_FLAGS = {
    "result_min_duration_met": "loadgen_min_duration_met",
    "result_min_queries_met": "loadgen_min_queries_met",
    "early_stopping_met": "loadgen_early_stopping_met",
    "result_perf_constraints_met": "loadgen_perf_constraints_met",
}


def metrics_from(detail: Dict[str, Any]) -> Dict[str, float]:
    """LoadGen's results as flat float metrics, latencies in ms (``loadgen_latency_p99_ms``; MultiStream's
    per-query ones ``loadgen_query_latency_p99_ms``)."""
    out: Dict[str, float] = {}
    for key, value in detail.items():
        if key in _FLAGS:
            if isinstance(value, bool):
                out[_FLAGS[key]] = float(value)
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        m = _PERCENTILE.match(key)
        if m:
            whole, frac, per_query = m.groups()
            label = whole if int(frac) == 0 else f"{whole}_{frac.rstrip('0')}"
            out[f"loadgen_{'query_' if per_query else ''}latency_p{label}_ms"] = value / 1e6
        elif key in _NS_KEYS:
            if value or not key.startswith("early_stopping"):  # 0: LoadGen had too few queries for the estimate
                out[_NS_KEYS[key]] = value / 1e6
        elif key in _PLAIN_KEYS:
            out[_PLAIN_KEYS[key]] = float(value)
    out["loadgen_min_duration_s"] = float(detail.get("effective_min_duration_ms", 0)) / 1000.0
    out["loadgen_valid"] = float(detail.get("result_validity") == "VALID")
    return out


@dataclass
class Outcome:
    """A performance run as the scenarios read it."""

    valid: bool
    # INVALID only because it ended before min_duration (LoadGen's hint was pessimistic): worth a retry
    short: bool
    reason: str
    metrics: Dict[str, float]
    details: Dict[str, str]
    artifacts: List[Path] = field(default_factory=list)
    run: Optional[LoadgenRun] = None


def outcome(run: LoadgenRun) -> Outcome:
    d = run.detail
    metrics = metrics_from(d)
    metrics["loadgen_wall_s"] = run.wall_s
    if run.batch_sizes:
        metrics["sut_batches"] = float(len(run.batch_sizes))
        metrics["sut_mean_batch"] = sum(run.batch_sizes) / len(run.batch_sizes)
    valid = d.get("result_validity") == "VALID"
    reason = "" if valid else invalid_reason(d, run.errors)
    short = (not valid and d.get("result_min_duration_met") is False and d.get("result_min_queries_met", True)
             is not False and d.get("result_perf_constraints_met", True) is not False)
    details = {"loadgen.version": str(d.get("loadgen_version", "")),
               "loadgen.result": str(d.get("result_validity", "missing")),
               "loadgen.early_stopping": " ".join(str(d.get("early_stopping_result", "")).split())}
    if reason:
        details["loadgen.invalid_reason"] = reason
    return Outcome(valid, short, reason, metrics, {k: v for k, v in details.items() if v}, run.artifacts, run)


def invalid_reason(detail: Dict[str, Any], errors: List[str]) -> str:
    """LoadGen's own words for an INVALID run: which constraint failed, its recommendation, early stopping."""
    if "result_validity" not in detail:
        return "LoadGen reported no result" + (f" ({errors[0]})" if errors else "")
    failed = [name for key, name in (("result_perf_constraints_met", "latency bound"),
                                     ("result_min_duration_met", "min duration"),
                                     ("result_min_queries_met", "min queries"),
                                     ("early_stopping_met", "early stopping")) if detail.get(key) is False]
    parts = [f"not met: {', '.join(failed)}"] if failed else []
    if detail.get("result_invalid_reason"):
        parts.append(" ".join(str(detail["result_invalid_reason"]).split()))
    if detail.get("early_stopping_met") is False and detail.get("early_stopping_result"):
        parts.append(" ".join(str(detail["early_stopping_result"]).replace("*", "").split()))
    ended = [e for e in errors if "Ending early" in e]
    if ended:
        parts.append(ended[0].split(": ", 1)[-1])
    return "; ".join(parts) or "INVALID"


def read_accuracy_log(path: Path, shapes: Dict[int, tuple], n_rows: int) -> List[Any]:
    """Each row's output as LoadGen logged it (hex float32 bytes; the shape the SUT noted per row)."""
    import numpy as np
    import torch

    outputs: List[Any] = [None] * n_rows
    if not path.is_file():
        return outputs
    for rec in json.loads(path.read_text() or "[]"):
        idx = int(rec["qsl_idx"])
        if outputs[idx] is not None:
            continue  # LoadGen may serve a sample more than once; the first response is the one evaluated
        data = bytes.fromhex(rec.get("data", ""))
        arr = np.frombuffer(data, dtype=np.float32).copy()
        outputs[idx] = torch.from_numpy(arr.reshape(shapes.get(idx, arr.shape)))
    return outputs
