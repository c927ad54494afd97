"""The in-process bias, measured: the same sweep with every job in one process (both job orders) and isolated.

Hydra's basic launcher runs every job of ``orchestrator -m ...`` in one process, so a job inherits what the jobs
before it left behind: oneDNN's kernels built per input shape, TorchScript's specialisations, allocator arenas.
This script runs one 4-job sweep through the real CLI three ways, round after round:

- ``basic``    hydra/launcher=basic, jobs in the order given (eager before jit, fp32 before bf16)
- ``reverse``  hydra/launcher=basic, the same jobs in reverse order
- ``isolated`` hydra/launcher=isolated (the default): each job a fresh process, one at a time

and prints, per job, the median throughput of each way and the ratios in-process / isolated. A ratio above 1
is a job made to look faster by an earlier job in the same process. It also prints the isolated launcher's
start-up cost per job (``process_startup_s``: process start to the run starting, imports included).

Jobs: eager and jit x fp32 and bf16 where the CPU has native bf16 (orchestrator/cpu.py), else eager, jit and
quantize in fp32. Workload: the embedded default (all-MiniLM-L6-v2, 150 STS pairs); any extra arguments are
passed to every sweep as overrides, e.g. ``experiment=sst2_minilm`` (needs ../shared).

    python benchmarks/isolation.py --rounds 3                      # ~15 min on 2 cores
    python benchmarks/isolation.py --rounds 2 experiment=sst2_minilm
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from orchestrator import cpu  # noqa: E402


def jobs() -> Tuple[List[str], List[str]]:
    """(stack values, precision values) in the forward order."""
    if cpu.has("bf16"):
        return ["[]", "[jit]"], ["fp32", "bf16"]
    return ["[]", "[jit]", "[quantize]"], ["fp32"]


def sweep(way: str, workdir: Path, extra: List[str]) -> Tuple[Dict[Tuple[str, str], float], List[float]]:
    stacks, precisions = jobs()
    if way == "reverse":
        stacks, precisions = stacks[::-1], precisions[::-1]
    launcher = "hydra/launcher=isolated" if way == "isolated" else "hydra/launcher=basic"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "orchestrator", "-m", f"optimization={','.join(stacks)}",
           f"precision={','.join(precisions)}", launcher, f"tracking.uri={uri}", "runtime.progress=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{way} sweep failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    sweep_dir = sorted((workdir / "outputs" / "multirun").glob("*/*"), key=lambda p: p.stat().st_mtime)[-1]
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    thr = {(r["stack"], r["precision"]): float(r["throughput"]) for r in rows}
    startup = _startups(uri) if way == "isolated" else []
    print(f"  {way:9s} {time.perf_counter() - t0:6.0f} s  " +
          "  ".join(f"{s}/{p} {v:7.1f}" for (s, p), v in sorted(thr.items())), flush=True)
    return thr, startup


def _startups(uri: str) -> List[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("orchestrator")
    runs = client.search_runs([exp.experiment_id], "tags.`process.isolated` = 'true'", max_results=1000,
                              order_by=["attributes.start_time DESC"])
    return [r.data.metrics["process_startup_s"] for r in runs[:len(jobs()[0]) * len(jobs()[1])]
            if "process_startup_s" in r.data.metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra overrides for every sweep (e.g. experiment=sst2_minilm)")
    args = parser.parse_args()
    ways = ["isolated", "basic", "reverse"]
    results: Dict[str, List[Dict[Tuple[str, str], float]]] = {w: [] for w in ways}
    startups: List[float] = []
    print(f"CPU: {cpu.describe()}; torch threads: default; {args.rounds} rounds; overrides: {args.overrides or '-'}")
    with tempfile.TemporaryDirectory(prefix="isolation-bench-") as tmp:
        for k in range(args.rounds):
            print(f"round {k + 1}/{args.rounds}", flush=True)
            order = ways[k % 3:] + ways[:k % 3]  # rotate which way runs first: drift spreads over all three
            for way in order:
                thr, st = sweep(way, Path(tmp), args.overrides)
                results[way].append(thr)
                startups += st
    keys = sorted(results["isolated"][0])
    med = {w: {key: statistics.median(r[key] for r in results[w]) for key in keys} for w in ways}
    print("\nmedian throughput (rows/s) and in-process / isolated ratio, per job")
    print(f"{'job':22s} {'isolated':>9s} {'basic':>9s} {'ratio':>6s} {'reverse':>9s} {'ratio':>6s}")
    for key in keys:
        iso = med["isolated"][key]
        print(f"{key[0] + '/' + key[1]:22s} {iso:9.1f} {med['basic'][key]:9.1f} {med['basic'][key] / iso:6.2f} "
              f"{med['reverse'][key]:9.1f} {med['reverse'][key] / iso:6.2f}")
    if startups:
        print(f"\nisolated start-up per job (process_startup_s): median {statistics.median(startups):.2f} s, "
              f"min {min(startups):.2f}, max {max(startups):.2f} over {len(startups)} jobs")


if __name__ == "__main__":
    main()
