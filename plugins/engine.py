"""What the engines that run the whole model outside PyTorch share (``onnxruntime``, ``openvino``, and the
export step of ``pt2e``): the outputs a task reads, a tuple-returning wrapper an exporter can trace, an example
input with dynamic batch and width, and the callable the runner calls afterwards.

An exporter needs positional tensor outputs; the runner's task heads read named ones (``logits``,
``start_logits``/``end_logits``, ``last_hidden_state``). The names are taken from one eager call on the run's
example batch, so each task gets what its head reads without the engine knowing the task.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch


def output_names(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the tensor outputs of one eager call (a ModelOutput or a dict), in order."""
    with torch.inference_mode():
        out = model(**batch)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


class TupleOutputs(torch.nn.Module):
    """``model(**inputs)`` as ``forward(*inputs) -> tuple`` in a fixed input/output order, for exporters."""

    def __init__(self, model: torch.nn.Module, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, list(inputs), list(outputs)

    def forward(self, *args):
        out = self.model(**dict(zip(self.inputs, args)))
        return tuple(out[k] for k in self.outputs)


def export_example(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The run's example batch with at least 2 rows and 2 tokens: exporters specialise a dimension whose example
    size is 1 (batch size 1 in runtime=single_stream), and the engine would then refuse every other batch."""
    out = dict(batch)
    if out["input_ids"].shape[0] < 2:
        out = {k: torch.cat([v, v]) for k, v in out.items()}
    if out["input_ids"].shape[1] < 2:
        out = {k: torch.cat([v, v], dim=1) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def file_mb(*paths: Path) -> float:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists()) / 2**20


class EngineModel:
    """What the runner calls after an engine took over: ``model(**inputs) -> {name: float tensor}``.

    ``run`` takes ``{input name: int64 numpy array}`` (only the inputs the engine's graph kept) and returns the
    outputs in ``outputs`` order. It is not an ``nn.Module``: the run's ``model_size_mb`` comes from the plugin."""

    def __init__(self, run: Callable[[Dict[str, object]], Sequence[object]], inputs: Sequence[str],
                 outputs: Sequence[str], engine: str):
        self._run, self.inputs, self.outputs, self.engine = run, list(inputs), list(outputs), engine

    def __call__(self, **inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
        feed = {k: inputs[k].numpy() for k in self.inputs}
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, self._run(feed))}

    def __repr__(self) -> str:
        return f"EngineModel({self.engine}, inputs={self.inputs}, outputs={self.outputs})"


class Stopwatch:
    """Named phase times of an engine's apply (export, quantize, compile), reported as plugin metrics."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch.seconds[f"{name}_s"] = time.perf_counter() - self.t0
                return False

        return _Phase()


def calibration_inputs(ctx, limit: int) -> Optional[List[Dict[str, torch.Tensor]]]:
    """Up to ``limit`` calibration batches from ``dataset.calibration_split`` (None when the run has none)."""
    batches = list(getattr(ctx, "calibration_batches", None) or [])[:limit]
    return batches or None


class quiet_loggers:
    """Raise the named loggers to ERROR for the duration (exporters and quantizers log at INFO/WARNING)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        return False
