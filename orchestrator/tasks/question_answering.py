"""Extractive question answering (SQuAD v1.1): overflowing windows, best span over all windows, EM/F1 x100.

Preprocessing is the reference evaluation's (transformers' ``run_qa.py``, ``prepare_validation_features``):
questions are left-stripped, ``question + context`` is tokenized with ``truncation="only_second"``,
``max_length=runtime.max_length`` (refused above the model's limit, :meth:`Task.check_max_length`) and ``stride=doc_stride`` so a
long context yields several overlapping windows; offsets outside the context are dropped. Padding is the runner's
(``runtime.padding``): ``max_length`` is what run_qa did (``pad_to_max_length`` defaults to True there).

Two scoring rules (``dataset.task_options.scoring``):

``run_qa`` (default) -- ``utils_qa.postprocess_qa_predictions`` exactly: in every window take the ``n_best_size``
  highest start and end logits (over the whole row as the model saw it, padding included), keep pairs inside the
  context with ``0 <= end - start < max_answer_length``, score = start logit + end logit, best score over all
  windows wins; no candidate at all gives run_qa's placeholder answer ``"empty"``.
``pipeline`` -- transformers 4.x ``pipeline("question-answering")``: per window, softmax over the context tokens
  (CLS kept), span score = p(start) * p(end) with ``end - start < max_answer_length``, the start/end tokens are
  widened to whole words, and the best probability across windows wins. Probabilities are normalised per window,
  so the two rules rank spans from different windows differently (see docs/tasks.md).

The metric is SQuAD v1.1 exact match and F1 (lowercase, strip punctuation and articles, collapse whitespace; max
over the gold answers) from ``torchmetrics.functional.text.squad``, which ships the official rules offline.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import ConfigError, DatasetError, ModelLoadError, RunInterrupted
from ..errors import first_line as describe_first_line
from .base import Features, Task

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import numpy as np
    import torch

class Scoring(StrEnum):
    run_qa = "run_qa"
    pipeline = "pipeline"
EMPTY_ANSWER = "empty"  # run_qa's answer when no span is valid


@dataclass
class QAOptions:
    # tokens of overlap between consecutive windows of a long context; null: min(runtime.max_length // 2, 128)
    # (128 at max_length 384, run_qa's default; the QA pipeline's rule for shorter windows)
    doc_stride: Optional[int] = None
    # how many top start and end logits of each window are paired
    n_best_size: int = 20
    # longest answer, in tokens
    max_answer_length: int = 30
    # run_qa: start+end logits (the reference evaluation); pipeline: softmax probabilities per window, word-aligned
    scoring: Scoring = Scoring.run_qa


def squad_scores(prediction: str, golds: List[str]) -> Tuple[float, float]:
    """(exact match, F1) x100 of one prediction under the official SQuAD v1.1 rules, max over the gold answers."""
    from torchmetrics.functional.text import squad

    if not golds:
        raise DatasetError("question answering: an example has no gold answer (SQuAD v1.1 needs at least one)")
    out = squad({"prediction_text": prediction, "id": "q"},
                {"answers": {"text": list(golds), "answer_start": [0] * len(golds)}, "id": "q"})
    return float(out["exact_match"]), float(out["f1"])


def squad_metric(predictions: Dict[str, str], golds: Dict[str, List[str]]) -> Dict[str, float]:
    """Mean EM/F1 x100 over every question in ``golds`` (a question without a prediction scores 0)."""
    scores = [squad_scores(predictions.get(qid, ""), answers) if qid in predictions else (0.0, 0.0)
              for qid, answers in golds.items()]
    n = max(len(scores), 1)
    return {"exact_match": sum(s[0] for s in scores) / n, "f1": sum(s[1] for s in scores) / n}


class QuestionAnswering(Task):
    name = "question_answering"
    auto_class = "AutoModelForQuestionAnswering"
    code = ("torchmetrics.functional.text",)
    head_suffix = "ForQuestionAnswering"
    primary_metric = "f1"
    metric_names = ("exact_match", "f1")
    roles = {"id": False, "question": True, "context": True, "answers": True}
    Options = QAOptions
    decision_field = "answer"

    @classmethod
    def validate_options(cls, o) -> None:
        for key in ("n_best_size", "max_answer_length"):
            if getattr(o, key) < 1:
                raise ConfigError(f"dataset.task_options.{key}={getattr(o, key)}: must be >= 1")
        if o.doc_stride is not None and o.doc_stride < 0:
            raise ConfigError(f"dataset.task_options.doc_stride={o.doc_stride}: must be >= 0 and < runtime.max_length")

    def __init__(self, dataset_cfg, runtime_cfg, tokenizer, model_config):
        super().__init__(dataset_cfg, runtime_cfg, tokenizer, model_config)
        o = self.options
        self.max_seq_length = self.runtime.max_length  # Task refused one above the model's limit
        if o.doc_stride is None:
            o.doc_stride = min(self.max_seq_length // 2, 128)
        if not 0 <= o.doc_stride < self.max_seq_length:
            raise ConfigError(f"dataset.task_options.doc_stride={o.doc_stride}: must be >= 0 and < runtime.max_length "
                              f"({self.max_seq_length})")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"task {self.name} needs a fast (tokenizers) tokenizer for offset mappings; "
                                 f"{type(tokenizer).__name__} is not one")
        self.pad_on_right = getattr(tokenizer, "padding_side", "right") == "right"
        # torchmetrics' first import takes seconds; pay it here, not inside the evaluation it would be timed in
        from torchmetrics.functional.text import squad  # noqa: F401

    # -- data ----------------------------------------------------------------------------------------------
    def ids(self, dataset) -> List[str]:
        if self.columns["id"] in dataset.column_names:
            return [str(i) for i in self.column(dataset, "id")]
        return [str(i) for i in range(len(dataset))]

    def check_values(self, dataset) -> None:
        self.gold_answers(dataset)

    def gold_answers(self, dataset) -> List[List[str]]:
        out = []
        for i, value in enumerate(self.column(dataset, "answers")):
            if isinstance(value, dict) and "text" in value:
                out.append([str(t) for t in value["text"]])
            elif isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
                out.append(list(value))
            elif isinstance(value, str):
                out.append([value])
            else:
                raise self.bad_row("answers", i, f"dataset answers {value!r} are not SQuAD answers "
                                                 "({'text': [...], 'answer_start': [...]}) or a list of strings")
            if not out[-1]:  # SQuAD v2's unanswerable questions: v1.1's metric has nothing to compare with
                raise self.bad_row("answers", i, "question without a gold answer (SQuAD v1.1 needs at least one)")
        return out

    def featurize(self, dataset) -> Features:
        import numpy as np

        questions = [str(q).lstrip() for q in self.column(dataset, "question")]
        contexts = [str(c) for c in self.column(dataset, "context")]
        first, second = (questions, contexts) if self.pad_on_right else (contexts, questions)
        try:
            enc = self.tokenizer(first, second, truncation="only_second" if self.pad_on_right else "only_first",
                                 max_length=self.max_seq_length, stride=self.options.doc_stride,
                                 return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
        except RunInterrupted:  # a signal or runtime.timeout_s that lands while it tokenizes is not bad data
            raise
        except Exception as e:  # the Rust tokenizer refuses a question that leaves no room for the context
            first_line = describe_first_line(e)
            raise DatasetError(f"question answering windows could not be built with runtime.max_length="
                               f"{self.max_seq_length} and dataset.task_options.doc_stride={self.options.doc_stride} "
                               f"(a question may be too long; raise max_length or lower doc_stride): {first_line}") from e
        context_index = 1 if self.pad_on_right else 0
        offsets, span_chars = [], []
        for i, row in enumerate(enc["offset_mapping"]):
            seq = enc.sequence_ids(i)
            offsets.append([tuple(o) if seq[k] == context_index else None for k, o in enumerate(row)])
            # the same as arrays (start char, end char; -1 outside the context) for the vectorised n-best search
            chars = np.asarray(row, dtype=np.int64).reshape(-1, 2)
            chars[np.asarray([s != context_index for s in seq], dtype=bool)] = -1
            span_chars.append(chars)
        sample_mapping = list(enc["overflow_to_sample_mapping"])
        n = len(enc["input_ids"])
        extra: Dict[str, List[Any]] = {"offset_mapping": offsets, "span_chars": span_chars}
        if self.options.scoring == "pipeline":  # word alignment needs word ids and their character spans
            extra["word_ids"] = [enc.word_ids(i) for i in range(n)]
            extra["char_spans"] = [self._word_chars(enc, i) for i in range(n)]
        return Features(rows=self.rows_from(enc, n), example_index=sample_mapping, extra=extra)

    def _word_chars(self, enc, i: int) -> Dict[int, Tuple[int, int]]:
        """Context word index -> (start, end) characters, for the pipeline rule's word alignment."""
        seq_index = 1 if self.pad_on_right else 0
        out: Dict[int, Tuple[int, int]] = {}
        for w, s in zip(enc.word_ids(i), enc.sequence_ids(i)):
            if w is not None and s == seq_index and w not in out:
                span = enc[i].word_to_chars(w, sequence_index=seq_index)
                out[w] = (span.start, span.end) if hasattr(span, "start") else tuple(span)
        return out

    # -- model outputs -------------------------------------------------------------------------------------
    def head(self, outputs, batch) -> torch.Tensor:
        # [batch, 2, seq]: start and end logits per row
        import torch

        return torch.stack([outputs["start_logits"], outputs["end_logits"]], dim=1).float()

    # -- postprocessing ------------------------------------------------------------------------------------
    def _candidates_run_qa(self, logits: np.ndarray, chars: np.ndarray) -> List[Tuple[Any, tuple]]:
        """utils_qa.postprocess_qa_predictions for one window: (score, (start_char, end_char)) candidates.

        The same pairs in the same order as run_qa's nested loop (start-major), so its stable sort ties the same
        way; ``chars`` is [tokens, 2] character spans with -1 outside the context.
        """
        import numpy as np

        start_logits, end_logits = logits[0], logits[1]
        n_best, max_len = self.options.n_best_size, self.options.max_answer_length
        start_indexes = np.argsort(start_logits)[-1: -n_best - 1: -1]
        end_indexes = np.argsort(end_logits)[-1: -n_best - 1: -1]
        s, e = (a.ravel() for a in np.meshgrid(start_indexes, end_indexes, indexing="ij"))
        n = len(chars)
        ok = (s < n) & (e < n)  # positions past the window's own tokens are padding
        s, e = s[ok], e[ok]
        ok = (chars[s, 0] >= 0) & (chars[e, 1] >= 0) & (e >= s) & (e - s + 1 <= max_len)
        s, e = s[ok], e[ok]
        scores = start_logits[s] + end_logits[e]
        return list(zip(scores, zip(chars[s, 0].tolist(), chars[e, 1].tolist())))

    def _candidate_pipeline(self, logits: np.ndarray, feature: int, features: Features):
        """transformers 4.x QuestionAnsweringPipeline (top_k=1) for one window: (probability, (start, end)) or None."""
        import numpy as np

        offsets = features.extra["offset_mapping"][feature]
        n = len(offsets)  # the window's own tokens; positions past it are padding
        start, end = logits[0][:n].copy(), logits[1][:n].copy()  # float32, as the pipeline computed
        # p_mask: 1 outside the context, but CLS stays a candidate for the softmax (as the pipeline does)
        allowed = np.array([o is not None for o in offsets])
        cls = self.tokenizer.cls_token_id
        ids = features.rows[feature]["input_ids"]
        softmax_ok = allowed.copy()
        if cls is not None and cls in ids:
            softmax_ok[ids.index(cls)] = True
        start = np.where(softmax_ok, start, np.float32(-10000.0))
        end = np.where(softmax_ok, end, np.float32(-10000.0))
        start = np.exp(start - start.max())
        start = start / start.sum()
        end = np.exp(end - end.max())
        end = end / end.sum()
        start[0] = end[0] = 0.0
        outer = np.tril(np.triu(np.outer(start, end)), self.options.max_answer_length - 1)
        s, e = np.unravel_index(int(np.argmax(outer)), outer.shape)
        if not (allowed[s] and allowed[e]):
            return None
        words = features.extra["word_ids"][feature]
        chars = features.extra["char_spans"][feature]
        ws, we = words[s], words[e]
        if ws in chars and we in chars:
            span = (chars[ws][0], chars[we][1])
        else:
            span = (offsets[s][0], offsets[e][1])
        return float(outer[s, e]), span

    def predict_answers(self, contexts: List[str], features: Features, outputs: List[torch.Tensor]) -> List[str]:
        per_example: Dict[int, List[int]] = collections.defaultdict(list)
        for f, ex in enumerate(features.example_index):
            per_example[ex].append(f)
        answers = []
        for ex, context in enumerate(contexts):
            if self.options.scoring == "pipeline":
                best = None
                for f in per_example[ex]:
                    cand = self._candidate_pipeline(outputs[f].numpy(), f, features)
                    if cand is not None and (best is None or cand[0] > best[0]):
                        best = cand
                answers.append(context[best[1][0]:best[1][1]] if best else "")
                continue
            prelim = []
            for f in per_example[ex]:
                prelim.extend(self._candidates_run_qa(outputs[f].numpy(), features.extra["span_chars"][f]))
            # a stable sort, as run_qa's sorted(): equal scores keep window order
            best = sorted(prelim, key=lambda c: c[0], reverse=True)[:self.options.n_best_size]
            texts = [context[a:b] for _, (a, b) in best]
            if len(texts) == 0 or (len(texts) == 1 and texts[0] == ""):
                texts.insert(0, EMPTY_ANSWER)
            answers.append(texts[0])
        return answers

    def evaluate(self, dataset, features: Features, outputs) -> Tuple[Dict[str, float], List[dict]]:
        ids = self.ids(dataset)
        questions = self.column(dataset, "question")
        golds = self.gold_answers(dataset)
        answers = self.predict_answers([str(c) for c in self.column(dataset, "context")], features, outputs)
        preds, em_sum, f1_sum = [], 0.0, 0.0
        for qid, question, gold, answer in zip(ids, questions, golds, answers):
            em, f1 = squad_scores(answer, gold)
            em_sum += em
            f1_sum += f1
            preds.append({"id": qid, "question": question, "answer": answer, "gold": gold,
                          "exact_match": em, "f1": f1})
        n = max(len(preds), 1)
        return {"exact_match": em_sum / n, "f1": f1_sum / n}, preds

    def artifacts(self, predictions: List[dict]) -> Dict[str, Any]:
        # run_qa's predictions.json: {question id: answer text} for every question
        return {"predictions.json": {p["id"]: p["answer"] for p in predictions}}
