"""Weights that do not fit the config, or a task head the checkpoint lacks, are refused in one line instead of
being evaluated as if trained; transformers' LOAD REPORT stays out of the console (load_report.json)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import mlflow_store, run_cli, tiny_sts_overrides, write_squad
from test_plugins import make_tiny_gpt2


@pytest.fixture(scope="module")
def bert_config_gpt2_weights(tmp_path_factory, tiny_encoder):
    dest = make_tiny_gpt2(tmp_path_factory.mktemp("mismatch"))
    shutil.copy(tiny_encoder / "config.json", dest / "config.json")  # a BERT config beside GPT-2 weights
    return dest


@pytest.mark.slow
def test_weights_that_do_not_match_the_config_are_refused(tmp_path, bert_config_gpt2_weights, sts_file):
    uri = mlflow_store(tmp_path / "store.db")
    proc = run_cli(*tiny_sts_overrides(bert_config_gpt2_weights, sts_file, uri), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: model.name_or_path='{bert_config_gpt2_weights}': ")
    assert "weight tensors are not in the checkpoint and would be random (embeddings." in last
    assert "the weights do not match this config" in last
    assert "LOAD REPORT" not in proc.stdout + proc.stderr and "UNEXPECTED" not in proc.stdout + proc.stderr
    run = MlflowClient(uri).search_runs(MlflowClient(uri).search_experiments()[0].experiment_id)[0]
    assert run.info.status == "FAILED" and "spearman" not in run.data.metrics


def qa_args(model, squad, uri):
    return [f"model.name_or_path={model}", "dataset=squad_sample", f"dataset.data_files={squad}", "runtime=quick",
            f"tracking.uri={uri}", "runtime.max_length=64", "dataset.task_options.doc_stride=16"]


def test_a_random_task_head_is_refused_unless_asked_for(tmp_path, tiny_encoder, compose, caplog):
    """In process: the CLI adds nothing to the error line (exit status and message are cli.exit_code/one_line's,
    test_weights_that_do_not_match... runs a load refusal through the CLI)."""
    from orchestrator.cli import exit_code, one_line
    from orchestrator.runner import run

    squad = write_squad(tmp_path / "s.json", [("alpha beta gamma delta", [("q1", "beta gamma", "gamma")])])
    uri = mlflow_store(tmp_path / "store.db")
    with pytest.raises(Exception) as refused:
        run(compose(*qa_args(tiny_encoder, squad, uri)))
    assert exit_code(refused.value) == 2
    assert f"error: {one_line(refused.value)}" == (
        f"error: model '{tiny_encoder}' has architectures ['BertModel']; task question_answering needs a checkpoint "
        "with a *ForQuestionAnswering head (loaded with AutoModelForQuestionAnswering); or set "
        "model.allow_random_head=true to measure speed only")
    with caplog.at_level("WARNING"):
        allowed = run(compose(*qa_args(tiny_encoder, squad, uri), "model.allow_random_head=true"))
    assert allowed["status"] == "FINISHED"
    assert "head is newly initialized; its accuracy is not meaningful" in caplog.text
    client = MlflowClient(uri)
    runs = client.search_runs(client.search_experiments()[0].experiment_id, "attributes.status = 'FINISHED'")
    assert runs[0].data.tags["model.random_head"] == "true"
    report = json.loads(Path(runs[0].data.tags["run_dir"], "load_report.json").read_text())
    assert report["missing_keys"] == ["qa_outputs.bias", "qa_outputs.weight"] and report["random_head"] is True


def test_a_trained_checkpoint_loads_without_a_report_line(tiny_classifier):
    from orchestrator.config import ModelConfig
    from orchestrator.pipeline import load_model
    from orchestrator.registry import tasks

    model, _, _ = load_model(ModelConfig(name_or_path=str(tiny_classifier)), tasks.get("text_classification"))
    assert model.load_report["missing_keys"] == [] and model.load_report["random_head"] is False


def test_a_head_declared_but_missing_from_the_weights_is_refused(tmp_path, tiny_encoder):
    from orchestrator.config import ModelConfig
    from orchestrator.errors import ModelLoadError
    from orchestrator.pipeline import load_model
    from orchestrator.registry import tasks

    lying = tmp_path / "lying"
    shutil.copytree(tiny_encoder, lying)
    cfg = json.loads((lying / "config.json").read_text())
    (lying / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForQuestionAnswering"]}))
    with pytest.raises(ModelLoadError, match=r"the question_answering head \(qa_outputs.bias, qa_outputs.weight\) is "
                                             r"not in the checkpoint and would be random: use a checkpoint fine-tuned"):
        load_model(ModelConfig(name_or_path=str(lying)), tasks.get("question_answering"))
