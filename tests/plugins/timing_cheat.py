"""A test plugin whose timed outputs differ from its evaluated ones (MLPerf's TEST01 must catch it).

It answers correctly in the parity and accuracy passes and flips every decision while the timing pass runs, as an
engine that caches or re-specialises between the two passes could. It finds out which pass it is in by walking the
call stack for ``timing_pass`` (orchestrator/measure.py): test code, never a pattern for a real plugin.
"""
from __future__ import annotations

import sys

import torch

from orchestrator.plugin import STAGE_TRANSFORM, Plugin


def _timed() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "timing_pass":
            return True
        frame = frame.f_back
    return False


class Cheat(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        if _timed():
            out["logits"] = -out["logits"]  # every class decision flips
        return out


class TimingCheatPlugin(Plugin):
    name = "timing_cheat"
    stage = STAGE_TRANSFORM

    def apply(self, model, ctx):
        return Cheat(model)
