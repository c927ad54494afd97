"""The ipex plugin, in both environments.

Main environment (torch 2.13): ``optimization=[ipex]`` fails with one line that says what was found, what is needed
and how to get the IPEX environment, without importing intel_extension_for_pytorch. IPEX environment (.venv-ipex,
torch 2.8 + IPEX 2.8, see docs/ipex.md; run by .ci/ipex): tiny models through ``[ipex]`` and ``[ipex,jit]`` in every
precision and int8, parity within the tolerances documented in docs/ipex.md, and the shared SST-2 model in bf16.
"""
from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED, needs_shared, run_cli, tiny_sts_overrides
from orchestrator.errors import PluginUnavailable
from orchestrator.plugin import PluginContext
from orchestrator.runner import run
from orchestrator_plugins import ipex as ipex_plugin

IPEX_ENV = ipex_plugin.environment_problem() is None
in_ipex_env = pytest.mark.skipif(
    not IPEX_ENV, reason="needs the IPEX environment (torch 2.8.x + intel-extension-for-pytorch 2.8, transformers"
                         "<=5.23): run .ci/ipex, or see docs/ipex.md")
in_main_env = pytest.mark.skipif(IPEX_ENV, reason="checks the refusal outside the IPEX environment")

# max |Δ| of the task head's output vs the eager fp32 model, on the tiny generated models (docs/ipex.md)
TOL = {"fp32": 1e-5, "bf16": 1e-3, "bf16_autocast": 1e-3, "int8": 2e-3}


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---- both environments: no import of IPEX until apply, and the guard ---------------------------------------------

def test_importing_orchestrator_and_the_plugin_class_does_not_import_ipex():
    code = ("import sys, orchestrator, orchestrator.runner, orchestrator.cli\n"
            "from orchestrator.registry import plugins\n"
            "cls = plugins.get('ipex'); plugins.validate_stack(['ipex', 'jit']); cls().describe()\n"
            "print('intel_extension_for_pytorch' in sys.modules, cls.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "orchestrator_plugins.ipex"]


@pytest.mark.parametrize("versions, needle", [
    ({"torch": "2.13.0+cpu", "transformers": "5.24.0", "intel-extension-for-pytorch": None},
     "found torch 2.13.0+cpu, transformers 5.24.0, intel-extension-for-pytorch not installed"),
    ({"torch": "2.8.0", "transformers": "5.24.0", "intel-extension-for-pytorch": "2.8.0"},
     "found torch 2.8.0, transformers 5.24.0, intel-extension-for-pytorch 2.8.0"),
    ({"torch": "2.9.1", "transformers": "5.23.0", "intel-extension-for-pytorch": "2.8.0"}, "found torch 2.9.1,"),
])
def test_guard_reads_metadata_and_says_what_is_needed(monkeypatch, versions, needle):
    monkeypatch.setattr(ipex_plugin, "_version", versions.get)  # None = not installed
    msg = ipex_plugin.environment_problem()
    assert msg.startswith(needle) and "\n" not in msg
    assert "needs torch 2.8.x, transformers<=5.23 and intel-extension-for-pytorch 2.8" in msg
    assert "pip install -r requirements/ipex.txt" in msg


def test_guard_accepts_the_ipex_environment(monkeypatch):
    versions = {"torch": "2.8.0+cpu", "transformers": "5.23.0", "intel-extension-for-pytorch": "2.8.0"}
    monkeypatch.setattr(ipex_plugin, "_version", versions.get)
    assert ipex_plugin.environment_problem() is None


@pytest.mark.parametrize("options, precision, message", [
    ({"int8": "static"}, "bf16", "optimization.ipex.int8=static quantizes an fp32 model; use precision=fp32"),
    ({"dtype": "bfloat16"}, "fp32", "optimization.ipex.dtype=bfloat16 disagrees with the precision"),
    ({"dtype": "float32"}, "bf16_autocast", "optimization.ipex.dtype=float32 disagrees with the precision"),
])
def test_options_are_checked_before_any_import(monkeypatch, options, precision, message):
    monkeypatch.setattr(ipex_plugin, "environment_problem", lambda: None)
    dtype, ac = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
                 "bf16_autocast": (torch.float32, torch.bfloat16)}[precision]
    plugin = ipex_plugin.IpexPlugin(ipex_plugin.IpexOptions(**options))
    ctx = PluginContext(task="text_classification", dtype=dtype, autocast_dtype=ac, example_batch={}, threads=1)
    with pytest.raises(PluginUnavailable, match=message.replace(".", r"\.").replace("(", r"\(")):
        plugin.check(ctx)


@pytest.mark.parametrize("options, message", [
    ({"level": "O3"}, "optimization.ipex.level: Invalid value 'O3', expected one of [O0, O1]"),
    ({"int8": "yes"}, "optimization.ipex.int8: Invalid value 'yes', expected one of [none, dynamic, static]"),
    ({"calibration_batches": 0}, "optimization.ipex.calibration_batches=0: must be >= 1"),
])
def test_option_values_are_config_errors_before_anything_loads(options, message):
    """Typed choices (the schema) and ranges (validate_options): ConfigError while validating, IPEX not imported."""
    from orchestrator.errors import ConfigError
    from orchestrator.pipeline import build_plugins

    with pytest.raises(ConfigError) as e:
        build_plugins({"ipex": options})
    assert str(e.value) == message


# ---- main environment: the refusal --------------------------------------------------------------------------------

@in_main_env
def test_ipex_in_the_main_environment_fails_in_one_line_without_importing_it(compose, tiny_encoder, sts_file,
                                                                               tracking_uri):
    expected = (f"optimization plugin 'ipex' is unavailable: found torch {_version('torch')}, transformers "
                f"{_version('transformers')}, intel-extension-for-pytorch {_version('intel-extension-for-pytorch')}; "
                "needs torch 2.8.x, transformers<=5.23 and intel-extension-for-pytorch 2.8 (IPEX 2.8 is the last "
                "release); set up the IPEX environment: python -m venv .venv-ipex && .venv-ipex/bin/pip install -r "
                "requirements/ipex.txt && .venv-ipex/bin/pip install --no-deps -e . (docs/ipex.md)")
    with pytest.raises(PluginUnavailable) as err:
        run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "optimization=[ipex]"))
    assert str(err.value) == expected
    assert "intel_extension_for_pytorch" not in sys.modules


# ---- IPEX environment: the real thing -----------------------------------------------------------------------------

def _cls_run(compose, model, data, uri, *overrides):
    return run(compose(f"model.name_or_path={model}", "dataset=sst2", f"dataset.data_files={data}", "runtime=quick",
                       f"tracking.uri={uri}", "runtime.parity_samples=40", "runtime.batch_size=8", *overrides))


@in_ipex_env
@pytest.mark.ipex
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16_autocast"])
@pytest.mark.parametrize("stack", [["ipex"], ["ipex", "jit"]], ids=["ipex", "ipex+jit"])
def test_tiny_classifier_parity(compose, tiny_classifier, cls_file, tracking_uri, stack, precision):
    results = _cls_run(compose, tiny_classifier, cls_file, tracking_uri, f"optimization=[{','.join(stack)}]",
                       f"precision={precision}")
    m, tags = results["metrics"], results["tags"]
    print(f"\nPARITY {'+'.join(stack)} {precision}: max|Δ|={m['parity_max_abs_diff']:.2e} "
          f"agreement={m['parity_agreement']:.3f}")
    assert results["status"] == "FINISHED" and results["applied"] == stack
    assert m["parity_max_abs_diff"] <= TOL[precision]
    assert m["parity_agreement"] == 1.0
    assert tags["plugin.ipex.dtype"] == ("float32" if precision == "fp32" else "bfloat16")
    assert tags["plugin.ipex.version"].startswith("2.8")
    assert ("jit trace+freeze" in tags["plugin.ipex.recipe"]) == ("jit" in stack)
    if precision == "bf16_autocast":
        assert "IPEX's recipe" in tags["plugin.ipex.recipe"]


@in_ipex_env
@pytest.mark.ipex
def test_tiny_encoder_fp32_parity(compose, tiny_encoder, sts_file, tracking_uri):
    """Sentence similarity reads last_hidden_state from the traced dict."""
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "optimization=[ipex,jit]"))
    assert results["metrics"]["parity_max_abs_diff"] <= TOL["fp32"]


@in_ipex_env
@pytest.mark.ipex
@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("stack", [["ipex"], ["ipex", "jit"]], ids=["ipex", "ipex+jit"])
def test_tiny_classifier_int8(compose, tiny_classifier, cls_file, tracking_uri, stack, mode):
    results = _cls_run(compose, tiny_classifier, cls_file, tracking_uri, f"optimization=[{','.join(stack)}]",
                       f"optimization.ipex.int8={mode}")
    m, tags = results["metrics"], results["tags"]
    print(f"\nPARITY {'+'.join(stack)} int8-{mode}: max|Δ|={m['parity_max_abs_diff']:.2e} "
          f"agreement={m['parity_agreement']:.3f}")
    assert results["applied"] == stack and tags["plugin.ipex.int8"] == mode
    assert m["parity_max_abs_diff"] <= TOL["int8"]
    assert m["parity_agreement"] >= 0.95


@in_ipex_env
@pytest.mark.ipex
def test_static_int8_calibrates_on_the_given_batches(tiny_classifier):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval()
    g = torch.Generator().manual_seed(0)

    def batch(rows, width):
        return {"input_ids": torch.randint(5, 30, (rows, width), generator=g),
                "attention_mask": torch.ones(rows, width, dtype=torch.long),
                "token_type_ids": torch.zeros(rows, width, dtype=torch.long)}

    example = batch(4, 12)
    ctx = PluginContext(task="text_classification", dtype=torch.float32, autocast_dtype=None, example_batch=example,
                        threads=1, calibration_batches=[batch(4, 12), batch(8, 20), batch(2, 7)])
    plugin = ipex_plugin.IpexPlugin(ipex_plugin.IpexOptions(int8="static", calibration_batches=2))
    plugin.check(ctx)
    q = plugin.apply(model, ctx)
    assert plugin.describe()["calibration"] == "2 batches from ctx.calibration_batches"
    with torch.inference_mode():
        diff = (q(**example)["logits"] - model(**example).logits).abs().max().item()
    assert diff <= TOL["int8"]


@in_ipex_env
@pytest.mark.ipex
def test_ipex_import_is_quiet():
    code = ("import time, sys; t = time.perf_counter()\n"
            "from orchestrator_plugins.ipex import import_ipex_quietly\n"
            "ipex = import_ipex_quietly(); print(ipex.__version__, round(time.perf_counter() - t, 1))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("2.8") and out.stderr == ""


@in_ipex_env
@pytest.mark.ipex
def test_failed_ipex_import_is_one_line_with_what_it_printed(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "intel_extension_for_pytorch":
            import os
            os.write(2, b"ERROR! Intel Extension for PyTorch needs torch 2.8\n")
            raise AttributeError("module 'os' has no attribute 'exit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "intel_extension_for_pytorch", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(RuntimeError, match=r"^import intel_extension_for_pytorch failed: AttributeError: module 'os' "
                                           r"has no attribute 'exit'; it printed: ERROR! Intel Extension"):
        ipex_plugin.import_ipex_quietly()


@in_ipex_env
@pytest.mark.ipex
@pytest.mark.slow
def test_cli_ipex_jit_bf16_autocast(tmp_path):
    out = run_cli("optimization=[ipex,jit]", "precision=bf16_autocast", "runtime=quick", "tracking=off",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OperatorEntry" not in out.stderr and "Overriding a previously registered kernel" not in out.stderr
    assert "FINISHED" in out.stdout


@in_ipex_env
@pytest.mark.ipex
@pytest.mark.slow
@needs_shared("models", "minilm-sst2")
@pytest.mark.parametrize("stack, precision", [(["ipex", "jit"], "bf16_autocast"), (["ipex"], "bf16")])
def test_minilm_sst2_bf16_keeps_accuracy(compose, tracking_uri, stack, precision):
    results = run(compose("experiment=sst2_minilm", f"optimization=[{','.join(stack)}]", f"precision={precision}",
                          f"tracking.uri={tracking_uri}", "runtime.parity_samples=64", "runtime.warmup=0",
                          "runtime.min_iterations=1", "runtime.max_iterations=1", "runtime.min_duration_s=0",
                          "runtime.progress=false"))
    m = results["metrics"]
    print(f"\nSST-2 {'+'.join(stack)} {precision}: accuracy={m['accuracy']:.2f} max|Δ|={m['parity_max_abs_diff']:.2e} "
          f"agreement={m['parity_agreement']:.3f} p50={m['latency_p50_ms']:.1f}ms")
    assert m["examples"] == 872 and results["applied"] == stack
    assert m["accuracy"] == pytest.approx(80.96, abs=0.5)
    assert m["parity_agreement"] >= 0.95


def _ipex_kinds_last_executed():
    """Kinds of IPEX's own nodes in the TorchScript graph this process executed last (the run's timing pass)."""
    return {n.kind() for n in torch.jit.last_executed_optimized_graph().nodes() if n.kind().startswith("ipex")}


@in_ipex_env
@pytest.mark.ipex
def test_a_plain_jit_job_after_an_ipex_job_in_the_same_process_runs_without_ipex_fusions(
        compose, tiny_encoder, sts_file, tracking_uri, caplog):
    """IPEX's import registers TorchScript fusion passes process-wide; a later plain jit run of the same process
    (a sequential sweep) must still be plain jit, and the process's switch must come back afterwards."""
    base = tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)
    first = run(compose(*base, "optimization=[ipex,jit]"))
    assert "ipex.loaded_in_process" not in first["tags"]
    assert _ipex_kinds_last_executed(), "the ipex job itself runs IPEX's fused kernels"
    core = sys.modules["intel_extension_for_pytorch._C"]

    # what a plain jit job would get without the isolation: IPEX's passes rewrite its graph
    with torch.inference_mode():
        ids = torch.randint(5, 30, (2, 12))
        from transformers import AutoModel
        traced = torch.jit.freeze(torch.jit.trace(AutoModel.from_pretrained(tiny_encoder).eval(),
                                                  example_kwarg_inputs={"input_ids": ids}, strict=False))
        for _ in range(3):
            traced(input_ids=ids)
    assert _ipex_kinds_last_executed(), "IPEX's passes should fuse a plain traced encoder when on"

    with caplog.at_level("INFO", logger="orchestrator_plugins.ipex"):
        later = run(compose(*base, "optimization=[jit]"))
    assert later["status"] == "FINISHED"
    assert later["tags"]["ipex.loaded_in_process"] == "true" and later["tags"]["ipex.fusions"] == "off"
    assert "fusion passes are off for this run (jit)" in caplog.text
    assert _ipex_kinds_last_executed() == set()
    assert core.get_jit_opt(), "the process's IPEX switch is restored after the run"

    # ipex asked for but refused (fallback): IPEX stays loaded with its passes on, and the run says so
    with caplog.at_level("WARNING", logger="orchestrator_plugins.ipex"):
        # refused by check() (int8 needs fp32), which a fallback may skip; a bad option value never falls back
        fell_back = run(compose(*base, "optimization=[ipex,jit]", "optimization.ipex.int8=static", "precision=bf16",
                                "runtime.on_plugin_error=fallback"))
    assert fell_back["applied"] == ["jit"] and "ipex" in fell_back["fallbacks"]
    assert fell_back["tags"]["ipex.fusions"] == "on" and fell_back["tags"]["ipex.loaded_in_process"] == "true"
    assert "stay on (ipex fell back)" in caplog.text


@in_ipex_env
@pytest.mark.ipex
def test_fused_linear_is_refused_in_one_line_where_its_op_cannot_run(compose, tiny_encoder, sts_file, tracking_uri):
    """torch 2.8's packed weight is an opaque tensor a registered op cannot take: ipex is the way there."""
    from orchestrator.errors import OrchestratorError

    with pytest.raises(OrchestratorError) as err:
        run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "optimization=[fused_linear,jit]"))
    msg = str(err.value)
    assert "fused_linear" in msg and f"torch {torch.__version__}" in msg and "use ipex instead" in msg
    assert "\n" not in msg
