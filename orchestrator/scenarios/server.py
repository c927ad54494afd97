"""Server: one-sample queries with Poisson arrivals at a target rate; the SUT batches what has arrived (up to
``max_batch``, waiting at most ``batch_timeout_ms``). The figure is the highest target QPS whose run LoadGen finds
VALID with p99 <= ``latency_bound_ms``, searched the way MLPerf submitters do: search runs bracket the rate (double
or halve it) and bisect to ``tolerance``, judged by the latency bound and by LoadGen's early-stopping rule for a run
of ``min_query_count`` queries; then a verifying run at the rate found must be VALID in every respect (stepping
down when it is not). By default search and verifying runs have the same query count; compliant, only the
verifying run lasts 600 s. The search is bounded by ``search_budget_s`` and ``max_runs``; a bound no rate meets is
a result (valid false: "no VALID rate: ..."), not an error.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .base import Figure, FigureOfMerit, Scenario, ScenarioOptions, ScenarioResult
from . import loadgen


VERIFY_ATTEMPTS = 3


@dataclass
class ServerOptions(ScenarioOptions):
    # the p99 latency a VALID run must keep (LoadGen's server_target_latency)
    latency_bound_ms: float = 100.0
    max_batch: Optional[int] = 8
    # how long the SUT waits for a batch to fill before running what it has
    batch_timeout_ms: float = 2.0
    # the rate the search starts from; null: half the warm-up throughput at max_batch
    target_qps: Optional[float] = None
    # queries in the verifying run. LoadGen's early stopping lets a run keep a few queries over the bound only
    # when it has enough of them: with fewer than ~660, one query over the bound makes it INVALID
    min_query_count: int = 1024
    # queries in each search run; null: min_query_count. A search run is judged by p99 <= bound and by whether its
    # share of queries over the bound would pass early stopping in a run of min_query_count queries. Fewer queries
    # search faster but a short run hides a slight overload (its backlog has no time to grow): the verifying run
    # then fails and the rate steps down
    search_min_query_count: Optional[int] = None
    # false: one run at target_qps (no search)
    search: bool = True
    # duration of each search run (the verifying run uses min_duration_s, or 600 s when compliant)
    search_min_duration_s: float = 1.0
    # no new search run starts after this many seconds; the verifying run always runs
    search_budget_s: float = 120.0
    max_runs: int = 12
    # bisection stops when (invalid rate - valid rate) / valid rate <= tolerance
    tolerance: float = 0.1


@dataclass
class Trial:
    qps: float
    outcome: "loadgen.Outcome"
    verifying: bool = False

    verify_queries: int = 0

    @property
    def ok(self) -> bool:
        """Verifying: LoadGen's VALID. Searching: p99 within the bound over a run that was not cut short, and the
        share of queries over the bound low enough that the verifying run's early stopping would hold."""
        if self.verifying:
            return self.outcome.valid
        m = self.outcome.metrics
        if not (m.get("loadgen_perf_constraints_met") == 1.0 and m.get("loadgen_min_queries_met") == 1.0):
            return False
        n = max(self.verify_queries, 1)
        over = round(m.get("loadgen_overlatency_queries", 0.0) / max(m.get("loadgen_query_count", 1.0), 1.0) * n)
        return early_stopping_holds(int(over), n)

    @property
    def p99_ms(self) -> float:
        return self.outcome.metrics.get("loadgen_latency_p99_ms", float("nan"))

    def row(self) -> Dict[str, Any]:
        return {"target_qps": self.qps, "ok": self.ok, "valid": self.outcome.valid, "verifying": self.verifying,
                "p99_ms": self.p99_ms, "min_latency_ms": self.outcome.metrics.get("loadgen_latency_min_ms"),
                "completed_qps": self.outcome.metrics.get("loadgen_completed_qps"), "reason": self.outcome.reason,
                "log_dir": str(self.outcome.run.log_dir) if self.outcome.run else None}


def early_stopping_holds(over: int, n: int, percentile: float = 0.99, confidence: float = 0.99) -> bool:
    """LoadGen's early-stopping test for Server runs (its MinPassingQueriesFinder): with ``over`` of ``n`` queries
    over the bound, is the ``percentile`` latency within it at ``confidence``? (No query over: n >= 459.)"""
    from scipy.stats import binom

    return over <= n and float(binom.cdf(over, n, 1.0 - percentile)) <= 1.0 - confidence


class Server(Scenario):
    name = "server"
    loadgen_scenario = "Server"
    Options = ServerOptions
    figure_of_merit = FigureOfMerit("server_max_qps", "queries/s", True,
                                    "LoadGen Server: highest target QPS whose run is VALID with p99 <= the bound")

    @classmethod
    def validate_options(cls, options: Any) -> None:
        super().validate_options(options)
        o = options
        cls.require(o.latency_bound_ms > 0, "latency_bound_ms", o.latency_bound_ms, "must be > 0 (ms)")
        cls.require(o.batch_timeout_ms >= 0, "batch_timeout_ms", o.batch_timeout_ms, "must be >= 0 (ms)")
        cls.require(o.target_qps is None or o.target_qps > 0, "target_qps", o.target_qps,
                    "must be > 0 or null (from the warm-up)")
        cls.require(o.search_min_duration_s >= 0, "search_min_duration_s", o.search_min_duration_s, "must be >= 0")
        cls.require(o.search_budget_s > 0, "search_budget_s", o.search_budget_s, "must be > 0 (seconds)")
        cls.require(o.max_runs >= 1, "max_runs", o.max_runs, "must be >= 1")
        cls.require(o.search_min_query_count is None or o.search_min_query_count >= 1, "search_min_query_count",
                    o.search_min_query_count, "must be >= 1 or null (min_query_count)")
        cls.require(0 < o.tolerance < 1, "tolerance", o.tolerance, "must be in (0, 1)")

    def batch_timeout_s(self, options) -> float:
        return options.batch_timeout_ms / 1000.0

    def first_qps(self, options, estimate) -> float:
        return options.target_qps or max(1.0, 0.5 * estimate.throughput)

    def configure(self, settings, options, estimate, n_rows: int) -> None:
        settings.server_target_latency_ns = max(1, int(round(options.latency_bound_ms * 1e6)))
        settings.server_target_latency_percentile = 0.99
        settings.server_target_qps = self.first_qps(options, estimate)

    # -- the search -----------------------------------------------------------------------------------------------
    def run(self, sut_step, rows, make_batches, options=None, log_dir: Path | str = ".") -> ScenarioResult:
        o = self.parse_options(options)
        lg = loadgen.require(f"scenario={self.name}")
        out_dir = Path(log_dir) / self.name
        estimate = loadgen.estimate(sut_step, rows, make_batches, o.max_batch, o.warmup_batches)
        trials: List[Trial] = []
        t_start = time.perf_counter()
        search_queries = o.search_min_query_count or o.min_query_count

        def trial(qps: float, verifying: bool) -> Trial:
            settings = self.settings(lg, o, estimate, len(rows))
            settings.server_target_qps = qps
            if not verifying:
                settings.min_duration_ms = int(round(o.search_min_duration_s * 1000))
                settings.min_query_count = search_queries
                # a rate far above capacity ends as soon as the backlog shows it (Little: outstanding queries ~
                # rate x latency; 4x the bound's worth, and more than a batch, cannot be a VALID run)
                settings.server_max_async_queries = int(math.ceil(4 * qps * o.latency_bound_ms / 1000.0)) + 64 + \
                    (o.max_batch or 1)
            label = f"{len(trials) + 1:02d}_{'verify' if verifying else 'search'}_qps_{qps:.4g}"
            t = Trial(qps, self.perf_run(lg, sut_step, rows, make_batches, o, settings, out_dir / label), verifying,
                      o.min_query_count)
            trials.append(t)
            return t

        def affordable(qps: float) -> bool:
            """Room for another search run: within max_runs, and its expected length inside the budget."""
            search_runs = sum(not t.verifying for t in trials)
            expected_s = max(o.search_min_duration_s, search_queries / qps)
            return search_runs < o.max_runs and time.perf_counter() - t_start + expected_s <= o.search_budget_s

        qps = self.first_qps(o, estimate)
        alone_ms = estimate.latency_s * 1000.0
        if o.search and alone_ms > o.latency_bound_ms:
            # one row alone already takes longer than the bound: one light-load run shows by how much
            qps = min(qps, max(qps / 10.0, search_queries / 10.0))
        if not o.search:
            best = trial(qps, verifying=True)
            return self.finish(o, estimate, trials, best if best.ok else None, t_start)

        lo: Optional[float] = None  # highest rate a search run passed
        hi: Optional[float] = None  # lowest rate a search run failed
        hopeless = False
        while True:  # bracket
            t = trial(qps, verifying=False)
            if t.ok:
                lo = qps if lo is None else max(lo, qps)
                if hi is not None:
                    break
                qps *= 2.0
            else:
                hi = qps if hi is None else min(hi, qps)
                if lo is not None:
                    break
                # the fastest query missed the bound, and not because of a backlog (the SUT kept up with the rate,
                # or one row alone takes longer than the bound): no lower rate can meet it
                m = t.outcome.metrics
                kept_up = m.get("loadgen_completed_qps", 0.0) >= 0.9 * m.get("loadgen_scheduled_qps", float("inf"))
                if m.get("loadgen_latency_min_ms", 0.0) > o.latency_bound_ms and (kept_up or
                                                                                  alone_ms > o.latency_bound_ms):
                    hopeless = True
                    break
                qps /= 2.0
            if not affordable(qps):
                break
        while lo is not None and hi is not None and (hi - lo) / lo > o.tolerance:  # bisect
            mid = 0.5 * (lo + hi)
            if not affordable(mid):
                break
            if trial(mid, verifying=False).ok:
                lo = mid
            else:
                hi = mid
        verified = None
        if lo is not None and not hopeless:
            # a rate found VALID in a short run can fail the full one (noise, a busier machine, early stopping's
            # larger sample): step down by twice the tolerance, three verifying runs at most
            rate = lo
            for _ in range(VERIFY_ATTEMPTS):
                t = trial(rate, verifying=True)
                if t.ok:
                    verified = t
                    break
                rate *= 1.0 - min(0.5, 2.0 * o.tolerance)
        return self.finish(o, estimate, trials, verified, t_start)

    def finish(self, o, estimate, trials: List[Trial], verified: Optional[Trial], t_start: float) -> ScenarioResult:
        search_s = time.perf_counter() - t_start
        out_dir = None
        for t in trials:
            if t.outcome.run is not None:
                out_dir = t.outcome.run.log_dir.parent
                break
        artifacts: List[Path] = []
        for t in trials:
            artifacts.extend(t.outcome.artifacts)
        if out_dir is not None:
            table = out_dir / "server_search.json"
            table.write_text(json.dumps({"latency_bound_ms": o.latency_bound_ms, "search_s": search_s,
                                         "trials": [t.row() for t in trials]}, indent=2))
            artifacts.append(table)
        extra = {"server_latency_bound_ms": o.latency_bound_ms, "server_search_runs": float(len(trials)),
                 "server_verify_runs": float(sum(t.verifying for t in trials)),
                 "server_search_s": search_s}
        if verified is not None:
            extra["server_max_qps"] = verified.qps
            extra["server_p99_ms"] = verified.p99_ms
            result = self.result(o, verified.outcome, estimate, extra)
        else:
            lowest = min(trials, key=lambda t: t.qps)
            extra["server_max_qps"] = 0.0
            extra["server_p99_ms"] = lowest.p99_ms
            result = self.result(o, lowest.outcome, estimate, extra)
            result.valid = False
            fastest = lowest.outcome.metrics.get("loadgen_latency_min_ms", float("nan"))
            parts = [f"target_qps {lowest.qps:.4g}", f"scenario.latency_bound_ms={o.latency_bound_ms:g}",
                     f"fastest query {fastest:.3g} ms"]
            if lowest.p99_ms <= o.latency_bound_ms:  # within the bound, INVALID for another reason: say which
                parts.append(f"INVALID: {lowest.outcome.reason.split(';')[0]}")
            verifying = [t for t in trials if t.verifying]
            if verifying:
                parts.append("verifying runs INVALID at " + ", ".join(f"{t.qps:.4g} QPS (p99 {t.p99_ms:.3g} ms)"
                                                                      for t in verifying))
            parts.append(f"{len(trials)} run(s) in {search_s:.0f} s")
            result.reason = (f"no VALID rate: p99 at the lowest QPS tried was {lowest.p99_ms:.3g} ms "
                             f"({'; '.join(parts)})")
            result.details["loadgen.invalid_reason"] = result.reason
        result.artifacts = artifacts
        result.figure = Figure(result.figure.name, extra["server_max_qps"], result.figure.unit,
                               result.figure.higher_is_better)
        result.metrics[result.figure.name] = result.figure.value
        return result
