"""``hydra/launcher=isolated``: every job of a sweep in a fresh Python process of its own, one after the other.

Why: a job run in the same process as the jobs before it inherits their state. oneDNN keeps the kernels it built
for every input shape, TorchScript/inductor keep their caches, IPEX registers fusion passes process-wide, the
allocator keeps its arenas and inter-op threads can be set once. A later job then skips work an earlier one paid
for, and its timings are not what a user running it alone would get. A fresh process per job, run alone, gives each
job the whole CPU and nothing from its predecessors.

How: the sweep process composes each job's config (as Hydra's basic launcher does), pickles what ``run_job`` needs
(cloudpickle, as the joblib launcher hands jobs to its workers) and runs ``python -m
hydra_plugins.orchestrator_launcher._job`` on it, then reads the job's ``JobReturn`` back. The job process gets the
sweep's environment (so it nests under the sweep's MLflow parent run) plus ``ORCH_ISOLATED_JOB=1`` and the time it
was started, from which the run logs ``process_startup_s``.

Racing (``race.mode=on``, the default for a multirun of two or more jobs; orchestrator/race.py): every job's process
prepares (load, stack, parity, accuracy pass) one at a time, eager fp32 jobs first, until it says it is ready; it
then blocks on a socket inherited from this process (``ORCH_RACE_FD``) while the others prepare. The processes are
started :data:`START_AHEAD` at a time (one per core): their start-up (Python, torch, MLflow imports, the config's
checks, the model's and metric's code, opening the MLflow store: seconds of single-threaded work before anything is
measured) runs side by side, then each waits, blocked, for its turn to prepare (``RaceWorker.wait_turn``, called by
the runner just before it creates its MLflow run), so each job's measured phases still run alone. The
launcher then times the ready jobs in interleaved rounds, one job at a time in a fresh seeded order per round, stops
each when its answer is known (or it is beaten, fails the accuracy gate, or rounds/budget run out). A stopped job
holds, blocked on its socket, until its group's race is over; the held jobs then record their runs,
:data:`PREPARE_AT_ONCE` at a time (recording takes seconds that would otherwise sit between timed rounds, and
nothing else may run while a job is timed). At most
``race.max_alive`` job processes are alive (default: what free memory holds); beyond it the jobs race in groups and
each eager fp32 reference stays alive across groups. The race's log (rounds, orders, seed, stops) is written to
``<sweep dir>/race.json``. With ``race.processes`` > 1 each job that passes the accuracy gate gets extra processes
(same job payload, ``ORCH_RACE_PROCESS``: "1 of 2"; Hydra output in the job's temporary folder) that only serve
rounds. They are prepared during the race, once the first rounds that can eliminate a job have run
(``Race.extras_round``, round 9 by default): a job beaten by then never costs a preparation. Between two rounds,
:data:`PREPARE_AT_ONCE` at a time: they record nothing of their preparation (a job's own load and apply times are
measured alone, as before), and a preparation is mostly single-threaded Python (imports, tracing, export), so two
share a 2-core machine well. ``race.mode=off``: one job
after another, as before.

Signals: the job runs in its own process group, so a terminal's Ctrl-C reaches the sweep process only, which passes
it on: one Ctrl-C ends the current job (the one being timed or prepared; its run ends KILLED) and the sweep goes on;
a second within 2 s stops the sweep (every live job ends KILLED). SIGTERM is passed on to every live job, and the
sweep stops once they have ended KILLED. Every job process also gets a parent-death signal (SIGTERM, set in
``_job.py``): whatever ends the sweep process — ``kill -9`` included — ends its jobs.
"""

import copy
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from orchestrator.environment import ISOLATED_ENV, SPAWNED_AT_ENV, OthersBusy
from orchestrator.interrupts import DOUBLE_INTERRUPT_S, DoubleInterrupt

from ._remote import SweepLauncher, job_payload

log = logging.getLogger(__name__)

# the sweep process's pid, for the job's parent-death check (_job.py)
SWEEP_PID_ENV = "ORCH_SWEEP_PID"
# how much more memory than the largest prepared job's peak RSS must be free to start another job
MEMORY_HEADROOM = 1.5
# extra processes (race.processes) prepared at once; see the module's docstring
PREPARE_AT_ONCE = 2
# job processes started at once, their imports side by side (Racer._start_ahead): one per core, up to 4
START_AHEAD = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
# after the sweep is stopped, how long a job may take to record itself KILLED before it is killed outright
GRACE_S = 60.0


@dataclass
class IsolatedLauncherConf:
    _target_: str = "hydra_plugins.orchestrator_launcher.isolated_launcher.IsolatedLauncher"
    # the interpreter that runs each job; null: the one running the sweep
    python: Optional[str] = None
    # extra environment for every job process (e.g. ONEDNN_MAX_CPU_ISA: AVX2, OMP_NUM_THREADS: "2")
    env: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="isolated", node=IsolatedLauncherConf,
                             provider="cpu-inference-orchestrator")


class SweepStopped(Exception):
    pass


class IsolatedLauncher(SweepLauncher):
    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.python = python or sys.executable
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self._interrupts = DoubleInterrupt()

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = self.start_sweep()
        configs = [self.job_config(initial_job_idx + i, o) for i, o in enumerate(job_overrides)]
        race = race_config(configs[0]) if configs else None
        if race is not None and len(configs) > 1 and _value(race.mode) == "on":
            log.info(f"Launching {len(job_overrides)} jobs, each in a fresh process (hydra/launcher=isolated), "
                     "raced in interleaved timing rounds (race.mode=on; race.mode=off times them one after another)")
            for idx, overrides in enumerate(job_overrides):
                log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
            min_effect = float(OmegaConf.select(configs[0], "summary.min_effect", default=0.0))
            return Racer(self, race, sweep_dir, min_effect).run([(initial_job_idx + i, list(o), c) for i, (o, c)
                                                     in enumerate(zip(job_overrides, configs))])
        log.info(f"Launching {len(job_overrides)} jobs, each in a fresh process (hydra/launcher=isolated)")
        runs: List[JobReturn] = []
        for idx, (overrides, sweep_config) in enumerate(zip(job_overrides, configs)):
            idx = initial_job_idx + idx
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            runs.append(self._run_one(idx, list(overrides), sweep_config, sweep_dir))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    def job_env(self) -> Dict[str, str]:
        return {**os.environ, **self.env, ISOLATED_ENV: "1", SPAWNED_AT_ENV: repr(time.time()),
                SWEEP_PID_ENV: str(os.getpid())}

    # -- one job ------------------------------------------------------------------------------------------------
    def _run_one(self, idx: int, overrides: List[str], sweep_config: DictConfig, sweep_dir: Path) -> JobReturn:
        with tempfile.TemporaryDirectory(prefix=f".isolated-{idx}-", dir=sweep_dir) as tmp:
            job_in, job_out = Path(tmp, "job.pkl"), Path(tmp, "return.pkl")
            job_in.write_bytes(job_payload(self.hydra_context, self.task_function, sweep_config))
            env = self.job_env()
            proc = subprocess.Popen([self.python, "-m", "hydra_plugins.orchestrator_launcher._job", str(job_in),
                                     str(job_out)], env=env, start_new_session=True)
            stop = self._wait(proc, idx)
            ret = self._read_return(job_out, proc.returncode, idx, overrides, sweep_config, proc.pid)
        if stop is not None:
            raise stop
        return ret

    def _wait(self, proc: subprocess.Popen, idx: int) -> Optional[BaseException]:
        """Wait for the job, passing Ctrl-C and SIGTERM on; returns what should stop the sweep afterwards."""
        stop: Optional[BaseException] = None
        interrupted = False

        def on_term(signum, frame):
            nonlocal stop
            log.error("SIGTERM: ending job %d (KILLED), then stopping the sweep", idx)
            stop = SystemExit(128 + signal.SIGTERM)
            _signal(proc, signal.SIGTERM)

        old_term = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
        try:
            while True:
                try:
                    proc.wait(timeout=None if stop is None else GRACE_S)
                    return stop
                except subprocess.TimeoutExpired:
                    log.error("job %d did not end %g s after it was stopped; killing it", idx, GRACE_S)
                    proc.kill()
                except KeyboardInterrupt:
                    second = self._interrupts.press()
                    # not the second of a double Ctrl-C: it would land in the job's own shutdown (its atexit
                    # handlers) and print a traceback there while the job is already ending KILLED
                    if not (interrupted and second):
                        _signal(proc, signal.SIGINT)
                    interrupted = True
                    if second:
                        log.error("second Ctrl-C: stopping the sweep after job %d", idx)
                        stop = KeyboardInterrupt()
                    else:
                        log.warning("Ctrl-C: ending job %d (KILLED); Ctrl-C again within %g s stops the sweep",
                                    idx, DOUBLE_INTERRUPT_S)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)

    @staticmethod
    def _read_return(path: Path, returncode: Optional[int], idx: int, overrides: List[str],
                     config: DictConfig, pid: Optional[int] = None) -> JobReturn:
        import cloudpickle

        from ._remote import record_lost_job

        if path.is_file():
            try:
                return cloudpickle.loads(path.read_bytes())
            except Exception as e:  # an unpicklable return value: report, keep the sweep going
                return record_lost_job(config, idx, overrides, "FAILED",
                                       f"its result could not be read back ({type(e).__name__}: {e})")
        # the job could not close its own run (kill -9, the OOM killer): this process outlives it and does. The
        # job ends COMPLETED with a failed result, as orchestrator's task function reports failed jobs: the sweep
        # goes on and its summary lists the job
        if returncode is not None and returncode < 0:
            return record_lost_job(config, idx, overrides, "KILLED",
                                   f"killed by signal {signal.Signals(-returncode).name} (process {pid})")
        return record_lost_job(config, idx, overrides, "FAILED",
                               f"its process {pid} ended (exit code {returncode}) before the job returned")


def _signal(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- racing -------------------------------------------------------------------------------------------------------

def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def race_config(cfg: DictConfig):
    """The sweep's race settings, from job 0's composed config (RaceConfig's defaults where it has none)."""
    from orchestrator.race import RaceConfig, check_config

    node = OmegaConf.select(cfg, "race", default=None)
    data = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    race = RaceConfig(**{k: v for k, v in dict(data).items() if k in RaceConfig.__dataclass_fields__})
    check_config(race)
    return race


def job_identity(config: DictConfig) -> Tuple[str, str, bool]:
    """(pairing key, workload, eager fp32?) of a job, by the rule the summary judges it by (records.comparison_keys):
    jobs of one workload (model, data, max_length, scenario) compete; jobs that differ only in stack and precision
    pair with one eager fp32 reference."""
    from orchestrator.records import comparison_keys

    plain: Dict[str, Any] = {}
    for k in config:
        if k == "hydra":
            continue
        node = config[k]
        try:
            plain[k] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except Exception:  # an interpolation only a job can resolve: compare what is written
            plain[k] = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    keys = comparison_keys(plain)
    baseline = not plain.get("optimization") and (plain.get("precision") or {}).get("name") == "fp32"
    return keys["baseline_key"], keys["workload"], bool(baseline)


class JobProcess:
    """One raced job: its process, its socket, and the race's commands to it (a RoundRunner of orchestrator/race)."""

    def __init__(self, racer: "Racer", idx: int, overrides: List[str], config: DictConfig, process: int = 0,
                 begin: bool = True):
        from orchestrator.race import RACE_FD_ENV, RACE_PROCESS_ENV

        self.racer, self.idx, self.overrides, self.config = racer, idx, overrides, config
        # process 0 is the job (it records the run); 1.. are its extra processes (race.processes), timed only
        self.process = process
        self.key, self.workload, self.baseline = job_identity(config)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".isolated-{idx}-{process}-" if process else f".isolated-{idx}-",
                                         dir=racer.sweep_dir))
        self.job_in, self.job_out = self.tmp / "job.pkl", self.tmp / "return.pkl"
        launcher = racer.launcher
        if process:  # its Hydra output folder (config, log) inside this temporary one, not the job's own
            config = copy.deepcopy(config)
            with read_write(config), open_dict(config):
                config.hydra.sweep.subdir = f"{self.tmp.name}/process-{process}"
        self.job_in.write_bytes(job_payload(launcher.hydra_context, launcher.task_function, config))
        self.sock, child = socket.socketpair()
        env = {**launcher.job_env(), RACE_FD_ENV: str(child.fileno()),
               RACE_PROCESS_ENV: f"{process} of {int(getattr(racer.cfg, 'processes', 1))}"}
        self.proc = subprocess.Popen([launcher.python, "-m", "hydra_plugins.orchestrator_launcher._job",
                                      str(self.job_in), str(self.job_out)], env=env, start_new_session=True,
                                     pass_fds=(child.fileno(),))
        child.close()  # the job holds the other end: end of file here once it is gone
        self._buf = b""
        self._closed = False
        self.why_lost = "its process ended"
        self.info: Dict[str, Any] = {}
        self.signalled = False
        self.started = time.monotonic()
        self.prep_s: Optional[float] = None  # spawn to ready: what its extra processes' preparation is ordered by
        self.held = False  # told it stopped; records its run when released (Racer.release)
        # it starts up (imports, checks, the MLflow store), says "started" and waits for "prepare"
        # (RaceWorker.wait_turn): a job started ahead prepares only once the one before it is ready
        self.begun = self.started_up = False
        if begin:
            self.begin()

    def begin(self) -> None:
        """Let it prepare (load, stack, accuracy pass) as soon as it has started up."""
        if not self.begun:
            self.begun = True
            self.started = time.monotonic()
            self._send({"cmd": "prepare"})

    def wait_started(self) -> None:
        """Until it has started up and waits for its turn (or is gone; or failed its checks: that message is kept
        for wait_ready)."""
        if not self.started_up:
            msg = self._message()
            self.started_up = True
            if msg is not None and msg.get("type") != "started":
                self._buf = json.dumps(msg).encode() + b"\n" + self._buf

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _message(self) -> Optional[Dict[str, Any]]:
        """The job's next message; None once it is gone. Waits in select(), checking for a stopped sweep."""
        while True:
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                return json.loads(line)
            if self._closed:
                return None
            self.racer.check_stop()
            readable, _, _ = select.select([self.sock], [], [], 0.5)
            if readable:
                data = self.sock.recv(1 << 16)
                if data:
                    self._buf += data
                else:
                    self._closed = True
            elif self.proc.poll() is not None:  # gone, though a process it started may still hold the socket
                self._closed = True

    def _send(self, msg: Dict[str, Any]) -> bool:
        try:
            self.sock.sendall(json.dumps(msg, default=str).encode() + b"\n")
            return True
        except OSError:
            return False

    def _reply(self, kind: str) -> Optional[Dict[str, Any]]:
        self.wait_started()
        msg = self._message()
        if msg is not None and msg.get("type") == kind:
            return msg
        if msg is not None and msg.get("type") == "abort":
            self.why_lost = f"failed: {msg.get('reason')}"
        self.racer.finish(self)
        return None

    def wait_ready(self) -> Optional[Dict[str, Any]]:
        self.racer.current = self
        msg = self._reply("ready")
        if msg is not None:
            self.info = msg
            self.prep_s = time.monotonic() - self.started
        return msg

    def has_message(self) -> bool:
        """A whole message, or the end of the socket, is there to read: _message() will not wait."""
        if b"\n" in self._buf or self._closed:
            return True
        return bool(select.select([self.sock], [], [], 0)[0])

    def time_round(self, r: int) -> Optional[Tuple[float, float, float, Optional[float]]]:
        """(rows/s, start, end, the cores other processes kept busy meanwhile) of one timed round."""
        self.racer.current = self
        others = OthersBusy(self.proc.pid)
        others.start()
        if not self._send({"cmd": "round", "round": r}):
            self.racer.finish(self)
            return None
        msg = self._reply("round")
        return None if msg is None else (float(msg["throughput"]), float(msg["start"]), float(msg["end"]),
                                         others.read())

    def stop(self, message: Dict[str, Any]) -> None:
        """Tell the job why it stopped. It holds (blocked on its socket, no CPU) until released: recording a run
        (MLflow, artifacts, process exit) takes seconds that would otherwise sit between two timed rounds, and
        nothing may run while one is timed. Held jobs record their runs together when the group's race is over."""
        if self._send({**message, "hold": True}):
            self.held = True
            self.racer.held.append(self)
        else:
            self.racer.finish(self)

    def release(self) -> None:
        """A held job may now record its run."""
        if not self._send({"cmd": "finish"}):
            log.debug("race: job %d was gone before it was released", self.idx)

    def rss_mb(self) -> float:
        if self.info.get("rss_mb"):
            return float(self.info["rss_mb"])
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except Exception:
            return 0.0


class _Runners(Mapping):
    """The race's runners (job -> process 0, (job, p) -> process p), read live: extra processes join mid-race."""

    def __init__(self, racer: "Racer") -> None:
        self.racer = racer

    def __getitem__(self, key: Any) -> "JobProcess":
        return self.racer.extra[key] if isinstance(key, tuple) else self.racer.procs[key]

    def __iter__(self):
        return iter([*self.racer.procs, *self.racer.extra])

    def __len__(self) -> int:
        return len(self.racer.procs) + len(self.racer.extra)


class Racer:
    """Starts and prepares the jobs, drives orchestrator.race over them, ends them, collects their returns."""

    def __init__(self, launcher: IsolatedLauncher, cfg: Any, sweep_dir: Path, min_effect: float = 0.0):
        from orchestrator.race import Race

        self.launcher, self.cfg, self.sweep_dir = launcher, cfg, sweep_dir
        # extra processes only for the jobs that survive the first rounds that can eliminate them
        self.race = Race(cfg, min_effect=min_effect, lazy_extras=True)
        self.procs: Dict[int, JobProcess] = {}
        self.extra: Dict[Tuple[int, int], JobProcess] = {}  # (job, process): a job's extra processes
        self.returns: Dict[int, JobReturn] = {}
        self.current: Optional[JobProcess] = None
        self.stop: Optional[BaseException] = None
        self.max_alive_seen = 0
        self.limit: Optional[str] = None
        self.held: List[JobProcess] = []  # stopped, waiting to record their runs (JobProcess.stop)
        self.recording: List[JobProcess] = []  # released, recording their runs
        self.started_together: List[List[int]] = []  # the jobs whose processes started (imported) at once

    # -- signals --------------------------------------------------------------------------------------------------
    def _on_int(self, signum, frame) -> None:
        second = self.launcher._interrupts.press()
        if second:
            log.error("second Ctrl-C: stopping the sweep")
            self.stop = KeyboardInterrupt()
            return
        cur = self.current
        if cur is not None and cur.alive() and not cur.signalled:
            log.warning("Ctrl-C: ending job %d (KILLED); Ctrl-C again within %g s stops the sweep", cur.idx,
                        DOUBLE_INTERRUPT_S)
            # the job is all its processes (race.processes): the one being timed may be an extra one
            for p in self.all_procs():
                if p.idx == cur.idx and p.alive() and not p.signalled:
                    p.signalled = True
                    _signal(p.proc, signal.SIGINT)

    def _on_term(self, signum, frame) -> None:
        log.error("SIGTERM: ending the sweep's jobs (KILLED), then stopping the sweep")
        self.stop = SystemExit(128 + signal.SIGTERM)
        for p in self.all_procs():
            if p.alive() and not p.signalled:
                p.signalled = True
                _signal(p.proc, signal.SIGTERM)

    def all_procs(self) -> List[JobProcess]:
        return [*self.procs.values(), *self.extra.values()]

    def check_stop(self) -> None:
        if self.stop is not None:
            raise SweepStopped()

    # -- the sweep ------------------------------------------------------------------------------------------------
    def run(self, jobs: List[Tuple[int, List[str], DictConfig]]) -> List[JobReturn]:
        env = {**os.environ, **self.launcher.env}
        if (env.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE"
                or env.get("KMP_BLOCKTIME", "").lower() in ("infinite", "infinity")):
            log.warning("OMP_WAIT_POLICY=ACTIVE / KMP_BLOCKTIME=infinite: a raced job's OpenMP threads spin while it "
                        "waits for its round and take CPU from the job being timed; unset them for a race")
        handlers = {}
        if _main_thread():
            handlers = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_int),
                        signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_term)}
        failed: Optional[BaseException] = None
        try:
            self._run(jobs)
        except SweepStopped:
            pass
        except BaseException as e:  # never leave prepared jobs waiting for a race that will not come
            failed = e
        finally:
            try:
                if self.stop is not None or failed is not None:
                    self._end_all()
            finally:
                for sig, old in handlers.items():
                    signal.signal(sig, old)
                self._write_log()
        if failed is not None:
            raise failed
        if self.stop is not None:
            raise self.stop
        return [self.returns[idx] for idx, _, _ in jobs if idx in self.returns]

    def _run(self, jobs: List[Tuple[int, List[str], DictConfig]]) -> None:
        from orchestrator.race import end_race

        # eager fp32 jobs first: the others' accuracy gate is judged against them as soon as they are ready
        pending = sorted(jobs, key=lambda j: (not job_identity(j[2])[2], j[0]))
        group: List[int] = []
        # the group's jobs whose extra processes may come (prepared during the race: Race.lazy_extras), for whom
        # memory is kept free
        extras: List[Tuple[int, List[str], DictConfig]] = []
        for i, (idx, overrides, config) in enumerate(pending):
            self.check_stop()
            if group and self._group_full(group, len(extras)):
                self._drop_ahead()
                self._race(group)
                group, extras = [], []
            if idx not in self.procs:  # not started ahead: start it with the next ones, all import at once
                ahead = pending[i + 1:i + min(START_AHEAD, 1 + self._room_ahead(len(extras)))]
                self._start_ahead([(idx, overrides, config)] + ahead)
            log.info("race: preparing job %d (load, stack, accuracy pass)", idx)
            jp = self.procs[idx]
            jp.begin()
            info = jp.wait_ready()
            if info is None:
                continue
            contender = self._contender(jp, info)
            self.race.add(contender)
            group.append(idx)
            if contender.gate is not False:  # a job that fails the gate is timed only for its row: one process
                extras.append((idx, overrides, config))
        if group:
            self._race(group)
        end_race(self.race, self._runners())
        self.release()

    def _start_ahead(self, jobs: List[Tuple[int, List[str], DictConfig]]) -> None:
        """Start these jobs' processes together and wait until each has started up (imports, the config's checks,
        the MLflow store: seconds of single-threaded Python): they share the cores, nothing is measured yet. Each
        then waits for its turn to prepare, blocked (no CPU). A job's own preparation still runs alone."""
        for idx, overrides, config in jobs:
            self.procs[idx] = JobProcess(self, idx, overrides, config, begin=False)
        self.started_together.append([idx for idx, _, _ in jobs])
        self.current = self.procs[jobs[0][0]]  # Ctrl-C now ends the job whose turn is next
        self._count_alive()
        for idx, _, _ in jobs:
            self.check_stop()
            self.procs[idx].wait_started()

    def _room_ahead(self, waiting: int) -> int:
        """How many more jobs may start now, besides the one about to prepare: with race.max_alive, as many as fit
        in the group with all their processes (``waiting``: the group's jobs whose extra processes may still come).
        By memory it is decided once the prepared jobs' RSS is known (_group_full, _drop_ahead)."""
        if self.cfg.max_alive is None:
            return START_AHEAD
        per_job = int(getattr(self.cfg, "processes", 1))
        alive = sum(p.alive() and p.begun for p in self.all_procs())
        room = self.cfg.max_alive - alive - 1 - (waiting + 1) * (per_job - 1)
        return max(0, room // per_job)

    def _drop_ahead(self) -> None:
        """End the processes started ahead that have not begun: their group is full (race.max_alive, memory), so
        they would wait through its race; each is started again when its turn comes. They ran nothing and leave
        nothing (orchestrator.runner._wait_for_turn: no MLflow run yet, their folder cleared)."""
        for idx, jp in list(self.procs.items()):
            if not jp.begun:
                del self.procs[idx]
                _signal(jp.proc, signal.SIGTERM)
                self.finish(jp)

    def _extra_processes(self, jobs: List[Tuple[int, List[str], DictConfig]]) -> None:
        """race.processes > 1: more processes of each job (load, precision, stack), PREPARE_AT_ONCE at a time."""
        # the longest preparations first (their job's own took longest), and a free slot refilled as soon as any
        # process is ready: a long one (an inductor compile) then runs beside the short ones, not after them
        todo = sorted(((idx, process, overrides, config) for idx, overrides, config in jobs
                       for process in range(1, int(getattr(self.cfg, "processes", 1)))),
                      key=lambda t: (-(self.procs[t[0]].prep_s or 0.0), t[0], t[1]))
        preparing: List[JobProcess] = []
        while todo or preparing:
            self.check_stop()
            while todo and len(preparing) < PREPARE_AT_ONCE:
                idx, process, overrides, config = todo.pop(0)
                if not self.procs[idx].alive():  # the job itself ended (Ctrl-C while its extras prepared)
                    continue
                log.info("race: preparing process %d of job %d (load, stack)", process, idx)
                jp = JobProcess(self, idx, overrides, config, process)
                self.extra[(idx, process)] = jp
                preparing.append(jp)
                self._count_alive()
            if preparing:
                jp = self._first_ready(preparing)
                preparing.remove(jp)
                if jp.wait_ready() is not None:
                    self.race.add_process(jp.idx, jp.process)

    def _first_ready(self, preparing: List[JobProcess]) -> JobProcess:
        """The first of the preparing processes with something to say (ready, failed or gone)."""
        while True:
            self.check_stop()
            self.release(wait=False)  # the jobs stopped so far record their runs meanwhile: nothing is timed
            for jp in preparing:
                if jp.has_message() and not jp.started_up:
                    jp.wait_started()  # "started" says nothing yet
                if jp.has_message():
                    return jp
            gone = next((jp for jp in preparing if not jp.alive()), None)
            if gone is not None:
                return gone
            select.select([jp.sock for jp in preparing], [], [], 0.5)

    def release(self, wait: bool = True) -> None:
        """Let the held (stopped) jobs record their runs, PREPARE_AT_ONCE at a time, and wait until they have
        (``wait=False``: release what there is room for, collect what has ended, and return)."""
        while self.held or self.recording:
            while self.held and len(self.recording) < PREPARE_AT_ONCE:
                jp = self.held.pop(0)  # what is still held when the sweep stops is released by _end_all
                jp.release()
                self.recording.append(jp)
            done = next((jp for jp in self.recording if not jp.alive()), None)
            if done is None:
                if not wait:
                    return
                self.check_stop()
                time.sleep(0.05)
                continue
            self.recording.remove(done)
            self.current = done
            self.finish(done)

    def _count_alive(self) -> None:
        self.max_alive_seen = max(self.max_alive_seen, sum(p.alive() for p in self.all_procs()))

    def _runners(self) -> "_Runners":
        return _Runners(self)

    def _group_full(self, group: List[int], waiting: int = 0) -> bool:
        """No room for another job; ``waiting``: the group's jobs whose extra processes are not started yet."""
        # a process started ahead (not begun) is the next job, counted below; or is ended if the group is full
        alive = [p for p in self.all_procs() if p.alive() and p.begun]
        per_job = int(getattr(self.cfg, "processes", 1))  # the next job needs room for all its processes
        coming = waiting * (per_job - 1)
        if self.cfg.max_alive is not None:
            full = len(alive) + coming + per_job > self.cfg.max_alive
            why = f"race.max_alive={self.cfg.max_alive}"
        else:
            import psutil

            largest = max((p.rss_mb() for p in alive), default=0.0)
            need = MEMORY_HEADROOM * (per_job + coming) * largest
            free = psutil.virtual_memory().available / 2**20
            full = len(alive) >= 2 and free < need
            why = (f"free memory {free:.0f} MB < {MEMORY_HEADROOM:g} x {per_job + coming} processes to come x the "
                   f"largest prepared one's {largest:.0f} MB")
        if full:
            self.limit = why
            log.info("race: %d job processes alive (%s): racing them before preparing more", len(alive), why)
        return full

    def _race(self, group: List[int]) -> None:
        from orchestrator.race import run_group

        def on_round(r: int, order: List[int]) -> None:
            log.info("race round %d: jobs %s", r, " ".join(map(str, order)))

        def add_extras(jobs: List[int]) -> None:
            log.info("race: jobs %s are still racing after round %d: preparing their extra processes",
                     " ".join(map(str, jobs)), self.race.round)
            self._extra_processes([(j, self.procs[j].overrides, self.procs[j].config) for j in jobs])
            self.release()  # every run recording meanwhile is done before the next timed round

        run_group(self.race, self._runners(), group, on_round, add_extras)
        self.release()  # the group's stopped jobs record their runs (and free their memory) before the next group

    def _contender(self, jp: JobProcess, info: Dict[str, Any]):
        from orchestrator.race import Contender

        c = Contender(job=jp.idx, key=jp.key, workload=jp.workload, baseline=jp.baseline)
        if info.get("status") not in (None, "ok"):
            c.gate, c.gate_reason = False, f"its run said {info.get('status')}"
        elif jp.baseline:
            c.gate = True
        else:
            base = self._baseline_of(jp)
            if base is not None:
                c.gate, c.gate_reason = self._gate(jp, base)
        return c

    def _baseline_of(self, jp: JobProcess) -> Optional[JobProcess]:
        ready = [p for p in self.procs.values() if p.baseline and p.info and p.info.get("status", "ok") == "ok"]
        for same in (lambda p: p.key == jp.key, lambda p: p.workload == jp.workload):
            match = sorted((p for p in ready if same(p)), key=lambda p: p.idx)
            if match:
                return match[0]
        return None

    def _gate(self, jp: JobProcess, base: JobProcess) -> Tuple[Optional[bool], str]:
        """The summary's accuracy gate (orchestrator/verdict.py), judged from the accuracy passes."""
        from orchestrator import verdict

        from orchestrator.config import SummaryConfig

        gate = SummaryConfig()  # the defaults live in the schema only
        min_ratio = float(OmegaConf.select(jp.config, "summary.min_accuracy_ratio", default=gate.min_accuracy_ratio))
        min_agree = float(OmegaConf.select(jp.config, "summary.min_agreement", default=gate.min_agreement))
        agree = None
        try:
            from orchestrator.registry import tasks

            task = tasks.get(str(OmegaConf.select(jp.config, "dataset.task")))
            mine, theirs = (json.loads(Path(p.info["decisions_file"]).read_text())
                            if p.info.get("decisions_file") and Path(p.info["decisions_file"]).is_file() else None
                            for p in (jp, base))
            agree = verdict.agreement(task, theirs, mine)
        except Exception as e:  # agreement not known: the metric alone judges, as in the summary
            log.debug("race: agreement of job %d not known (%s)", jp.idx, e)
        reasons = verdict.gate_reasons(jp.info.get("metric"), jp.info.get("value"), base.info.get("value"), agree,
                                       min_ratio, min_agree)
        return (not reasons), "; ".join(reasons)

    def finish(self, jp: JobProcess) -> None:
        """Wait for a job that is ending, then read back what it returned (an extra process, or one that never
        began, returns nothing)."""
        if jp.process or not jp.begun:
            if jp.tmp.exists():
                self._wait_ended(jp)
                shutil.rmtree(jp.tmp, ignore_errors=True)
            return
        if jp.idx in self.returns:
            return
        self._wait_ended(jp)
        self.returns[jp.idx] = self.launcher._read_return(jp.job_out, jp.proc.returncode, jp.idx, jp.overrides,
                                                          jp.config, jp.proc.pid)
        shutil.rmtree(jp.tmp, ignore_errors=True)
        configure_log(self.launcher.config.hydra.hydra_logging, self.launcher.config.hydra.verbose)

    def _wait_ended(self, jp: JobProcess) -> None:
        while True:
            try:
                jp.proc.wait(timeout=0.5 if self.stop is None else GRACE_S)
                break
            except subprocess.TimeoutExpired:
                if self.stop is not None:
                    log.error("job %d did not end %g s after it was stopped; killing it", jp.idx, GRACE_S)
                    jp.proc.kill()
        try:
            jp.sock.close()
        except OSError:
            pass

    def _end_all(self) -> None:
        """The sweep stops: every live job ends KILLED (those already signalled are not signalled again)."""
        sig = signal.SIGTERM
        for p in self.held:  # their race is over: they record their runs as they are, FINISHED
            p.release()
        self.held = []
        for p in self.all_procs():
            if p.held or not p.alive():
                continue
            if not p.signalled:
                p.signalled = True
                _signal(p.proc, sig)
        for p in self.all_procs():
            self.finish(p)

    def _write_log(self) -> None:
        from orchestrator.records import RACE_FILE

        if not self.race.jobs:
            return
        data = self.race.log_dict()
        data["max_alive"] = self.max_alive_seen
        data["group_limit"] = self.limit
        data["started_together"] = self.started_together
        data["stopped_by_signal"] = type(self.stop).__name__ if self.stop is not None else None
        try:
            path = self.sweep_dir / RACE_FILE
            path.write_text(json.dumps(data, indent=2, default=str))
        except OSError as e:
            log.error("could not write %s (%s)", self.sweep_dir / RACE_FILE, e)
