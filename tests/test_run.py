"""run(cfg) end to end on tiny generated models: metrics, parity, MLflow run contents, failures recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_sts_overrides
from orchestrator.errors import DatasetError, ModelLoadError, PluginUnavailable
from orchestrator.runner import run

REQUIRED = ["throughput", "latency_p50_ms", "latency_p99_ms", "parity_max_abs_diff", "parity_agreement",
            "peak_rss_mb", "model_load_s", "stack_apply_s", "latency_stdev_pct", "latency_p90_ms", "code_import_s"]


def only_run(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("orchestrator")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_sentence_similarity_run_is_tracked(compose, tiny_encoder, sts_file, tracking_uri):
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri)))
    assert results["status"] == "FINISHED"
    m = results["metrics"]
    assert -100 <= m["spearman"] <= 100 and -100 <= m["pearson"] <= 100
    assert m["examples"] == 24 and m["features"] == 48
    assert m["parity_max_abs_diff"] == 0.0 and m["parity_agreement"] == 1.0  # eager fp32 vs itself

    client, r = only_run(tracking_uri)
    assert r.info.status == "FINISHED" and r.info.run_id == results["run_id"]
    for key in REQUIRED + ["spearman", "pearson"]:
        assert key in r.data.metrics, key
    assert r.data.params["runtime.batch_size"] == "32"
    assert r.data.params["dataset.task"] == "sentence_similarity"
    assert r.data.tags["stack"] == "eager" and r.data.tags["precision"] == "fp32"
    for tag in ("version.torch", "version.transformers", "version.python", "cpu.model", "cpu.amx_bf16", "git_sha"):
        assert tag in r.data.tags
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"results.json", "predictions_sample.json"} <= artifacts
    assert r.inputs.dataset_inputs and r.inputs.dataset_inputs[0].dataset.digest


def test_spearman_matches_an_independent_computation(compose, tiny_encoder, sts_file, tracking_uri):
    """Mean pooling over the mask, L2 normalisation and cosine, recomputed here with plain transformers."""
    import csv

    import torch
    from scipy.stats import spearmanr
    from transformers import AutoModel, AutoTokenizer

    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "runtime.batch_size=5",
                          "runtime.sort_by_length=true"))
    rows = list(csv.DictReader(open(sts_file), delimiter="\t"))
    tok, model = AutoTokenizer.from_pretrained(tiny_encoder), AutoModel.from_pretrained(tiny_encoder).eval()

    def embed(texts):
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    sims = (embed([r["sentence1"] for r in rows]) * embed([r["sentence2"] for r in rows])).sum(-1)
    expected = 100 * spearmanr(sims.tolist(), [float(r["score"]) for r in rows]).statistic
    assert results["metrics"]["spearman"] == pytest.approx(expected, abs=1e-3)


def test_text_classification_run(compose, tiny_classifier, cls_file, tracking_uri):
    results = run(compose(f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={cls_file}",
                          "runtime=quick", f"tracking.uri={tracking_uri}", "dataset.max_samples=30"))
    m = results["metrics"]
    assert m["examples"] == 30 and 0 <= m["accuracy"] <= 100 and 0 <= m["macro_f1"] <= 100
    preds = json.loads((Path(results["run_dir"]) / "predictions_sample.json").read_text())
    assert preds[0]["label"] in ("negative", "positive") and preds[0]["predicted"] in ("negative", "positive")


def test_failed_run_is_recorded_with_what_it_measured(compose, tiny_encoder, tmp_path, tracking_uri):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(DatasetError, match=r"dataset columns missing for task sentence_similarity: .*columns found: a, b"):
        run(compose(*tiny_sts_overrides(tiny_encoder, bad, tracking_uri)))
    _, r = only_run(tracking_uri)
    assert r.info.status == "FAILED"
    assert r.data.tags["error"].startswith("dataset columns missing")
    assert "model_load_s" in r.data.metrics  # measured before the failure, kept
    saved = json.loads(next(tmp_path.glob("outputs/runs/*/results.json")).read_text())
    assert saved["status"] == "FAILED" and "model_load_s" in saved["metrics"]


def test_missing_model_directory_is_one_line(compose, sts_file, tmp_path, tracking_uri):
    with pytest.raises(ModelLoadError, match=r"^model.name_or_path='.*nowhere': directory not found"):
        run(compose(*tiny_sts_overrides(tmp_path / "nowhere", sts_file, tracking_uri)))


def test_task_head_mismatch_names_the_auto_class(compose, tiny_encoder, cls_file, tracking_uri):
    with pytest.raises(ModelLoadError, match="needs a checkpoint with a \\*ForSequenceClassification head "
                                             "\\(loaded with AutoModelForSequenceClassification\\)"):
        run(compose(f"model.name_or_path={tiny_encoder}", "dataset=sst2", f"dataset.data_files={cls_file}",
                    "runtime=quick", f"tracking.uri={tracking_uri}"))


def test_labels_outside_the_model_map_are_refused(compose, tiny_classifier, tmp_path, tracking_uri):
    data = tmp_path / "labels.tsv"
    data.write_text("text\tlabel\nthe cat\t0\nthe dog\t7\n")
    with pytest.raises(DatasetError, match="dataset label 7 is outside the model's 2 labels"):
        run(compose(f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={data}",
                    "runtime=quick", f"tracking.uri={tracking_uri}"))


def test_plugin_failure_policy(compose, tiny_encoder, sts_file, tracking_uri):
    from orchestrator.plugin import Plugin
    from orchestrator.registry import plugins

    class Broken(Plugin):
        name = "broken"

        def apply(self, model, ctx):
            raise RuntimeError("kernel refused")

    plugins.register("broken", Broken)
    try:
        base = tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri) + ["+optimization.broken={}"]
        with pytest.raises(PluginUnavailable, match="optimization plugin 'broken' is unavailable: apply failed: "
                                                    "RuntimeError: kernel refused"):
            run(compose(*base))
        results = run(compose(*base, "runtime.on_plugin_error=fallback"))
    finally:
        plugins.unregister("broken")  # later tests in this worker list the registered names
    assert results["status"] == "FINISHED" and results["applied"] == []
    assert results["tags"]["plugin.broken.fallback"] == "RuntimeError: kernel refused"


def test_tracking_disabled_still_writes_results(compose, tiny_encoder, sts_file, tracking_uri, tmp_path):
    store = tmp_path / "mlflow.db"
    before = store.read_bytes() if store.exists() else None  # the fixture may lay an empty store there
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "tracking=off"))
    assert results["run_id"] is None
    assert json.loads((Path(results["run_dir"]) / "results.json").read_text())["status"] == "FINISHED"
    assert (store.read_bytes() if store.exists() else None) == before  # the store was not touched


def test_unreachable_tracking_server_does_not_lose_the_run(compose, tiny_encoder, sts_file, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, f"http://127.0.0.1:{port}")))
    assert results["status"] == "FINISHED" and results["run_id"] is None
    assert results["tracking_error"].startswith(f"start: ConnectionError: tracking server http://127.0.0.1:{port} "
                                                "is unreachable")
    saved = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert saved["metrics"]["spearman"] == results["metrics"]["spearman"]
    assert "MLflow tracking failed" in capsys.readouterr().out


def test_system_metrics_are_logged_when_asked(compose, tiny_encoder, sts_file, tracking_uri):
    results = run(compose(*tiny_sts_overrides(tiny_encoder, sts_file, tracking_uri), "tracking.system_metrics=true",
                          "tracking.system_metrics_interval_s=0.2", "runtime.min_duration_s=1.5",
                          "runtime.max_iterations=null"))
    _, r = only_run(tracking_uri)
    assert results["status"] == "FINISHED"
    assert any(k.startswith("system/cpu_utilization") for k in r.data.metrics), sorted(r.data.metrics)


IMPORT_CODE = r'''
import json, sys
from types import SimpleNamespace
from orchestrator import pipeline
from orchestrator.tasks.text_classification import TextClassification
cfg = SimpleNamespace(name_or_path=sys.argv[1], trust_remote_code=sys.argv[2] == "remote")
watched = ("transformers.models.bert.modeling_bert", "torchmetrics.functional.classification")
before = [m in sys.modules for m in watched]
seconds = pipeline.import_code(cfg, TextClassification)
print(json.dumps({"before": before, "after": [m in sys.modules for m in watched], "seconds": seconds}))
'''


@pytest.mark.parametrize("remote", [False, True])
def test_the_model_and_metric_code_is_imported_before_the_measured_phases(tiny_classifier, remote):
    """preflight imports the architecture's module and the task's metric library (pipeline.import_code), so that
    model_load_s and the accuracy pass do not time one-off imports; a model that asks for remote code is not
    touched before its load."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", IMPORT_CODE, str(tiny_classifier), "remote" if remote else "local"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] == [False, False] and seen["seconds"] >= 0
    assert seen["after"] == [not remote, True]

