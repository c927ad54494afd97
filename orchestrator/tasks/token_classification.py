"""Token classification (NER): words -> sub-tokens, label on each word's first sub-token, entity-level F1 x100.

Data: a ``tokens`` column (list of words per sentence) and a ``tags`` column (default ``ner_tags``) holding either
tag names (CoNLL files read by ``dataset.path=conll``) or class ids with ``ClassLabel`` names (hub datasets).

Label list: when the model config names its labels (anything but transformers' default ``LABEL_<i>``), those names
are the label list and every dataset tag must be among them. A model with default names takes the dataset's list:
``task_options.labels`` if given, else the ``ClassLabel`` names, else the tags found in the data (``O`` first, then
by entity type, ``B-`` before ``I-``); its size must equal the model's ``num_labels``. Any disagreement is a
one-line DatasetError naming both lists.

Alignment: sentences are tokenized with ``is_split_into_words=True``; the logits of each word's first sub-token
give the word's prediction, other sub-tokens are ignored. A word with no sub-token (e.g. a lone zero-width
character) or cut off by ``runtime.max_length`` is predicted ``O`` (counted and logged).

Metrics: seqeval entity-level precision/recall/F1 (micro, conlleval rules) and word-level accuracy, all x100.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..errors import DatasetError, ModelLoadError
from .base import Features, Task

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import torch

log = logging.getLogger(__name__)

OUTSIDE = "O"
DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


@dataclass
class TokenClassificationOptions:
    # the label list (id order) for a model whose config has only default LABEL_<i> names; null: from the dataset
    labels: Optional[List[str]] = None


def ner_metrics(gold: List[List[str]], predicted: List[List[str]]) -> Dict[str, float]:
    """seqeval entity-level micro precision/recall/F1 and word accuracy, x100."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "f1": 100.0 * float(f1_score(gold, predicted, average="micro", zero_division=0)),
        "precision": 100.0 * float(precision_score(gold, predicted, average="micro", zero_division=0)),
        "recall": 100.0 * float(recall_score(gold, predicted, average="micro", zero_division=0)),
        "accuracy": 100.0 * float(accuracy_score(gold, predicted)),
    }


def sort_tags(tags) -> List[str]:
    """O first, then by entity type, B- before I- (the order hub NER datasets such as wnut_17 use)."""
    def key(tag: str):
        prefix, _, kind = tag.partition("-")
        return (tag != OUTSIDE, kind or prefix, prefix)

    return sorted(set(tags), key=key)


class TokenClassification(Task):
    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    code = ("seqeval.metrics",)
    head_suffix = "ForTokenClassification"
    primary_metric = "f1"
    metric_names = ("f1", "precision", "recall", "accuracy")
    roles = {"tokens": True, "tags": True}
    Options = TokenClassificationOptions

    def __init__(self, dataset_cfg, runtime_cfg, tokenizer, model_config):
        super().__init__(dataset_cfg, runtime_cfg, tokenizer, model_config)
        if "tags" not in dataset_cfg.columns:
            self.columns["tags"] = "ner_tags"
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"task {self.name} needs a fast (tokenizers) tokenizer for word alignment; "
                                 f"{type(tokenizer).__name__} is not one")
        self.labels: List[str] = []

    # -- labels --------------------------------------------------------------------------------------------
    def gold_tags(self, dataset) -> List[List[str]]:
        """Tag names per word, whatever the column stores (names, or ids with ClassLabel names)."""
        column = self.columns["tags"]
        feature = dataset.features.get(column)
        inner = getattr(feature, "feature", None)
        names = getattr(inner, "names", None)
        out = []
        for i, row in enumerate(self.column(dataset, "tags")):
            if not isinstance(row, (list, tuple)):
                raise self.bad_row("tags", i, f"dataset tags {row!r} are not a list of tags (one per word)")
            if names is not None:
                out.append([names[int(t)] for t in row])
            elif all(isinstance(t, str) for t in row):
                if not all(t.strip() for t in row):
                    raise self.bad_row("tags", i, f"dataset tags {row!r} include a blank tag (every word needs one)")
                out.append(list(row))
            else:  # bare ids: named by the model config (or task_options.labels)
                ids = self.model_label_names()
                if ids is None:
                    raise DatasetError(f"dataset column {column!r} holds tag ids without names and the model config "
                                       "has only default label names; set dataset.task_options.labels=[...]")
                try:
                    out.append([ids[int(t)] for t in row])
                except (IndexError, ValueError, TypeError) as e:
                    raise self.bad_row("tags", i, f"dataset tags {row!r} are not all ids in 0..{len(ids) - 1} "
                                                  f"({', '.join(ids)})") from e
        return out

    def model_label_names(self) -> Optional[List[str]]:
        id2label = {int(k): str(v) for k, v in (self.model_config.id2label or {}).items()}
        names = [id2label.get(i, f"LABEL_{i}") for i in range(int(self.model_config.num_labels))]
        if all(DEFAULT_LABEL.match(n) for n in names):
            return list(self.options.labels) if self.options.labels else None
        return names

    def resolve_labels(self, dataset, gold: List[List[str]]) -> List[str]:
        found = sorted({t for row in gold for t in row})
        num = int(self.model_config.num_labels)
        named = self.model_label_names()
        if named is not None:
            if len(named) != num:
                raise DatasetError(f"dataset.task_options.labels has {len(named)} names; the model has {num} labels")
            unknown = [t for t in found if t not in named]
            if unknown:
                first = next(i for i, row in enumerate(gold) if set(row) - set(named))
                raise DatasetError(f"dataset tags {', '.join(unknown)} are not in the model's labels "
                                   f"({', '.join(named)}), first in {self.where('tags', first)}; use a model "
                                   "trained on this tag set")
            return named
        feature = dataset.features.get(self.columns["tags"])
        names = getattr(getattr(feature, "feature", None), "names", None)
        labels = list(names) if names is not None else sort_tags(found)
        if len(labels) != num:
            raise DatasetError(f"the dataset has {len(labels)} tags ({', '.join(labels)}) but the model has {num} "
                               "labels with default names; set dataset.task_options.labels=[...] in the model's order")
        return labels

    # -- data ----------------------------------------------------------------------------------------------
    def featurize(self, dataset) -> Features:
        words = self.column(dataset, "tokens")
        i = next((i for i, w in enumerate(words) if not isinstance(w, (list, tuple))), None)
        if i is not None:
            raise self.bad_row("tokens", i, f"dataset tokens {words[i]!r} are not a list of words")
        gold = self.gold_tags(dataset)
        for i, (w, t) in enumerate(zip(words, gold)):
            if len(w) != len(t):
                raise self.bad_row("tags", i, f"{len(w)} words (column {self.columns['tokens']!r}) but {len(t)} "
                                              "tags")
        self.labels = self.resolve_labels(dataset, gold)
        enc = self.tokenize([list(map(str, w)) for w in words], is_split_into_words=True)
        first_tokens = []  # per row: (token position, word index) of each word's first sub-token
        for i in range(len(words)):
            seen, pairs = set(), []
            for pos, w in enumerate(enc.word_ids(i)):
                if w is not None and w not in seen:
                    seen.add(w)
                    pairs.append((pos, w))
            first_tokens.append(pairs)
        lost = sum(len(w) - len(p) for w, p in zip(words, first_tokens))
        if lost:
            log.warning("%d word(s) have no sub-token (empty after tokenization or cut by runtime.max_length=%d); "
                        "they are predicted %s", lost, self.runtime.max_length, OUTSIDE)
        return Features(rows=self.rows_from(enc, len(words)), example_index=list(range(len(words))),
                        extra={"first_tokens": first_tokens})

    # -- model outputs -------------------------------------------------------------------------------------
    def head(self, outputs, batch) -> torch.Tensor:
        return outputs["logits"].float()  # [batch, seq, num_labels]

    def word_predictions(self, dataset, features: Features, outputs) -> List[List[str]]:
        preds = []
        if not self.labels:
            self.labels = self.resolve_labels(dataset, self.gold_tags(dataset))
        for pairs, logits in zip(features.extra["first_tokens"], outputs):
            ids = logits.argmax(-1).tolist()
            preds.append({w: self.labels[ids[pos]] for pos, w in pairs})
        n_words = [len(w) for w in self.column(dataset, "tokens")]
        return [[p.get(i, OUTSIDE) for i in range(n)] for p, n in zip(preds, n_words)]

    def evaluate(self, dataset, features: Features, outputs) -> Tuple[Dict[str, float], List[dict]]:
        gold = self.gold_tags(dataset)
        predicted = self.word_predictions(dataset, features, outputs)
        metrics = ner_metrics(gold, predicted)
        records = [{"tokens": list(w), "tags": g, "predicted": p}
                   for w, g, p in zip(self.column(dataset, "tokens"), gold, predicted)]
        return metrics, records
