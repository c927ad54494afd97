"""The engines: onnxruntime, openvino (whole model in their own runtime) and pt2e (torch.export -> int8 ->
inductor). Parity vs eager fp32 on tiny generated models for every task head, at shapes other than the one
exported (dynamic batch and sequence), int8 variants, refusals in one line, and runs end to end for the four tasks.

Tolerances: fp32 engines <= 1e-4 (measured ~1e-8); bf16 within 0.05 of eager fp32 on these tiny models; int8
within 0.1 of fp32 and >= 80 % argmax agreement on classification logits (as for quantize in test_plugins).
Real-model accuracy (SST-2, STS-B in ../shared) is in test_engines_reference.py.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import make_tiny_model, needs_bf16, tiny_sts_overrides
from orchestrator.errors import ConfigError, PluginUnavailable
from orchestrator.runner import run
from test_plugins import ctx_for, forward, padded_batch
from test_question_answering import qa_overrides, small_squad  # noqa: F401 (fixtures)
from test_token_classification import conll_file, ner_overrides  # noqa: F401 (fixtures)

HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxscript"))
HAS_OV = all(importlib.util.find_spec(m) for m in ("openvino", "nncf"))
HAS_AO = importlib.util.find_spec("torchao") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime extra not installed (pip install -e '.[onnxruntime]')")
needs_ov = pytest.mark.skipif(not HAS_OV, reason="openvino extra not installed (pip install -e '.[openvino]')")
needs_ao = pytest.mark.skipif(not HAS_AO, reason="pt2e extra not installed (pip install -e '.[pt2e]')")

HEADS = {"base": "last_hidden_state", "classification": "logits", "qa": "start_logits", "token": "logits"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForSequenceClassification, \
        AutoModelForTokenClassification

    auto = {"base": AutoModel, "classification": AutoModelForSequenceClassification,
            "qa": AutoModelForQuestionAnswering, "token": AutoModelForTokenClassification}
    return {h: auto[h].from_pretrained(make_tiny_model(tmp_path_factory.mktemp(f"eng-{h}"), h, num_labels=2 if h == "qa" else 3)).eval()
            for h in HEADS}


def engine(name, **options):
    from orchestrator.pipeline import build_plugins

    return build_plugins({name: options})[0]


def apply(plugin, model, batch, tmp_path, dtype=torch.float32, calibration=None, split=None):
    ctx = ctx_for(batch, dtype)
    ctx.run_dir, ctx.threads = tmp_path, 2
    ctx.calibration_batches, ctx.calibration_split = calibration or [], split
    plugin.check(ctx)
    return plugin.apply(model, ctx), ctx


EXAMPLE = padded_batch([12, 5, 9, 3], seed=1)
OTHERS = [padded_batch([4, 10, 7], seed=2), padded_batch([15], seed=3)]  # other widths and batch sizes
CALIB = [padded_batch([5, 8, 9], seed=7), padded_batch([3, 11], seed=8)]


def max_diff(a, b, batch, key):
    x, y = forward(a, batch, key), forward(b, batch, key)
    if x.dim() == 3:  # per-token outputs: real tokens only
        return float((x - y).abs()[batch["attention_mask"].bool()].max())
    return float((x - y).abs().max())


# ---- fp32 parity, every head, dynamic shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("name,options", [
    pytest.param("onnxruntime", {}, marks=needs_ort, id="onnxruntime-dynamo"),
    pytest.param("openvino", {}, marks=needs_ov, id="openvino"),
])
def test_fp32_engine_matches_eager_at_every_shape(tiny_models, tmp_path, head, name, options):
    model = tiny_models[head]
    out, ctx = apply(engine(name, **options), model, EXAMPLE, tmp_path)
    key = HEADS[head]
    for batch in [EXAMPLE, *OTHERS]:
        assert max_diff(out, model, batch, key) <= 1e-4
    if head == "qa":
        assert max_diff(out, model, OTHERS[0], "end_logits") <= 1e-4


@needs_ort
def test_onnxruntime_details_metrics_and_artifact(tiny_models, tmp_path):
    plugin = engine("onnxruntime", exporter="torchscript", graph_optimization_level="extended")
    out, ctx = apply(plugin, tiny_models["classification"], EXAMPLE, tmp_path)
    assert max_diff(out, tiny_models["classification"], OTHERS[0], "logits") <= 1e-4
    d, m = plugin.describe(), plugin.metrics()
    assert d["exporter"] == "torchscript" and d["provider"] == "CPUExecutionProvider"
    assert d["intra_op_threads"] == "2" and d["dynamic_axes"] == "batch,sequence"
    assert m["export_s"] > 0 and m["model_size_mb"] > 0
    assert [p.name for p in plugin.artifacts()] == ["model.onnx"] and plugin.compute_precision(ctx) == "fp32"
    assert "onnxruntime" in repr(out)


def int8_ok(out, model, batch):
    x, y = forward(out, batch, "logits"), forward(model, batch, "logits")
    return float((x - y).abs().max()) <= 0.1 and float((x.argmax(-1) == y.argmax(-1)).float().mean()) >= 0.8


@pytest.mark.parametrize("name,options", [
    pytest.param("onnxruntime", {"int8": "dynamic"}, marks=needs_ort, id="onnxruntime-dynamic"),
    pytest.param("onnxruntime", {"int8": "static"}, marks=needs_ort, id="onnxruntime-static"),
    pytest.param("openvino", {"int8": "weights"}, id="openvino-weights", marks=[needs_ov, pytest.mark.skipif(
        bool(os.environ.get("ONEDNN_MAX_CPU_ISA")), reason="under ONEDNN_MAX_CPU_ISA on an AVX-512 CPU OpenVINO's "
        "int8-weight FullyConnected finds no primitive (seen on AMD Zen 5); a real AVX2 CPU is not checked here")]),
    pytest.param("openvino", {"int8": "static"}, marks=needs_ov, id="openvino-static"),
])
def test_int8_engines_stay_close_and_say_how_they_calibrated(tiny_models, tmp_path, name, options):
    plugin = engine(name, **options)
    model = tiny_models["classification"]
    out, ctx = apply(plugin, model, EXAMPLE, tmp_path, calibration=CALIB, split="train")
    for batch in [EXAMPLE, *OTHERS]:
        assert int8_ok(out, model, batch)
    d = plugin.describe()
    if options["int8"] == "static":
        assert d["calibration"] == "2 batches from dataset.calibration_split=train"
        assert plugin.compute_precision(ctx) == "int8"
    assert plugin.metrics()["quantize_s"] > 0


@pytest.mark.parametrize("name,options,message", [
    pytest.param("onnxruntime", {"int8": "static"}, "int8=static calibrates activation ranges on "
                 "dataset.calibration_split", marks=needs_ort),
    pytest.param("openvino", {"int8": "static"}, "int8=static calibrates on dataset.calibration_split",
                 marks=needs_ov),
    pytest.param("pt2e", {"mode": "static"}, "mode=static calibrates on dataset.calibration_split", marks=needs_ao),
])
def test_static_int8_without_a_calibration_split_is_refused(name, options, message):
    with pytest.raises(PluginUnavailable, match=message):
        engine(name, **options).check(ctx_for(EXAMPLE))


@needs_ort
def test_onnxruntime_refuses_bf16():
    for kw in ({"dtype": torch.bfloat16}, {"autocast": torch.bfloat16}):
        with pytest.raises(PluginUnavailable, match="use precision=fp32, or openvino for bf16"):
            engine("onnxruntime").check(ctx_for(EXAMPLE, **kw))


@needs_ov
@needs_bf16
def test_openvino_bf16_runs_bf16_and_says_so(tiny_models, tmp_path):
    model = tiny_models["classification"]
    plugin = engine("openvino")
    out, ctx = apply(plugin, model, EXAMPLE, tmp_path, dtype=torch.bfloat16)
    assert plugin.describe()["inference_precision"] == "bf16" and plugin.compute_precision(ctx) == "bf16"
    assert max_diff(out, model, OTHERS[0], "logits") <= 0.05


FORKS: list = []  # os.register_at_fork cannot be undone: one hook for the module, read by the tests that need it
os.register_at_fork(before=lambda: FORKS.append(1))


@needs_ov
def test_openvino_fp32_is_explicit_even_where_bf16_is_the_default(tiny_models, tmp_path):
    """Also: OpenVINO's telemetry sends nothing without the user's consent (it forked this process 39 times in one
    model's convert and compile; benchmarks/openvino_telemetry.py)."""
    plugin = engine("openvino", performance_hint="THROUGHPUT", log_model=False)
    FORKS.clear()
    out, ctx = apply(plugin, tiny_models["base"], EXAMPLE, tmp_path)
    d = plugin.describe()
    assert d["telemetry"] in ("off", "sent (the user opted in)"), d
    if d["telemetry"] == "off":
        assert FORKS == [], f"{len(FORKS)} fork(s) while the model converted and compiled"
    assert d["precision_hint"] == "f32" and d["inference_precision"] == "fp32"
    assert d["shapes"] == "[?,?];[?,?];[?,?]" and plugin.artifacts() == []
    assert (tmp_path / "openvino" / "model.xml").exists() and plugin.metrics()["model_size_mb"] > 0


@needs_ao
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_pt2e_int8_close_to_fp32_at_other_shapes(tiny_models, tmp_path, mode):
    from orchestrator_plugins.pt2e import Pt2ePlugin

    model = tiny_models["classification"]
    plugin = engine("pt2e", mode=mode)
    with Pt2ePlugin.process_state(["pt2e"]):
        out, ctx = apply(plugin, model, EXAMPLE, tmp_path, calibration=CALIB, split="train")
        for batch in [EXAMPLE, *OTHERS]:
            assert int8_ok(out, model, batch)
    from torch._inductor import config as inductor_config

    assert inductor_config.freezing is False  # process_state put the process back
    assert plugin.describe()["mode"] == mode and plugin.metrics()["compile_s"] > 0
    torch._dynamo.reset()


# ---- stack rules and options, before anything loads ----------------------------------------------------------


@pytest.mark.parametrize("stack,message", [
    ("openvino,jit", r"'openvino' runs the whole model in its own runtime; it cannot be stacked with jit "
                     r"\(use optimization=\[openvino\] alone\)"),
    ("bettertransformer,onnxruntime", r"'onnxruntime' runs the whole model in its own runtime; it cannot be "
                                      r"stacked with bettertransformer"),
    ("quantize,pt2e", r"'pt2e' exports the whole model \(torch.export\) and compiles it; it cannot be stacked"),
])
def test_engines_run_alone(stack, message):
    from orchestrator.registry import plugins

    with pytest.raises(ConfigError, match=rf"^optimization=\[{stack}\]: {message}"):
        plugins.validate_stack(stack.split(","))


def test_engine_options_are_checked_in_one_line():
    from orchestrator.pipeline import build_plugins

    with pytest.raises(ConfigError, match=r"^optimization.openvino.int8: Invalid value 'int4', expected one of "
                                          r"\[none, weights, static\]"):
        build_plugins({"openvino": {"int8": "int4"}})
    with pytest.raises(ConfigError, match=r"^optimization.onnxruntime.opset=9: valid: 14..23$"):
        build_plugins({"onnxruntime": {"opset": 9}})
    with pytest.raises(ConfigError, match=r"^optimization.pt2e.calibration_batches=0: must be >= 1$"):
        build_plugins({"pt2e": {"calibration_batches": 0}})


# ---- end to end: the four tasks, length-sorted dynamic padding ------------------------------------------------

DYNAMIC = ["runtime.padding=dynamic", "runtime.sort_by_length=true"]


def tags_metrics_artifacts(uri, run_id):
    client = MlflowClient(uri)
    r = client.get_run(run_id)
    arts = [a.path for a in client.list_artifacts(run_id, "plugins/" + r.data.tags["stack"])]
    return r.data.tags, r.data.metrics, arts


@pytest.mark.slow
@pytest.mark.parametrize("task,name", [  # each engine on two tasks end to end; every head is in the parity tests
    pytest.param("sentence_similarity", "onnxruntime", marks=needs_ort),
    pytest.param("question_answering", "onnxruntime", marks=needs_ort),
    pytest.param("text_classification", "openvino", marks=needs_ov),
    pytest.param("token_classification", "openvino", marks=needs_ov),
])
def test_engine_end_to_end_on_every_task(compose, tmp_path, tracking_uri, tiny_encoder, sts_file, tiny_classifier,
                                         cls_file, tiny_qa_model, small_squad, tiny_ner, conll_file, name, task):
    overrides = {
        "sentence_similarity": tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri),
        "text_classification": [f"model.name_or_path={tiny_classifier}", "dataset=sst2",
                                f"dataset.data_files={cls_file}", "runtime=quick", f"tracking.uri={tracking_uri}",
                                "dataset.calibration_split=null", "dataset.calibration_data_files=null"],
        "question_answering": qa_overrides(tiny_qa_model, small_squad, tracking_uri, "runtime.max_length=128",
                                           "dataset.task_options.doc_stride=32", "runtime.batch_size=2"),
        "token_classification": ner_overrides(tiny_ner, conll_file, tracking_uri, "dataset.max_samples=20",
                                              "runtime.batch_size=4"),
    }[task]
    results = run(compose(*overrides, *DYNAMIC, f"optimization=[{name}]"))
    m = results["metrics"]
    assert results["status"] == "FINISHED" and results["applied"] == [name] and results["task"] == task
    assert m["parity_max_abs_diff"] <= 1e-4 and m["parity_agreement"] == 1.0
    assert m["batch_shapes"] > 1  # several widths ran on one exported/converted model
    tags, metrics, arts = tags_metrics_artifacts(tracking_uri, results["run_id"])
    assert tags["stack"] == name and tags["peak.compute"] == "fp32" and f"version.{name}" in tags
    assert metrics["model_size_mb"] > 0 and metrics[f"plugin_{name}_s"] > 0
    assert arts and all(a.startswith(f"plugins/{name}/model.") for a in arts)


@pytest.mark.slow
@needs_ao
def test_pt2e_end_to_end_classification(compose, tracking_uri, tiny_classifier, cls_file):
    results = run(compose(f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={cls_file}",
                          "dataset.calibration_split=train", f"dataset.calibration_data_files={cls_file}",
                          "dataset.calibration_samples=16", "runtime=quick", "runtime.batch_size=8", f"tracking.uri={tracking_uri}",
                          *DYNAMIC, "optimization=[pt2e]", "optimization.pt2e.mode=static"))
    assert results["status"] == "FINISHED" and results["applied"] == ["pt2e"]
    tags = MlflowClient(tracking_uri).get_run(results["run_id"]).data.tags
    assert tags["peak.compute"] == "int8" and tags["plugin.pt2e.calibration"].startswith("2 batches")
    assert results["metrics"]["parity_agreement"] >= 0.8
    torch._dynamo.reset()


def test_stack_with_an_engine_is_refused_before_loading(compose, tmp_path, tracking_uri):
    from orchestrator.runner import run as run_

    with pytest.raises(ConfigError, match=r"'openvino' runs the whole model"):
        run_(compose("dataset=sts_smoke", "optimization=[openvino,compile]", f"tracking.uri={tracking_uri}"))
    assert not any(Path(tmp_path).rglob("model.xml"))


# ---- recipes and the engine sweeps ---------------------------------------------------------------------------


RECIPES = {"eager_fp32": ([], "fp32"), "eager_bf16": ([], "bf16"), "jit_bf16": (["jit"], "bf16"),
           "compile_bf16": (["compile"], "bf16"), "onnxruntime_fp32": (["onnxruntime"], "fp32"),
           "onnxruntime_int8": (["onnxruntime"], "fp32"), "openvino_fp32": (["openvino"], "fp32"),
           "openvino_bf16": (["openvino"], "bf16"), "openvino_int8": (["openvino"], "fp32"),
           "pt2e_int8": (["pt2e"], "fp32")}


def test_recipes_name_a_stack_precision_and_options(compose):
    from omegaconf import OmegaConf

    from orchestrator.config import validate

    conf = Path(__file__).resolve().parents[1] / "conf"
    assert {p.stem for p in (conf / "recipe").glob("*.yaml")} == set(RECIPES)
    for name, (stack, precision) in RECIPES.items():
        rc = validate(compose(f"recipe={name}", "experiment=sst2_minilm"))
        assert list(rc.optimization) == stack and rc.precision.name == precision, name
    rc = validate(compose("recipe=onnxruntime_int8"))
    assert rc.optimization["onnxruntime"]["int8"] == "dynamic"
    assert validate(compose("recipe=openvino_int8")).optimization["openvino"]["int8"] == "weights"
    for preset in ("engines", "engines_bf16"):
        swept = OmegaConf.load(conf / "sweep" / f"{preset}.yaml").hydra.sweeper.params.recipe.split(",")
        assert set(swept) <= set(RECIPES) and swept[0] == "eager_fp32"  # the baseline job first
