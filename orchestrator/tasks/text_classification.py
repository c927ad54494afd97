"""Text (pair) classification: argmax of logits; accuracy and macro-F1 x100; labels mapped through the model config."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

from .base import Features, Task

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import torch


class TextClassification(Task):
    name = "text_classification"
    auto_class = "AutoModelForSequenceClassification"
    code = ("torchmetrics.functional.classification",)
    head_suffix = "ForSequenceClassification"
    primary_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1")
    roles = {"text": True, "text_pair": False, "label": True}

    def featurize(self, dataset) -> Features:
        texts = self.column(dataset, "text")
        pairs = self.column(dataset, "text_pair") if self.columns["text_pair"] in dataset.column_names else None
        enc = self.tokenize(texts, pairs) if pairs is not None else self.tokenize(texts)
        return Features(rows=self.rows_from(enc, len(texts)), example_index=list(range(len(texts))))

    def check_values(self, dataset) -> None:
        self.gold_labels(dataset)

    def gold_labels(self, dataset) -> List[int]:
        """Label ids: names through the model's label2id (any case), or ids in range; anything else is refused
        with the row, including blanks and fractional ids (a csv column with a blank cell reads as floats)."""
        import pandas as pd

        num = int(self.model_config.num_labels)
        label2id = {str(k).lower(): int(v) for k, v in (self.model_config.label2id or {}).items()}
        valid = f"valid: {', '.join(sorted(label2id))} or ids 0..{num - 1}"
        out = []
        for i, value in enumerate(self.column(dataset, "label")):
            text = "" if pd.isna(value) else str(value).strip()
            number = pd.to_numeric(text, errors="coerce") if text else None
            if not text:
                raise self.bad_row("label", i, f"dataset label is blank ({valid})")
            if pd.isna(number):  # a name
                if text.lower() not in label2id:
                    raise self.bad_row("label", i, f"dataset label {value!r} is not in the model's label map "
                                                   f"({valid})")
                out.append(label2id[text.lower()])
            elif number % 1:  # also inf, whose remainder is NaN
                raise self.bad_row("label", i, f"dataset label {value!r} is not a whole number ({valid})")
            elif not 0 <= number < num:
                raise self.bad_row("label", i, f"dataset label {value!r} is outside the model's {num} labels "
                                               f"(valid ids 0..{num - 1}: {self.model_config.id2label})")
            else:
                out.append(int(number))
        return out

    def head(self, outputs, batch) -> torch.Tensor:
        return outputs["logits"].float()

    def evaluate(self, dataset, features: Features, outputs) -> Tuple[Dict[str, float], List[dict]]:
        import torch
        from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

        gold = torch.tensor(self.gold_labels(dataset))
        logits = torch.stack(outputs)
        pred = logits.argmax(-1)
        n = int(self.model_config.num_labels)
        metrics = {
            "accuracy": 100.0 * float(multiclass_accuracy(pred, gold, num_classes=n, average="micro")),
            "macro_f1": 100.0 * float(multiclass_f1_score(pred, gold, num_classes=n, average="macro")),
        }
        id2label = self.model_config.id2label
        preds = [{"text": t, "label": id2label[int(g)], "predicted": id2label[int(p)]}
                 for t, g, p in zip(self.column(dataset, "text"), gold.tolist(), pred.tolist())]
        return metrics, preds
