"""Racing vs timing one job after another, measured through the real CLI (issue 28).

Three questions, each on this machine as it is (the CPU model and the load average are printed with every figure):

- ``--aa N``   **false positives.** An A/A sweep holds one configuration twice (``race.replica=0,1``: a key that
  changes nothing computed). N such sweeps raced (``race.mode=on``) and N timed one after another
  (``race.mode=off``); how often each says the two identical jobs differ beyond noise (the 95 % speedup interval
  excludes 1.0; under the race, also a job eliminated as slower). ``--hog`` runs a CPU hog (one busy process per
  core minus one... or ``--hog-procs``) in the background throughout, as a neighbour would.
- **interval width at equal wall time**, from the same sweeps: the mean relative half-width of the speedup interval
  and the mean timing wall time of each way, and the width scaled to equal wall time (width x sqrt(wall / wall of
  the other way): an interval narrows with the square root of the rounds it has).
- ``--twice``  **repeatability**: the README's sweep (``'optimization=[],[jit]' precision=fp32,bf16``, raced) run
  twice: the same recommendation, and every job's paired speedup inside the other run's interval?
- ``--engines``  **time to answer** of ``sweep=engines experiment=sst2_minilm`` (needs ../shared): raced vs
  exhaustive sequential (``race.mode=off runtime.repeats=<race.max_rounds>``): wall time and the winner of each;
  also raced with rounds as long as sequential ones (``race.round_s=null``), which separates what the shorter race
  round buys from what pairing, stopping and elimination buy.

    python benchmarks/race.py --aa 20 experiment=sst2_minilm dataset.max_samples=128
    python benchmarks/race.py --aa 20 --hog experiment=sst2_minilm dataset.max_samples=128
    python benchmarks/race.py --twice experiment=sst2_minilm dataset.max_samples=128
    python benchmarks/race.py --engines

Extra arguments are overrides for every sweep. Results: one line per sweep on stderr, a table at the end, and
``--out FILE.json`` for the raw figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchestrator import cpu, stats, verdict  # noqa: E402
from orchestrator.config import SummaryConfig  # noqa: E402
from orchestrator.records import shown_precision  # noqa: E402

MIN_EFFECT = SummaryConfig().min_effect  # what the summary calls beyond noise


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cpus"


def sweep(workdir: Path, args: List[str]) -> Dict[str, Any]:
    """Run one sweep; its jobs' results.json, race.json (if raced) and wall time."""
    sweep_dir = workdir / f"sweep-{time.time_ns()}"
    cmd = [sys.executable, "-m", "orchestrator", "-m", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
           "runtime.progress=false", f"hydra.sweep.dir={sweep_dir}", *args]
    t0, started = time.perf_counter(), time.time()
    # presets name ../shared relative to the checkout; the sweeps run in a scratch folder
    env = {**os.environ, "ORCH_SHARED_DIR": os.environ.get("ORCH_SHARED_DIR", str(REPO.parent / "shared"))}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    jobs = {}
    for res in sorted(sweep_dir.glob("*/results.json")):
        jobs[int(res.parent.name)] = json.loads(res.read_text())
    race = json.loads((sweep_dir / "race.json").read_text()) if (sweep_dir / "race.json").is_file() else None
    md = sweep_dir / "summary.md"  # "### Recommended: ...", the CPU, then the recommendation line
    parts = md.read_text().split("\n\n") if md.is_file() else []
    recommendation = " ".join(parts[2].split()) if len(parts) > 2 else None
    return {"rc": proc.returncode, "wall_s": wall, "started": started, "jobs": jobs, "race": race,
            "recommendation": recommendation,
            "error": proc.stderr.strip().splitlines()[-1:] if proc.returncode else None}


def row(res: Dict[str, Any]) -> Dict[str, Any]:
    m = res.get("metrics", {})
    race = res.get("race") or {}
    return {"throughput": m.get("throughput"), "throughput_ci_low": m.get("throughput_ci_low"),
            "throughput_ci_high": m.get("throughput_ci_high"), "race_rounds": race.get("throughputs"),
            "timing_wall_s": m.get("timing_wall_s", 0.0), "stopped": race.get("stopped")}


def aa_verdict(result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Job 1 over job 0 (identical): speedup, interval, method, and whether it claims a difference."""
    if set(result["jobs"]) < {0, 1}:
        return None
    a, b = row(result["jobs"][1]), row(result["jobs"][0])
    s = verdict.paired(a, b)
    method = "paired"
    if s is None:
        method = "unpaired"
        s = stats.speedup_interval((a["throughput"], a["throughput_ci_low"], a["throughput_ci_high"]),
                                   (b["throughput"], b["throughput_ci_low"], b["throughput_ci_high"]))
    if s is None or s[1] is None:
        return None
    eliminated = any(str(r.get("stopped") or "").startswith("eliminated") for r in (a, b))
    return {"speedup": s[0], "low": s[1], "high": s[2], "method": method,
            "claims_difference": (not stats.within_noise(s[1], s[2], MIN_EFFECT)) or eliminated,
            "excludes_1": not stats.within_noise(s[1], s[2]),
            "half_width": stats.half_width(s[1], s[2]),
            "timing_s": (a["timing_wall_s"] or 0.0) + (b["timing_wall_s"] or 0.0), "wall_s": result["wall_s"]}


def start_hog(procs: int) -> List[subprocess.Popen]:
    code = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(procs)]


def run_aa(trials: int, extra: List[str], workdir: Path, modes=("on", "off")) -> Dict[str, Any]:
    out: Dict[str, Any] = {mode: [] for mode in modes}
    for t in range(trials):  # the two ways alternate: a load that changes over the hour hits both alike
        for mode in modes:
            res = sweep(workdir, ["race.replica=0,1", f"race.mode={mode}", f"race.seed={t}", *extra])
            v = aa_verdict(res)
            print(f"A/A race.mode={mode} trial {t + 1}/{trials}: "
                  + (f"{v['speedup']:.3f}x [{v['low']:.3f}-{v['high']:.3f}] {v['method']}"
                     f"{' DIFFERENCE CLAIMED' if v['claims_difference'] else ''}, sweep {v['wall_s']:.0f} s"
                     if v else f"no verdict (rc {res['rc']}: {res['error']})") + f"; {load()}",
                  file=sys.stderr, flush=True)
            if v:
                out[mode].append(v)
    return out


def summarize_aa(out: Dict[str, Any]) -> List[str]:
    lines = []
    widths = {}
    for mode, results in out.items():
        if not results:
            lines.append(f"race.mode={mode}: no verdicts")
            continue
        claims = sum(v["claims_difference"] for v in results)
        bare = sum(v.get("excludes_1", not stats.within_noise(v["low"], v["high"])) for v in results)
        hw = statistics.mean(v["half_width"] for v in results)
        timing = statistics.mean(v["timing_s"] for v in results)
        wall = statistics.mean(v["wall_s"] for v in results)
        widths[mode] = (hw, timing)
        lines.append(f"race.mode={mode}: 'within noise' in {len(results) - claims}/{len(results)} A/A sweeps "
                     f"({100 * (len(results) - claims) / len(results):.0f} %; summary.min_effect={MIN_EFFECT:g}), "
                     f"the interval excluded 1.0 in {bare}; mean half-width +-{100 * hw:.1f} %, "
                     f"timing {timing:.0f} s of {wall:.0f} s per sweep")
    if len(widths) == 2:
        (hw_on, t_on), (hw_off, t_off) = widths["on"], widths["off"]
        scaled = hw_on * math.sqrt(t_on / t_off) if t_off > 0 else float("nan")
        lines.append(f"equal wall time: the race's half-width scaled to sequential's timing time "
                     f"+-{100 * scaled:.1f} % vs sequential +-{100 * hw_off:.1f} %")
    return lines


def winner(result: Dict[str, Any]) -> Optional[str]:
    done = {j: r for j, r in result["jobs"].items() if r.get("status") == "FINISHED"}
    if not done:
        return None
    best = max(done.items(), key=lambda kv: kv[1].get("metrics", {}).get("throughput") or 0.0)
    shown = shown_precision(str(best[1].get("precision")), best[1].get("compute"), best[1].get("weights"))
    return f"job {best[0]} ({best[1].get('stack')}/{shown})"


ENGINE_WAYS = {"raced": ["race.mode=on"],
               # isolates the race's round length: raced, but each round as long as a sequential one
               "long-rounds": ["race.mode=on", "race.round_s=null"],
               "sequential": ["race.mode=off"]}


def run_engines(extra: List[str], workdir: Path, max_rounds: int, ways=tuple(ENGINE_WAYS)) -> List[str]:
    lines = []
    labels = {"raced": "raced", "long-rounds": "raced, rounds of runtime.min_duration_s",
              "sequential": "exhaustive sequential"}
    for way in ways:
        label, args = labels[way], ENGINE_WAYS[way] + ([f"runtime.repeats={max_rounds}"] if way == "sequential"
                                                        else [])
        res = sweep(workdir, ["sweep=engines", "experiment=sst2_minilm", *args, *extra])
        failed = {j: r.get("error") for j, r in res["jobs"].items() if r.get("status") != "FINISHED"}
        lines.append(f"{label}: {res['wall_s']:.0f} s, fastest {winner(res)}, rc {res['rc']}; {load()}; "
                     f"recommendation: {res.get('recommendation')}"
                     + (f"; not finished: {failed}" if failed else ""))
        where = phases(res)
        lines += [where] if where else []
        print("\n".join(lines[-2:] if where else lines[-1:]), file=sys.stderr, flush=True)
    return lines


def phases(res: Dict[str, Any]) -> Optional[str]:
    """Where a raced sweep's wall time went, from race.json's round spans: start and the jobs' own preparation (to
    round 1), the rounds before the extra processes, their preparation (the gap before the first round that times
    one), the rounds after, and recording + summary (after the last round)."""
    race = res.get("race") or {}
    rounds = [r for r in race.get("rounds", []) if r.get("spans")]
    if not rounds:
        return None
    start = lambda r: min(s[0] for s in r["spans"].values())  # noqa: E731
    end = lambda r: max(s[1] for s in r["spans"].values())  # noqa: E731
    first_extra = next((i for i, r in enumerate(rounds) if any(p for _, p in r.get("units", []))), None)
    before = rounds[:first_extra] if first_extra else rounds
    parts = [f"start + own preparation {start(rounds[0]) - res['started']:.0f} s",
             f"rounds {before[0]['round']}-{before[-1]['round']} {end(before[-1]) - start(before[0]):.0f} s"]
    if first_extra:
        after = rounds[first_extra:]
        parts += [f"extra processes {start(after[0]) - end(before[-1]):.0f} s",
                  f"rounds {after[0]['round']}-{after[-1]['round']} {end(after[-1]) - start(after[0]):.0f} s"]
    parts.append(f"recording + summary {res['started'] + res['wall_s'] - end(rounds[-1]):.0f} s")
    stops = "; ".join(f"job {j}: {v['rounds']} rounds, {(v.get('stopped') or '')[:40]}"
                      for j, v in sorted(race.get("jobs", {}).items(), key=lambda kv: int(kv[0])))
    sd = race.get("process_sd")
    spread = f"{100 * sd:.1f} %" if isinstance(sd, (int, float)) else "not measured"
    return f"  where the time went: {', '.join(parts)}; spread between processes (sd) {spread}; {stops}"


def speedups(result: Dict[str, Any]) -> Dict[str, tuple]:
    """Each job's paired speedup over its reference, by what ran (stack/precision): (speedup, low, high)."""
    out = {}
    for job, res in result["jobs"].items():
        m = res.get("metrics", {})
        if m.get("race_speedup") is not None:
            out[f"{res.get('stack')}/{res.get('precision')}"] = (m["race_speedup"], m.get("race_speedup_ci_low"),
                                                                  m.get("race_speedup_ci_high"))
    return out


def run_twice(extra: List[str], workdir: Path) -> List[str]:
    args = ["optimization=[],[jit]", "precision=fp32,bf16", "race.mode=on", *extra]
    first, second = sweep(workdir, args), sweep(workdir, args)
    lines = []
    for n, res in enumerate((first, second), 1):
        lines.append(f"run {n}: {res['wall_s']:.0f} s, rc {res['rc']}, recommendation: {res.get('recommendation')}")
    a, b = speedups(first), speedups(second)
    agree = []
    for key in sorted(set(a) & set(b)):
        (s1, l1, h1), (s2, l2, h2) = a[key], b[key]
        inside = l1 is not None and l2 is not None and l2 <= s1 <= h2 and l1 <= s2 <= h1
        agree.append(inside)
        lines.append(f"  {key}: {s1:.2f}x [{l1:.2f}-{h1:.2f}] then {s2:.2f}x [{l2:.2f}-{h2:.2f}]"
                     f"{'' if inside else '  NOT within each other'}")
    def chosen(res):  # "recommended: job 3 (jit/bf16): 3.58x ..." -> "recommended: job 3 (jit/bf16)"
        return str(res.get("recommendation") or "").split(": ")[:2]

    lines.append(f"same recommendation: {chosen(first) == chosen(second)}; speedups "
                 f"within each other's intervals: {sum(agree)}/{len(agree)}; {load()}")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aa", type=int, default=0, help="A/A sweeps per mode")
    ap.add_argument("--modes", default="on,off", help="A/A: the ways to run (on: raced, off: sequential)")
    ap.add_argument("--hog", action="store_true", help="a CPU hog in the background throughout")
    ap.add_argument("--hog-procs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--twice", action="store_true", help="the README's sweep twice: same answer?")
    ap.add_argument("--engines", action="store_true", help="time to answer of sweep=engines experiment=sst2_minilm")
    ap.add_argument("--ways", default=",".join(ENGINE_WAYS),
                    help=f"--engines: which ways to run, of {','.join(ENGINE_WAYS)}")
    ap.add_argument("--out", type=Path, help="a JSON file for the raw figures")
    args, extra = ap.parse_known_args()
    if args.out and (args.out.is_dir() or not args.out.parent.is_dir()):  # found out before minutes of sweeps
        ap.error(f"--out {args.out}: must be a file in an existing folder")
    print(f"CPU: {cpu.describe()}; {load()}", file=sys.stderr)
    hog = start_hog(args.hog_procs) if args.hog else []
    report: Dict[str, Any] = {"cpu": cpu.describe(), "hog_procs": len(hog), "extra": extra}
    lines = [f"CPU {cpu.describe()}; hog: {len(hog)} busy process(es); overrides: {' '.join(extra) or '-'}"]
    try:
        with tempfile.TemporaryDirectory(prefix="race-bench-") as tmp:
            if args.aa:
                report["aa"] = run_aa(args.aa, extra, Path(tmp), tuple(args.modes.split(",")))
                lines += summarize_aa(report["aa"])
            if args.twice:
                lines += run_twice(extra, Path(tmp))
            if args.engines:
                lines += run_engines(extra, Path(tmp), 20, tuple(args.ways.split(",")))
    finally:
        for p in hog:
            p.kill()
    lines.append(f"at the end: {load()}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({**report, "lines": lines}, indent=2, default=str))


if __name__ == "__main__":
    main()
