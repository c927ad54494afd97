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
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

Z95 = 1.959963984540054
RESAMPLES = 2000


def round_throughputs(rounds: Sequence[Tuple[Sequence[int], Sequence[float]]]) -> list:
    """Rows / busy seconds of each round, from (rows per batch, seconds per batch) pairs."""
    return [float(np.sum(r)) / float(np.sum(s)) if np.sum(s) > 0 else 0.0 for r, s in rounds]


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


def within_noise(low: Optional[float], high: Optional[float]) -> bool:
    return low is not None and high is not None and low <= 1.0 <= high
