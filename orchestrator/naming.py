"""What labels say: a run's name, what a "row" of a task's throughput is, the units of a console column.

One place, so run names, plot legends, console headers and the MLflow dashboard agree on what ran and what was
counted. Pure functions over config values and summary rows (nothing here imports torch or MLflow).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .records import override_values, shown_precision, stack_label

# what one row of a task's timing pass is: the unit its rows/s counts
ROW_UNITS = {
    "sentence_similarity": ("sentences", "2 per pair"),
    "question_answering": ("features", "question+context windows"),
    "text_classification": ("texts", ""),
    "token_classification": ("sentences", ""),
}


def row_unit(task: Optional[str]) -> str:
    """'sentences', 'features', ...; 'rows' for a task this module does not know (a plugin's own task)."""
    return ROW_UNITS.get(str(task), ("rows", ""))[0]


def throughput_unit(tasks: Iterable[Optional[str]]) -> str:
    """The unit of throughput for jobs of these tasks: 'sentences/s (2 per pair)'; 'rows/s' when they differ."""
    units = {ROW_UNITS.get(str(t), ("rows", "")) for t in tasks if t}
    if len(units) != 1:
        return "rows/s"
    name, note = next(iter(units))
    return f"{name}/s" + (f" ({note})" if note else "")


def latency_unit(batch_size: Any = None) -> str:
    """A latency percentile is the time of one batch: 'ms per batch of 32' (or 'ms per batch')."""
    return f"ms per batch of {batch_size}" if batch_size not in (None, "") else "ms per batch"


def _given(overrides: Iterable[Any], *keys: str) -> Optional[str]:
    values = override_values(overrides)
    return next((values[k] for k in keys if values.get(k)), None)


def _folder_name(path: str) -> str:
    text = str(path).rstrip("/")
    if text.startswith("package:"):  # a model shipped as a Python package
        return text[len("package:"):]
    return Path(text).name or text


def model_name(name_or_path: str, choice: Optional[str], overrides: Iterable[Any] = ()) -> str:
    """The model a run's name carries: the model's own folder name when ``model.name_or_path`` was given on the
    command line (``model.name_or_path=/x/my-bert`` is my-bert, whatever config group was chosen), else the
    config-group choice (``model=minilm_sst2``), else the folder name."""
    given = _given(overrides, "model.name_or_path")
    if given:
        return _folder_name(given)
    return choice or _folder_name(name_or_path)


def dataset_name(data_files: Any, path: Any, choice: Optional[str], overrides: Iterable[Any] = ()) -> str:
    """Likewise for the data: the file's stem when ``dataset.data_files`` (or ``dataset.path``) was given on the
    command line, else the config-group choice."""
    given = _given(overrides, "dataset.data_files", "dataset.path")
    if given and given not in ("csv", "json", "text", "parquet"):  # a loader name says nothing about the data
        return Path(given.rstrip("/")).stem or given
    if given or not choice:
        return Path(str(data_files or path).rstrip("/")).stem
    return choice


def run_name(rc: Any, ctx: Any, stack: Optional[str] = None, compute: Optional[str] = None,
             weights: Optional[str] = None) -> str:
    """What tells a run apart first (the values its sweep varies, stack, the precision that ran), then model and
    data: MLflow's runs list shows ~14-18 characters of a name. ``compute``: the arithmetic the stack ran (an int8
    recipe on fp32 weights is int8), known once the stack is applied."""
    if rc.tracking.run_name:
        return rc.tracking.run_name
    choices: Dict[str, str] = dict(getattr(ctx, "choices", {}) or {})
    overrides = list(getattr(ctx, "overrides", ()) or ())
    model = model_name(rc.model.name_or_path, choices.get("model"), overrides)
    dataset = dataset_name(rc.dataset.data_files, rc.dataset.path, choices.get("dataset"), overrides)
    # a recipe's name says what it is (e.g. an engine_int8 recipe): no key before it, so MLflow's ~18 visible
    # characters show it
    parts = [str(v) if k == "recipe" else f"{k}={v}" for k, v in ctx.swept_values().items()]
    parts += [stack or stack_label(rc.optimization), shown_precision(rc.precision.name, compute, weights), model,
              dataset]
    return "-".join(parts)
