"""Intervals for throughput and speedup: how sure a number is on a shared, noisy machine.

A run's timing pass runs in ``runtime.repeats`` rounds. Its throughput is the **median round's** throughput
(rows / busy seconds of that round). The 95 % interval is a two-level (hierarchical) percentile bootstrap: each
resample draws the rounds with replacement, then each drawn round's batches with replacement, and takes the median
of the resampled rounds' throughputs. It therefore widens with round-to-round drift (another tenant starting up,
frequency changes), not only with batch-to-batch spread; with one round it is a plain bootstrap over batches.

A speedup between two runs (job / baseline) gets its interval from the two runs' intervals on the log scale,
assuming independent, roughly log-normal estimates: ``exp(log s ± 1.96 · sqrt(se_a² + se_b²))`` with each
``se = (log high − log low) / (2 · 1.96)``. The runs are separate processes measured at different times, so this
is the honest noise model for them; it cannot see drift slower than one job.

**Paired speedups** (a race, orchestrator/race.py): when two jobs were timed in the same interleaved rounds, each
round r gives one ratio ``job_r / base_r`` of two timings taken minutes apart at most, so drift slower than a round
(another tenant, thermal or frequency changes) multiplies both and cancels in the ratio. The speedup is the median of
the ratios and its interval the **exact distribution-free (sign-test) interval for that median**: the k-th smallest
and k-th largest ratio, with k the largest rank such that ``2 · P(Binomial(n, 1/2) < k) <= 1 − confidence``. Why
this and not a bootstrap over rounds or a t interval: with the handful of rounds a race affords, a bootstrap over
rounds is too narrow (it cannot produce an interval wider than the observed range and under-covers badly at small
n: the unpaired bootstrap gave 11–17 % false "beyond noise" at 3 rounds where 5 % was promised), and a t interval
assumes normal ratios while a disturbed round is an outlier. The sign interval only assumes that the rounds' ratios
are independent draws from one continuous distribution whose median is the speedup; its coverage is then at least
the promised level for every n (conservative: 96.9 % at n = 6, 97.9 % at n = 10, 95.9 % at n = 20). Its price: no
95 % interval exists below 6 rounds (2 · 0.5^5 = 6.25 % > 5 %), hence race.min_rounds = 6.

**Process-level variation** (race.processes, below): rounds of one process cannot see how that process differs
from another of the same configuration, so a job is timed in several processes, the spread between them is
measured per sweep and the paired interval widened by it (:func:`widen_for_processes`).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

Z95 = 1.959963984540054
RESAMPLES = 2000


def round_throughputs(rounds: Sequence[Tuple[Sequence[int], Sequence[float]]]) -> list:
    """Rows / busy seconds of each round, from (rows per batch, seconds per batch) pairs."""
    return [float(np.sum(r)) / float(np.sum(s)) if np.sum(s) > 0 else 0.0 for r, s in rounds]


def matched_throughput(batch_ids: Sequence[int], rows: Sequence[int], secs: Sequence[float], common: int) -> float:
    """Rows / busy seconds of a race round's first ``common`` batches (its seeded order, which every job and
    process of the round starts from and times at least that far), each at its mean time over all the round timed
    it. Raw rows/s over whatever a unit timed mixes batches of different lengths in different proportions: a slow
    job stops after a few batches, a fast one fills its seconds with passes, so a pair's ratio carried which
    batches each happened to cover (on SST-2 dev, 256 rows in 8 length-sorted batches of 66-264 ms, 5 of them drawn
    at random gave rows/s with a 15 % sd and +2.5 % bias; 10: 6 %). Over the same batches that mix cancels."""
    if not len(secs):
        return 0.0
    prefix = list(batch_ids[:max(1, min(int(common), len(secs)))])
    times: Dict[int, List[float]] = {}
    size: Dict[int, int] = {}
    for k, n, t in zip(batch_ids, rows, secs):
        times.setdefault(int(k), []).append(float(t))
        size[int(k)] = int(n)
    busy = sum(float(np.mean(times[int(k)])) for k in prefix)
    return float(sum(size[int(k)] for k in prefix)) / busy if busy > 0 else 0.0


def throughput_interval(rounds: Sequence[Tuple[Sequence[int], Sequence[float]]], confidence: float = 0.95,
                        resamples: int = RESAMPLES, seed: int = 0) -> Tuple[float, float, float]:
    """(median round throughput, interval low, interval high) over the rounds of one run."""
    rounds = [(np.asarray(r, dtype=float), np.asarray(s, dtype=float)) for r, s in rounds if len(s)]
    if not rounds:
        return 0.0, 0.0, 0.0
    point = float(np.median(round_throughputs(rounds)))
    rng = np.random.default_rng(seed)
    # per round: `resamples` bootstrap throughputs over its batches
    per_round = np.empty((len(rounds), resamples))
    for k, (rows, secs) in enumerate(rounds):
        idx = rng.integers(0, len(secs), size=(resamples, len(secs)))
        per_round[k] = rows[idx].sum(axis=1) / secs[idx].sum(axis=1)
    pick = rng.integers(0, len(rounds), size=(resamples, len(rounds)))
    stat = np.median(per_round[pick, np.arange(resamples)[:, None]], axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stat, [alpha, 1.0 - alpha])
    # the point estimate is the observed median; keep low <= point <= high even when the bootstrap is skewed
    return point, float(min(low, point)), float(max(high, point))


def _log_se(low: float, high: float) -> Optional[float]:
    if not (low and high) or low <= 0 or high <= 0:
        return None
    return (math.log(high) - math.log(low)) / (2.0 * Z95)


def speedup_interval(job: Tuple[float, float, float], base: Tuple[float, float, float]
                     ) -> Optional[Tuple[float, float, float]]:
    """(speedup, low, high) of job over base, each given as (throughput, low, high); None without intervals."""
    (t, tl, th), (b, bl, bh) = job, base
    if not t or not b or t <= 0 or b <= 0:
        return None
    s = t / b
    se_job, se_base = _log_se(tl, th), _log_se(bl, bh)
    if se_job is None or se_base is None:
        return s, None, None  # type: ignore[return-value]
    half = Z95 * math.sqrt(se_job ** 2 + se_base ** 2)
    return s, s * math.exp(-half), s * math.exp(half)


def faster_beyond(low: Optional[float], margin: float = 0.0) -> bool:
    """A ratio interval whose low end clears the band [1 / (1 + margin), 1 + margin] around "no difference"
    (summary.min_effect) on the fast side."""
    return low is not None and low > 1.0 + margin


def slower_beyond(high: Optional[float], margin: float = 0.0) -> bool:
    """... and whose high end clears it on the slow side."""
    return high is not None and high < 1.0 / (1.0 + margin)


def within_noise(low: Optional[float], high: Optional[float], margin: float = 0.0) -> bool:
    """The interval reaches the band: neither faster nor slower beyond it."""
    return (low is not None and high is not None
            and not faster_beyond(low, margin) and not slower_beyond(high, margin))


def sign_rank(n: int, confidence: float = 0.95) -> Optional[int]:
    """k of the sign-test interval (k-th smallest .. k-th largest of n values) for the median; None when even the
    sample's range covers the median with less than ``confidence`` (too few values)."""
    alpha = 1.0 - confidence
    k, below = 0, 0.0  # below = P(Binomial(n, 1/2) <= k - 1)
    while k < n // 2 + 1:
        nxt = below + math.comb(n, k) / 2.0 ** n
        if 2.0 * nxt > alpha + 1e-12:
            break
        below, k = nxt, k + 1
    return k if k >= 1 else None


def sign_coverage(n: int, k: int) -> float:
    """Exact coverage of the k-th smallest .. k-th largest interval for the median of n continuous values."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n


def paired_ratios(job: Mapping[int, float], base: Mapping[int, float]) -> Dict[int, float]:
    """job_r / base_r for every round both ran with a positive throughput."""
    return {r: job[r] / base[r] for r in sorted(set(job) & set(base))
            if job[r] and base[r] and job[r] > 0 and base[r] > 0}


def median_interval(values: Sequence[float], confidence: float = 0.95
                    ) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, low, high) of positive values on the log scale, with the sign-test interval; (None, None, None)
    without values, (median, None, None) with too few for an interval."""
    logs = np.sort(np.log(np.asarray([v for v in values if v > 0], dtype=float)))
    if not len(logs):
        return None, None, None
    point = float(np.exp(np.median(logs)))
    k = sign_rank(len(logs), confidence)
    if k is None:
        return point, None, None
    return point, float(np.exp(logs[k - 1])), float(np.exp(logs[len(logs) - k]))


def paired_speedup_interval(job: Mapping[int, float], base: Mapping[int, float], confidence: float = 0.95
                            ) -> Optional[Tuple[float, Optional[float], Optional[float], int]]:
    """(speedup, low, high, rounds paired) of job over base from their per-round throughputs ({round: rows/s});
    None when they share no round. low/high are None below the rounds a ``confidence`` interval needs (6 at 95 %)."""
    ratios = paired_ratios(job, base)
    if not ratios:
        return None
    point, low, high = median_interval(list(ratios.values()), confidence)
    return point, low, high, len(ratios)  # type: ignore[return-value]


def half_width(low: Optional[float], high: Optional[float]) -> Optional[float]:
    """Relative half-width of a ratio interval on the log scale: sqrt(high/low) - 1 (0.05: about ±5 %)."""
    if low is None or high is None or low <= 0 or high <= 0:
        return None
    return math.sqrt(high / low) - 1.0


# ---- process-level variation ------------------------------------------------------------------------------------
# Two processes of one configuration differ by a few per cent for the whole of their lives (memory layout, which
# kernels and code paths were picked at start-up): measured here, identical jobs raced against each other came out
# 2-4 % apart with intervals of +-3 %, and the same sweep run twice moved 5-8 %. Rounds of one process cannot see
# that; more rounds do not shrink it. Kalibera & Jones's remedy is process replicas: each configuration timed in
# several processes (race.processes), the spread between them measured, and the speedup's interval widened by it.

def process_effects(processes: Sequence[Mapping[int, float]], min_shared: int = 3) -> Optional[list]:
    """Each process's log-throughput effect (median over the rounds all of them ran of its deviation from that
    round's mean), or None with fewer than two processes or ``min_shared`` shared rounds. Per round, so drift
    common to the processes cancels."""
    procs = [p for p in processes if p]
    if len(procs) < 2:
        return None
    shared = sorted(set.intersection(*(set(r for r, v in p.items() if v and v > 0) for p in procs)))
    if len(shared) < min_shared:
        return None
    logs = np.log(np.array([[p[r] for r in shared] for p in procs], dtype=float))
    return [float(e) for e in np.median(logs - logs.mean(axis=0), axis=1)]


def process_spread(jobs: Sequence[Sequence[Mapping[int, float]]]) -> Tuple[Optional[float], int]:
    """(sd of the process effect on log throughput, its degrees of freedom), pooled over the configurations with
    two or more processes: sum of squared deviations from each configuration's mean effect / sum of (processes - 1).
    It includes what is left of round-to-round noise in each median: an overestimate, on the safe side."""
    ss, dof = 0.0, 0
    for processes in jobs:
        effects = process_effects(processes)
        if effects is None:
            continue
        mean = sum(effects) / len(effects)
        ss += sum((e - mean) ** 2 for e in effects)
        dof += len(effects) - 1
    return (math.sqrt(ss / dof), dof) if dof else (None, 0)


def process_term(sd: Optional[float], dof: int, m_job: int, m_base: int, confidence: float = 0.95
                 ) -> Optional[float]:
    """The process-level half-width on the log scale: ``t(dof) * sd * sqrt(1/m_job + 1/m_base)``, the uncertainty of
    two configurations' mean process effects with m processes each (Student's t: sd is estimated from dof); None
    without an estimate."""
    if sd is None or not dof:
        return None
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2.0, dof)) * sd * math.sqrt(1.0 / max(m_job, 1) + 1.0 / max(m_base, 1))


def widen_for_processes(point: float, low: Optional[float], high: Optional[float], sd: Optional[float], dof: int,
                        m_job: int, m_base: int, confidence: float = 0.95
                        ) -> Tuple[float, Optional[float], Optional[float]]:
    """A paired speedup interval (rounds) widened by the process-level term (:func:`process_term`): each side's log
    half-width combined with it in quadrature. Unchanged without an estimate."""
    q = process_term(sd, dof, m_job, m_base, confidence)
    if low is None or high is None or q is None or point <= 0:
        return point, low, high
    below, above = math.log(point / low), math.log(high / point)
    return (point, point * math.exp(-math.sqrt(below ** 2 + q ** 2)),
            point * math.exp(math.sqrt(above ** 2 + q ** 2)))
