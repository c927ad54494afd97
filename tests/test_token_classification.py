"""Token classification: CoNLL loading, label lists, first-sub-token alignment, seqeval F1, a tiny model end to end."""
from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SHARED, VOCAB, make_tiny_model, needs_shared
from orchestrator import data
from orchestrator.errors import DatasetError, ModelLoadError
from orchestrator.runner import run
from orchestrator.tasks.token_classification import TokenClassification, ner_metrics, sort_tags

WNUT = SHARED / "data" / "wnut17_emerging.test.annotated"
TAGS = ["O", "B-thing", "I-thing"]


def load(path, fmt="conll", **kw):
    cfg = SimpleNamespace(path=fmt, name=None, data_files=str(path), split="train", load_kwargs={}, max_samples=None)
    cfg.__dict__.update(kw)
    return data.load(cfg)


def write_conll(path: Path, sentences) -> Path:
    path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")
    return path


@pytest.fixture(scope="session")
def conll_file(tmp_path_factory) -> Path:
    rnd = random.Random(5)
    words = VOCAB[5:]
    sentences = []
    for _ in range(30):
        sent, i = [], 0
        n = rnd.randint(3, 14)
        while i < n:
            if rnd.random() < 0.2:
                span = rnd.randint(1, 2)
                sent += [(rnd.choice(words), "B-thing")] + [(rnd.choice(words), "I-thing") for _ in range(span - 1)]
                i += span
            else:
                sent.append((rnd.choice(words), "O"))
                i += 1
        sentences.append(sent)
    return write_conll(tmp_path_factory.mktemp("ner") / "tiny.conll", sentences)


def ner_overrides(model, conll, uri, *extra):
    return [f"model.name_or_path={model}", "dataset=wnut17", f"dataset.data_files={conll}", "runtime=quick",
            f"tracking.uri={uri}", *extra]


# -- loading --------------------------------------------------------------------------------------------------
@needs_shared("data", "wnut17_emerging.test.annotated")
def test_conll_file_loads_as_tokens_and_tags():
    ds = load(WNUT)
    assert len(ds) == 1287 and ds.column_names == ["id", "tokens", "ner_tags"]
    assert ds[0]["tokens"][:5] == ["&", "gt", ";", "*", "The"] and ds[0]["ner_tags"][20] == "B-location"
    assert len(load(WNUT, max_samples=10)) == 10


def test_conll_reader_handles_docstart_spaces_and_splits(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n")
    ds = load(f)
    assert ds["tokens"] == [["EU", "rejects"], ["Peter"]] and ds["ner_tags"] == [["B-ORG", "O"], ["B-PER"]]
    ds = load(None, data_files={"train": str(f), "test": str(f)}, split="test")
    assert len(ds) == 2
    with pytest.raises(DatasetError, match=r"dataset.split='dev' is not in dataset.data_files; valid: train"):
        load(None, data_files={"train": str(f)}, split="dev")
    bad = tmp_path / "bad.txt"
    bad.write_text("word\tO\nlonely\n")
    with pytest.raises(DatasetError, match=r"line 2 has one column"):
        load(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="has 0 rows"):
        load(empty)


# -- metric and alignment -------------------------------------------------------------------------------------
@needs_shared("data", "wnut17_emerging.test.annotated")
def test_gold_tags_score_100():
    gold = load(WNUT)["ner_tags"]
    assert ner_metrics(gold, gold) == {"f1": 100.0, "precision": 100.0, "recall": 100.0, "accuracy": 100.0}


def test_entity_level_scores_are_seqeval_micro():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]  # PER span cut short: 2 of 3 entities right
    m = ner_metrics(gold, pred)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(500 / 6)


def test_tag_order_puts_o_first_then_types_b_before_i():
    assert sort_tags(["I-person", "B-location", "O", "B-person", "I-location"]) == \
        ["O", "B-location", "I-location", "B-person", "I-person"]


@needs_shared("data", "wnut17_emerging.test.annotated")
@needs_shared("models", "tiny-qa")
def test_gold_logits_on_first_sub_tokens_map_back_to_words_with_f1_100():
    """Real bert-uncased word pieces: logits favouring the gold tag on each word's first sub-token (and a wrong tag
    on every other sub-token) must come back as the gold tags, F1 100, through the task's own alignment."""
    from transformers import AutoTokenizer, BertConfig

    ds = load(WNUT)
    labels = sort_tags(t for row in ds["ner_tags"] for t in row)
    cfg = BertConfig(num_labels=len(labels), id2label=dict(enumerate(labels)))
    task = TokenClassification(SimpleNamespace(columns={"tokens": "tokens", "tags": "ner_tags"}, task_options={}),
                               SimpleNamespace(max_length=512, padding="dynamic"),
                               AutoTokenizer.from_pretrained(SHARED / "models" / "tiny-qa"), cfg)
    feats = task.featurize(ds)
    assert "token_type_ids" in feats.rows[0] and "first_tokens" not in feats.rows[0]
    outputs = []
    for row, pairs, gold in zip(feats.rows, feats.extra["first_tokens"], ds["ner_tags"]):
        logits = torch.zeros(len(row["input_ids"]), len(labels))
        logits[:, labels.index("B-person")] = 1.0  # what a non-first sub-token would wrongly say
        for pos, w in pairs:
            logits[pos, labels.index(gold[w])] = 2.0
        outputs.append(logits)
    metrics, preds = task.evaluate(ds, feats, outputs)
    # the only words without a sub-token in this file are three lone variation selectors tagged O
    lost = sum(len(t) - len(p) for t, p in zip(ds["tokens"], feats.extra["first_tokens"]))
    assert lost == 3
    assert metrics == {"f1": 100.0, "precision": 100.0, "recall": 100.0, "accuracy": 100.0}
    assert preds[0]["predicted"] == preds[0]["tags"]


# -- end to end -----------------------------------------------------------------------------------------------
def test_tiny_ner_model_end_to_end(compose, tiny_ner, conll_file, tracking_uri):
    results = run(compose(*ner_overrides(tiny_ner, conll_file, tracking_uri, "dataset.max_samples=20",
                                         "runtime.batch_size=4")))
    m = results["metrics"]
    assert results["status"] == "FINISHED" and m["examples"] == 20 and m["features"] == 20
    for k in ("f1", "precision", "recall", "accuracy"):
        assert 0 <= m[k] <= 100
    assert m["parity_max_abs_diff"] == 0.0 and m["parity_agreement"] == 1.0
    sample = json.loads((Path(results["run_dir"]) / "predictions_sample.json").read_text())
    assert len(sample[0]["predicted"]) == len(sample[0]["tokens"]) == len(sample[0]["tags"])
    assert set(t for s in sample for t in s["predicted"]) <= set(TAGS)


def test_jit_stack_runs_token_classification(compose, tiny_ner, conll_file):
    results = run(compose(*ner_overrides(tiny_ner, conll_file, "sqlite:///unused.db", "tracking=off",
                                         "optimization=[jit]", "runtime.padding=max_length", "runtime.max_length=32")))
    assert results["applied"] == ["jit"] and results["metrics"]["parity_agreement"] == 1.0


def test_hub_style_tag_ids_with_label_names_from_options(compose, tiny_ner, tmp_path, tracking_uri):
    """Hub datasets store tag ids; with a model lacking label names, task_options.labels names them."""
    rows = [{"tokens": ["the", "cat", "sat"], "ner_tags": [0, 1, 2]}, {"tokens": ["dog"], "ner_tags": [1]}]
    f = tmp_path / "ids.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    results = run(compose(*ner_overrides(tiny_ner, f, "sqlite:///unused.db", "tracking=off", "dataset.path=json",
                                         "+dataset.task_options.labels=[O,B-thing,I-thing]")))
    sample = json.loads((Path(results["run_dir"]) / "predictions_sample.json").read_text())
    assert sample[0]["tags"] == ["O", "B-thing", "I-thing"]


# -- errors ---------------------------------------------------------------------------------------------------
def test_label_count_disagreement_is_one_line(compose, tmp_path, conll_file):
    model = make_tiny_model(tmp_path / "two", "token", num_labels=2)
    with pytest.raises(DatasetError, match=r"^the dataset has 3 tags \(O, B-thing, I-thing\) but the model has 2 "
                                           r"labels with default names; set dataset.task_options.labels") as e:
        run(compose(*ner_overrides(model, conll_file, "sqlite:///unused.db", "tracking=off")))
    assert "\n" not in str(e.value)


def test_tags_outside_a_named_model_label_list_are_refused(compose, tmp_path, conll_file):
    from transformers import BertForTokenClassification

    model_dir = make_tiny_model(tmp_path / "named", "token", num_labels=3)
    m = BertForTokenClassification.from_pretrained(model_dir)
    m.config.id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
    m.config.label2id = {v: k for k, v in m.config.id2label.items()}
    m.save_pretrained(model_dir)
    with pytest.raises(DatasetError, match=r"dataset tags B-thing, I-thing are not in the model's labels "
                                           r"\(O, B-PER, I-PER\)"):
        run(compose(*ner_overrides(model_dir, conll_file, "sqlite:///unused.db", "tracking=off")))


def test_ner_task_on_a_model_without_a_token_head(compose, tiny_qa_model, conll_file):
    with pytest.raises(ModelLoadError, match=r"\*ForTokenClassification head \(loaded with "
                                             r"AutoModelForTokenClassification\)"):
        run(compose(*ner_overrides(tiny_qa_model, conll_file, "sqlite:///unused.db", "tracking=off")))


def test_missing_columns_name_the_columns_found(compose, tiny_ner, conll_file):
    with pytest.raises(DatasetError, match=r"missing for task token_classification: tags->'labels'; "
                                           r"columns found: id, tokens, ner_tags"):
        run(compose(*ner_overrides(tiny_ner, conll_file, "sqlite:///unused.db", "tracking=off",
                                   "dataset.columns.tags=labels")))
