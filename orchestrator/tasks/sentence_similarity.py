"""Sentence similarity (STS): mean-pooled, L2-normalised embeddings; cosine vs gold score; Spearman/Pearson x100."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from scipy.stats import pearsonr, spearmanr

from ..errors import DatasetError
from .base import Features, Task, max_abs_diff

# two sentences agree when their similarity moves less than this (the scale is cosine, -1..1)
SIMILARITY_TOLERANCE = 0.01


class SentenceSimilarity(Task):
    name = "sentence_similarity"
    auto_class = "AutoModel"
    head_suffix = None
    primary_metric = "spearman"
    metric_names = ("spearman", "pearson")
    roles = {"sentence1": True, "sentence2": True, "score": True}
    decision_field = "similarity"

    @classmethod
    def same_decision(cls, reference, candidate) -> bool:
        # a similarity is a score, not a choice: "the same" is within the per-run parity tolerance
        return reference is not None and candidate is not None and abs(reference - candidate) <= SIMILARITY_TOLERANCE

    def featurize(self, dataset) -> Features:
        s1, s2 = self.column(dataset, "sentence1"), self.column(dataset, "sentence2")
        # rows 2i and 2i+1 are the two sentences of example i
        texts = [t for pair in zip(s1, s2) for t in pair]
        if any(not isinstance(t, str) for t in texts):
            raise DatasetError(f"dataset columns {self.columns['sentence1']}/{self.columns['sentence2']} "
                               "must hold text in every row (found an empty or non-text cell)")
        enc = self.tokenize(texts)
        return Features(rows=self.rows_from(enc, len(texts)), example_index=[i // 2 for i in range(len(texts))])

    def head(self, outputs, batch) -> torch.Tensor:
        hidden = outputs["last_hidden_state"].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)

    @staticmethod
    def similarities(outputs: List[torch.Tensor]) -> torch.Tensor:
        emb = torch.stack(outputs)
        return (emb[0::2] * emb[1::2]).sum(-1)

    def evaluate(self, dataset, features: Features, outputs) -> Tuple[Dict[str, float], List[dict]]:
        gold = [float(s) for s in self.column(dataset, "score")]
        sims = self.similarities(outputs).tolist()
        metrics = {
            "spearman": 100.0 * float(spearmanr(sims, gold).statistic),
            "pearson": 100.0 * float(pearsonr(sims, gold).statistic),
        }
        preds = [{"sentence1": a, "sentence2": b, "score": g, "similarity": s}
                 for a, b, g, s in zip(self.column(dataset, "sentence1"), self.column(dataset, "sentence2"),
                                       gold, sims)]
        return metrics, preds

    def parity(self, reference, candidate) -> Tuple[float, float]:
        n = len(reference) - len(reference) % 2  # whole pairs only
        diff = max_abs_diff(reference, candidate)
        if n == 0:
            return diff, 1.0
        delta = (self.similarities(reference[:n]) - self.similarities(candidate[:n])).abs()
        return diff, float((delta <= SIMILARITY_TOLERANCE).float().mean())
