"""Racing a sweep's jobs (orchestrator/race.py): paired intervals, interleaved rounds, stopping, elimination.

The decision logic is tested with fake in-process workers first (pure, fast); then the job side over a real socket,
a waiting job's CPU, and the isolated launcher end to end.
"""
from __future__ import annotations

import math
import socket
import threading

import numpy as np
import pytest

from hydra_plugins.orchestrator_launcher import isolated_launcher
from orchestrator import race as R
from orchestrator import records, stats, verdict


# ---- fakes ------------------------------------------------------------------------------------------------------

class World:
    """A shared machine: a clock, per-round drift common to every job, per-job-round noise and disturbances."""

    def __init__(self, seed: int, sigma: float = 0.05, p_out: float = 0.05, drift=None):
        self.rng = np.random.default_rng(seed)
        self.sigma, self.p_out, self.drift = sigma, p_out, drift
        self.t = 0.0

    def throughput(self, speed: float, r: int) -> float:
        self.t += 1.0
        noise = math.exp(self.rng.normal(0.0, self.sigma)) if self.sigma else 1.0
        if self.p_out and self.rng.random() < self.p_out:
            noise *= 0.7  # another tenant woke up during this job's round
        return speed * (self.drift(r) if self.drift else 1.0) * noise


class FakeJob(R.RoundRunner):
    def __init__(self, world: World, speed: float):
        self.world, self.speed = world, speed
        self.stopped = None

    def time_round(self, r):
        start = self.world.t
        thr = self.world.throughput(self.speed, r)
        return thr, start, self.world.t

    def stop(self, message):
        self.stopped = message


def race_of(speeds, cfg=None, gates=None, world=None, seed=0):
    world = world or World(seed)
    race = R.Race(cfg or R.RaceConfig(seed=seed), clock=lambda: world.t)
    runners = {}
    for j, speed in enumerate(speeds):
        gate = (gates or {}).get(j, True)
        race.add(R.Contender(job=j, key="k", workload="w", baseline=(j == 0), gate=gate,
                             gate_reason="" if gate else "spearman 0.10 < 99% of 0.90"))
        runners[j] = FakeJob(world, speed)
    R.run_group(race, runners, list(runners))
    R.end_race(race, runners)
    return race, runners


# ---- the paired interval ----------------------------------------------------------------------------------------

def test_the_sign_interval_needs_six_values_and_covers_at_least_95_percent():
    assert stats.sign_rank(5) is None  # 2 * 0.5**5 = 6.25 % > 5 %
    assert stats.sign_rank(6) == 1
    for n in range(6, 41):
        k = stats.sign_rank(n)
        assert stats.sign_coverage(n, k) >= 0.95
        assert stats.sign_coverage(n, k + 1) < 0.95  # and it is the narrowest such interval
    s, low, high, n = stats.paired_speedup_interval({r: 2.0 * (1 + 0.01 * r) for r in range(1, 9)},
                                                    {r: 1.0 for r in range(1, 11)})
    assert n == 8 and low <= s <= high and 2.0 < low < high < 2.2
    assert stats.paired_speedup_interval({1: 1.0}, {2: 1.0}) is None
    assert stats.paired_speedup_interval({r: 1.0 for r in range(5)}, {r: 1.0 for r in range(5)})[1] is None


def test_calibration_identical_jobs_with_noise_and_drift_exclude_one_in_at_most_5_percent():
    """Identical jobs, round-level noise, disturbed rounds and slow drift common to both: through the project's own
    interval code, at fixed n and through the whole race at the default settings (adaptive stopping included)."""
    rng = np.random.default_rng(1)
    trials, excluded = 2000, 0
    for _ in range(trials):
        drift = np.exp(np.cumsum(rng.normal(0, 0.1, 6)))  # a random walk of the machine's speed
        a = drift * np.exp(rng.normal(0, 0.05, 6)) * np.where(rng.random(6) < 0.1, 0.7, 1.0)
        b = drift * np.exp(rng.normal(0, 0.05, 6)) * np.where(rng.random(6) < 0.1, 0.7, 1.0)
        _, low, high, _ = stats.paired_speedup_interval(dict(enumerate(a)), dict(enumerate(b)))
        excluded += not (low <= 1.0 <= high)
    assert excluded / trials <= 0.05

    false, races = 0, 600
    for seed in range(races):
        walk = np.exp(np.cumsum(np.random.default_rng(seed + 10_000).normal(0, 0.05, 40)))
        world = World(seed, sigma=0.05, p_out=0.05, drift=lambda r: walk[r] * (0.6 if r % 2 else 1.0))
        race, _ = race_of([1.0, 1.0], world=world, seed=seed)
        job = race.jobs[1]
        s = race.speedup(job)
        false += (s[1] is not None and not (s[1] <= 1.0 <= s[2])) or job.stopped.startswith("eliminated")
    assert false / races <= 0.05, false / races


def race_of_processes(speeds, process_sd, seed, processes=2, sigma=0.02):
    """A race whose jobs each run in ``processes`` processes, each process with a fixed speed effect of its own
    (log-normal, sd ``process_sd``) for its whole life, as two processes of one configuration have."""
    world = World(seed, sigma=sigma, p_out=0.0)
    rng = np.random.default_rng(seed + 50_000)
    race = R.Race(R.RaceConfig(seed=seed, processes=processes), clock=lambda: world.t)
    runners = {}
    for j, speed in enumerate(speeds):
        race.add(R.Contender(job=j, key="k", workload="w", baseline=(j == 0), gate=True))
        for p in range(processes):
            runner = FakeJob(world, speed * math.exp(rng.normal(0.0, process_sd)))
            runners[j if p == 0 else (j, p)] = runner
            race.add_process(j, p)
    R.run_group(race, runners, list(range(len(speeds))))
    R.end_race(race, runners)
    return race, runners


def test_process_replicas_put_the_spread_between_processes_into_the_interval():
    """Identical configurations whose processes differ by ~4 % for life (what was measured here between two
    processes of one job): intervals from the rounds alone exclude 1.0 far more often than 5 %, since more rounds
    cannot see a process's own speed; with two processes per job and the measured spread, at most 5 % do."""
    rounds_only = widened = 0
    trials = 200
    for seed in range(trials):
        race, runners = race_of_processes([1.0, 1.0, 1.0], process_sd=0.04, seed=seed)
        for job in (1, 2):
            c = race.jobs[job]
            assert sorted(c.per_process) == [0, 1]
            r = race.round_speedup(c)
            s = race.speedup(c)
            rounds_only += not (r[1] <= 1.0 <= r[2])
            widened += not (s[1] <= 1.0 <= s[2]) or c.stopped.startswith("eliminated")
            assert s[1] <= r[1] and s[2] >= r[2]
    assert rounds_only / (2 * trials) > 0.15, rounds_only
    assert widened / (2 * trials) <= 0.05, widened
    sd, dof = race.process_spread()
    assert dof == 3 and 0.0 < sd < 0.2
    # every process of a job told to stop, and its message carries what the summary widens with
    msg = runners[(1, 1)].stopped
    assert msg["outcome"]["processes"] == 2 and msg["outcome"]["process_dof"] >= 1
    assert sorted(msg["outcome"]["per_process"]) == ["0", "1"]


def race_with_lazy_extras(speeds, process_sd, seed, sigma=0.02, cfg=None):
    """As the launcher races: one process per job until Race.extras_round, then an extra process (a fixed speed
    effect of its own) for each job still racing. Returns the race, its runners and the (round, jobs) of each
    preparation."""
    world = World(seed, sigma=sigma, p_out=0.0)
    rng = np.random.default_rng(seed + 50_000)
    race = R.Race(cfg or R.RaceConfig(seed=seed), clock=lambda: world.t, lazy_extras=True)
    runners, prepared = {}, []
    for j, speed in enumerate(speeds):
        race.add(R.Contender(job=j, key="k", workload="w", baseline=(j == 0), gate=True))
        runners[j] = FakeJob(world, speed * math.exp(rng.normal(0.0, process_sd)))

    def add_extras(jobs):
        prepared.append((race.round, list(jobs)))
        for j in jobs:
            runners[(j, 1)] = FakeJob(world, speeds[j] * math.exp(rng.normal(0.0, process_sd)))
            race.add_process(j, 1)

    R.run_group(race, runners, list(range(len(speeds))), add_extras=add_extras)
    R.end_race(race, runners)
    return race, runners, prepared


def test_extra_processes_come_only_for_the_jobs_that_survive_the_first_rounds_that_can_eliminate():
    """A job 2.5x slower is eliminated at round 9 (the first look the 99.5 % sign test allows) with the prior
    spread, before any extra process is prepared; the others then get theirs and finish on the measured spread."""
    race, runners, prepared = race_with_lazy_extras([1.0, 1.05, 0.4], process_sd=0.03, seed=4)
    assert race.extras_round == 9
    assert prepared == [(9, [0, 1])]  # once, after round 9, for the jobs still racing
    slow = race.jobs[2]
    assert slow.stopped.startswith("eliminated at round 9: slower than job 1"), slow.stopped
    assert sorted(slow.per_process) == [0] and (2, 1) not in runners
    for job in (0, 1):
        c = race.jobs[job]
        assert sorted(c.per_process) == [0, 1]
        assert min(c.per_process[1]) == 10 and set(c.per_process[1]) <= set(c.per_process[0])
    # nothing stopped on its interval's width before it had a measured spread
    assert all(e["round"] >= 9 for e in race.events)
    sd, dof = race.process_spread()
    assert sd is not None and dof == 2
    msg = runners[(1, 1)].stopped
    # its rounds average over fewer than 2 processes in effect: process 0 alone weighs in every round before 10
    rounds = msg["outcome"]["rounds"]
    assert 1.0 < msg["outcome"]["processes"] < 2.0 and msg["outcome"]["process_dof"] == 2
    assert msg["outcome"]["processes"] == pytest.approx(rounds ** 2 / ((rounds - (rounds - 9) / 2) ** 2
                                                                      + ((rounds - 9) / 2) ** 2), abs=1e-3)
    # processes 15 % apart and noisy rounds: "more rounds cannot narrow it" waits for min_rounds rounds of every
    # process (a spread from 3 rounds still holds their noise: too large to stop on)
    noisy, _, _ = race_with_lazy_extras([1.0, 1.0, 1.0], process_sd=0.15, seed=3, sigma=0.08)
    for job in (1, 2):
        c = noisy.jobs[job]
        if "cannot narrow" in c.stopped:
            assert len(c.per_process[1]) >= noisy.cfg.min_rounds, c.stopped
    assert any("cannot narrow" in (c.stopped or "") for c in noisy.jobs.values())
    # max_rounds 6: the extras come after round 3, so the spread still gets three rounds
    short, _, prepared = race_with_lazy_extras([1.0, 1.0], 0.03, seed=1, cfg=R.RaceConfig(seed=1, max_rounds=6))
    assert short.extras_round == 3 and prepared == [(3, [0, 1])]


def test_lazy_extras_keep_identical_jobs_within_noise():
    """Identical configurations whose processes differ by ~4 % for life: the rounds before the extras are widened by
    the prior spread, the rest by the measured one; at most 5 % of intervals exclude 1.0 or eliminate."""
    trials, false = 150, 0
    for seed in range(trials):
        race, _, _ = race_with_lazy_extras([1.0, 1.0, 1.0], process_sd=0.04, seed=seed)
        for job in (1, 2):
            c = race.jobs[job]
            s = race.speedup(c)
            false += not (s[1] <= 1.0 <= s[2]) or c.stopped.startswith("eliminated")
    assert false / (2 * trials) <= 0.05, false


def test_rounds_stop_once_the_spread_between_processes_dominates():
    """Noisy rounds (8 %) and processes 15 % apart: the interval cannot get near +-5 % however many rounds run, so
    a job stops once its rounds' part is below the processes' part instead of running to max_rounds."""
    race, _ = race_of_processes([1.0, 1.0, 1.0], process_sd=0.15, seed=3, sigma=0.08)
    for job in (1, 2):
        c = race.jobs[job]
        assert len(c.throughputs) < race.cfg.max_rounds, c.stopped
        assert "spread between processes, which more rounds cannot narrow" in c.stopped
        s = race.speedup(c)
        assert s[1] <= 1.0 <= s[2]  # wide, and honest about it
    one, _ = race_of([1.0, 1.0, 1.0], world=World(3, sigma=0.08, p_out=0.0))  # one process: no such stop
    assert all("spread between processes" not in (c.stopped or "") for c in one.jobs.values())


def test_a_real_difference_still_shows_with_process_replicas():
    """Two jobs: the spread has two degrees of freedom (t = 4.3), the interval is wide, but 1.5x shows."""
    race, _ = race_of_processes([1.0, 1.5], process_sd=0.02, seed=7)
    s = race.speedup(race.jobs[1])
    assert stats.faster_beyond(s[1], 0.05) and s[1] <= 1.5 <= s[2]


def test_process_spread_and_widening_arithmetic():
    # two processes 10 % apart in every round: effects +-log(1.1)/2, sd log(1.1)/sqrt(2) with one degree of freedom
    a, b = {r: 110.0 for r in range(6)}, {r: 100.0 for r in range(6)}
    sd, dof = stats.process_spread([[a, b]])
    assert dof == 1 and sd == pytest.approx(math.log(1.1) / math.sqrt(2))
    assert stats.process_spread([[a]]) == (None, 0)  # one process: nothing measured
    point, low, high = stats.widen_for_processes(2.0, 1.9, 2.1, None, 0, 2, 2)
    assert (low, high) == (1.9, 2.1)  # nothing to widen with
    point, low, high = stats.widen_for_processes(2.0, 1.9, 2.1, 0.03, 10, 2, 2)
    q = 2.2281388519649385 * 0.03  # t(10) 97.5 % quantile x sd x sqrt(1/2 + 1/2)
    assert low == pytest.approx(2.0 * math.exp(-math.hypot(math.log(2.0 / 1.9), q)))
    assert high == pytest.approx(2.0 * math.exp(math.hypot(math.log(2.1 / 2.0), q)))
    # the summary widens a raced row's paired speedup with the spread its race measured
    base = {"race_rounds": {r: 100.0 for r in range(6)}, "race_processes": 2, "race_process_sd": 0.03,
            "race_process_dof": 10}
    row = {**base, "race_rounds": {r: 200.0 * (1 + 0.01 * (r % 3 - 1)) for r in range(6)}}
    s = verdict.paired(row, base)
    bare = stats.paired_speedup_interval(row["race_rounds"], base["race_rounds"])
    assert s[1] < bare[1] and s[2] > bare[2] and s[0] == bare[0]


def test_pairing_gives_the_right_answer_under_drift_where_unpaired_does_not():
    """The machine is twice as slow in odd rounds. Timed one after another, the baseline's rounds fell in slow
    periods and the job's in fast ones: the unpaired interval excludes the true 1.2x. Raced, the drift cancels."""
    true = 1.2
    slow = lambda r: 0.5 if r % 2 else 1.0  # noqa: E731
    world = World(3, sigma=0.02, p_out=0.0, drift=slow)
    race, _ = race_of([1.0, true], world=world)
    s, low, high, n = race.speedup(race.jobs[1])
    assert low <= true <= high and low > 1.0, (s, low, high)

    # sequential (race.mode=off): baseline 3 rounds during odd (slow) periods, then the job in even (fast) ones
    rng = np.random.default_rng(3)

    def rounds(speed, parity):
        return [([32] * 10, list(32 / (speed * slow(2 * k + parity) * np.exp(rng.normal(0, 0.02, 10)))))
                for k in range(3)]

    base, job = stats.throughput_interval(rounds(1.0, 1)), stats.throughput_interval(rounds(true, 0))
    unpaired = stats.speedup_interval(job, base)
    assert not (unpaired[1] <= true <= unpaired[2]), unpaired
    # and on the race's own rounds, treated as independent, the unpaired interval is far wider than the paired one
    thr = lambda c: [([1], [1.0 / t]) for t in c.throughputs.values()]  # noqa: E731
    wide = stats.speedup_interval(stats.throughput_interval(thr(race.jobs[1])),
                                  stats.throughput_interval(thr(race.jobs[0])))
    assert wide[2] / wide[1] > 2 * high / low


# ---- the coordinator ---------------------------------------------------------------------------------------------

def test_rounds_interleave_every_live_job_in_fresh_seeded_orders():
    race, _ = race_of([1.0, 1.0, 1.0], cfg=R.RaceConfig(min_rounds=6, max_rounds=8, target_halfwidth=1e-6))
    orders = [r["order"] for r in race.rounds]
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # a fresh order each round
    again, _ = race_of([1.0, 1.0, 1.0], cfg=R.RaceConfig(min_rounds=6, max_rounds=8, target_halfwidth=1e-6))
    assert [r["order"] for r in again.rounds] == orders  # seeded: the same seed, the same orders
    other, _ = race_of([1.0, 1.0, 1.0], cfg=R.RaceConfig(min_rounds=6, max_rounds=8, target_halfwidth=1e-6, seed=7))
    assert [r["order"] for r in other.rounds] != orders
    # round by round the jobs' timings alternate in time: every job's round r lies between rounds r-1 and r+1
    spans = {j: race.jobs[j].spans for j in range(3)}
    for r in range(2, len(orders)):
        assert max(spans[j][r - 1][1] for j in range(3)) <= min(spans[j][r][0] for j in range(3))
    log = race.log_dict()
    assert log["order_seed"] == 0 and [e["order"] for e in log["rounds"]] == orders


def test_a_clearly_slower_job_is_eliminated_early_and_told_why():
    race, runners = race_of([1.0, 2.0, 0.5], world=World(0, sigma=0.03, p_out=0.0))
    slow = race.jobs[2]
    assert slow.stopped.startswith("eliminated at round ") and slow.stopped.endswith(
        "slower than job 1 beyond noise")
    assert len(slow.throughputs) < race.cfg.max_rounds
    msg = runners[2].stopped
    assert msg["outcome"]["stopped"] == slow.stopped and msg["outcome"]["rounds"] == len(slow.throughputs)
    assert sorted(int(k) for k in msg["outcome"]["throughputs"]) == sorted(slow.throughputs)
    assert msg["metrics"]["race_rounds"] == len(slow.throughputs)
    assert msg["metrics"]["race_speedup_ci_high"] < 1.0
    # the reference is timed as long as anything is paired with it, then stopped
    assert race.jobs[0].stopped.startswith("reference of job(s) 1, 2")
    assert len(race.jobs[0].throughputs) == race.round


def test_a_gate_failing_job_is_not_timed_beyond_min_rounds_even_when_fastest():
    race, _ = race_of([1.0, 3.0, 1.1], gates={1: False}, world=World(1, sigma=0.08))
    fast = race.jobs[1]
    assert len(fast.throughputs) == race.cfg.min_rounds
    assert fast.stopped == "gate failed (spearman 0.10 < 99% of 0.90): timed only min_rounds (6)"
    # it was never the leader: job 2 is not "slower than job 1"
    assert "job 1" not in (race.jobs[2].stopped or "")


def test_stopping_reasons_target_max_rounds_and_budget():
    quiet, _ = race_of([1.0, 1.5], world=World(0, sigma=0.002, p_out=0.0))
    assert quiet.jobs[1].stopped.startswith("target half-width reached at round 7")  # 98 %: 7 rounds
    assert quiet.stop_reason().startswith("every job decided")

    noisy, _ = race_of([1.0, 1.0], cfg=R.RaceConfig(max_rounds=8), world=World(0, sigma=0.3, p_out=0.0))
    assert noisy.jobs[1].stopped == "max_rounds (8) reached" and len(noisy.jobs[1].throughputs) == 8
    assert noisy.stop_reason().startswith("max_rounds (8)")

    # budget: each fake round costs 1 s of the fake clock; min_rounds is timed regardless
    short, _ = race_of([1.0, 1.0, 1.0], cfg=R.RaceConfig(budget_s=5), world=World(0, sigma=0.3, p_out=0.0))
    assert all(short.jobs[j].stopped == "budget_s (5 s) spent at round 6" for j in (1, 2))
    assert short.stop_reason() == "budget_s (5 s) spent"


def test_jobs_race_in_groups_and_the_reference_runs_in_every_group():
    world = World(0, sigma=0.01, p_out=0.0)
    race = R.Race(R.RaceConfig(), clock=lambda: world.t)
    runners = {j: FakeJob(world, s) for j, s in enumerate([1.0, 1.2, 1.4, 0.9])}
    for j in runners:
        race.add(R.Contender(job=j, key="k", workload="w", baseline=(j == 0), gate=True))
    R.run_group(race, runners, [0, 1])
    first = race.round
    assert race.jobs[0].live and not race.jobs[1].live
    R.run_group(race, runners, [2, 3])
    R.end_race(race, runners)
    assert race.groups == [[0, 1], [0, 2, 3]]
    assert min(race.jobs[2].throughputs) == first + 1  # rounds number on across groups
    assert set(race.jobs[0].throughputs) == set(range(1, race.round + 1))
    assert race.speedup(race.jobs[2])[1] > 1.3  # paired with the reference's rounds of its own group


def test_a_job_that_ends_on_its_own_leaves_the_race():
    class Dies(FakeJob):
        def time_round(self, r):
            return None if r == 3 else super().time_round(r)

    world = World(0)
    race = R.Race(R.RaceConfig(), clock=lambda: world.t)
    runners = {0: FakeJob(world, 1.0), 1: Dies(world, 1.0), 2: FakeJob(world, 1.5)}
    for j in runners:
        race.add(R.Contender(job=j, key="k", workload="w", baseline=(j == 0), gate=True))
    R.run_group(race, runners, list(runners))
    assert race.jobs[1].stopped == "its process ended" and race.jobs[1].stopped_round == 3
    assert runners[1].stopped is None  # nothing is sent to a job that is gone


def test_race_settings_are_checked_in_one_line():
    from orchestrator.errors import ConfigError

    R.check_config(R.RaceConfig())
    for bad, words in (({"mode": "maybe"}, "race.mode='maybe' is not valid; valid: on, off"),
                       ({"min_rounds": 3}, "race.min_rounds=3 must be >= 6"),
                       ({"max_rounds": 5}, "race.max_rounds=5 must be >= race.min_rounds=6"),
                       ({"target_halfwidth": 0}, "race.target_halfwidth=0 must be > 0"),
                       ({"max_alive": 3}, "race.max_alive=3 must be >= 4 (a job and its reference, "
                                          "race.processes=2 process(es) each)"),
                       ({"processes": 0}, "race.processes=0 is not valid; valid: 1 to 8"),
                       ({"round_s": -1}, "race.round_s=-1 must be >= 0"),
                       ({"warmup": -1}, "race.warmup=-1 must be >= 0 (untimed batches before each round), or null")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            R.check_config({**vars(R.RaceConfig()), **bad})


# ---- the job side -------------------------------------------------------------------------------------------------

class Runtime:
    warmup, min_iterations, min_duration_s, max_iterations, seed = 1, 3, 0.0, None, 0


def _batches(n=4):
    import torch

    from orchestrator.measure import Batch

    return [Batch([i], {"x": torch.ones(1, 2) * i}) for i in range(n)]


def test_the_worker_serves_rounds_until_stop_and_reports_the_race():
    ours, theirs = socket.socketpair()
    worker = R.RaceWorker(ours)
    calls = []
    got = {}

    def launcher():
        f = theirs.makefile("rb")
        got["ready"] = R.json.loads(f.readline())
        for r in (4, 5):
            theirs.sendall(b'{"cmd": "round", "round": %d}\n' % r)
            got[r] = R.json.loads(f.readline())
        theirs.sendall(R.json.dumps({"cmd": "stop", "outcome": {"stopped": "max_rounds", "rounds": 2},
                                     "metrics": {"race_rounds": 2}, "paired": {"4": 1.1, "5": 0.9}}).encode()
                       + b"\n")

    t = threading.Thread(target=launcher)
    t.start()
    worker.ready({"job": 3, "status": "ok"})
    timing = worker.timing(lambda inputs: calls.append(inputs) or inputs["x"], _batches(), Runtime)
    t.join()
    assert got["ready"] == {"type": "ready", "job": 3, "status": "ok"}
    assert got[4]["type"] == "round" and got[4]["round"] == 4 and got[4]["throughput"] > 0
    assert got[4]["iterations"] == 3 and got[4]["start"] <= got[4]["end"] <= got[5]["start"]
    assert sorted(set(timing.round_ids)) == [4, 5] and len(timing.latencies_s) == 6
    assert len(calls) == 8  # each round: 1 untimed warm-up + 3 timed
    assert worker.outcome == {"stopped": "max_rounds", "rounds": 2}
    assert worker.metrics() == {"race_rounds": 2.0}
    assert worker.history() == {"paired_ratio": {4: 1.1, 5: 0.9}}
    worker.abort("late")  # harmless after the race


def test_a_stopped_job_holds_until_released_so_its_recording_runs_beside_no_timed_round():
    """The launcher stops a job with hold: its timing pass returns (and the job records its run) only once the
    launcher says finish, after the group's rounds; a launcher gone meanwhile releases it too."""
    import time

    for release in (b'{"cmd": "finish"}\n', None):
        ours, theirs = socket.socketpair()
        worker = R.RaceWorker(ours)
        sent = {}

        def launcher():
            f = theirs.makefile("rb")
            f.readline()  # ready
            theirs.sendall(b'{"cmd": "round", "round": 1}\n')
            f.readline()
            theirs.sendall(R.json.dumps({"cmd": "stop", "hold": True, "outcome": {"stopped": "eliminated"}}).encode()
                           + b"\n")
            time.sleep(0.3)
            sent["at"] = time.monotonic()
            if release:
                theirs.sendall(release)
            else:
                theirs.close()

        t = threading.Thread(target=launcher)
        t.start()
        worker.ready({"job": 1, "status": "ok"})
        timing = worker.timing(lambda inputs: inputs["x"], _batches(), Runtime)
        returned = time.monotonic()
        t.join()
        assert returned >= sent["at"], "the job went on to record its run while held"
        assert worker.outcome == {"stopped": "eliminated"} and sorted(set(timing.round_ids)) == [1]


def test_a_round_lasts_race_round_s_shared_by_the_jobs_processes():
    import time

    def serve(worker, round_s):
        ours, theirs = worker._sock, worker._peer
        f = theirs.makefile("rb")
        t = threading.Thread(target=lambda: worker.timing(lambda inputs: time.sleep(0.01), _batches(), Runtime,
                                                          round_s))
        t.start()
        theirs.sendall(b'{"cmd": "round", "round": 1}\n')
        got = R.json.loads(f.readline())
        theirs.sendall(b'{"cmd": "stop", "outcome": {}}\n')
        t.join()
        return got

    def worker(process=0, processes=1):
        ours, theirs = socket.socketpair()
        w = R.RaceWorker(ours, process, processes)
        w._peer = theirs
        return w

    # runtime.min_duration_s is 0 here: the round's length is race.round_s's, halved for each of two processes
    one = serve(worker(), 0.2)
    assert one["end"] - one["start"] >= 0.2
    half = serve(worker(1, 2), 0.2)
    assert half["end"] - half["start"] >= 0.1
    assert serve(worker(), None)["iterations"] == Runtime.min_iterations  # null: runtime.min_duration_s (0)


def test_a_round_is_paired_over_the_batches_every_unit_timed():
    """A slow job stops after runtime.min_iterations batches of the round's order, a fast one fills race.round_s
    with passes over all of them: their raw rows/s mixed different batches. What a round reports is rows/s over the
    order's first min_iterations batches (each at its mean time in the round), the same batches for both."""
    import time

    def unit(factor, round_s, r):
        ours, theirs = socket.socketpair()
        worker = R.RaceWorker(ours)
        f = theirs.makefile("rb")
        box = {}
        # batch k takes (k + 1) x 25 ms x factor: four lengths, as length-sorted batches do (long enough that a
        # loaded machine's few ms of late wake-up stay small beside them)
        t = threading.Thread(target=lambda: box.setdefault("timing", worker.timing(
            lambda inputs: time.sleep(0.025 * factor * (1 + float(inputs["x"][0, 0]))), _batches(), Runtime,
            round_s)))
        t.start()
        theirs.sendall(f'{{"cmd": "round", "round": {r}}}\n'.encode())
        got = R.json.loads(f.readline())
        theirs.sendall(b'{"cmd": "stop", "outcome": {}}\n')
        t.join()
        return got, box["timing"]

    from orchestrator import measure

    # a round whose order leaves the longest batch out of the slow job's three: raw rows/s favour it most
    r = next(r for r in range(1, 50) if measure.timing_order(4, r)[Runtime.min_iterations:] == [3])
    slow, slow_t = unit(2.0, 0.0, r)
    fast, fast_t = unit(1.0, 1.0, r)
    assert slow["iterations"] == Runtime.min_iterations and fast["iterations"] > 4 * Runtime.min_iterations
    raw = stats.round_throughputs([(fast_t.batch_rows, fast_t.latencies_s), (slow_t.batch_rows, slow_t.latencies_s)])
    assert raw[0] / raw[1] < 1.8  # the true 2x, understated by 15 %: the slow job skipped the longest batch
    assert fast["throughput"] / slow["throughput"] == pytest.approx(2.0, rel=0.1)


def test_matched_throughput_weighs_the_common_batches_at_their_mean_times():
    ids, rows, secs = [2, 0, 1, 2, 0, 1, 2], [4, 1, 2, 4, 1, 2, 4], [0.4, 0.1, 0.2, 0.6, 0.3, 0.2, 0.5]
    # the first three of the order: batches 2, 0, 1 at their means 0.5, 0.2, 0.2
    assert stats.matched_throughput(ids, rows, secs, 3) == pytest.approx(7 / 0.9)
    assert stats.matched_throughput(ids, rows, secs, 1) == pytest.approx(4 / 0.5)
    assert stats.matched_throughput(ids[:2], rows[:2], secs[:2], 5) == pytest.approx(5 / 0.5)  # fewer timed
    assert stats.matched_throughput([], [], [], 3) == 0.0


def test_an_extra_process_sees_every_batch_once_before_its_first_timed_round():
    """An extra process ran no accuracy pass: its first round starts with an untimed pass over every batch (each
    shape built once), later rounds with runtime.warmup batches only; the job's own process is unchanged."""
    def calls_per_round(process, processes, rounds=2):
        ours, theirs = socket.socketpair()
        worker, seen = R.RaceWorker(ours, process, processes), []
        f = theirs.makefile("rb")
        t = threading.Thread(target=lambda: worker.timing(lambda inputs: seen.append(1), _batches(8), Runtime, 0.0))
        t.start()
        counts = []
        for r in range(1, rounds + 1):
            before = len(seen)
            theirs.sendall(f'{{"cmd": "round", "round": {r}}}\n'.encode())
            got = R.json.loads(f.readline())
            counts.append((len(seen) - before, got["iterations"]))
        theirs.sendall(b'{"cmd": "stop", "outcome": {}}\n')
        t.join()
        return counts

    timed = -(-Runtime.min_iterations // 2)
    assert calls_per_round(1, 2) == [(8 + timed, timed), (Runtime.warmup + timed, timed)]
    assert calls_per_round(0, 2) == [(Runtime.warmup + timed, timed)] * 2


def test_a_round_warms_up_on_the_shortest_batch_untimed():
    """race.warmup: each round starts with that many untimed runs of the cheapest batch (the process waited for
    its turn; any forward pass brings caches and threads back); an extra process's first round still sees every
    batch once; null keeps runtime.warmup batches of the round's order."""
    import torch

    from orchestrator import measure
    from orchestrator.measure import Batch

    widths = [9, 3, 7, 5]  # batch 1 is the shortest
    batches = [Batch([i], {"input_ids": torch.zeros(2, w, dtype=torch.long)}) for i, w in enumerate(widths)]

    def rounds(warmup, process=0, processes=1, n=2):
        ours, theirs = socket.socketpair()
        worker, seen = R.RaceWorker(ours, process, processes), []
        f = theirs.makefile("rb")
        t = threading.Thread(target=lambda: worker.timing(lambda inputs: seen.append(inputs["input_ids"].shape[1]),
                                                          batches, Runtime, 0.0, warmup=warmup))
        t.start()
        got = []
        for r in range(1, n + 1):
            before = len(seen)
            theirs.sendall(f'{{"cmd": "round", "round": {r}}}\n'.encode())
            timed = R.json.loads(f.readline())["iterations"]
            got.append(seen[before:len(seen) - timed])  # what ran untimed before the timed batches
        theirs.sendall(b'{"cmd": "stop", "outcome": {}}\n')
        t.join()
        return got

    assert rounds(1) == [[3], [3]] and rounds(2) == [[3, 3], [3, 3]] and rounds(0) == [[], []]
    first, second = rounds(1, process=1, processes=2)
    assert sorted(first) == sorted(widths) and second == [3]
    old = rounds(None)  # runtime.warmup (1) batches of each round's order
    assert [len(w) for w in old] == [Runtime.warmup] * 2
    assert old[0] == [widths[measure.timing_order(len(widths), 1)[0]]]


def test_abort_is_harmless_without_a_launcher_and_a_lost_launcher_is_one_error():
    ours, theirs = socket.socketpair()
    worker = R.RaceWorker(ours)
    theirs.close()
    worker.abort("failed before ready")  # the other end is gone: no error
    ours2, theirs2 = socket.socketpair()
    theirs2.close()
    with pytest.raises(R.RaceLost, match="the sweep process that races this job is gone"):
        R.RaceWorker(ours2).timing(lambda x: x, _batches(), Runtime)


def test_worker_from_env_is_none_unless_the_launcher_set_a_socket(monkeypatch):
    monkeypatch.delenv(R.RACE_FD_ENV, raising=False)
    assert R.worker_from_env() is None
    ours, theirs = socket.socketpair()
    monkeypatch.setenv(R.RACE_FD_ENV, str(ours.detach()))
    worker = R.worker_from_env()
    assert isinstance(worker, R.RaceWorker)
    import os

    assert R.RACE_FD_ENV not in os.environ  # nothing this job starts thinks it is raced
    worker.abort("x")
    assert b"abort" in theirs.recv(100)


def test_a_job_started_ahead_waits_for_its_turn_then_reads_on():
    """wait_turn: says "started", blocks until "prepare", and the job's next message is read intact after it."""
    import json
    import time

    ours, theirs = socket.socketpair()
    worker = R.RaceWorker(ours)
    waiter = threading.Thread(target=worker.wait_turn)
    waiter.start()
    assert json.loads(theirs.makefile("rb").readline()) == {"type": "started"}
    time.sleep(0.3)
    assert waiter.is_alive()  # its turn has not come
    theirs.sendall(b'{"cmd": "prepare"}\n{"cmd": "stop", "outcome": {"stopped": "x"}}\n')
    waiter.join(10)
    assert not waiter.is_alive()
    assert worker._recv() == {"cmd": "stop", "outcome": {"stopped": "x"}}
    theirs.close()
    with pytest.raises(R.RaceLost, match="gone"):  # its launcher died while it waited
        R.RaceWorker(socket.socketpair()[0]).wait_turn()


ENDED_WHILE_WAITING = r'''
import os, signal, socket, sys
from pathlib import Path
from orchestrator import race, runner
from orchestrator.interrupts import restore_sigint
restore_sigint()  # as the job's process does: pytest may run with SIGINT ignored (started in the background)
run_dir = Path(sys.argv[1])
(run_dir / ".hydra").mkdir(parents=True)
(run_dir / ".hydra" / "config.yaml").write_text("x: 1")
(run_dir / "cli.log").write_text("")
runner._wait_for_turn(race.RaceWorker(socket.socket(fileno=int(sys.argv[2]))), run_dir)
'''


@pytest.mark.parametrize("how, code", [("sigterm", 143), ("sigint", 130), ("launcher gone", 1)])
def test_a_job_ended_while_it_waits_for_its_turn_leaves_nothing(tmp_path, how, code):
    """A raced job waits for its turn after its start-up (Hydra made its folder) and before its MLflow run exists.
    Ended then — dropped from a full group (SIGTERM; started again later in the same folder), the sweep stopped,
    Ctrl-C, its launcher gone — it exits with the signal's status and its folder holds nothing of it."""
    import signal
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    run_dir = tmp_path / "3"
    proc = subprocess.Popen([sys.executable, "-c", ENDED_WHILE_WAITING, str(run_dir), str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE, text=True)
    theirs.close()
    assert ours.makefile("rb").readline() == b'{"type": "started"}\n'
    if how == "launcher gone":
        ours.close()
    else:
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert not (run_dir / ".hydra").exists() and not (run_dir / "cli.log").exists()
    assert not (run_dir / "results.json").exists()
    if how == "launcher gone":
        assert err.strip().splitlines() == ["error: the sweep process that races this job is gone"]
    else:
        assert "Traceback" not in err


# ---- a waiting job's CPU -----------------------------------------------------------------------------------------

WAITING_JOB = r'''
import sys, torch
from orchestrator import measure, race
torch.set_num_threads(2)  # OpenMP (libgomp) worker threads: their spin-wait after a parallel region counts
w = torch.randn(256, 256)
def step(inputs):
    with torch.inference_mode():
        return (inputs["x"] @ w).relu() @ w
batches = [measure.Batch(list(range(32)), {"x": torch.randn(32, 256)}) for _ in range(4)]
class Runtime:
    warmup, min_iterations, min_duration_s, max_iterations, seed = 2, 20, 0.3, None, 0
worker = race.worker_from_env()
with measure.PeakRSS():  # as in the runner: its sampling thread runs while the job waits
    worker.ready({"job": 0, "status": "ok"})
    worker.timing(step, batches, Runtime)
'''


def test_a_waiting_job_takes_no_cpu():
    """Between its rounds a raced job blocks in recv(): < 1 % of wall in CPU time, OpenMP threads included
    (libgomp's default spin-wait is short; OMP_WAIT_POLICY=ACTIVE would spin for the whole wait)."""
    import json
    import os
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO

    ours, theirs = socket.socketpair()
    env = {**os.environ, R.RACE_FD_ENV: str(theirs.fileno())}
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.Popen([sys.executable, "-c", WAITING_JOB], env=env, pass_fds=(theirs.fileno(),), cwd=REPO)
    theirs.close()
    try:
        f = ours.makefile("rb")
        assert json.loads(f.readline())["type"] == "ready"
        job = psutil.Process(proc.pid)
        shares = []
        for r in (1, 2):
            ours.sendall(b'{"cmd": "round", "round": %d}\n' % r)
            assert json.loads(f.readline())["round"] == r
            cpu0, t0 = sum(job.cpu_times()[:2]), time.monotonic()
            time.sleep(3.0)
            shares.append((sum(job.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0))
        assert max(shares) < 0.01, shares
        ours.sendall(json.dumps({"cmd": "stop", "outcome": {"stopped": "test"}, "metrics": {}}).encode() + b"\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- end to end: the isolated launcher races real jobs --------------------------------------------------------------

def _spans_alternate(log):
    """Every job's round r starts after every job's round r-1 ended: the rounds interleave the jobs in time."""
    rounds = log["rounds"]
    for prev, cur in zip(rounds, rounds[1:]):
        assert max(s[1] for s in prev["spans"].values()) <= min(s[0] for s in cur["spans"].values())
    return True


@pytest.mark.slow  # eight job processes through the CLI (the race's logic is tested fast above, in simulation)
def test_the_isolated_launcher_races_three_jobs_in_interleaved_rounds(tmp_path, tiny_encoder, sts_file):
    """Four jobs, two processes each (race.processes=2, the default), at most six processes alive: two groups."""
    import json

    from mlflow.tracking import MlflowClient

    from conftest import mlflow_store, run_cli

    uri = mlflow_store(tmp_path / "store.db")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                   "optimization=[],[jit]", "runtime.batch_size=8,16", f"tracking.uri={uri}",
                   "race.max_alive=6", "race.max_rounds=6", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
                   timeout=900)
    out = proc.stdout + proc.stderr
    assert "raced in interleaved timing rounds" in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    log = json.loads((sweep_dir / records.RACE_FILE).read_text())
    assert sorted(log["jobs"]) == ["0", "1", "2", "3"] and log["order_seed"] == 0
    assert _spans_alternate(log)
    assert len({tuple(r["order"]) for r in log["rounds"]}) > 1  # fresh orders
    # each batch size pairs with its own eager fp32 job
    assert log["jobs"]["1"]["reference_job"] == 1 and log["jobs"]["3"]["reference_job"] == 1
    assert log["jobs"]["2"]["reference_job"] == 0
    for job in log["jobs"].values():
        assert 6 <= job["rounds"] and job["stopped"]
    # six processes at most: the eager fp32 jobs (prepared first) and job 2, then job 3 with the references
    assert log["groups"] == [[0, 1, 2], [0, 1, 3]] and log["max_alive"] == 6
    # processes start two at a time (their imports side by side, one per core), unless the next job would not fit
    # race.max_alive: job 3 races in the next group
    assert log["started_together"] == {1: [[0], [1], [2], [3]], 2: [[0, 1], [2], [3]]}.get(
        isolated_launcher.START_AHEAD, [[0, 1, 2], [3]])
    # every job timed in two processes, the extra one from its fourth round on (lazy extras: max_rounds 6 puts
    # them after round 3), interleaved with the other jobs' processes
    for job in log["jobs"].values():
        assert sorted(job["per_process"]) == ["0", "1"]
        own = sorted(map(int, job["per_process"]["0"]))
        assert set(job["per_process"]["0"]) == set(job["throughputs"])
        assert sorted(map(int, job["per_process"]["1"])) == own[3:], job
    assert any(r["units"] != [[j, p] for j in r["order"] for p in (0, 1)] for r in log["rounds"])
    assert log["process_sd"] is not None and log["process_dof"] == 4
    assert not list(sweep_dir.glob(".isolated-*"))  # the extra processes' folders are gone
    assert min(map(int, log["jobs"]["3"]["throughputs"])) > max(map(int, log["jobs"]["2"]["throughputs"]))
    # job 3 pairs with job 1 (batch size 16), timed in its rounds; job 0 has nothing left to pair with
    assert set(log["jobs"]["1"]["throughputs"]) >= set(log["jobs"]["3"]["throughputs"])
    assert not set(log["jobs"]["0"]["throughputs"]) & set(log["jobs"]["3"]["throughputs"])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])
    children = {r.data.tags["job_num"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert sorted(children) == ["0", "1", "2", "3"]  # the extra processes record no run
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    assert parent.data.tags["race.processes"].startswith("2 processes per job; spread between processes ")
    for num, run in children.items():
        assert run.info.status == "FINISHED", (num, run.data.tags.get("error"))
        history = client.get_metric_history(run.info.run_id, "round_throughput")
        assert sorted(m.step for m in history) == sorted(int(k) for k in log["jobs"][num]["throughputs"])
        res = json.loads((sweep_dir / num / "results.json").read_text())
        assert res["race"]["stopped"] == log["jobs"][num]["stopped"]
        assert res["metrics"]["race_rounds"] == log["jobs"][num]["rounds"]
        # in effect: its own process weighs alone in its first three rounds
        assert 1.0 < res["metrics"]["race_processes"] < 2.0
    # the speedup's interval holds the process-level spread: wider than the rounds alone give
    res = json.loads((sweep_dir / "2" / "results.json").read_text())
    rounds = stats.paired_speedup_interval(log["jobs"]["2"]["throughputs"] and
                                           {int(k): v for k, v in log["jobs"]["2"]["throughputs"].items()},
                                           {int(k): v for k, v in log["jobs"]["0"]["throughputs"].items()})
    m = res["metrics"]
    assert m["race_speedup_ci_low"] < rounds[1] and m["race_speedup_ci_high"] > rounds[2]


@pytest.mark.slow
def test_killing_the_sweep_ends_its_waiting_jobs(tmp_path, tiny_encoder, sts_file):
    """kill -9 of the sweep process: its jobs (own sessions, one waiting for its round, one in a long round) get the
    parent-death signal and end; none runs on as an orphan."""
    import time

    import psutil

    from conftest import descendants_running, mlflow_store, start_cli

    uri = mlflow_store(tmp_path / "store.db")
    proc = start_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                     "runtime.max_iterations=null", "runtime.min_duration_s=600", "race.round_s=null", "optimization=[],[jit]",
                     f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    deadline = time.time() + 300
    jobs = []
    while time.time() < deadline and proc.poll() is None:
        jobs = descendants_running(proc.pid, "hydra_plugins.orchestrator_launcher._job")
        if len(jobs) == 2 and (tmp_path / "sweep" / "1" / "decisions.json").exists():
            break
        time.sleep(0.5)
    # two jobs, one process each in the first rounds (their extra processes come after round 9): one timing, one
    # waiting
    assert len(jobs) == 2, "both jobs' processes should be alive (one timing, the other waiting)"
    time.sleep(2)
    proc.kill()
    proc.wait(30)
    gone, alive = psutil.wait_procs(jobs, timeout=120)
    assert not alive, [p.pid for p in alive]


# ---- the verdict on raced rows --------------------------------------------------------------------------------------

def _rows(rounds_by_job, thr_half=None):
    from orchestrator.tasks.text_classification import TextClassification  # noqa: F401 (the task the rows use)

    rows = []
    for job, (stack, rounds) in rounds_by_job.items():
        thr = float(np.median(list(rounds.values())))
        half = thr_half if thr_half is not None else 0.3 * thr
        rows.append({"job": job, "stack": stack, "precision": "fp32", "status": "FINISHED", "metric": "accuracy",
                     "value": 80.0, "throughput": thr, "throughput_ci_low": thr - half,
                     "throughput_ci_high": thr + half, "task": "text_classification", "workload": "w",
                     "baseline_key": "b", "race_rounds": {str(k): v for k, v in rounds.items()}})
    return rows


def _assess(rows):
    from orchestrator import verdict
    from orchestrator.tasks.text_classification import TextClassification

    verdict.assess(rows, 0.99, 0.95, lambda t: TextClassification, lambda r: None)
    return verdict.recommend(rows), {r["job"]: r for r in rows}


def test_raced_rows_get_paired_speedups_and_the_runner_up_is_named():
    drift = {r: (0.5 if r % 2 else 1.0) * (1 + 0.01 * (r % 3)) for r in range(1, 11)}  # the machine, per round
    base = {r: 100.0 * d for r, d in drift.items()}
    line, by = _assess(_rows({0: ("eager", base), 1: ("jit", {r: 1.5 * v for r, v in base.items()}),
                              2: ("ipex", {r: 1.2 * v * (1.001 if r % 2 else 0.999) for r, v in base.items()})}))
    assert by[1]["speedup_method"] == "paired" and by[1]["speedup"] == pytest.approx(1.5)
    assert 1.4 < by[1]["speedup_ci_low"] <= 1.5 <= by[1]["speedup_ci_high"] < 1.6  # drift cancelled
    assert line.startswith("recommended: job 1 (jit/fp32): 1.50x [95% ")
    assert "beats the runner-up job 2 (ipex/fp32) by 1.25x [95% " in line and "paired]" in line

    # a tie: the runner-up within noise of the winner
    tie = {r: v * (1.02 if r % 2 else 0.99) for r, v in base.items()}
    line, _ = _assess(_rows({0: ("eager", base), 1: ("jit", {r: 1.5 * v for r, v in base.items()}),
                             2: ("ipex", {r: 1.5 * v for r, v in tie.items()})}))
    assert "is a tie within noise" in line and "choose between them by other criteria (memory, apply time)" in line
    assert "margin" not in line  # its interval spans 1.0: noise alone makes it a tie

    # an interval that excludes 1.0 but not the summary.min_effect band: a tie, and the line says by which rule
    rows = _rows({0: ("eager", base), 1: ("jit", {r: 1.5 * v for r, v in base.items()}),
                  2: ("ipex", {r: 1.5 / 1.03 * v * (1.001 if r % 2 else 0.999) for r, v in base.items()})})
    _assess(rows)
    said = verdict.runner_up(rows[1], rows, 0.05)
    assert said.startswith("; the runner-up job 2 (ipex/fp32) is a tie within noise (1.03x [95% 1.0")
    assert "; not beyond the 5% margin, summary.min_effect): choose between them" in said, said

    # the recommended job beaten beyond noise by a rival (one whose own speedup was undecided) is no tie
    rows = _rows({0: ("eager", base), 1: ("jit", {r: 1.5 * v for r, v in base.items()}),
                  2: ("ipex", {r: 1.8 * v for r, v in base.items()})})
    _assess(rows)
    said = verdict.runner_up(rows[1], rows)
    assert said.startswith("; but job 2 (ipex/fp32) is faster than it by 1.20x [95% ") and "tie" not in said

    # unraced rows keep today's unpaired interval
    rows = _rows({0: ("eager", base), 1: ("jit", {r: 1.5 * v for r, v in base.items()})})
    for r in rows:
        r.pop("race_rounds")
    _, by = _assess(rows)
    assert by[1]["speedup_method"] == "unpaired"


def test_a_difference_inside_min_effect_is_within_noise():
    """Two processes of one configuration differ by a few percent that paired rounds cannot see (A/A on the quiet
    Xeon: 1.035x [1.005-1.077]); summary.min_effect is the band an interval must clear."""
    assert stats.within_noise(1.005, 1.077, 0.05) and not stats.within_noise(1.005, 1.077)
    assert not stats.within_noise(1.06, 1.2, 0.05) and not stats.within_noise(0.80, 0.95, 0.05)
    assert stats.within_noise(0.80, 0.96, 0.05)  # 0.96 > 1 / 1.05
    base = {r: 100.0 * (1 + 0.01 * (r % 3)) for r in range(1, 11)}
    rows = _rows({0: ("eager", base), 1: ("jit", {r: v * (1.035 + 0.004 * (r % 2)) for r, v in base.items()})})
    verdict.assess(rows, 0.99, 0.95, lambda t: __import__(
        "orchestrator.tasks.text_classification", fromlist=["x"]).TextClassification, lambda r: None, 0.05)
    assert rows[1]["speedup_ci_low"] > 1.0 and rows[1]["noise"] == "within noise"
    assert verdict.recommend(rows, 0.05).startswith("no recommendation: nothing beat eager fp32 beyond noise")
    assert verdict.recommend(rows).startswith("recommended: job 1 (jit/fp32)")  # without the band: "faster"


def test_no_recommendation_from_an_interval_wider_than_2x_either_way():
    rng = np.random.default_rng(0)
    base = {r: 100.0 for r in range(1, 7)}
    wild = {r: 100.0 * float(np.exp(rng.normal(2.0, 1.5))) for r in range(1, 7)}
    wild.update({1: 300.0, 2: 20000.0})
    line, by = _assess(_rows({0: ("eager", base), 1: ("jit", wild)}))
    assert by[1]["speedup_ci_low"] > 1.0  # beyond noise, but by how much is anyone's guess
    assert line.startswith("no recommendation: job 1 (jit/fp32) is the fastest that passes the gate but its "
                           "speedup ") and "spans more than 2x either way" in line


def _start_race(tmp_path, tiny_encoder, sts_file, *extra):
    from conftest import mlflow_store, start_cli

    uri = mlflow_store(tmp_path / "store.db")
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # the store exists before anything polls it
    proc = start_cli("-m", f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}", "runtime=quick",
                     "runtime.max_iterations=null", "race.round_s=null", f"tracking.uri={uri}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     *extra, cwd=tmp_path)
    return proc, uri


def _wait_for_round(tmp_path, proc, seconds=300):
    """Until the race has started (job 1 prepared, then round 1 under way)."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if (tmp_path / "sweep" / "1" / "decisions.json").exists():
            time.sleep(6)  # job 1 is ready; the quick job's round is over, job 0 is in its long round
            return
        time.sleep(0.5)
    raise AssertionError("the race did not start")


def _children(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])
    return {r.data.tags["job_num"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}


@pytest.mark.slow
def test_ctrl_c_in_a_race_ends_the_job_being_timed_and_the_race_goes_on(tmp_path, tiny_encoder, sts_file):
    import json
    import signal

    from conftest import finish

    # job 0 times 600 s rounds, job 1 quick ones: both eager fp32 of different settings, each its own reference;
    # one process each, so that job 1's readiness means the race has begun (an extra process would prepare next)
    proc, uri = _start_race(tmp_path, tiny_encoder, sts_file, "runtime.min_duration_s=600,0", "race.processes=1")
    _wait_for_round(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    done = finish(proc, 600)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]  # one job did not finish
    assert "Ctrl-C: ending job 0 (KILLED)" in out
    runs = _children(uri)
    assert runs["0"].info.status == "KILLED" and runs["1"].info.status == "FINISHED"
    log = json.loads((tmp_path / "sweep" / records.RACE_FILE).read_text())
    assert log["jobs"]["0"]["stopped"].startswith("failed:") and log["jobs"]["1"]["rounds"] >= 6


@pytest.mark.slow
def test_sigterm_in_a_race_ends_every_job_killed(tmp_path, tiny_encoder, sts_file):
    import json
    import signal

    from conftest import finish

    proc, uri = _start_race(tmp_path, tiny_encoder, sts_file, "runtime.min_duration_s=600,0")
    _wait_for_round(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    done = finish(proc, 600)
    assert done.returncode != 0
    assert "SIGTERM: ending the sweep's jobs (KILLED)" in done.stdout + done.stderr
    runs = _children(uri)
    assert sorted(r.info.status for r in runs.values()) == ["KILLED", "KILLED"]
    # the rounds a job had served are recorded (run and results.json), said to be partial; the summary judges no
    # speedup from a run that did not finish (orchestrator/verdict.py)
    served = json.loads((tmp_path / "sweep" / records.RACE_FILE).read_text())["jobs"]["1"]["rounds"]
    assert served >= 1  # job 1's quick round came first, job 0 was in its long one
    res = json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())
    assert res["status"] == "KILLED" and res["metrics"]["throughput"] > 0
    assert runs["1"].data.metrics["throughput"] > 0
    assert runs["1"].data.tags["timing.partial"].startswith(f"the run ended after {served} timing round(s)")
    assert "timing.partial" not in runs["0"].data.tags  # in its first round: nothing completed


def test_a_reference_nothing_is_paired_with_is_not_timed_beyond_min_rounds():
    world = World(0, sigma=0.01, p_out=0.0)
    race = R.Race(R.RaceConfig(), clock=lambda: world.t)
    runners = {0: FakeJob(world, 1.0), 1: FakeJob(world, 1.0), 2: FakeJob(world, 1.3)}
    race.add(R.Contender(job=0, key="a", workload="w", baseline=True, gate=True))
    race.add(R.Contender(job=1, key="b", workload="v", baseline=True, gate=True))  # another model: alone
    race.add(R.Contender(job=2, key="a", workload="w", gate=True))
    world.sigma = 0.2  # job 2 needs many rounds; job 1 has nothing to wait for
    R.run_group(race, runners, [0, 1, 2])
    R.end_race(race, runners)
    assert len(race.jobs[1].throughputs) == 6 and len(race.jobs[2].throughputs) > 6
    assert race.jobs[1].stopped == "timed 6 rounds (nothing to pair with)"


@pytest.mark.slow
def test_timed_outputs_that_differ_from_the_evaluated_ones_fail_the_gate(tmp_path, tiny_classifier, cls_file):
    """MLPerf's TEST01 through a raced sweep: a plugin that answers right in the accuracy pass and flips its decisions
    while timed (tests/plugins/timing_cheat.py) is caught, and the summary's gate fails it."""
    import csv
    import json
    import os

    from conftest import REPO, mlflow_store, run_cli

    info = tmp_path / "site" / "timing_cheat-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: timing-cheat\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[orchestrator.plugins]\ntiming_cheat = timing_cheat:TimingCheatPlugin\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO / "tests" / "plugins"),
                                          os.environ.get("PYTHONPATH", "")])}
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={cls_file}",
                   "runtime=quick", f"tracking.uri={mlflow_store(tmp_path / 'store.db')}",
                   "optimization=[],[timing_cheat]", f"hydra.sweep.dir={sweep_dir}",
                   "race.processes=1",  # the job's own process compares timed and evaluated outputs
                   cwd=tmp_path, env=env, timeout=900)
    assert "raced in interleaved timing rounds" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    res = json.loads((sweep_dir / "1" / "results.json").read_text())
    assert res["status"] == "FINISHED" and res["race"]["rounds"] >= 6
    assert res["metrics"]["timed_equals_evaluated"] == 0.0
    assert "timed outputs differ from the evaluated ones" in res["timed_equals_evaluated"]
    assert json.loads((sweep_dir / "0" / "results.json").read_text())["metrics"]["timed_equals_evaluated"] == 1.0
    rows = {r["job"]: r for r in csv.DictReader(open(sweep_dir / "summary.csv"))}
    assert rows["1"]["gate"] == "fail", rows["1"]


def test_the_cores_others_kept_busy_in_the_rounds_reach_the_job_and_race_json():
    """The launcher measures the machine's other load during each timed round (a hog that starts after the jobs'
    own start sample still shows); each job's stop message carries the median over its rounds, which the summary
    line uses to explain a missing recommendation (verdict.busy_note)."""

    class Loaded(FakeJob):
        def time_round(self, r):
            thr, start, end = super().time_round(r)
            return thr, start, end, (1.0 if r > 2 else 0.1)  # the hog arrives in round 3

    world = World(0)
    race = R.Race(R.RaceConfig(max_rounds=6), clock=lambda: world.t)
    runners = {0: Loaded(world, 1.0), 1: Loaded(world, 1.02)}
    for j in runners:
        race.add(R.Contender(job=j, key="k", workload="w", baseline=(j == 0), gate=True))
    R.run_group(race, runners, list(runners))
    R.end_race(race, runners)
    for runner in runners.values():
        assert runner.stopped["metrics"]["cores_busy_in_rounds"] == 1.0
    log = race.log_dict()
    assert log["rounds"][0]["others_busy"] == {0: 0.1, 1: 0.1} and log["rounds"][3]["others_busy"][1] == 1.0
    # runners without the measurement (a machine without /proc) leave the metric out
    race2, plain = race_of([1.0, 1.02], R.RaceConfig(max_rounds=6))
    assert all("cores_busy_in_rounds" not in r.stopped["metrics"] for r in plain.values())
