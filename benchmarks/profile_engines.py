"""Where one forward's time goes, per engine, on the QA workload's shape: op types and the GEMM share.

Model: a bert-base-sized BertForQuestionAnswering (BertConfig defaults, random weights, seed 0), one batch of 8 rows
x ``--length`` tokens (160: a typical length-sorted batch of the SQuAD sample at max_length 384; random token ids,
the last rows' tails padded). Every engine is built through the plugin classes (``pipeline.build_plugins`` +
``apply_stack``, as benchmarks/stacks.py does), then:

- ``wall ms``: median wall time of one forward of the plugin-built model (no profiler attached);
- the breakdown, from each runtime's own profiler over ``--iters`` forwards after warm-up:
  eager fp32/bf16 and pt2e: ``torch.profiler`` self CPU time per op (pt2e with inductor's kernel profiling on, so
  the generated ``cpp_fused_*`` kernels show up by name); onnxruntime: ``SessionOptions.enable_profiling`` on the
  .onnx file the plugin wrote (run_dir/onnxruntime), node kernel times summed by op_type; openvino:
  ``PERF_COUNT`` on the IR the plugin saved (run_dir/openvino/model.xml, same precision hint), real time summed by
  node type and by exec type (the kernel implementation: brgemm/jit/ref and its precision).

Each op is put in a class: gemm (matmul / linear / qlinear / MatMulInteger / FullyConnected), attention
(softmax, SDPA), layernorm, gelu, quant (quantize/dequantize, dynamic quantization), reorder (copies, transposes,
layout changes) and other (adds, embeddings, masks). Shares are of the profiled op time (self times add up to it).

    python benchmarks/profile_engines.py                                  # all engines, 2 threads (~5 min here)
    python benchmarks/profile_engines.py --engines eager_bf16,openvino_bf16 --length 384
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator import pipeline  # noqa: E402
from orchestrator.plugin import PluginContext  # noqa: E402

# engine -> (precision dtype, {plugin: options})
ENGINES = {
    "eager_fp32": (torch.float32, {}),
    "eager_bf16": (torch.bfloat16, {}),
    "pt2e": (torch.float32, {"pt2e": {"mode": "dynamic"}}),
    "onnxruntime_fp32": (torch.float32, {"onnxruntime": {}}),
    "onnxruntime_int8": (torch.float32, {"onnxruntime": {"int8": "dynamic"}}),
    "openvino_fp32": (torch.float32, {"openvino": {}}),
    "openvino_bf16": (torch.bfloat16, {"openvino": {}}),
    "openvino_int8w": (torch.bfloat16, {"openvino": {"int8": "weights"}}),
}
CLASSES = [  # first match wins: a fused quantize+matmul (DynamicQuantizeMatMul, qlinear) counts as gemm
    ("gemm", r"qlinear|matmul|gemm|fullyconnected|innerproduct|\b(aten::)?(mm|addmm|bmm|baddbmm|linear|_int_mm)\b"
             r"|onednn::|mkldnn|einsum"),
    ("quant", r"quantiz|choose_qparams|qdq|fakequant"),
    ("attention", r"softmax|scaled_dot_product|attention|sdpa"),
    ("layernorm", r"layer_?norm|mvn|normaliz"),
    ("gelu", r"gelu|erf"),
    ("reorder", r"reorder|transpose|permute|copy|contiguous|clone|convert|_to_copy|cast|reshape|view|expand"),
]


def classify(name: str) -> str:
    n = name.lower()
    return next((c for c, pat in CLASSES if re.search(pat, n)), "other")


def make_inputs(batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    ids[:, 0], ids[:, length // 4] = 101, 102  # [CLS] question [SEP] context
    tt = torch.zeros_like(ids)
    tt[:, length // 4 + 1:] = 1
    mask = torch.ones_like(ids)
    for r in range(batch // 2, batch):  # sorted batches: the shorter rows are padded at the tail
        mask[r, length - 4 * (r - batch // 2 + 1):] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}


def build(name, base, batch, run_dir: Path):
    dtype, stack = ENGINES[name]
    model = base if dtype == torch.float32 else __import__("copy").deepcopy(base).to(dtype)
    if not stack:
        return model, None
    if name == "pt2e":  # the generated kernels appear in torch.profiler by name (set before inductor compiles)
        import torch._inductor.config as ic
        ic.cpp.enable_kernel_profile = True
    plugins = pipeline.build_plugins(stack)
    ctx = PluginContext(task="qa", dtype=dtype, autocast_dtype=None, example_batch=batch,
                        threads=torch.get_num_threads(), run_dir=run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine, record = pipeline.apply_stack(model, plugins, ctx, "fail")
    return engine, record.details[plugins[0].name]


def wall_ms(model, batch, iters: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(iters):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def profile_torch(model, batch, iters: int):
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            model(**batch)
    by_op = collections.Counter()
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0 and not e.key.startswith(("ProfilerStep", "## Call")):
            by_op[e.key] += e.self_cpu_time_total / 1000 / iters  # ms per forward
    return by_op, None


def profile_ort(path: Path, batch, threads: int, iters: int, warm: int = 3):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = True
    so.profile_file_prefix = str(path.parent / "ort_profile")
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: batch[i.name].numpy() for i in sess.get_inputs()}
    for _ in range(warm + iters):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff = runs[warm - 1]["ts"] + runs[warm - 1]["dur"]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > cutoff:
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1000 / iters
    run_ms = sum(r["dur"] for r in runs[warm:]) / 1000 / iters
    return by_op, f"session run {run_ms:.1f} ms/forward, node kernels {sum(by_op.values()):.1f} ms"


def profile_ov(xml: Path, batch, details, iters: int, warm: int = 3):
    import openvino as ov

    config = {"PERFORMANCE_HINT": details["performance_hint"], "INFERENCE_NUM_THREADS": int(details["threads"]),
              "INFERENCE_PRECISION_HINT": details["precision_hint"], "PERF_COUNT": True}
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    request = compiled.create_infer_request()
    feed = {p.get_any_name(): batch[p.get_any_name()].numpy() for p in compiled.inputs}
    by_type, by_exec = collections.Counter(), collections.Counter()
    for i in range(warm + iters):
        request.infer(feed)
        if i < warm:
            continue
        for p in request.get_profiling_info():
            if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_RUN"):
                ms = p.real_time.total_seconds() * 1000 / iters
                by_type[p.node_type] += ms
                by_exec[re.sub(r"_[A-Z0-9]+$", "", p.exec_type) + " " + p.exec_type.rsplit("_", 1)[-1]] += ms
    top_exec = ", ".join(f"{k} {100 * v / sum(by_exec.values()):.0f}%" for k, v in by_exec.most_common(4))
    return by_type, f"exec types: {top_exec}"


def report(name: str, wall: float, by_op, note, top: int) -> dict:
    total = sum(by_op.values())
    classes = collections.Counter()
    for op, ms in by_op.items():
        classes[classify(op)] += ms
    print(f"\n== {name}: {wall:.1f} ms/forward wall; profiled op time {total:.1f} ms/forward"
          + (f"; {note}" if note else ""))
    for op, ms in by_op.most_common(top):
        print(f"   {100 * ms / total:5.1f}%  {ms:7.2f} ms  {op[:70]}  [{classify(op)}]")
    print("   classes: " + ", ".join(f"{c} {100 * ms / total:.1f}%" for c, ms in classes.most_common()))
    return {"engine": name, "wall_ms": wall, "op_ms": total, "note": note,
            "top": [(op, 100 * ms / total) for op, ms in by_op.most_common(top)],
            "classes": {c: 100 * ms / total for c, ms in classes.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10, help="profiled forwards (and timed ones) per engine")
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--layers", type=int, default=12, help="fewer for a quick smoke test")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    names = args.engines.split(",")
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; valid: {', '.join(ENGINES)}")

    from transformers import BertConfig, BertForQuestionAnswering
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = BertForQuestionAnswering(BertConfig(num_hidden_layers=args.layers)).eval()
    batch = make_inputs(args.batch, args.length)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"prof-{name}-") as tmp:
            try:
                t0 = time.perf_counter()
                model, details = build(name, base, batch, Path(tmp))
                build_s = time.perf_counter() - t0
                wall_ms(model, batch, 3)  # warm-up: kernels picked, shapes compiled
                wall = wall_ms(model, batch, args.iters)
                if name.startswith("onnxruntime"):
                    by_op, note = profile_ort(Path(tmp) / "onnxruntime" / details["file"], batch, args.threads,
                                              args.iters)
                elif name.startswith("openvino"):
                    by_op, note = profile_ov(Path(tmp) / "openvino" / "model.xml", batch, details, args.iters)
                    note += f"; inference_precision {details['inference_precision']}"
                else:
                    by_op, note = profile_torch(model, batch, args.iters)
            except Exception as e:  # noqa: BLE001 - one engine failing does not hide the others
                print(f"\n== {name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                results.append({"engine": name, "error": f"{type(e).__name__}: {e}"})
                continue
            r = report(name, wall, by_op, (note + "; " if note else "") + f"built in {build_s:.0f} s", args.top)
            results.append(r)
    print(f"\nbatch {args.batch} x {args.length} tokens, {args.layers} layers, {args.threads} threads, "
          f"{args.iters} profiled forwards; torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
