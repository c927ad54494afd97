"""fused_linear's module (plugins/fused_linear.py): apart from the plugin so that importing the plugin for its
options schema, as every CLI start does, does not import torch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

OP = "orchestrator::packed_linear"


def _register_op():
    """The traceable wrapper around mkldnn._linear_pointwise, registered once per process."""
    if hasattr(torch.ops.orchestrator, "packed_linear"):
        return torch.ops.orchestrator.packed_linear

    @torch.library.custom_op(OP, mutates_args=())
    def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
                      attr: str) -> torch.Tensor:
        # ``weight`` is oneDNN's blocked layout for [out_features, in_features]; x is 2-D
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [None] if attr != "none" else [], "none")

    @packed_linear.register_fake
    def _(x, weight, bias, out_features, attr):
        return x.new_empty((x.shape[0], out_features))

    return torch.ops.orchestrator.packed_linear


class PackedLinear(nn.Module):
    """``nn.Linear`` (optionally followed by exact GELU) as one oneDNN call on a prepacked weight."""

    def __init__(self, linear: nn.Linear, post: str = "none"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.post = post
        w = linear.weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self._op = _register_op()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, post={self.post}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._op(x.reshape(-1, self.in_features), self.weight, self.bias, self.out_features, self.post)
        return y.view(*lead, self.out_features)
