"""Racing a sweep's jobs: every job prepared once, then timed in interleaved, paired rounds until the answer is known.

Why: timed one after another, each job's interval comes from its own rounds and cannot see drift slower than one
job (another tenant starting, load dropping): identical jobs were "recommended" as 2.6x apart. Careful benchmarkers
interleave the candidates in time, pair what ran close together, stop when the answer is known and drop what is
beaten (Kalibera & Jones 2013; Google Benchmark's random interleaving; MLPerf's early stopping). Here:

- **Rounds.** ``hydra/launcher=isolated`` starts every job's process and lets it prepare (load, stack, parity,
  accuracy pass) one at a time; each job then blocks in :meth:`RaceWorker.timing`. In round r every live job runs
  one timing round (its own untimed warm-up, then ``measure.timing_pass`` over the batch order seeded by
  runtime.seed + r, the same order for every job), one job at a time, the jobs in a fresh order drawn from
  ``race.seed`` and r. A waiting job blocks in ``recv`` on its socket: no CPU.
- **Pairing.** Job J's speedup over its reference (the eager fp32 job of the same settings) is the median of the
  per-round ratios J_r / ref_r with the exact sign-test interval (orchestrator/stats.py, why that interval).
- **Stopping** (after each round, never before ``race.min_rounds``): a job stops when its paired speedup interval's
  half-width is below ``race.target_halfwidth``; when its paired interval against the leader (the fastest live job
  that passes the accuracy gate) lies wholly below 1 at :data:`ELIMINATION_CONFIDENCE` (eliminated); when it fails
  the accuracy gate (it is timed only ``min_rounds``, enough for its row); at ``race.max_rounds``; or when
  ``race.budget_s`` is spent. A reference is timed as long as a job paired with it is.
- **Processes.** Each job is timed in ``race.processes`` processes (its own, which records the run, and extra ones
  that only serve rounds): their spread, measured across the sweep, widens the paired intervals
  (orchestrator/stats.py, process-level variation); stopping on the target half-width looks at the rounds' part.
  The launcher prepares them lazily (``lazy_extras``): the first :attr:`Race.extras_round` rounds (9, the first at
  which the 99.5 % sign-test interval exists) run one process per job, and only the jobs still racing then get
  their extra processes. Until a job has them, its intervals are widened by :data:`PRIOR_PROCESS_SD` (twice the
  spread measured here) instead of a measured spread, and it stops only by elimination, the gate, max_rounds or
  the budget, so a job beaten early never costs a preparation and no final interval lacks a measured spread.
- **Memory.** At most ``race.max_alive`` job processes at once (default: as many as free memory holds at 1.5x the
  largest prepared job's peak RSS); beyond it the jobs race in groups and the references stay alive for every group.

:class:`Race` is the pure decision logic (tests drive it with fake workers); the isolated launcher drives it with
job processes (hydra_plugins/orchestrator_launcher/isolated_launcher.py). Nothing heavy is imported at module level:
``orchestrator.config`` imports :class:`RaceConfig` from here.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

log = logging.getLogger(__name__)

# the inherited socket (a file descriptor number) a raced job talks to its launcher through
RACE_FD_ENV = "ORCH_RACE_FD"
# which of a job's processes this one is ("1 of 2": 0-based index, count); only process 0 records the job
RACE_PROCESS_ENV = "ORCH_RACE_PROCESS"
# elimination looks at the data after every round: a stricter level than the reported 95 % keeps the chance that
# an identical job is ever called "slower beyond noise" over all looks of a race near 5 % (tests/test_race.py)
ELIMINATION_CONFIDENCE = 0.995
CONFIDENCE = 0.95
STOPPING_CONFIDENCE = 0.98
# the spread between two processes of one configuration assumed while it is not measured yet (lazy extra processes,
# Race.lazy_extras): about twice the largest measured on our machines (sd 0.03-0.05 of log throughput,
# docs/sweeps.md), so that an elimination before the extra processes exist is no bolder than one after
PRIOR_PROCESS_SD = 0.10


class RaceMode(str, Enum):
    on = "on"
    off = "off"


@dataclass
class RaceConfig:
    # on: a multirun with hydra/launcher=isolated prepares every job, then times them in interleaved, paired rounds
    # (docs/sweeps.md "Racing"); off: one job after another, each timed runtime.repeats rounds alone
    mode: RaceMode = RaceMode.on
    # the fewest rounds a job is timed: 6 is the fewest for which a distribution-free 95 % interval of a median
    # exists (orchestrator/stats.py)
    min_rounds: int = 6
    # the most rounds a job is timed when its interval does not get narrow enough
    max_rounds: int = 20
    # a job stops once its paired speedup interval is narrower than +-this (relative, on the log scale)
    target_halfwidth: float = 0.05
    # wall seconds for all timing rounds of the sweep (null: no limit); min_rounds is timed regardless
    budget_s: Optional[float] = None
    # job processes alive at once (null: as many as free memory holds, from the prepared jobs' peak RSS)
    max_alive: Optional[int] = None
    # seeds the order of the jobs within each round
    seed: int = 0
    # changes nothing that is computed: `-m race.replica=0,1` runs the same configuration twice (an A/A sweep)
    replica: int = 0
    # processes timed per job: two processes of one configuration differ by a few per cent for their whole lives,
    # which no number of rounds shows; with 2+ the spread between them is measured and widens the speedup's
    # interval (orchestrator/stats.py, process-level variation). Each process's round is 1/processes as long, so
    # a round takes as long as with one; preparing the extra processes (load, stack; no accuracy pass; two at a
    # time) is the cost
    processes: int = 2
    # seconds each job is timed per round (its processes share them); null: runtime.min_duration_s, as when timed
    # alone. Shorter than a sequential round because pairing, not length, is what steadies a race's comparison: a
    # round's pair runs seconds apart, so drift cancels, and the spread between processes (item 6 of docs/sweeps.md
    # "Racing"), which no round length reduces, dominates the interval; Google Benchmark likewise shortens
    # repetitions when it interleaves them (--benchmark_min_time). runtime.min_iterations still holds per round
    round_s: Optional[float] = 0.5
    # untimed batches before each round's timing pass, the shortest of the job's batches: the process waited
    # seconds for its turn, and any forward pass brings back what a wait loses (every weight read into the caches,
    # the thread pool woken) whatever its length, so the cheapest batch does it; every shape was built in the
    # accuracy pass. null: runtime.warmup batches of the round's order, as a job timed alone warms up
    warmup: Optional[int] = 1


def check_config(cfg: Any) -> None:
    """One line naming the key and what is valid, for a race setting that cannot work."""
    from .errors import ConfigError

    get = (lambda k: getattr(cfg, k)) if not isinstance(cfg, Mapping) else cfg.get
    mode = get("mode")
    mode = getattr(mode, "value", mode)
    if str(mode) not in ("on", "off"):
        raise ConfigError(f"race.mode={mode!r} is not valid; valid: on, off")
    if get("min_rounds") < 6:
        raise ConfigError(f"race.min_rounds={get('min_rounds')} must be >= 6: fewer rounds give no 95 % interval "
                          "for a paired speedup")
    if get("max_rounds") < get("min_rounds"):
        raise ConfigError(f"race.max_rounds={get('max_rounds')} must be >= race.min_rounds={get('min_rounds')}")
    if not get("target_halfwidth") > 0:
        raise ConfigError(f"race.target_halfwidth={get('target_halfwidth')} must be > 0 (e.g. 0.05 for +-5 %)")
    if get("budget_s") is not None and not get("budget_s") > 0:
        raise ConfigError(f"race.budget_s={get('budget_s')} must be > 0, or null for no limit")
    if not 1 <= get("processes") <= 8:
        raise ConfigError(f"race.processes={get('processes')} is not valid; valid: 1 to 8 (2: the spread between "
                          "two processes of a job is measured and in the interval; 1: it is not)")
    if get("round_s") is not None and not get("round_s") >= 0:
        raise ConfigError(f"race.round_s={get('round_s')} must be >= 0 (seconds each job is timed per round), or null "
                          "for runtime.min_duration_s")
    if get("warmup") is not None and not get("warmup") >= 0:
        raise ConfigError(f"race.warmup={get('warmup')} must be >= 0 (untimed batches before each round), or null "
                          "for runtime.warmup")
    if get("max_alive") is not None and get("max_alive") < 2 * get("processes"):
        raise ConfigError(f"race.max_alive={get('max_alive')} must be >= {2 * get('processes')} (a job and its "
                          f"reference, race.processes={get('processes')} process(es) each), or null")


# ---- the job side ---------------------------------------------------------------------------------------------

class RaceLost(RuntimeError):
    """The sweep process that drives the race is gone."""


class RaceWorker:
    """A raced job's end of the socket: says when it is ready, then serves timing rounds until told to stop."""

    def __init__(self, sock: socket.socket, process: int = 0, processes: int = 1):
        self._sock = sock
        # which of the job's processes this is (0: the one that records the job) and how many share its rounds
        self.process, self.processes = process, max(1, processes)
        self._reader = sock.makefile("rb")
        self._done = False
        self.outcome: Dict[str, Any] = {}
        self._metrics: Dict[str, float] = {}
        self._paired: Dict[int, float] = {}

    # -- protocol -----------------------------------------------------------------------------------------------
    def _send(self, msg: Dict[str, Any]) -> None:
        self._sock.sendall(json.dumps(msg, default=str).encode() + b"\n")

    def _recv(self) -> Dict[str, Any]:
        line = self._reader.readline()  # blocks in recv(): a waiting job takes no CPU
        if not line:
            raise RaceLost("the sweep process that races this job is gone")
        return json.loads(line)

    # -- what the runner calls ----------------------------------------------------------------------------------
    def wait_turn(self) -> None:
        """Say "started" and block (no CPU) until the launcher says "prepare". The runner calls it once everything
        before the job's first measured phase is done — imports, the config's checks, the MLflow store's set-up:
        seconds of single-threaded work that run beside another job's start-up instead of alone — so that each
        job's measured phases (load, stack, accuracy pass) still run alone."""
        try:
            self._send({"type": "started"})
        except OSError as e:
            raise RaceLost("the sweep process that races this job is gone") from e
        msg = self._recv()
        if msg.get("cmd") != "prepare":
            raise RaceLost(f"unexpected message from the sweep process: {msg!r}")

    def ready(self, info: Mapping[str, Any]) -> None:
        self._send({"type": "ready", **info})

    def timing(self, step: Callable, batches: list, runtime: Any, round_s: Optional[float] = None, out: Any = None,
               warmup: Optional[int] = None):
        """Serve the launcher's rounds until it says stop; a TimingResult whose round_ids are the race's rounds.
        A round times at least `round_s` seconds (None: runtime.min_duration_s), shared by the job's processes,
        after ``warmup`` untimed runs of the shortest batch (None: runtime.warmup batches of the round's order).
        ``out``: the caller's TimingResult to add the rounds to (the rounds served survive an interrupt)."""
        from . import measure, stats

        round_s = float(runtime.min_duration_s if round_s is None else round_s)
        out = measure.TimingResult([], 0, 0.0) if out is None else out
        shortest = min(batches, key=lambda b: b.elements) if batches else None
        while True:
            msg = self._recv()
            if msg.get("cmd") == "stop":
                self._done = True
                self.outcome = dict(msg.get("outcome") or {})
                self._metrics = {k: float(v) for k, v in (msg.get("metrics") or {}).items() if v is not None}
                self._paired = {int(k): float(v) for k, v in (msg.get("paired") or {}).items()}
                if not out.latencies_s:
                    raise RaceLost(f"the race stopped this job before it was timed ({self.outcome.get('stopped')})")
                if msg.get("hold"):
                    self._held()
                return out
            if msg.get("cmd") != "round":
                raise RaceLost(f"unexpected message from the sweep process: {msg!r}")
            r = int(msg["round"])
            order = measure.timing_order(len(batches), int(getattr(runtime, "seed", 0)) + r)
            t0 = time.time()
            # its own untimed warm-up first (caches and the thread pool come back after the wait): `warmup` runs of
            # the shortest batch (race.warmup), or, None, runtime.warmup batches of the round's order inside the
            # timing pass as when timed alone; the job's processes share its round: together they time as long as
            # one would alone.
            # An extra process ran no accuracy pass: before its first round it has never seen most batch shapes
            # (oneDNN primitives, engines' shape specialisations are built on first sight), so that round was its
            # slowest by 20-30 % in every measured race; one untimed pass over every batch first
            if self.process and not out.latencies_s:
                in_order, short = len(batches), 0
            elif warmup is None:
                in_order, short = int(runtime.warmup), 0
            else:
                in_order, short = 0, int(warmup)
            for _ in range(short):
                step(shortest.inputs)
            common = -(-int(runtime.min_iterations) // self.processes)
            part = measure.timing_pass(step, batches, in_order, common, round_s / self.processes,
                                       runtime.max_iterations, progress=False, order=order)
            out.extend(part, r)
            # what the race pairs: rows/s over the batches every unit of the round timed (the order's first
            # `common`), so that a pair's ratio compares the same batches (stats.matched_throughput)
            thr = stats.matched_throughput(part.batch_ids, part.batch_rows, part.latencies_s, common)
            self._send({"type": "round", "round": r, "throughput": thr, "start": t0, "end": time.time(),
                        "iterations": len(part.latencies_s)})

    def _held(self) -> None:
        """Told to hold after it stopped: block (no CPU) until the launcher says finish, so that recording this run
        does not run beside another job's timed round. The launcher gone: record it anyway, the rounds are done."""
        while True:
            line = self._reader.readline()
            if not line or json.loads(line).get("cmd") == "finish":
                return

    def metrics(self) -> Dict[str, float]:
        return dict(self._metrics)

    def history(self) -> Dict[str, Dict[int, float]]:
        """Per-round series for an MLflow metric history (step = the race's round)."""
        return {"paired_ratio": dict(self._paired)} if self._paired else {}

    def abort(self, reason: str) -> None:
        """The job failed before or while it was raced: the race goes on without it. Harmless when not connected."""
        if self._done:
            return
        self._done = True
        try:
            self._send({"type": "abort", "reason": str(reason)[:2000]})
        except OSError:
            pass


def worker_from_env() -> Optional[RaceWorker]:
    """This job's race worker when its launcher races the sweep's jobs (it set ORCH_RACE_FD), else None."""
    fd = os.environ.pop(RACE_FD_ENV, None)  # popped: nothing this job starts may think it is raced
    process = os.environ.pop(RACE_PROCESS_ENV, "0 of 1")
    if not fd:
        return None
    try:
        index, count = (int(v) for v in process.split(" of "))
    except ValueError:
        index, count = 0, 1
    try:
        sock = socket.socket(fileno=int(fd))
    except (ValueError, OSError) as e:
        log.warning("%s=%s is not a socket this process holds (%s): timed alone", RACE_FD_ENV, fd, e)
        return None
    sock.set_inheritable(False)
    return RaceWorker(sock, index, count)


# ---- the decision logic ---------------------------------------------------------------------------------------

@dataclass
class Contender:
    job: int
    # jobs with the same key pair with one reference (the eager fp32 job of the same settings)
    key: str = ""
    # jobs of one workload (model, data, length) compete: leader and elimination
    workload: str = ""
    baseline: bool = False  # an eager fp32 job: the reference its key prefers
    gate: Optional[bool] = None  # the accuracy gate against its baseline; None: not known (no baseline)
    gate_reason: str = ""
    reference: Optional[int] = None
    # {round: rows/s} of the job: the geometric mean over its processes that ran the round
    throughputs: Dict[int, float] = field(default_factory=dict)
    spans: Dict[int, Tuple[float, float]] = field(default_factory=dict)
    # {process: {round: rows/s}}, and the processes still timed (0: the job's own; more with race.processes)
    per_process: Dict[int, Dict[int, float]] = field(default_factory=dict)
    # {round: cores other processes kept busy while it was timed} (the most over its processes; launcher-measured)
    others_busy: Dict[int, float] = field(default_factory=dict)
    processes: List[int] = field(default_factory=lambda: [0])
    live: bool = True
    entered: bool = False  # its group has started racing
    extras_tried: bool = False  # its extra processes were asked for (Race.lazy_extras)
    stopped: Optional[str] = None
    stopped_round: Optional[int] = None

    def median(self) -> float:
        values = sorted(self.throughputs.values())
        return float(values[len(values) // 2]) if values else 0.0


def _timed(c: Contender) -> float:
    """How many processes a job's rounds average over, in effect: 1 / sum over processes of (its share of the rounds'
    weight)^2, a round's weight split equally among the processes that ran it. A job timed in 2 processes in every
    round gives 2; one whose extra process joined at round 10 of 20 (lazy extras) about 1.7, since its own process's
    lifelong effect weighs in every round."""
    n = len(c.throughputs)
    if not n:
        return 1.0
    weight = {p: 0.0 for p in c.per_process}
    for r in c.throughputs:
        ran = [p for p, t in c.per_process.items() if t.get(r, 0.0) > 0]
        for p in ran:
            weight[p] += 1.0 / len(ran)
    share = sum((w / n) ** 2 for w in weight.values())
    return 1.0 / share if share > 0 else 1.0


class Race:
    """Which job runs when, and when each stops. Pure: the caller runs the rounds and reports throughputs."""

    def __init__(self, cfg: RaceConfig, clock: Callable[[], float] = time.monotonic, min_effect: float = 0.0,
                 lazy_extras: bool = False):
        self.cfg, self.clock = cfg, clock
        self.min_effect = min_effect  # summary.min_effect: a job is beaten only beyond this margin
        # the caller prepares a job's extra processes (race.processes) only once the job has survived the first
        # rounds at which it could be eliminated (extras_wanted); until then the process spread is PRIOR_PROCESS_SD
        self.lazy_extras = lazy_extras and int(cfg.processes) > 1
        self.jobs: Dict[int, Contender] = {}
        self.round = 0
        self.started: Optional[float] = None
        self.rounds: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.groups: List[List[int]] = []
        self.ended_by: List[str] = []

    # -- setting up ---------------------------------------------------------------------------------------------
    def add(self, c: Contender) -> None:
        self.jobs[c.job] = c

    def begin_group(self, jobs: Iterable[int]) -> None:
        """The jobs that race next (the references already alive stay in)."""
        group = sorted(set(jobs) | {c.job for c in self.live()})
        self.groups.append(group)
        for j in group:
            self.jobs[j].entered = True
        for key in {self.jobs[j].key for j in group}:
            members = [self.jobs[j] for j in group if self.jobs[j].key == key and self.jobs[j].live]
            current = [c for c in members if c.reference == c.job]
            workload = [self.jobs[j] for j in group if self.jobs[j].workload == members[0].workload
                        and self.jobs[j].baseline and self.jobs[j].live]
            if current:
                ref = current[0]
            else:  # as the summary finds a baseline: same settings, else same model and data, else the first job
                ref = (next((c for c in members if c.baseline), None)
                       or min(workload, key=lambda c: c.job, default=None) or min(members, key=lambda c: c.job))
            for c in members:
                c.reference = ref.job
        if self.started is None:
            self.started = self.clock()

    def live(self) -> List[Contender]:
        return [c for c in self.jobs.values() if c.live and c.entered]

    def is_reference(self, c: Contender) -> bool:
        return c.reference == c.job

    # -- a round ------------------------------------------------------------------------------------------------
    def next_round(self) -> Tuple[int, List[int]]:
        """The next round's number and its order of the live jobs (fresh, seeded by race.seed and the round)."""
        self.round += 1
        order = sorted(c.job for c in self.live() if self._needed(c))
        rng = random.Random(self.cfg.seed * 1_000_003 + self.round)
        rng.shuffle(order)
        units = [(j, p) for j in order for p in self.jobs[j].processes]
        if len(units) > len(order):  # a job's processes are interleaved with the others' too
            rng.shuffle(units)
        self.rounds.append({"round": self.round, "order": list(order), "units": units, "throughputs": {},
                            "spans": {}, "processes": {}})
        return self.round, order

    def _needed(self, c: Contender) -> bool:
        """A live job is timed in the next round; a reference nothing is paired with any more has had its rounds."""
        return (not self.is_reference(c) or len(c.throughputs) < self.cfg.min_rounds
                or any(o.reference == c.job and o is not c for o in self.live()))

    @property
    def extras_round(self) -> int:
        """With lazy extras: the job's own round after which a live job gets its extra processes. The first at which
        elimination can happen (the sign test's 99.5 % interval needs 9 rounds), so a job beaten by then never costs
        a preparation; at most max_rounds - 3, so the spread is measured over 3+ rounds of every job."""
        from . import stats

        first_look = next(n for n in range(self.cfg.min_rounds, self.cfg.min_rounds + 64)
                          if stats.sign_rank(n, ELIMINATION_CONFIDENCE) is not None)
        return max(0, min(first_look, self.cfg.max_rounds - 3))

    def awaiting_extras(self, c: Contender) -> bool:
        """c is to get extra processes but has not yet: its process spread is not measured."""
        return self.lazy_extras and not c.extras_tried and c.gate is not False

    def _shared_short(self, c: Contender, min_shared: int = 3) -> bool:
        """Lazy extras: c has extra processes that have not yet shared ``min_shared`` rounds with its own."""
        from . import stats

        return (self.lazy_extras and len(c.processes) > 1
                and stats.process_effects(list(c.per_process.values()), min_shared=min_shared) is None)

    def _unmeasured(self, c: Contender) -> bool:
        """Lazy extras: c's spread between processes is still to be measured (no extras yet, or too few rounds)."""
        return self.awaiting_extras(c) or self._shared_short(c)

    def _spread_known(self, c: Contender) -> bool:
        """Lazy extras: c's and its reference's processes have shared min_rounds rounds. Before that the spread is
        measured (3 shared rounds) but overestimated, round noise still in each process's median: on the safe side
        for an interval, not for deciding that more rounds cannot help."""
        return not any(self._shared_short(o, self.cfg.min_rounds)
                       for o in (c, self.jobs.get(c.reference)) if o is not None)

    def extras_wanted(self) -> List[int]:
        """The jobs whose extra processes the caller should prepare now (then :meth:`extras_tried` for each, and
        :meth:`add_process` for each that came up)."""
        if not self.lazy_extras:
            return []
        return sorted(c.job for c in self.live() if self.awaiting_extras(c) and self._needed(c)
                      and len(c.throughputs) >= self.extras_round)

    def extras_tried(self, job: int) -> None:
        self.jobs[job].extras_tried = True

    def units(self) -> List[Tuple[int, int]]:
        """The current round's (job, process) in the order they are timed."""
        return list(self.rounds[-1]["units"]) if self.rounds else []

    def add_process(self, job: int, process: int) -> None:
        """Another process of ``job`` is ready: it is timed from the next round on."""
        c = self.jobs[job]
        if process not in c.processes:
            c.processes.append(process)

    def lost_process(self, job: int, process: int, r: int, why: str) -> None:
        """One of a job's extra processes is gone: the job goes on with the others."""
        c = self.jobs[job]
        if process in c.processes:
            c.processes.remove(process)
        self.events.append({"round": r, "job": c.job, "process": process, "stopped": why})
        log.warning("race: process %d of job %d is gone (%s); the job goes on with %d", process, job, why,
                    len(c.processes))

    def record(self, job: int, r: int, throughput: float, start: Optional[float] = None,
               end: Optional[float] = None, others: Optional[float] = None, process: int = 0) -> None:
        c = self.jobs[job]
        if others is not None:
            c.others_busy[r] = max(others, c.others_busy.get(r, 0.0))
        c.per_process.setdefault(process, {})[r] = float(throughput)
        ran = [p[r] for p in c.per_process.values() if p.get(r, 0.0) > 0]
        c.throughputs[r] = float(math.exp(sum(map(math.log, ran)) / len(ran))) if ran else float(throughput)
        entry = self.rounds[-1] if self.rounds and self.rounds[-1]["round"] == r else None
        if entry is not None:
            entry["throughputs"][job] = c.throughputs[r]
            if len(c.processes) > 1 or process:
                entry["processes"][f"{job}.{process}"] = float(throughput)
        if start is not None and end is not None:
            old = c.spans.get(r)
            c.spans[r] = (min(start, old[0]), max(end, old[1])) if old else (start, end)
            if entry is not None:
                entry["spans"][job] = list(c.spans[r])
        if entry is not None and r in c.others_busy:
            entry.setdefault("others_busy", {})[job] = round(c.others_busy[r], 3)

    def lost(self, job: int, r: int, why: str) -> None:
        """A job that ended on its own (failed, killed): out of the race."""
        self._stop(self.jobs[job], r, why)

    def _stop(self, c: Contender, r: int, why: str) -> None:
        c.live, c.stopped, c.stopped_round = False, why, r
        self.events.append({"round": r, "job": c.job, "stopped": why})

    # -- intervals ----------------------------------------------------------------------------------------------
    def speedup(self, c: Contender, confidence: float = CONFIDENCE):
        """(speedup, low, high, rounds) of c over its reference, paired by round; None for a reference."""
        from . import stats

        if c.reference is None or c.reference == c.job:
            return None
        return self._vs(c, self.jobs[c.reference], confidence)

    def round_speedup(self, c: Contender, confidence: float = CONFIDENCE):
        """The same from the rounds alone, without the process-level term: what more rounds can narrow."""
        from . import stats

        if c.reference is None or c.reference == c.job:
            return None
        return stats.paired_speedup_interval(c.throughputs, self.jobs[c.reference].throughputs, confidence)

    def process_halfwidth(self, c: Contender, confidence: float = CONFIDENCE, asymptotic: bool = False
                          ) -> Optional[float]:
        """The process-level part of c's interval against its reference (relative: exp(t * sd * sqrt(...)) - 1);
        None while the spread is not measured. ``asymptotic``: what it tends to with more rounds, each process of
        the two jobs timed in every one (lazy extras: it shrinks as the rounds with all processes accumulate)."""
        from . import stats

        if c.reference is None or c.reference == c.job:
            return None
        ref = self.jobs[c.reference]
        m = (len(c.processes), len(ref.processes)) if asymptotic else (_timed(c), _timed(ref))
        q = stats.process_term(*self.process_spread(), *m, confidence)
        return None if q is None else math.exp(q) - 1.0

    def process_spread(self) -> Tuple[Optional[float], int]:
        """(sd, degrees of freedom) of the process-level effect, from every job timed in 2+ processes."""
        from . import stats

        return stats.process_spread([list(c.per_process.values()) for c in self.jobs.values()])

    def _spread_or_prior(self) -> Tuple[Optional[float], float]:
        """What an interval is widened with: the measured spread, or (lazy extras, nothing measured yet) the prior
        PRIOR_PROCESS_SD taken as known (infinite degrees of freedom: the normal quantile)."""
        sd, dof = self.process_spread()
        if sd is None and self.lazy_extras:
            return PRIOR_PROCESS_SD, math.inf
        return sd, dof

    def _vs(self, c: Contender, other: Contender, confidence: float):
        """c over other, paired by round, widened by the process-level spread when it is measured."""
        from . import stats

        s = stats.paired_speedup_interval(c.throughputs, other.throughputs, confidence)
        if s is None or s[1] is None:
            return s
        sd, dof = self._spread_or_prior()
        point, low, high = stats.widen_for_processes(s[0], s[1], s[2], sd, dof, _timed(c), _timed(other),
                                                     confidence)
        return point, low, high, s[3]

    def _below(self, c: Contender, lead: Contender, confidence: float) -> bool:
        from . import stats

        vs = self._vs(c, lead, confidence)
        return vs is not None and stats.slower_beyond(vs[2], self.min_effect)

    def leader(self, workload: str) -> Optional[Contender]:
        """The fastest live job of the workload that passes the accuracy gate (or whose gate is not known)."""
        passing = [c for c in self.live() if c.workload == workload and c.gate is not False and c.throughputs]
        return max(passing, key=lambda c: (c.median(), -c.job)) if passing else None

    # -- after a round ------------------------------------------------------------------------------------------
    def decide(self, r: int) -> List[Tuple[int, str]]:
        """The jobs that stop after round r, with why; they are out of the race from now on."""
        from . import stats

        cfg = self.cfg
        elapsed = self.clock() - self.started if self.started is not None else 0.0
        stops: Dict[int, str] = {}
        for c in self.live():
            if c.gate is False and len(c.throughputs) >= cfg.min_rounds:
                stops[c.job] = f"gate failed ({c.gate_reason}): timed only min_rounds ({len(c.throughputs)})"
        for w in sorted({c.workload for c in self.live()}):
            lead = self.leader(w)
            for c in self.live():
                n = len(c.throughputs)
                if c.workload != w or c.job in stops or self.is_reference(c) or n < cfg.min_rounds:
                    continue
                beaten = f"eliminated at round {r}: slower than job {lead.job} beyond noise" if lead else ""
                if lead is not None and c is not lead and self._below(c, lead, ELIMINATION_CONFIDENCE):
                    stops[c.job] = beaten
                    continue
                if self._unmeasured(c) or (c.reference is not None and self._unmeasured(self.jobs[c.reference])):
                    # its spread between processes is not measured yet: no interval of its own is final
                    if n >= cfg.max_rounds:
                        stops[c.job] = f"max_rounds ({cfg.max_rounds}) reached"
                    elif cfg.budget_s is not None and elapsed >= cfg.budget_s:
                        stops[c.job] = f"budget_s ({cfg.budget_s:g} s) spent at round {r}"
                    continue
                # more rounds narrow only the rounds' part: the process-level part is what it is
                s = self.round_speedup(c, STOPPING_CONFIDENCE)
                hw = stats.half_width(s[1], s[2]) if s else None
                # once the rounds' part is below the process-level part, more rounds can narrow the interval by
                # less than a third (sqrt(hw^2 + q^2) >= q): Kalibera & Jones spend repetitions where the variance is
                q = self.process_halfwidth(c, asymptotic=True)
                settled = hw is not None and q is not None and hw < q and self._spread_known(c)
                if hw is not None and (hw < cfg.target_halfwidth or settled):
                    # settled: said as beaten when its (one, final) 95 % interval against the leader is below 1
                    why = (f"target half-width reached at round {r} (+-{100 * hw:.1f} %)" if hw < cfg.target_halfwidth
                           else f"target half-width in rounds reached at round {r}: the rounds' +-{100 * hw:.1f} % "
                                f"is below the +-{100 * q:.1f} % spread between processes, which more rounds "
                                "cannot narrow")
                    stops[c.job] = (beaten if lead is not None and c is not lead and self._below(c, lead, CONFIDENCE)
                                    else why)
                elif n >= cfg.max_rounds:
                    stops[c.job] = f"max_rounds ({cfg.max_rounds}) reached"
                elif cfg.budget_s is not None and elapsed >= cfg.budget_s:
                    stops[c.job] = f"budget_s ({cfg.budget_s:g} s) spent at round {r}"
        for job, why in stops.items():
            self._stop(self.jobs[job], r, why)
            log.info("race: job %d stops: %s", job, why)
        for why in stops.values():
            kind = next((k for k in ("max_rounds", "budget_s", "target half-width", "eliminated", "gate failed")
                         if why.startswith(k)), None)
            if kind and kind not in self.ended_by:
                self.ended_by.append(kind)
        return sorted(stops.items())

    def group_done(self) -> bool:
        """Nothing left to time in this group: every live job is a reference that has had its min_rounds, and no
        live job is paired with it."""
        live = self.live()
        if any(not self.is_reference(c) for c in live):
            return False
        return all(len(c.throughputs) >= self.cfg.min_rounds for c in live)

    def finish(self, r: Optional[int] = None) -> List[Tuple[int, str]]:
        """Stop what is still live at the end of the race (the references)."""
        r = self.round if r is None else r
        out = []
        for c in self.live():
            paired = [o.job for o in self.jobs.values() if o.reference == c.job and o is not c]
            why = (f"reference of job(s) {', '.join(map(str, paired))}: timed while they raced"
                   if paired else f"timed {len(c.throughputs)} rounds (nothing to pair with)")
            self._stop(c, r, why)
            out.append((c.job, why))
        return out

    # -- what each job and the sweep are told ---------------------------------------------------------------------
    def stop_message(self, job: int) -> Dict[str, Any]:
        """The STOP command for a job: why it stopped, its rounds and paired ratios, and its race metrics."""
        from . import stats

        c = self.jobs[job]
        paired: Dict[int, float] = {}
        metrics: Dict[str, Optional[float]] = {"race_rounds": float(len(c.throughputs)),
                                               "race_stopped_round": float(c.stopped_round or 0)}
        if c.reference is not None and c.reference != c.job:
            paired = stats.paired_ratios(c.throughputs, self.jobs[c.reference].throughputs)
            s = self.speedup(c)
            if s is not None:
                metrics.update({"race_speedup": s[0], "race_speedup_ci_low": s[1], "race_speedup_ci_high": s[2]})
        sd, dof = self.process_spread()
        metrics.update({"race_processes": float(_timed(c)), "race_process_sd": sd})
        if c.others_busy:  # the summary line names a busy machine from it (verdict.busy_note)
            busy = sorted(c.others_busy.values())
            metrics["cores_busy_in_rounds"] = busy[len(busy) // 2]
        outcome = {"stopped": c.stopped, "rounds": len(c.throughputs), "stopped_round": c.stopped_round,
                   "order_seed": self.cfg.seed, "reference_job": c.reference,
                   "throughputs": {str(k): v for k, v in sorted(c.throughputs.items())},
                   "paired": {str(k): v for k, v in sorted(paired.items())},
                   # what the summary widens the paired interval with (orchestrator/stats.py)
                   "processes": round(_timed(c), 3), "process_sd": sd, "process_dof": dof,
                   "per_process": {str(p): {str(k): v for k, v in sorted(t.items())}
                                   for p, t in sorted(c.per_process.items())}}
        return {"cmd": "stop", "outcome": outcome, "metrics": {k: v for k, v in metrics.items() if v is not None},
                "paired": {str(k): v for k, v in paired.items()}}

    def stop_reason(self) -> str:
        if not self.ended_by:
            return "every job decided"
        if "budget_s" in self.ended_by:
            return f"budget_s ({self.cfg.budget_s:g} s) spent"
        if "max_rounds" in self.ended_by:
            return f"max_rounds ({self.cfg.max_rounds}) reached for some jobs"
        return "every job decided (target half-width, elimination or gate)"

    def log_dict(self) -> Dict[str, Any]:
        """race.json: settings, each round's order and throughputs, eliminations and stops, the stop reason."""
        cfg = asdict(self.cfg)
        cfg["mode"] = getattr(self.cfg.mode, "value", self.cfg.mode)
        jobs = {}
        for c in sorted(self.jobs.values(), key=lambda c: c.job):
            s = self.speedup(c)
            jobs[str(c.job)] = {"reference_job": c.reference, "workload": c.workload, "gate": c.gate,
                                "gate_reason": c.gate_reason, "rounds": len(c.throughputs),
                                "stopped": c.stopped, "stopped_round": c.stopped_round,
                                "throughputs": {str(k): v for k, v in sorted(c.throughputs.items())},
                                "per_process": {str(p): {str(k): v for k, v in sorted(t.items())}
                                                for p, t in sorted(c.per_process.items())},
                                "speedup": list(s[:3]) if s else None}
        sd, dof = self.process_spread()
        return {"config": cfg, "order_seed": self.cfg.seed, "elimination_confidence": ELIMINATION_CONFIDENCE,
                "process_sd": sd, "process_dof": dof,
                "rounds": [{**e, "units": [list(u) for u in e.get("units", [])],
                            "throughputs": {str(k): v for k, v in e["throughputs"].items()},
                            "spans": {str(k): v for k, v in e["spans"].items()}} for e in self.rounds],
                "groups": self.groups, "events": self.events, "jobs": jobs, "stopped": self.stop_reason(),
                "elapsed_s": (self.clock() - self.started) if self.started is not None else 0.0}


class RoundRunner:
    """What the driver needs from a raced job (a process in the launcher, a fake in tests)."""

    def time_round(self, r: int) -> Optional[tuple]:
        """(rows/s, start, end) or (rows/s, start, end, cores others kept busy meanwhile); None: the job is gone."""
        raise NotImplementedError

    def stop(self, message: Dict[str, Any]) -> None:
        raise NotImplementedError

    why_lost: str = "its process ended"


Runners = Mapping[Any, RoundRunner]  # job -> its process 0; (job, p) -> its process p (race.processes)


def _stop_job(race: Race, runners: Runners, job: int) -> None:
    """Tell a job's extra processes, then the job itself (which records the job), that it stopped."""
    message = race.stop_message(job)
    for p in sorted(p for p in race.jobs[job].processes if p):
        runners[(job, p)].stop(message)
    runners[job].stop(message)


def run_group(race: Race, runners: Runners, jobs: Iterable[int],
              on_round: Optional[Callable[[int, List[int]], None]] = None,
              add_extras: Optional[Callable[[List[int]], None]] = None) -> None:
    """Race ``jobs`` (with the references still alive) until the group is done; each job that stops is told so.
    ``add_extras(jobs)`` (lazy extras): prepare those jobs' extra processes and :meth:`Race.add_process` them."""
    race.begin_group(jobs)
    while not race.group_done() and race.live():
        wanted = race.extras_wanted()
        if wanted:
            if add_extras is not None:
                add_extras(wanted)
            for job in wanted:
                race.extras_tried(job)
        r, order = race.next_round()
        if on_round is not None:
            on_round(r, order)
        for job, p in race.units():
            c = race.jobs[job]
            if not c.live or p not in c.processes:
                continue
            runner = runners[job] if p == 0 else runners[(job, p)]
            res = runner.time_round(r)
            if res is None and p == 0:
                race.lost(job, r, runner.why_lost)
                for q in [q for q in c.processes if q]:  # nothing to time them for: end them
                    runners[(job, q)].stop(race.stop_message(job))
                continue
            if res is None:
                race.lost_process(job, p, r, runner.why_lost)
                continue
            race.record(job, r, *res, process=p)
        for job, _ in race.decide(r):
            _stop_job(race, runners, job)


def end_race(race: Race, runners: Runners) -> None:
    for job, _ in race.finish():
        _stop_job(race, runners, job)
