"""Does a race round's warm-up change what its timed batches read? (`race.warmup`, docs/sweeps.md)

Several recipes are built in one process through the orchestrator's own phases (load, precision, stack), each
batch run once. Then, repeatedly, every (recipe, warm-up) unit runs in a fresh seeded order — the other recipes'
units in between, as other jobs' rounds are in a race — with one of three warm-ups before its timed batches:

- ``short1``: one untimed run of the shortest batch (``race.warmup=1``, the default);
- ``order2``: the round order's first two batches, which are then timed first (``race.warmup=null`` with
  ``runtime.warmup=2``, the earlier default);
- ``none``: no warm-up.

Each timed batch is read relative to that batch's median over everything, by position in the unit, and per unit
(the mean over its timed batches); medians and a robust spread (IQR / 1.35) are printed per recipe and warm-up.
Not a test.

    python benchmarks/race_warmup.py --recipes eager_fp32,pt2e_int8,openvino_int8 --reps 40
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUPS = ("short1", "order2", "none")


def build(recipe: str, overrides: list, tmp: Path):
    """(step, batches) of one recipe, as a race's extra process builds them: no accuracy pass, nothing recorded."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator import phases
    from orchestrator.config import register_configs, to_run_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "orchestrator" / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"recipe={recipe}", *overrides,
                                                       f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"])
    rc = to_run_config(cfg)
    run_dir = tmp / recipe
    run_dir.mkdir()
    rec = phases.Recorder.unrecorded(rc, run_dir, recipe)
    checked = phases.preflight(rc, evaluates=False)
    loaded = phases.load(checked, rec)
    prepared = phases.prepare(checked, loaded, rec, None)
    opt = phases.optimize(checked, loaded, prepared, rec, [])
    for b in prepared.batches:  # every shape once, as the accuracy pass does
        opt.step(b.inputs)
    return opt.step, prepared.batches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="eager_fp32,pt2e_int8,openvino_int8")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--timed", type=int, default=5, help="timed batches per unit (a race process's share)")
    ap.add_argument("--out", type=Path, help="a JSON file for the raw times")
    args, overrides = ap.parse_known_args(argv)
    overrides = overrides or ["experiment=sst2_minilm", "dataset.max_samples=256", "runtime.padding=dynamic",
                              "runtime.sort_by_length=true"]
    os.environ.setdefault("ORCH_SHARED_DIR", str(REPO.parent / "shared"))
    from orchestrator import cpu

    recipes = args.recipes.split(",")
    with tempfile.TemporaryDirectory(prefix="race-warmup-") as tmp:
        built = {r: build(r, overrides, Path(tmp)) for r in recipes}
    rng = random.Random(0)
    units = [(r, w) for r in recipes for w in WARMUPS]
    rows = []  # (rep, recipe, warm-up, position, batch, seconds)
    load0 = os.getloadavg()
    for rep in range(args.reps):
        rng.shuffle(units)
        for r, w in units:
            step, batches = built[r]
            order = list(range(len(batches)))
            rng.shuffle(order)
            if w == "short1":
                step(min(batches, key=lambda b: b.elements).inputs)  # as RaceWorker.timing picks it
            elif w == "order2":
                for k in order[:2]:
                    step(batches[k].inputs)
            for pos, k in enumerate(order[:args.timed]):
                t0 = time.perf_counter()
                step(batches[k].inputs)
                rows.append((rep, r, w, pos, k, time.perf_counter() - t0))
    by_batch = defaultdict(list)
    for _, r, _, _, k, s in rows:
        by_batch[(r, k)].append(s)
    median = {key: statistics.median(v) for key, v in by_batch.items()}
    pos_rel, unit_rel = defaultdict(list), defaultdict(list)
    for rep, r, w, pos, k, s in rows:
        pos_rel[(r, w, pos)].append(s / median[(r, k)])
        unit_rel[(r, w, rep)].append(s / median[(r, k)])
    print(f"CPU {cpu.describe()}; load {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
          f"{args.reps} repetitions, {args.timed} timed batches per unit; time relative to each batch's median")
    for r in recipes:
        print(f"{r}: per-batch medians " + ", ".join(f"{1000 * median[(r, k)]:.0f}" for k in range(len(built[r][1])))
              + " ms")
        for w in WARMUPS:
            units_w = sorted(statistics.mean(v) for (rr, ww, _), v in unit_rel.items() if (rr, ww) == (r, w))
            q = statistics.quantiles(units_w, n=4)
            by_pos = " ".join(f"{statistics.median(pos_rel[(r, w, p)]):.3f}" for p in range(args.timed))
            print(f"  {w:7s} unit median {statistics.median(units_w):.3f}, spread (IQR/1.35) "
                  f"{(q[2] - q[0]) / 1.35:.3f}; by position {by_pos}")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu.describe(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
