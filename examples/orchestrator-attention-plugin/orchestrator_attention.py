"""``attention``: run the model with another transformers attention implementation.

transformers picks SDPA (``torch.nn.functional.scaled_dot_product_attention``) for BERT-family models by default;
``eager`` is its plain matmul-softmax-matmul path. Which is faster on a CPU depends on the sequence length and the
precision, so it is a stack choice to measure, not a constant. A module swap: it goes before graph capture
(``optimization=[attention,jit]``).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from orchestrator.plugin_api import STAGE_TRANSFORM, Plugin, PluginContext, first_line


class Implementation(StrEnum):
    eager = "eager"
    sdpa = "sdpa"


@dataclass
class AttentionOptions:
    # the transformers attn_implementation to switch to
    implementation: Implementation = Implementation.eager


class AttentionPlugin(Plugin):
    name = "attention"
    stage = STAGE_TRANSFORM
    Options = AttentionOptions
    packages = ("transformers",)

    def check(self, ctx: PluginContext) -> None:
        import transformers

        if not hasattr(transformers.PreTrainedModel, "set_attn_implementation"):
            raise self.unavailable(f"transformers {transformers.__version__} cannot switch the attention "
                                   "implementation of a loaded model (set_attn_implementation)")

    def apply(self, model, ctx: PluginContext):
        before = getattr(model.config, "_attn_implementation", "unknown")
        try:
            model.set_attn_implementation(str(self.options.implementation))
        except (ValueError, AttributeError) as e:
            raise self.unavailable(f"{type(model).__name__} cannot use attention {self.options.implementation}: "
                                   f"{first_line(e)}")
        self._details = {"implementation": str(self.options.implementation), "was": str(before)}
        return model
