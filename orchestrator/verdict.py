"""What a sweep's rows say: speedups with intervals, the accuracy gate, whole-dataset agreement, the Pareto front
and one recommendation. Pure functions over summary rows (dicts), so the sweep callback and
``orchestrator-report`` give the same answer.

- **Baseline.** For each row, the eager fp32 job of the same model, data and runtime settings (tag
  ``baseline_key``); failing that, any eager fp32 job of the same model and data (tag ``workload``).
- **Speedup** = throughput / the baseline's, with a 95 % interval from both runs' intervals (orchestrator/stats.py).
  An interval that contains 1.0 is "within noise". When both rows were raced (``race_rounds``: {round: rows/s}, from
  orchestrator/race.py) and share enough rounds for an interval, the speedup is **paired** instead: the median of
  the per-round ratios with its exact sign-test interval (``speedup_method`` says which; drift common to a round
  cancels).
- **Gate** (MLPerf-style): the task metric keeps at least ``min_accuracy_ratio`` of the baseline's (0.99 by
  default), and the job's predictions agree with the baseline's on at least ``min_agreement`` of *all* examples
  (0.95 by default; ``agreement_vs_baseline``, from each run's decisions.json).
- **Recommendation**: the fastest job that passes the gate and whose speedup is beyond noise, and how it compares
  with the runner-up (the next fastest that passes the gate): beaten beyond noise, or a tie to be chosen by other
  criteria (memory, apply time). No recommendation from an interval that spans more than 2x either way of its
  speedup (seen under load: "22.97x [95% 2.53-208.73]"); else a plain statement that nothing beat eager fp32 beyond
  noise.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from . import stats
from .environment import threads_that_fit, threads_wait_on_busy_cores
from .records import EAGER


def speed(r: Dict[str, Any]) -> Optional[float]:
    """What "faster" means for a row, higher is better: its throughput, or for a LoadGen scenario job its figure of
    merit (offline samples/s, server max QPS; a latency figure, p90/p99 ms, inverted), None when it has none or
    LoadGen did not find the run VALID."""
    if r.get("figure"):
        v = r.get("figure_value")
        if not v or v <= 0 or r.get("scenario_valid") is False:
            return None
        return float(v) if r.get("higher_is_better", True) else 1.0 / float(v)
    return r.get("throughput")


def is_baseline_candidate(r: Dict[str, Any]) -> bool:
    return (r.get("stack") == EAGER and r.get("precision") == "fp32" and r.get("status") == "FINISHED"
            and bool(speed(r)) and not r.get("fallback"))


def find_baseline(r: Dict[str, Any], rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    candidates = [b for b in rows if is_baseline_candidate(b)]
    for key in ("baseline_key", "workload"):
        if r.get(key):
            same = [b for b in candidates if b.get(key) == r.get(key)]
            if same:
                return same[0]
    if any(b.get("workload") for b in candidates) and r.get("workload"):
        return None  # rows of other models/data only: no fair baseline
    return candidates[0] if candidates else None


def agreement(task_cls: Any, reference: Optional[list], candidate: Optional[list]) -> Optional[float]:
    if task_cls is None or reference is None or candidate is None or len(reference) != len(candidate):
        return None
    if not reference:
        return None
    same = sum(bool(task_cls.same_decision(a, b)) for a, b in zip(reference, candidate))
    return same / len(reference)


def _keeps_metric(value: float, base: float, ratio: float) -> bool:
    # metrics here are higher-is-better; |base| keeps the rule meaningful for a negative correlation
    return value >= base - (1.0 - ratio) * abs(base)


def race_rounds(r: Dict[str, Any]) -> Dict[int, float]:
    """A row's per-round throughputs of a race ({round: rows/s}); {} for a job timed alone."""
    rounds = r.get("race_rounds") or {}
    try:
        return {int(k): float(v) for k, v in dict(rounds).items() if v is not None}
    except (TypeError, ValueError):
        return {}


def paired(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[tuple]:
    """(a over b, low, high) from the rounds both were raced in; None unless that gives a 95 % interval."""
    s = stats.paired_speedup_interval(race_rounds(a), race_rounds(b))
    if s is None or s[1] is None:
        return None
    # the spread between a job's processes (race.processes), as measured by the latest of the two to stop
    later = max((a, b), key=lambda r: (r.get("race_process_dof") or 0, r.get("race_process_sd") or 0.0))
    return stats.widen_for_processes(s[0], s[1], s[2], later.get("race_process_sd"),
                                     int(later.get("race_process_dof") or 0), float(a.get("race_processes") or 1),
                                     float(b.get("race_processes") or 1))


def gate_reasons(metric: Optional[str], value: Optional[float], base_value: Optional[float],
                 agree: Optional[float], min_accuracy_ratio: float, min_agreement: float) -> List[str]:
    """Why a job fails the accuracy gate against its baseline (empty: it passes). Also the race's gate, judged as
    soon as a job's accuracy pass is done (orchestrator/race.py)."""
    reasons = []
    if value is not None and base_value is not None:
        if not _keeps_metric(value, base_value, min_accuracy_ratio):
            reasons.append(f"{metric} {value:.2f} < {min_accuracy_ratio:.0%} of {base_value:.2f}")
    else:
        reasons.append("no task metric")
    if agree is not None and agree < min_agreement:
        reasons.append(f"agreement {agree:.1%} < {min_agreement:.0%}")
    return reasons


def assess(rows: List[Dict[str, Any]], min_accuracy_ratio: float, min_agreement: float,
           task_of: Callable[[Optional[str]], Any], decisions_of: Callable[[Dict[str, Any]], Optional[list]],
           min_effect: float = 0.0) -> None:
    """Fill speedup (+ interval, noise), agreement_vs_baseline, accuracy_delta, gate and gate_reason in place.
    ``min_effect``: summary.min_effect, the band around 1.0 an interval must clear to be beyond noise."""
    cache: Dict[int, Optional[list]] = {}

    def decisions(r):
        if id(r) not in cache:
            cache[id(r)] = decisions_of(r)
        return cache[id(r)]

    for r in rows:
        base = find_baseline(r, rows)
        r["baseline_job"] = base["job"] if base else None
        if r.get("status") != "FINISHED":
            r["gate"], r["gate_reason"] = "-", f"job {str(r.get('status', '?')).lower()}"
            continue
        if base is None:
            r["gate"], r["gate_reason"] = "-", "no eager fp32 job of this model and data in the sweep"
            continue
        if r is base:
            r["speedup"], r["speedup_ci_low"], r["speedup_ci_high"] = 1.0, None, None
        elif r.get("figure") and speed(r):
            # a scenario's figure comes from one LoadGen run: a ratio, no interval (what LoadGen measures once)
            r["speedup"], r["speedup_ci_low"], r["speedup_ci_high"] = speed(r) / speed(base), None, None
            r["speedup_method"], r["noise"] = "one LoadGen run each", "no interval"
        elif r.get("throughput"):
            s = paired(r, base)
            r["speedup_method"] = "paired" if s is not None else "unpaired"
            if s is None:
                s = stats.speedup_interval((r["throughput"], r.get("throughput_ci_low"),
                                            r.get("throughput_ci_high")),
                                           (base["throughput"], base.get("throughput_ci_low"),
                                            base.get("throughput_ci_high")))
            if s is not None:
                r["speedup"], r["speedup_ci_low"], r["speedup_ci_high"] = s
                r["noise"] = ("within noise" if stats.within_noise(s[1], s[2], min_effect)
                              else ("no interval" if s[1] is None else ""))
        if r is base:
            r["agreement_vs_baseline"], r["accuracy_delta"] = 1.0, 0.0
            r["gate"], r["gate_reason"] = "baseline", "the eager fp32 job others are measured against"
            continue
        r["agreement_vs_baseline"] = agreement(task_of(r.get("task")), decisions(base), decisions(r))
        if r.get("value") is not None and base.get("value") is not None:
            r["accuracy_delta"] = r["value"] - base["value"]
        agree = r["agreement_vs_baseline"]
        reasons = gate_reasons(r.get("metric"), r.get("value"), base.get("value"), agree, min_accuracy_ratio,
                               min_agreement)
        if r.get("timed_equals_evaluated") == 0.0:  # MLPerf's TEST01: what was timed is not what was evaluated
            reasons.append("timed outputs differ from the evaluated ones (timed_equals_evaluated)")
        if reasons:
            r["gate"], r["gate_reason"] = "fail", "; ".join(reasons)
        else:
            r["gate"] = "pass"
            r["gate_reason"] = (f"keeps >= {min_accuracy_ratio:.0%} of {r['metric']}"
                                + (f", agrees on {agree:.1%}" if agree is not None
                                   else ", agreement not measured (no decisions.json)"))


def mark_pareto(rows: List[Dict[str, Any]]) -> None:
    """pareto=True for each finished row no other row of its workload beats on both throughput and metric."""
    done = [r for r in rows if r.get("status") == "FINISHED" and speed(r) and r.get("value") is not None]
    for r in rows:
        r["pareto"] = False
    for r in done:
        peers = [o for o in done if o.get("workload") == r.get("workload") and o is not r]
        r["pareto"] = not any(speed(o) >= speed(r) and o["value"] >= r["value"]
                              and (speed(o) > speed(r) or o["value"] > r["value"]) for o in peers)


def label(r: Dict[str, Any]) -> str:
    """stack/precision and the swept values that set this job apart (console, plot, recommendation)."""
    text = f"{r['stack']}/{r['precision']}"
    swept = r.get("swept")
    if swept:
        text += " " + " ".join(f"{k}={v}" for k, v in swept.items())
    return text


def _label(r: Dict[str, Any]) -> str:
    return f"job {r['job']} ({label(r)})"


def _group_name(rows: List[Dict[str, Any]], workload: Any) -> str:
    """How a recommendation line names its group: the scenario (and its figure) when its jobs ran one."""
    row = next((r for r in rows if r.get("workload") == workload), {})
    if row.get("scenario"):
        return f"scenario={row['scenario']}, {row.get('figure')} ({row.get('figure_unit')})"
    return f"workload {workload}"


def _interval(r: Dict[str, Any]) -> str:
    if r.get("figure"):
        return (f"{r['speedup']:.2f}x on {r['figure']} ({r.get('figure_value'):.4g} {r.get('figure_unit')}; one "
                "LoadGen run each, no interval)")
    if r.get("speedup_ci_low") is None:
        return f"{r['speedup']:.2f}x (no interval)"
    return f"{r['speedup']:.2f}x [95% {r['speedup_ci_low']:.2f}-{r['speedup_ci_high']:.2f}]"


# an interval reaching further than this factor either side of its speedup decides nothing
WIDE = 2.0


def too_wide(r: Dict[str, Any]) -> bool:
    s, low, high = r.get("speedup"), r.get("speedup_ci_low"), r.get("speedup_ci_high")
    return bool(s and low and high and (high > WIDE * s or low < s / WIDE))


def _ratio(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[tuple]:
    """a's speed over b's: paired when both were raced, else from their throughput intervals; with the method."""
    s = paired(a, b)
    if s is not None:
        return s + ("paired",)
    u = stats.speedup_interval((a["throughput"], a.get("throughput_ci_low"), a.get("throughput_ci_high")),
                               (b["throughput"], b.get("throughput_ci_low"), b.get("throughput_ci_high")))
    return None if u is None or u[1] is None else tuple(u) + ("unpaired",)


def runner_up(best: Dict[str, Any], rows: List[Dict[str, Any]], min_effect: float = 0.0) -> str:
    """How the recommended job compares with the next fastest job of its workload that passes the gate."""
    rivals = [r for r in rows if r is not best and r.get("workload") == best.get("workload")
              and r.get("gate") in ("pass", "baseline") and speed(r)]
    if not rivals:
        return ""
    second = max(rivals, key=speed)
    if best.get("figure"):
        return (f"; runner-up {_label(second)} at {speed(best) / speed(second):.2f}x less (one LoadGen run each, "
                "no interval)")
    s = _ratio(best, second)
    if s is None:
        return f"; runner-up {_label(second)} (no interval to compare)"
    what = f"{s[0]:.2f}x [95% {s[1]:.2f}-{s[2]:.2f}, {s[3]}]"
    if stats.faster_beyond(s[1], min_effect):
        return f"; beats the runner-up {_label(second)} by {what}"
    if stats.slower_beyond(s[2], min_effect):  # a faster job, undecided vs eager fp32: no tie, an open question
        faster = f"{1 / s[0]:.2f}x [95% {1 / s[2]:.2f}-{1 / s[1]:.2f}, {s[3]}]"
        return (f"; but {_label(second)} is faster than it by {faster} and is not recommended only because its own "
                "speedup over eager fp32 is undecided: race more rounds (race.max_rounds, race.budget_s) to settle it")
    if not stats.within_noise(s[1], s[2]):  # the interval excludes 1.0 yet is no win: say which rule made it a tie
        what += f"; not beyond the {min_effect:.0%} margin, summary.min_effect"
    return (f"; the runner-up {_label(second)} is a tie within noise ({what}): choose between them by other "
            "criteria (memory, apply time)")


def busy_note(rows: List[Dict[str, Any]], recommended: bool = False) -> str:
    """Why a sweep on a busy machine may find no difference, or the wrong size of one: its jobs' threads shared
    cores with other work, so every batch waited on a descheduled thread and the jobs' timings converge on the
    scheduler's, not their compute's (seen under a one-core hog: fp32 and bf16 both ~940 ms per batch with 2
    threads; bf16 1.84x with runtime.threads=1). Beside a recommendation the same wait inflates the speedups over
    an eager fp32 whose threads wait most (the AMD EPYC, 2026-12-05: an engine's int8 recommended at 8.54x under a
    one-core hog, where quiet races chose another stack at 2.7-3.0x). The busiest job (its timed rounds' median
    when raced, else its start), with the setting that fits; empty on a quiet machine."""
    def load(r):  # a raced job's rounds (launcher-measured) say more than its start
        return r["cores_busy_in_rounds"] if r.get("cores_busy_in_rounds") is not None else r.get("cores_busy_at_start")

    busy = [r for r in rows if r.get("cores_available") and r.get("threads")
            and threads_wait_on_busy_cores(load(r), int(r["cores_available"]), int(r["threads"]))]
    if not busy:
        return ""
    worst = max(busy, key=load)
    available, most = int(worst["cores_available"]), load(worst)
    threads = {int(r["threads"]) for r in busy}
    ran = f"ran {threads.pop()} thread(s)" if len(threads) == 1 else "ran more threads than the cores left"
    fits = threads_that_fit(most, available, max(int(r["threads"]) for r in busy))
    effect = ("can change the speedups and the winner: treat this recommendation as this load's, not the CPU's"
              if recommended else "can hide a real difference")
    return (f"; {len(busy)} of {len(rows)} jobs {ran} while other processes kept up to {most:.1f} of "
            f"{available} core(s) busy: their batches waited for a thread that was not running, which {effect} "
            f"(runtime.threads={fits} times them on the cores left)")


def recommend(rows: List[Dict[str, Any]], min_effect: float = 0.0) -> Optional[str]:
    """One line: the fastest job that passes the gate with a speedup beyond noise, or why there is none.
    The chosen rows get ``recommended=True``."""
    for r in rows:
        r["recommended"] = False
    workloads: List[Any] = []
    for r in rows:
        if r.get("gate") == "baseline" and r.get("workload") not in workloads:
            workloads.append(r.get("workload"))
    if not workloads:
        return "no recommendation: the sweep has no finished eager fp32 job to measure speedups and accuracy against"
    lines = []
    for w in workloads:
        ours = [r for r in rows if r.get("workload") == w]
        group = [r for r in ours if r.get("speedup") and r.get("gate") != "baseline"]
        # a scenario's figure is one LoadGen run: better is all it can say (its line says there is no interval)
        good = [r for r in group if r.get("gate") == "pass" and (
            stats.faster_beyond(r.get("speedup_ci_low"), min_effect)
            or (r.get("figure") and r["speedup"] > 1.0))]
        prefix = "" if len(workloads) == 1 else f"[{_group_name(rows, w)}] "
        decided = [r for r in good if not too_wide(r)]
        if decided:
            best = max(decided, key=speed)
            best["recommended"] = True
            delta = best.get("accuracy_delta")
            agree = best.get("agreement_vs_baseline")
            lines.append(f"{prefix}recommended: {_label(best)}: {_interval(best)} vs eager fp32, "
                         f"{best['metric']} {delta:+.2f}" + (f", agreement {agree:.1%}" if agree is not None else "")
                         + runner_up(best, rows, min_effect)
                         + busy_note(ours, recommended=True))
            continue
        if good:
            top = max(good, key=speed)
            lines.append(f"{prefix}no recommendation: {_label(top)} is the fastest that passes the gate but its "
                         f"speedup {_interval(top)} spans more than {WIDE:g}x either way: too uncertain to act on "
                         "(race more rounds: race.max_rounds, race.budget_s; or a quieter machine)"
                         + busy_note(ours))
            continue
        faster = sorted((r for r in group if r.get("speedup", 0) > 1.0), key=lambda r: -speed(r))
        note = ""
        if faster:
            top = faster[0]
            why = (f"failed the gate ({top['gate_reason']})" if top.get("gate") == "fail"
                   else "within noise" if top.get("noise") == "within noise" else "no interval")
            note = f" (fastest, {_label(top)} at {_interval(top)}, {why})"
        lines.append(f"{prefix}no recommendation: nothing beat eager fp32 beyond noise while passing the "
                     f"accuracy gate{note}" + busy_note(ours))
    return "; ".join(lines)
