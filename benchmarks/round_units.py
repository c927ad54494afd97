"""Does a race round's composition change what it reads? Two questions, in one process, interleaved:

- ``--same``: timing the batches the warm-up has just run, against timing two others (the race's timing pass starts
  where its warm-up did, in the round's seeded order).
- ``--lengths``: units of 2, 5 and 16 timed batches (a short round against a long one).

Each unit is one round of one job as in a race: another model's forward first (another job's round), then
``--warmup`` untimed batches, then the timed ones, in a fresh seeded order of the length-sorted batches. The
variants alternate in a seeded order within each repetition, so load changes hit them alike; medians are quoted.
Eager fp32 only (a transformers sequence-classification model and a TSV of sentences). Not a test.

    python benchmarks/round_units.py --model ../shared/models/minilm-sst2 --data ../shared/data/sst2_dev.tsv
"""
from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a TSV with a header; its first column is the text")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--same", action="store_true")
    ap.add_argument("--lengths", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator import cpu

    torch.set_num_threads(args.threads)
    model = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    other = AutoModelForSequenceClassification.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.data, newline="") as f:
        texts = sorted((r[0] for r in list(csv.reader(f, delimiter="\t"))[1:args.rows + 1]), key=len)
    bs = args.batch_size
    batches = [tok(texts[i:i + bs], padding=True, return_tensors="pt") for i in range(0, len(texts), bs)]

    def forward(m, b):
        with torch.inference_mode():
            m(**b)

    def unit(order, timed, offset):
        for b in batches[:3]:
            forward(other, b)  # another job's round
        for i in range(args.warmup):
            forward(model, batches[order[i % len(order)]])
        rows, t0 = 0, time.perf_counter()
        for i in range(timed):
            b = batches[order[(offset + i) % len(order)]]
            forward(model, b)
            rows += b["input_ids"].shape[0]
        return rows / (time.perf_counter() - t0)

    variants = {}
    if args.same or not args.lengths:
        variants["2 timed: the warmed-up batches"] = (2, 0)
        variants["2 timed: two others"] = (2, args.warmup)
    if args.lengths:
        for n in (2, 5, 16):
            variants[f"{n} timed"] = (n, args.warmup)
    got = {k: [] for k in variants}
    for r in range(args.reps):
        order = list(range(len(batches)))
        random.Random(r).shuffle(order)
        keys = list(variants)
        random.Random(1000 + r).shuffle(keys)
        for k in keys:
            got[k].append(unit(order, *variants[k]))
    print(f"CPU: {cpu.describe()}; {len(batches)} batches of {bs}; {args.reps} repetitions; warm-up {args.warmup}")
    for k, v in got.items():
        print(f"  {k:34s} median {statistics.median(v):7.1f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
