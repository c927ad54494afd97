"""The engines on the real shared models and data (../shared): fp32/bf16 engines within 0.5 points of eager fp32
(SST-2 accuracy 80.96, STS-B Spearman 82.03), int8 accuracy reported (and above a floor that only a broken
quantization misses). Each figure is printed for the test log; the CPU decides whether bf16 runs."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import needs_bf16, needs_shared
from orchestrator import cpu
from orchestrator.runner import run
from test_reference import TIMING

pytestmark = pytest.mark.slow

HAS = {name: all(importlib.util.find_spec(m) for m in mods) for name, mods in
       {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "nncf"),
        "pt2e": ("torchao",)}.items()}


def needs(name):
    return pytest.mark.skipif(not HAS[name], reason=f"{name} extra not installed (pip install -e '.[{name}]')")


SST2_FP32, STSB_FP32 = 80.96, 82.03


@needs_shared("models", "minilm-sst2")
@pytest.mark.parametrize("stack,precision", [
    pytest.param("onnxruntime", "fp32", marks=needs("onnxruntime")),
    pytest.param("openvino", "fp32", marks=needs("openvino")),
    pytest.param("openvino", "bf16", marks=[needs("openvino"), needs_bf16]),
])
def test_sst2_fp32_and_bf16_engines_keep_the_accuracy(compose, tracking_uri, stack, precision):
    m = run(compose("experiment=sst2_minilm", f"optimization=[{stack}]", f"precision={precision}",
                    f"tracking.uri={tracking_uri}", *TIMING))["metrics"]
    print(f"SST-2 {stack} {precision}: accuracy {m['accuracy']:.2f} (eager fp32 {SST2_FP32}) on {cpu.describe()}")
    assert m["examples"] == 872 and abs(m["accuracy"] - SST2_FP32) <= 0.5


@needs_shared("models", "minilm-sst2")
@needs_shared("data", "sst2_train.tsv")
@pytest.mark.parametrize("stack,options", [
    pytest.param("onnxruntime", "optimization.onnxruntime.int8=dynamic", marks=needs("onnxruntime")),
    pytest.param("openvino", "optimization.openvino.int8=static", marks=needs("openvino")),
    pytest.param("pt2e", "optimization.pt2e.mode=static", marks=needs("pt2e")),
])
def test_sst2_int8_engines_report_their_accuracy(compose, tracking_uri, stack, options):
    results = run(compose("experiment=sst2_minilm", f"optimization=[{stack}]", options,
                          "dataset.calibration_samples=128", f"tracking.uri={tracking_uri}", *TIMING))
    m = results["metrics"]
    print(f"SST-2 {stack} int8 ({options}): accuracy {m['accuracy']:.2f} (eager fp32 {SST2_FP32}), parity "
          f"agreement {m['parity_agreement']:.3f} on {cpu.describe()}")
    assert results["status"] == "FINISHED" and m["examples"] == 872
    assert m["accuracy"] >= SST2_FP32 - 5  # a broken quantization lands near 50 %


@needs_shared("data", "stsb_test.csv")
@pytest.mark.parametrize("stack", [pytest.param("onnxruntime", marks=needs("onnxruntime")),
                                   pytest.param("openvino", marks=needs("openvino"))])
def test_stsb_engines_keep_the_spearman(compose, tracking_uri, stack):
    m = run(compose("experiment=stsb_minilm", f"optimization=[{stack}]", f"tracking.uri={tracking_uri}",
                    *TIMING))["metrics"]
    print(f"STS-B {stack} fp32: Spearman {m['spearman']:.2f} (eager fp32 {STSB_FP32}) on {cpu.describe()}")
    assert m["examples"] == 1379 and abs(m["spearman"] - STSB_FP32) <= 0.5
