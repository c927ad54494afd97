"""What OpenVINO's telemetry costs a conversion: ``convert_model`` and ``compile_model`` times with the library's own
consent default (no consent file = send) against the openvino plugin's (no consent file = do not send), each in a
fresh process (the telemetry object is a process-wide singleton), the two interleaved in pairs.

    python benchmarks/openvino_telemetry.py --pairs 6

Prints each pair and the medians per arm with their ratio, naming the CPU. Models: a 2-layer BERT (hidden 32) and a
MiniLM-L6-sized BERT (hidden 384, 6 layers, random weights: the graph, not the weights, is converted). The "sent"
arm runs OpenVINO as installed: on a machine without a consent file it tries to reach Google Analytics and writes a
client id under ~/intel (offline here: the attempts fail, their forks and threads still run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
forks = []
os.register_at_fork(before=lambda: forks.append(1))
if sys.argv[1] == "off":
    from orchestrator_plugins.openvino import telemetry_only_by_consent
    telemetry_only_by_consent()
import torch
from transformers import BertConfig, BertModel
size = dict(tiny=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
            minilm=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536))
torch.manual_seed(0)
model = BertModel(BertConfig(vocab_size=1000, **size[sys.argv[2]])).eval()
import openvino as ov
example = (torch.ones(8, 32, dtype=torch.long), torch.ones(8, 32, dtype=torch.long))
t0 = time.perf_counter()
converted = ov.convert_model(model, example_input=example)
t1 = time.perf_counter()
ov.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": 1})
t2 = time.perf_counter()
print(json.dumps({"convert_s": t1 - t0, "compile_s": t2 - t1, "forks": len(forks)}))
"""


def measure(arm: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, arm, model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--models", default="tiny,minilm")
    args = ap.parse_args(argv)
    from orchestrator import cpu

    print(f"CPU: {cpu.describe()}")
    for model in args.models.split(","):
        arms = {"sent": [], "off": []}
        for i in range(args.pairs):
            order = ("sent", "off") if i % 2 == 0 else ("off", "sent")  # alternate which arm goes first
            for arm in order:
                arms[arm].append(measure(arm, model))
            print(f"{model} pair {i + 1}: " + "  ".join(
                f"{a} convert {arms[a][-1]['convert_s']:.2f} s compile {arms[a][-1]['compile_s']:.2f} s "
                f"forks {arms[a][-1]['forks']}" for a in ("sent", "off")))
        for key in ("convert_s", "compile_s"):
            sent = statistics.median(r[key] for r in arms["sent"])
            off = statistics.median(r[key] for r in arms["off"])
            print(f"{model} {key}: median {sent:.3f} s sent, {off:.3f} s off, ratio {sent / off:.2f}x "
                  f"({args.pairs} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
