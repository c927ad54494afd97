"""TupleOutputs, apart from orchestrator/engines.py so that importing the engine helpers (as every plugin module
does, and every CLI start imports the plugins for their options) does not import torch."""
from __future__ import annotations

from typing import Sequence

import torch


class TupleOutputs(torch.nn.Module):
    """``model(**inputs)`` as ``forward(*inputs) -> tuple`` in a fixed input/output order, for exporters."""

    def __init__(self, model: torch.nn.Module, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, list(inputs), list(outputs)

    def forward(self, *args):
        out = self.model(**dict(zip(self.inputs, args)))
        return tuple(out[k] for k in self.outputs)
