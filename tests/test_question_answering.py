"""Question answering: SQuAD JSON loading, the official v1.1 metric, run_qa's answers string for string, windows."""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SHARED, VOCAB, make_tiny_model, needs_shared, write_squad
from orchestrator import data
from orchestrator.errors import ConfigError, DatasetError, ModelLoadError
from orchestrator.runner import run
from orchestrator.tasks.base import Features
from orchestrator.tasks.question_answering import QuestionAnswering, squad_metric, squad_scores

SQUAD_FILE = SHARED / "data" / "squad_v1.1_dev_superbowl50.json"
REFERENCE = SHARED / "reference"
FAST = ["runtime.warmup=0", "runtime.min_iterations=1", "runtime.max_iterations=1", "runtime.min_duration_s=0",
        "runtime.progress=false"]


# -- the official SQuAD v1.1 evaluation script's rules, verbatim, to check the metric against --------------------
def official_normalize(s):
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def official_f1(prediction, truth):
    p, t = official_normalize(prediction).split(), official_normalize(truth).split()
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def official_evaluate(predictions, golds):
    em = sum(max(official_normalize(predictions[q]) == official_normalize(g) for g in gs) for q, gs in golds.items())
    f1 = sum(max(official_f1(predictions[q], g) for g in gs) for q, gs in golds.items())
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f1 / len(golds)}


def load_squad(path=SQUAD_FILE, **kw):
    cfg = SimpleNamespace(path="squad_json", name=None, data_files=str(path), split="train", load_kwargs={},
                          max_samples=None)
    cfg.__dict__.update(kw)
    return data.load(cfg)


def squad_golds(ds):
    return {q: list(a["text"]) for q, a in zip(ds["id"], ds["answers"])}


@pytest.fixture(scope="session")
def small_squad(tmp_path_factory) -> Path:
    import random

    rnd = random.Random(3)
    words = VOCAB[5:]
    paragraphs = []
    for p in range(4):
        context = " ".join(rnd.choice(words) for _ in range(rnd.randint(20, 90)))
        qas = [(f"p{p}q{k}", " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 6))),
                " ".join(context.split()[k:k + 2])) for k in range(3)]
        paragraphs.append((context, qas))
    return write_squad(tmp_path_factory.mktemp("squad") / "small.json", paragraphs)


def qa_overrides(model, squad_file, uri, *extra):
    return [f"model.name_or_path={model}", "dataset=squad_sample", f"dataset.data_files={squad_file}",
            "runtime=quick", f"tracking.uri={uri}", *extra]


# -- loading --------------------------------------------------------------------------------------------------
@needs_shared("data", "squad_v1.1_dev_superbowl50.json")
def test_squad_json_is_flattened_to_the_hub_columns():
    ds = load_squad()
    assert len(ds) == 810
    assert {"id", "title", "context", "question", "answers"} <= set(ds.column_names)
    row = ds[0]
    assert row["id"] == "56be4db0acb8001400a502ec" and row["answers"]["text"][0] == "Denver Broncos"
    assert row["context"][row["answers"]["answer_start"][0]:].startswith("Denver Broncos")
    assert len(load_squad(max_samples=7)) == 7


def test_not_a_squad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"name": "x", "rows": [1]}]}))
    with pytest.raises(DatasetError, match=r"not SQuAD's .* columns found: name, rows") as e:
        load_squad(bad)
    assert "\n" not in str(e.value)


# -- the metric -----------------------------------------------------------------------------------------------
@needs_shared("data", "squad_v1.1_dev_superbowl50.json")
def test_gold_answers_as_predictions_score_100():
    golds = squad_golds(load_squad())
    for pick in (0, -1):  # the first and the last gold answer of every question
        m = squad_metric({q: gs[pick] for q, gs in golds.items()}, golds)
        assert m == {"exact_match": 100.0, "f1": 100.0}


@pytest.mark.parametrize("prediction,golds,em,f1", [
    ("the Denver Broncos", ["Denver Broncos"], 100.0, 100.0),       # articles are dropped
    ("Denver Broncos!", ["denver broncos"], 100.0, 100.0),           # punctuation and case
    ("Denver", ["Denver Broncos"], 0.0, 200 / 3),                     # p 1, r 1/2
    ("Broncos defeated", ["Denver Broncos"], 0.0, 50.0),              # p 1/2, r 1/2
    ("Santa Clara", ["Santa Clara, California", "Levi's Stadium"], 0.0, 80.0),  # max over golds: p 1, r 2/3
    ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
    ("", ["Denver Broncos"], 0.0, 0.0),
])
def test_near_misses_score_as_the_official_rules(prediction, golds, em, f1):
    got = squad_scores(prediction, golds)
    assert got == pytest.approx((em, f1), abs=1e-4)
    assert got == pytest.approx((100.0 * max(official_normalize(prediction) == official_normalize(g) for g in golds),
                                 100.0 * max(official_f1(prediction, g) for g in golds)), abs=1e-4)


@needs_shared("data", "squad_v1.1_dev_superbowl50.json")
def test_metric_equals_the_official_script_on_perturbed_answers():
    golds = squad_golds(load_squad())
    perturb = [lambda a: a.split()[0], lambda a: "the " + a + ".", lambda a: a.upper(),
               lambda a: " ".join(a.split()[:-1]) or "x", lambda a: a + " and more words"]
    preds = {q: perturb[i % len(perturb)](gs[0]) for i, (q, gs) in enumerate(golds.items())}
    ours, official = squad_metric(preds, golds), official_evaluate(preds, golds)
    assert 0 < ours["f1"] < 100
    assert ours == pytest.approx(official, abs=1e-4)


# -- the reference evaluation, string for string --------------------------------------------------------------
@pytest.mark.slow
@needs_shared("models", "tiny-qa")
@needs_shared("reference", "tiny-qa_runqa_384_128.json")
@pytest.mark.parametrize("max_len,stride,features,em,f1", [(384, 128, 830, 0.00, 0.5103), (128, 32, 1523, 0.00, 3.4598)])
def test_answers_equal_run_qa_string_for_string(compose, tracking_uri, max_len, stride, features, em, f1):
    results = run(compose("model=tiny_qa", "dataset=squad_sample", f"runtime.max_length={max_len}",
                          f"dataset.task_options.doc_stride={stride}", "runtime.padding=max_length",
                          "runtime.batch_size=8", "runtime.parity_samples=8", f"tracking.uri={tracking_uri}", *FAST))
    m = results["metrics"]
    assert m["examples"] == 810 and m["features"] == features
    run_dir = Path(results["run_dir"])
    ours = json.loads((run_dir / "predictions.json").read_text())
    reference = json.loads((REFERENCE / f"tiny-qa_runqa_{max_len}_{stride}.json").read_text())
    assert len(ours) == len(reference) == 810
    differ = [(q, ours.get(q), a) for q, a in reference.items() if ours.get(q) != a]
    assert not differ, f"{len(differ)} answers differ from run_qa, e.g. {differ[:3]}"
    # EM/F1 are the official rules applied to those answers
    official = official_evaluate(reference, squad_golds(load_squad()))
    assert m["exact_match"] == pytest.approx(official["exact_match"], abs=1e-4) == pytest.approx(em, abs=5e-3)
    assert m["f1"] == pytest.approx(official["f1"], abs=1e-4)
    assert round(m["f1"], 4) == f1
    sample = json.loads((run_dir / "predictions_sample.json").read_text())
    assert sample[0]["id"] == "56be4db0acb8001400a502ec" and sample[0]["answer"] == reference[sample[0]["id"]]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(results["run_id"])}
    assert {"predictions.json", "predictions_sample.json", "results.json"} <= artifacts


@pytest.mark.slow
@needs_shared("models", "tiny-qa")
@needs_shared("reference", "tiny-qa_pipeline_384_128.json")
def test_pipeline_scoring_rule_follows_the_old_pipeline(compose):
    """The option reproduces most of transformers 4.57's pipeline answers (its per-window softmax and word
    alignment); it is not bit-exact (the pipeline batched and padded windows its own way)."""
    results = run(compose("model=tiny_qa", "dataset=squad_sample", "runtime.max_length=384",
                          "dataset.task_options.scoring=pipeline", "runtime.padding=max_length", "runtime.batch_size=8",
                          "runtime.parity_samples=0", "tracking=off", *FAST))
    ours = json.loads((Path(results["run_dir"]) / "predictions.json").read_text())
    pipeline = json.loads((REFERENCE / "tiny-qa_pipeline_384_128.json").read_text())
    run_qa = json.loads((REFERENCE / "tiny-qa_runqa_384_128.json").read_text())
    agree_pipeline = sum(ours[q] == a for q, a in pipeline.items())
    agree_run_qa = sum(ours[q] == a for q, a in run_qa.items())
    assert agree_pipeline >= 0.9 * 810 and agree_run_qa < 0.2 * 810


# -- windows --------------------------------------------------------------------------------------------------
def make_task(tokenizer, model_config, max_length=32, **options):
    dataset_cfg = SimpleNamespace(columns={}, task_options=options)
    runtime = SimpleNamespace(max_length=max_length, padding="dynamic")
    return QuestionAnswering(dataset_cfg, runtime, tokenizer, model_config)


def test_a_long_context_gives_several_windows_and_the_answer_can_come_from_a_later_one(tiny_qa_model, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qa_model)
    words = VOCAB[5:]
    context = " ".join(words[i % len(words)] for i in range(60)) + " piano guitar"
    squad = write_squad(tmp_path / "long.json", [(context, [("q1", "who plays", "piano guitar")])])
    ds = load_squad(squad)
    task = make_task(tok, AutoConfig.from_pretrained(tiny_qa_model), max_length=32, doc_stride=8)
    feats = task.featurize(ds)
    assert len(feats) >= 3 and feats.example_index == [0] * len(feats)
    assert all(len(r["input_ids"]) <= 32 for r in feats.rows)
    # logits that favour "piano guitar", visible only in the last window; every other window prefers its first word
    outputs = []
    answer_start = context.index("piano guitar")
    for f, offsets in enumerate(feats.extra["offset_mapping"]):
        logits = torch.zeros(2, len(offsets))
        ctx = [k for k, o in enumerate(offsets) if o is not None]
        logits[0, ctx[0]] = logits[1, ctx[0]] = 1.0
        for k, o in enumerate(offsets):
            if o is not None and o[0] == answer_start:
                logits[0, k] = 5.0
            if o is not None and o[1] == len(context):
                logits[1, k] = 5.0
        outputs.append(logits)
    metrics, preds = task.evaluate(ds, feats, outputs)
    assert preds[0]["answer"] == "piano guitar" and metrics == {"exact_match": 100.0, "f1": 100.0}
    assert answer_start > max(o[1] for o in feats.extra["offset_mapping"][0] if o is not None)  # not in window 1


def test_dynamic_padding_only_uses_each_rows_own_positions(tiny_qa_model, small_squad, compose, tracking_uri):
    """Dynamic and max_length padding give the same answers when the top-n covers the context (n_best large)."""
    opts = ["runtime.max_length=64", "dataset.task_options.doc_stride=16", "dataset.task_options.n_best_size=64",
            "runtime.batch_size=3"]
    a = run(compose(*qa_overrides(tiny_qa_model, small_squad, tracking_uri, *opts, "runtime.padding=dynamic")))
    b = run(compose(*qa_overrides(tiny_qa_model, small_squad, tracking_uri, *opts, "runtime.padding=max_length",
                                  "tracking=off")))
    pa = json.loads((Path(a["run_dir"]) / "predictions.json").read_text())
    pb = json.loads((Path(b["run_dir"]) / "predictions.json").read_text())
    assert len(pa) == 12 and pa == pb
    assert a["metrics"]["features"] > a["metrics"]["examples"]
    assert 0 <= a["metrics"]["f1"] <= 100 and a["metrics"]["parity_agreement"] == 1.0


def test_a_model_without_token_type_ids(tmp_path, small_squad, compose):
    from transformers import BertTokenizer

    model = make_tiny_model(tmp_path / "no-tt", "qa")
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True,
                        model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(model)
    results = run(compose(*qa_overrides(model, small_squad, "sqlite:///unused.db", "tracking=off",
                                        "runtime.max_length=48", "dataset.task_options.doc_stride=8")))
    assert results["status"] == "FINISHED" and results["metrics"]["examples"] == 12


def test_jit_stack_runs_question_answering(tiny_qa_model, small_squad, compose):
    results = run(compose(*qa_overrides(tiny_qa_model, small_squad, "sqlite:///unused.db", "tracking=off",
                                        "optimization=[jit]", "runtime.padding=max_length",
                                        "runtime.max_length=64", "dataset.task_options.doc_stride=16")))
    assert results["applied"] == ["jit"]
    assert results["metrics"]["parity_max_abs_diff"] < 1e-4 and results["metrics"]["parity_agreement"] == 1.0


# -- errors ---------------------------------------------------------------------------------------------------
def test_qa_task_on_a_model_without_a_qa_head_names_the_auto_class(tiny_classifier, small_squad, compose):
    with pytest.raises(ModelLoadError, match=r"needs a checkpoint with a \*ForQuestionAnswering head "
                                             r"\(loaded with AutoModelForQuestionAnswering\)"):
        run(compose(*qa_overrides(tiny_classifier, small_squad, "sqlite:///unused.db", "tracking=off")))


def test_missing_columns_name_the_columns_found(tiny_qa_model, small_squad, compose):
    with pytest.raises(DatasetError, match=r"missing for task question_answering: question->'query'; columns found: "
                                           r"title, id, context, question, answers"):
        run(compose(*qa_overrides(tiny_qa_model, small_squad, "sqlite:///unused.db", "tracking=off",
                                  "dataset.columns.question=query")))


@pytest.mark.parametrize("option,message", [
    ("dataset.task_options.doc_stride=64", "dataset.task_options.doc_stride=64: must be >= 0 and < runtime.max_length"),
    ("dataset.task_options.n_best_size=0", "dataset.task_options.n_best_size=0: must be >= 1"),
])
def test_bad_task_options_are_one_line(tiny_qa_model, small_squad, compose, option, message):
    with pytest.raises(ConfigError) as e:
        run(compose(*qa_overrides(tiny_qa_model, small_squad, "sqlite:///unused.db", "tracking=off",
                                  "runtime.max_length=64", option)))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("option,message", [
    # typed by the task's schema (conf/dataset/squad*.yaml pull it in): refused while composing
    ("dataset.task_options.scoring=best",
     "error: dataset.task_options.scoring: Invalid value 'best', expected one of [run_qa, pipeline]"),
    ("dataset.task_options.n_best=3",
     "error: dataset.task_options.n_best: unknown key; valid keys here: doc_stride, n_best_size, max_answer_length"),
])
def test_task_option_typos_are_refused_while_composing(cli_error, tiny_qa_model, small_squad, option, message):
    line, code = cli_error(*qa_overrides(tiny_qa_model, small_squad, "sqlite:///unused.db", "tracking=off", option))
    assert code == 2 and line.startswith(message), line


def test_empty_dataset_after_max_samples_filtering_is_refused(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"data": [{"title": "t", "paragraphs": []}]}))
    with pytest.raises(DatasetError, match="has 0 rows"):
        load_squad(empty)
