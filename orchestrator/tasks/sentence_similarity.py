"""Sentence similarity (STS): mean-pooled, L2-normalised embeddings; cosine vs gold score; Spearman/Pearson x100."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

from ..errors import DatasetError, ModelLoadError
from .base import Features, Task, max_abs_diff

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import torch

# two sentences agree when their similarity moves less than this (the scale is cosine, -1..1)
SIMILARITY_TOLERANCE = 0.01


class SentenceSimilarity(Task):
    name = "sentence_similarity"
    auto_class = "AutoModel"
    code = ("scipy.stats",)
    head_suffix = None
    primary_metric = "spearman"
    metric_names = ("spearman", "pearson")
    roles = {"sentence1": True, "sentence2": True, "score": True}
    decision_field = "similarity"

    @classmethod
    def same_decision(cls, reference, candidate) -> bool:
        # a similarity is a score, not a choice: "the same" is within the per-run parity tolerance
        return reference is not None and candidate is not None and abs(reference - candidate) <= SIMILARITY_TOLERANCE

    def check_values(self, dataset) -> None:
        self.gold_scores(dataset)

    def gold_scores(self, dataset) -> List[float]:
        """The score column as floats; refuses what would make the correlation fail or come out NaN."""
        import numpy as np
        import pandas as pd

        raw = pd.Series(self.column(dataset, "score"), dtype=object)
        scores = pd.to_numeric(raw, errors="coerce").astype(float)
        bad = ~np.isfinite(scores.to_numpy())
        if bad.any():
            i = int(bad.argmax())
            value = raw.iloc[i]
            what = "is blank or NaN" if pd.isna(value) or not str(value).strip() else f"{value!r} is not a number"
            raise self.bad_row("score", i, f"dataset score {what} (every row needs a finite gold score)")
        if len(scores) < 2:
            cut = " after dataset.max_samples" if getattr(self.dataset_cfg, "max_samples", None) else ""
            raise DatasetError(f"task {self.name} needs at least 2 rows for a correlation; {self.source()} has "
                               f"{len(scores)}{cut}")
        if scores.nunique() == 1:
            raise DatasetError(f"the metric is undefined: all gold scores are equal ({scores.iloc[0]:g}) in "
                               f"{self.source()}, column {self.columns['score']!r}; Spearman and Pearson need "
                               "scores that vary")
        return scores.tolist()

    def featurize(self, dataset) -> Features:
        s1, s2 = self.column(dataset, "sentence1"), self.column(dataset, "sentence2")
        for role, texts in (("sentence1", s1), ("sentence2", s2)):
            i = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if i is not None:
                raise self.bad_row(role, i, f"dataset sentence {texts[i]!r} is not text (every row needs two "
                                            "sentences)")
        # rows 2i and 2i+1 are the two sentences of example i
        texts = [t for pair in zip(s1, s2) for t in pair]
        enc = self.tokenize(texts)
        return Features(rows=self.rows_from(enc, len(texts)), example_index=[i // 2 for i in range(len(texts))])

    def head(self, outputs, batch) -> torch.Tensor:
        import torch

        hidden = outputs["last_hidden_state"].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)

    @staticmethod
    def similarities(outputs: List[torch.Tensor]) -> torch.Tensor:
        import torch

        emb = torch.stack(outputs)
        return (emb[0::2] * emb[1::2]).sum(-1)

    def evaluate(self, dataset, features: Features, outputs) -> Tuple[Dict[str, float], List[dict]]:
        import numpy as np
        from scipy.stats import pearsonr, spearmanr

        gold = self.gold_scores(dataset)
        sims = self.similarities(outputs).tolist()
        if np.ptp(sims) == 0:  # the gold side was checked before the run; a constant model makes the same NaN
            raise ModelLoadError(f"the model gave every pair the same similarity ({sims[0]:.4f}): Spearman and "
                                 "Pearson are undefined (its embeddings do not depend on the input: check the "
                                 "weights at model.name_or_path)")
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
