"""What every task provides: columns it reads, features it builds, the head it applies, the metric it computes.

A task never runs the model: the runner batches its features, calls the (possibly optimized) model and hands each
task the per-feature outputs of :meth:`Task.head`, in the original feature order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, DatasetError, ModelLoadError, RunInterrupted, first_line

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import torch


@dataclass
class NoOptions:
    pass


@dataclass
class Features:
    """Tokenized rows, one per model input row; ``example_index`` maps each row back to its dataset example."""

    rows: List[Dict[str, List[int]]]
    example_index: List[int]
    # task-specific per-row data the postprocessing needs (e.g. offset mappings for QA)
    extra: Dict[str, List[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


def max_abs_diff(reference: List[torch.Tensor], candidate: List[torch.Tensor]) -> float:
    return max((float((r - c).abs().max()) for r, c in zip(reference, candidate)), default=0.0)


class Task:
    name: ClassVar[str] = ""
    # the transformers Auto class that loads a model for this task
    auto_class: ClassVar[str] = "AutoModel"
    # modules evaluate() imports (its metric library): imported before the run's measured phases
    # (pipeline.import_code), so that an import of seconds is not timed as the accuracy pass's postprocessing
    code: ClassVar[Tuple[str, ...]] = ()
    # architecture suffix a checkpoint must declare (None: any encoder works, e.g. embeddings from the base model)
    head_suffix: ClassVar[Optional[str]] = None
    primary_metric: ClassVar[str] = ""
    # every task metric, in the order tables show them (all on a 0-100 scale)
    metric_names: ClassVar[tuple] = ()
    # role -> required; a dataset config maps roles to its column names (default: the role's own name)
    roles: ClassVar[Dict[str, bool]] = {}
    # schema of dataset.task_options for this task
    Options: ClassVar[type] = NoOptions
    # the field of each prediction record that is the model's decision for that example; sweep summaries
    # compare it with the eager fp32 job's on every example (agreement_vs_baseline)
    decision_field: ClassVar[str] = "predicted"

    def __init__(self, dataset_cfg, runtime_cfg, tokenizer, model_config):
        self.dataset_cfg = dataset_cfg
        self.runtime = runtime_cfg
        self.tokenizer = tokenizer
        self.model_config = model_config
        unknown = sorted(set(dataset_cfg.columns) - set(self.roles))
        if unknown:
            raise DatasetError(
                f"dataset.columns: unknown role(s) {', '.join(unknown)} for task {self.name}; "
                f"valid roles: {', '.join(self.roles)}"
            )
        self.columns = {role: dataset_cfg.columns.get(role, role) for role in self.roles}
        self.options = self.parse_options(getattr(dataset_cfg, "task_options", None) or {})
        self.check_max_length()

    def check_max_length(self) -> None:
        """Refuse a runtime.max_length the model cannot take, before any data is read: above its position table
        the forward dies mid-run (or, with padding=max_length, on the first batch) with a tensor-size error.
        Refused, not clamped: max_length is part of what a run measures (config digest, sweep workload), so a
        silently smaller value would label the run with a truncation it did not use."""
        from ..pipeline import max_positions

        limit = max_positions(self.model_config, self.tokenizer)
        if limit is not None and self.runtime.max_length > limit[0]:
            model = getattr(self.model_config, "_name_or_path", "") or getattr(self.tokenizer, "name_or_path", "")
            raise ConfigError(f"runtime.max_length={self.runtime.max_length}: the model {model!r} takes at most "
                              f"{limit[0]} tokens ({limit[1]}); valid: 8..{limit[0]}")

    @classmethod
    def parse_options(cls, options: Dict[str, Any]) -> Any:
        from omegaconf import OmegaConf

        try:
            parsed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Options), options))
        except RunInterrupted:  # runtime.timeout_s or a signal, not a config error
            raise
        except Exception as e:  # omegaconf names the key; keep its first line
            first = first_line(e)
            raise ConfigError(f"dataset.task_options ({cls.name}): {first}") from e
        cls.validate_options(parsed)
        return parsed

    @classmethod
    def validate_options(cls, options: Any) -> None:
        """Raise ConfigError for option values no dataset or model could make valid (runs before anything loads)."""

    # -- decisions (whole-dataset agreement between two runs) ---------------------------------------------------
    @classmethod
    def decisions(cls, predictions: List[dict]) -> List[Any]:
        return [p.get(cls.decision_field) for p in predictions]

    @classmethod
    def same_decision(cls, reference: Any, candidate: Any) -> bool:
        return reference == candidate

    # -- model ---------------------------------------------------------------------------------------------
    @classmethod
    def check_model(cls, model_config, name_or_path: str) -> None:
        """Refuse a checkpoint whose head does not fit (instead of silently adding a random head)."""
        if cls.head_suffix is None:
            return
        archs = list(getattr(model_config, "architectures", None) or [])
        if not any(a.endswith(cls.head_suffix) for a in archs):
            raise ModelLoadError(
                f"model '{name_or_path}' has architectures {archs or '[none declared]'}; task {cls.name} needs a "
                f"checkpoint with a *{cls.head_suffix} head (loaded with {cls.auto_class}); or set "
                f"model.allow_random_head=true to measure speed only"
            )

    # -- data ----------------------------------------------------------------------------------------------
    def check_data(self, dataset) -> None:
        """Columns, then gold values: a bad cell is refused here, before the model runs, not by the metric."""
        self.check_columns(dataset.column_names)
        self.check_values(dataset)

    def check_values(self, dataset) -> None:
        """Raise DatasetError (via :meth:`bad_row`) for gold values the metric cannot use; none by default."""

    def source(self) -> str:
        """The data a row number counts in: the file(s) as configured, else the hub dataset and split."""
        cfg = self.dataset_cfg
        files = getattr(cfg, "data_files", None)
        split = getattr(cfg, "split", None)
        if isinstance(files, dict):
            files = files.get(split) or list(files.values())
        if isinstance(files, str):
            return f"file {files}"
        if files:
            return "files " + ", ".join(map(str, files))
        name = getattr(cfg, "name", None)
        return f"dataset {getattr(cfg, 'path', '?')!r}" + (f" ({name})" if name else "") + f" split {split!r}"

    def where(self, role: str, index: int) -> str:
        """``<file>, column <c>, row <n>``: rows counted from 1, header excluded."""
        return f"{self.source()}, column {self.columns[role]!r}, row {index + 1}"

    def bad_row(self, role: str, index: int, problem: str) -> DatasetError:
        return DatasetError(f"{problem} in {self.where(role, index)}")

    def check_columns(self, column_names: Sequence[str]) -> None:
        missing = [f"{role}->'{col}'" for role, col in self.columns.items()
                   if self.roles[role] and col not in column_names]
        if missing:
            raise DatasetError(
                f"dataset columns missing for task {self.name}: {', '.join(missing)}; columns found: "
                f"{', '.join(column_names)} (map them with dataset.columns.<role>=<column>)"
            )

    def column(self, dataset, role: str) -> list:
        # datasets 5 returns a lazy Column object; tokenizers and metrics want a list
        return list(dataset[self.columns[role]])

    def featurize(self, dataset) -> Features:
        raise NotImplementedError

    def tokenize(self, *texts, **kwargs) -> Dict[str, List[List[int]]]:
        enc = self.tokenizer(*texts, truncation=kwargs.pop("truncation", True),
                             max_length=self.runtime.max_length, padding=False, **kwargs)
        return enc

    def model_input_names(self, enc) -> List[str]:
        return [k for k in self.tokenizer.model_input_names if k in enc]

    def rows_from(self, enc, n: int) -> List[Dict[str, List[int]]]:
        names = self.model_input_names(enc)
        return [{k: enc[k][i] for k in names} for i in range(n)]

    # -- model outputs -------------------------------------------------------------------------------------
    def head(self, outputs, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-row float32 tensor [batch, ...] from the model's outputs (ModelOutput or a traced dict)."""
        raise NotImplementedError

    def evaluate(self, dataset, features: Features, outputs: List[torch.Tensor]) -> Tuple[Dict[str, float], List[dict]]:
        """Metrics (0-100 scale) and one prediction record per example."""
        raise NotImplementedError

    def artifacts(self, predictions: List[dict]) -> Dict[str, Any]:
        """Extra JSON artifacts (file name -> object) the runner writes to the run dir and logs; none by default."""
        return {}

    def parity(self, reference: List[torch.Tensor], candidate: List[torch.Tensor]) -> Tuple[float, float]:
        """(max |delta| of head outputs, fraction of rows whose prediction agrees)."""
        diff = max_abs_diff(reference, candidate)
        agree = [self.same_prediction(r, c) for r, c in zip(reference, candidate)]
        return diff, (sum(agree) / len(agree) if agree else 1.0)

    def same_prediction(self, reference: torch.Tensor, candidate: torch.Tensor) -> bool:
        import torch

        return bool(torch.equal(reference.argmax(-1), candidate.argmax(-1)))
