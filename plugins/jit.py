"""TorchScript: trace with the run's own first batch, freeze, warm up (what Trainer's ``--jit_mode_eval`` did).

transformers 5 removed ``jit_mode_eval`` and ``torchscript=True``; ``torch.jit.trace(..., example_kwarg_inputs=,
strict=False)`` still works on torch 2.13 (deprecated, with warnings we silence here). Traced modules return a
plain dict and must be called with exactly the traced keyword inputs, which the runner's batches guarantee.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from orchestrator.plugin_api import STAGE_CAPTURE, Plugin, PluginContext, quiet_transformers


@dataclass
class JitOptions:
    freeze: bool = True
    strict: bool = False
    # calls after tracing, so the profiling executor has specialised before anything is timed
    warmup_calls: int = 2


class JitPlugin(Plugin):
    name = "jit"
    stage = STAGE_CAPTURE
    conflicts = ("compile",)
    Options = JitOptions

    @classmethod
    def validate_options(cls, o) -> None:
        cls.require_at_least("warmup_calls", o.warmup_calls, 0)

    def check(self, ctx: PluginContext) -> None:
        import torch

        if not hasattr(torch.jit, "trace"):
            raise self.unavailable(f"torch {torch.__version__} has no torch.jit.trace")

    def apply(self, model, ctx: PluginContext):
        with quiet_transformers():
            return self._trace(model, ctx, ctx.example_batch)

    def _trace(self, model, ctx: PluginContext, batch):
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning/DeprecationWarning noise from torch.jit on 2.13
            # autocast's weight-cast cache must be off while tracing, or cached casts get baked into the graph
            with torch.no_grad(), torch.autocast("cpu", dtype=ctx.autocast_dtype or torch.bfloat16,
                                                 enabled=ctx.autocast, cache_enabled=False):
                traced = torch.jit.trace(model, example_kwarg_inputs=dict(batch), strict=self.options.strict)
                if self.options.freeze:
                    traced = torch.jit.freeze(traced)
                for _ in range(self.options.warmup_calls):
                    traced(**batch)
        shape = "x".join(str(s) for s in batch["input_ids"].shape)
        self._details = {"freeze": str(self.options.freeze), "inputs": ",".join(batch),
                         "example_shape": shape, "autocast": str(ctx.autocast)}
        return traced
