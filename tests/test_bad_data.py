"""Bad data and limits through the CLI (issue 18): runtime.max_length above the model's limit, gold values the metric
cannot use, and presets whose development data (../shared) is absent. Each ends in exactly one `error:` line on
stderr naming the file/key, the column and the first bad row, exit status 2, and no metric presented as a result.

The CLI runs once per kind of mistake (its stderr must be that one line, nothing in front of it); the further cases
of a kind run in process, where the same words come from ``orchestrator.cli.one_line``."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from conftest import make_tiny_model, run_cli, sqlite_uri, write_tsv

pytestmark = pytest.mark.slow


def only_error_line(proc) -> str:
    """stderr must be the one error line, not a traceback, a warning or MLflow's notices in front of it."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def failed_run_metrics(uri: str) -> dict:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    return runs[0].data.metrics


def results_metrics(cwd) -> dict:
    """What the run's results.json (written with or without tracking) presents as measured."""
    import json

    (path,) = cwd.glob("outputs/runs/**/results.json")  # the CLI's <date>/<time>/, a Python run's <date_time>/
    saved = json.loads(path.read_text())
    assert saved["status"] == "FAILED"
    return saved["metrics"]


@pytest.fixture()
def cli(tmp_path):
    """The CLI in tmp_path, tracked in a fresh sqlite store; tracking=off among args skips MLflow's start-up."""
    uri = sqlite_uri(tmp_path / "store.db")  # fresh: MLflow's notices while it creates the store must not show

    def _run(*args: str, env: dict | None = None):
        return run_cli("runtime=quick", f"tracking.uri={uri}", *args, cwd=tmp_path, env=env, timeout=300), uri

    return _run


@pytest.fixture()
def refused(compose, monkeypatch):
    """The same run in process, untracked: the CLI's error line for what it raises (exit status 2 checked)."""
    from orchestrator.cli import exit_code, one_line
    from orchestrator.runner import run

    def _run(*args: str, env: dict | None = None) -> str:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(Exception) as e:
            run(compose("runtime=quick", "tracking=off", *args))
        assert exit_code(e.value) == 2, repr(e.value)
        line = f"error: {one_line(e.value)}"
        assert "\n" not in line
        return line

    return _run


# -- runtime.max_length --------------------------------------------------------------------------------------
def test_max_length_above_the_position_table_is_refused_before_the_data_loads(cli, tiny_encoder, sts_file):
    proc, uri = cli(f"model.name_or_path={tiny_encoder}", f"dataset.data_files={sts_file}",
                    "runtime.max_length=100000", "runtime.padding=max_length")
    assert only_error_line(proc) == (f"error: runtime.max_length=100000: the model '{tiny_encoder}' takes at most 128 "
                                     "tokens (max_position_embeddings=128); valid: 8..128")
    metrics = failed_run_metrics(uri)
    assert "model_load_s" in metrics and "dataset_load_s" not in metrics and "spearman" not in metrics


def test_the_lower_of_position_table_and_tokenizer_limit_binds():
    from orchestrator.pipeline import max_positions

    roberta = SimpleNamespace(max_position_embeddings=514)
    assert max_positions(roberta, SimpleNamespace(model_max_length=512)) == (
        512, "the tokenizer's model_max_length=512")
    # transformers' placeholder when a tokenizer declares no limit
    assert max_positions(roberta, SimpleNamespace(model_max_length=int(1e30))) == (514, "max_position_embeddings=514")
    assert max_positions(SimpleNamespace(), SimpleNamespace()) is None


# -- gold values ---------------------------------------------------------------------------------------------
STS_HEADER = ("sentence1", "sentence2", "score")
STS_ROWS = [("the cat sat", "a dog ran", "1.5"), ("the man plays guitar", "a woman plays piano", "3.0"),
            ("red car", "blue car", "2.5")]
WHERE = "in file {path}, column 'score', row 2"


STS_CASES = [
    ("blank", [STS_ROWS[0], ("a b", "c d", ""), STS_ROWS[2]],
     "dataset score is blank or NaN (every row needs a finite gold score) " + WHERE),
    ("nan", [STS_ROWS[0], ("a b", "c d", "NaN"), STS_ROWS[2]],
     "dataset score is blank or NaN (every row needs a finite gold score) " + WHERE),
    ("text", [STS_ROWS[0], ("a b", "c d", "high"), STS_ROWS[2]],
     "dataset score 'high' is not a number (every row needs a finite gold score) " + WHERE),
    ("one_row", STS_ROWS[:1], "task sentence_similarity needs at least 2 rows for a correlation; file {path} has 1"),
    ("constant", [(a, b, "2.0") for a, b, _ in STS_ROWS],
     "the metric is undefined: all gold scores are equal (2) in file {path}, column 'score'; Spearman and Pearson "
     "need scores that vary"),
]


def test_sts_scores_the_metric_cannot_use_through_the_cli(cli, tmp_path, tiny_encoder):
    name, rows, message = STS_CASES[0]
    path = write_tsv(tmp_path / f"{name}.tsv", STS_HEADER, rows)
    proc, _ = cli(f"model.name_or_path={tiny_encoder}", f"dataset.data_files={path}", "tracking=off")
    assert only_error_line(proc) == "error: " + message.format(path=path)
    metrics = results_metrics(tmp_path)
    assert "spearman" not in metrics and "pearson" not in metrics and "accuracy_pass_s" not in metrics


@pytest.mark.parametrize("name, rows, message", STS_CASES)
def test_sts_scores_the_metric_cannot_use(refused, tmp_path, tiny_encoder, name, rows, message):
    path = write_tsv(tmp_path / f"{name}.tsv", STS_HEADER, rows)
    assert refused(f"model.name_or_path={tiny_encoder}", f"dataset.data_files={path}") == \
        "error: " + message.format(path=path)
    metrics = results_metrics(tmp_path)
    assert "spearman" not in metrics and "pearson" not in metrics and "accuracy_pass_s" not in metrics


LABEL_CASES = [
    ("", "dataset label is blank (valid: negative, positive or ids 0..1)"),
    ("high", "dataset label 'high' is not in the model's label map (valid: negative, positive or ids 0..1)"),
    ("0.5", "dataset label '0.5' is not a whole number (valid: negative, positive or ids 0..1)"),
]


def test_classification_labels_the_model_cannot_score_through_the_cli(cli, tmp_path, tiny_classifier):
    label, message = LABEL_CASES[0]
    path = write_tsv(tmp_path / "labels.tsv", ("text", "label"), [("the cat", "positive"), ("the dog", label)])
    proc, _ = cli(f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={path}",
                  "tracking=off")
    assert only_error_line(proc) == f"error: {message} in file {path}, column 'label', row 2"
    assert "accuracy" not in results_metrics(tmp_path)


@pytest.mark.parametrize("label, message", LABEL_CASES)
def test_classification_labels_the_model_cannot_score(refused, tmp_path, tiny_classifier, label, message):
    path = write_tsv(tmp_path / "labels.tsv", ("text", "label"), [("the cat", "positive"), ("the dog", label)])
    assert refused(f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={path}") == \
        f"error: {message} in file {path}, column 'label', row 2"
    assert "accuracy" not in results_metrics(tmp_path)


def test_conll_line_without_a_tag(cli, tmp_path, tiny_ner):
    path = tmp_path / "blank_tag.conll"
    path.write_text("the\tO\ncat\tB-thing\n\ndog\t\n")
    proc, _ = cli(f"model.name_or_path={tiny_ner}", "dataset=wnut17", f"dataset.data_files={path}", "tracking=off")
    assert only_error_line(proc) == (f"error: dataset.path='conll': {path} line 4 has a blank tag ('dog\\t'); "
                                     "expected token<TAB>tag")


# -- development data (../shared) ----------------------------------------------------------------------------
DEV_DATA = ("../shared or $ORCH_SHARED_DIR holds this project's development data, not shipped with the package; "
            "point the preset at your own with ")


def test_preset_without_the_shared_folder_says_it_is_development_data(cli, refused, tmp_path, tiny_encoder):
    """Checked before anything loads, every missing path in one line (a preset reads model and data there)."""
    empty = tmp_path / "no-shared"
    empty.mkdir()
    env = {"ORCH_SHARED_DIR": str(empty)}
    proc, _ = cli("experiment=sst2_minilm", "tracking=off", env=env)
    model, data = empty / "models" / "minilm-sst2", empty / "data" / "sst2_dev.tsv"
    assert only_error_line(proc) == (f"error: development data not found (model.name_or_path={model}, "
                                     f"dataset.data_files={data}): {DEV_DATA}model.name_or_path=<a local model "
                                     "directory or a Hub id> dataset.data_files=<your file>")
    assert "loading model" not in proc.stdout
    data = empty / "data" / "stsb_test.csv"
    assert refused("dataset=stsb", f"model.name_or_path={tiny_encoder}", env=env) == (
        f"error: development data not found (dataset.data_files={data}): {DEV_DATA}dataset.data_files=<your file>")


def test_a_missing_path_of_ones_own_is_plain_not_found(refused, tmp_path):
    mine = tmp_path / "my-model"
    assert refused(f"model.name_or_path={mine}") == f"error: model.name_or_path='{mine}': directory not found ({mine})"


def test_a_missing_calibration_file_is_named_by_its_own_key(refused, tmp_path, tiny_classifier, cls_file):
    empty = tmp_path / "no-shared"
    empty.mkdir()
    line = refused(f"model.name_or_path={tiny_classifier}", "dataset=sst2", f"dataset.data_files={cls_file}",
                   "optimization=[onnxruntime]", "optimization.onnxruntime.int8=static",
                   env={"ORCH_SHARED_DIR": str(empty)})
    train = empty / "data" / "sst2_train.tsv"
    assert line == (f"error: development data not found (dataset.calibration_data_files={train}): "
                    f"{DEV_DATA}dataset.calibration_data_files=<your file>")


def test_a_model_whose_similarities_are_all_equal_gives_no_nan_result(cli, tmp_path, sts_file):
    import torch
    from transformers import BertModel

    flat = make_tiny_model(tmp_path / "flat", "base")
    model = BertModel.from_pretrained(flat)
    with torch.no_grad():  # the last LayerNorm's output is its bias alone: every token embeds the same
        model.encoder.layer[-1].output.LayerNorm.weight.zero_()
        model.encoder.layer[-1].output.LayerNorm.bias.fill_(1.0)
    model.save_pretrained(flat)
    proc, _ = cli(f"model.name_or_path={flat}", f"dataset.data_files={sts_file}", "tracking=off")
    assert only_error_line(proc).startswith("error: the model gave every pair the same similarity (1.0000): "
                                            "Spearman and Pearson are undefined")
    assert "spearman" not in results_metrics(tmp_path)
