"""oneDNN's prepacked Linear with the bias and the FFN's GELU fused into the matmul, in the main environment.

What IPEX's ``ipex.optimize`` does for Linear layers (prepacked weights, fused epilogues), with the kernel stock
PyTorch already ships: ``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once by
``torch.ops.mkldnn._reorder_linear_weight`` (the same ops inductor uses when it freezes a model). Two costs go away:

- ``aten::addmm`` first copies the broadcast bias into its output, then multiplies (measured on bert-base, 8 x 250:
  ~6 % of an fp32 forward, ~8 % of a bf16 one); oneDNN adds the bias in the kernel;
- the FFN's separate GELU reads and writes the whole 4x-wide intermediate, into a freshly allocated (page-faulting)
  buffer (~9 % fp32, ~14 % bf16); a fused ``gelu`` post-op does it while the tile is in registers.

Every ``nn.Linear`` with a float weight of the run's dtype becomes a :class:`PackedLinear`; where a module holds a
Linear and the exact-GELU activation applied right after it (BERT-family ``*Intermediate``: ``dense`` +
``intermediate_act_fn``; DistilBERT's FFN: ``lin1`` + ``activation``), the GELU moves into the Linear and the
activation becomes ``nn.Identity``. The call goes through a small registered op (``orchestrator::packed_linear``)
so ``torch.jit.trace`` records it (the raw mkldnn op's ``Scalar?[]`` argument cannot be traced) and
``torch.compile`` sees a fake kernel. Before the swap is kept, the model's output on the run's first batch is
compared with the unswapped model's; beyond ``verify_atol`` every module is put back and the plugin refuses.

Refused with one line: autocast (the prepacked weight has one dtype; use ``precision=bf16``), bf16 on a CPU without
oneDNN bf16 support, a torch without the ops, and ``ipex``/``quantize``/``bettertransformer`` in the same stack
(they rewrite the same Linear layers).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

from orchestrator.plugin_api import STAGE_TRANSFORM, Plugin, PluginContext, describe
from orchestrator_plugins.activations import probe_activation

if TYPE_CHECKING:  # annotations only: importing the plugin for its options must not import torch
    import torch

# (linear attribute, activation attribute) pairs where the activation is applied right after that Linear
GELU_SITES = (("dense", "intermediate_act_fn"), ("lin1", "activation"))


@dataclass
class FusedLinearOptions:
    # fold an exact GELU that follows a Linear into it (BERT-family FFN); false: bias fusion and prepacking only
    gelu: bool = True
    # compare the model's first output with the unswapped model on the run's first batch before keeping the swap
    verify: bool = True
    # max |delta| allowed by that check, fp32 weights / bf16 weights, times max(1, largest |output|): bf16 rounds
    # per element, so a 6-layer MiniLM whose hidden states reach ~10 legitimately differs by ~0.3 from bf16 eager,
    # while a broken swap is off by the output's own size
    verify_atol: float = 1.0e-4
    verify_atol_bf16: float = 0.25


def __getattr__(name: str):
    # the module lives in _packed_linear (torch at import); the name stays importable from here
    if name == "PackedLinear":
        from orchestrator_plugins._packed_linear import PackedLinear

        return PackedLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)  # the answer is fixed for the process: torch and the CPU
def _probe() -> Optional[str]:
    """None when a packed weight goes through the registered op and gives F.linear's result; else what failed.

    torch 2.8 (the IPEX environment) returns an opaque oneDNN tensor from _reorder_linear_weight, which a
    registered op cannot take ("Cannot access storage of OpaqueTensorImpl"); 2.13 returns a dense one.
    """
    import torch
    from torch import nn

    from orchestrator_plugins._packed_linear import PackedLinear

    try:
        lin = nn.Linear(8, 4).eval()
        x = torch.randn(2, 8)
        with torch.inference_mode():
            got = PackedLinear(lin, "gelu")(x)
            want = nn.functional.gelu(lin(x))
        return None if torch.allclose(got, want, atol=1e-4) else "wrong result on a probe"
    except Exception as e:  # noqa: BLE001 - any failure means the plugin cannot run here
        return describe(e)


def _is_exact_gelu(fn) -> bool:
    """Probed numerically, not by class name (GELUActivation, nn.GELU(), ACT2FN['gelu'] all qualify)."""
    from torch import nn

    return isinstance(fn, nn.Module) and probe_activation(fn) is True


def _first_tensor(out) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    return next(v for v in values if isinstance(v, torch.Tensor))


class FusedLinearPlugin(Plugin):
    name = "fused_linear"
    stage = STAGE_TRANSFORM
    # each rewrites the same nn.Linear layers its own way
    conflicts = ("ipex", "quantize", "bettertransformer")
    Options = FusedLinearOptions

    def check(self, ctx: PluginContext) -> None:
        import torch

        mk = torch.ops.mkldnn
        if not (torch.backends.mkldnn.is_available() and hasattr(mk, "_linear_pointwise")
                and hasattr(mk, "_reorder_linear_weight") and hasattr(torch.library, "custom_op")):
            raise self.unavailable(f"torch {torch.__version__} lacks oneDNN's prepacked linear "
                                   "(torch.ops.mkldnn._linear_pointwise)")
        problem = _probe()
        if problem:
            raise self.unavailable(f"oneDNN's prepacked linear does not work on torch {torch.__version__} "
                                   f"({problem}); in the IPEX environment use ipex instead")
        if ctx.autocast:
            raise self.unavailable("the prepacked weight has a single dtype and the op is not autocast-aware; "
                                   "use precision=bf16 (weights cast) instead of bf16_autocast")
        if ctx.dtype not in (torch.float32, torch.bfloat16):
            raise self.unavailable(f"weights of dtype {ctx.dtype} are not supported; use precision=fp32 or bf16")
        if ctx.dtype == torch.bfloat16 and not mk._is_mkldnn_bf16_supported():
            raise self.unavailable("this CPU has no oneDNN bf16 support (AVX512-BF16/AMX); use precision=fp32")

    def apply(self, model, ctx: PluginContext):
        import torch
        from torch import nn

        from orchestrator_plugins._packed_linear import PackedLinear

        if model.training:
            raise self.unavailable("prepacked weights are inference-only; the model is in training mode")
        o = self.options
        before = self._output(model, ctx) if o.verify else None
        swapped: List[Tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original) to undo
        fused = 0
        for parent in list(model.modules()):
            if o.gelu:
                for lin_name, act_name in GELU_SITES:
                    lin, act = getattr(parent, lin_name, None), getattr(parent, act_name, None)
                    if self._swappable(lin, ctx) and _is_exact_gelu(act):
                        swapped.append((parent, lin_name, lin))
                        setattr(parent, lin_name, PackedLinear(lin, "gelu"))
                        swapped.append((parent, act_name, act))
                        setattr(parent, act_name, nn.Identity())
                        fused += 1
            for name, child in list(parent.named_children()):
                if self._swappable(child, ctx):
                    swapped.append((parent, name, child))
                    setattr(parent, name, PackedLinear(child))
        n_linear = sum(isinstance(m, PackedLinear) for m in model.modules())
        if n_linear == 0:
            raise self.unavailable(f"{type(model).__name__} has no nn.Linear layer with {ctx.dtype} weights")
        diff = None
        if before is not None:
            diff = float((self._output(model, ctx) - before).abs().max())
            scale = max(1.0, float(before.abs().max()))
            atol = (o.verify_atol_bf16 if ctx.dtype == torch.bfloat16 else o.verify_atol) * scale
            if not diff <= atol:  # also catches NaN
                for parent, name, original in reversed(swapped):
                    setattr(parent, name, original)
                raise self.unavailable(f"the fused model's output differs from the original by {diff:.3g} on the "
                                       f"first batch (allowed {atol:.3g}: verify_atol x max(1, largest |output| "
                                       f"{scale:.3g})); model left unchanged")
        self._details = {"mechanism": "torch.ops.mkldnn._linear_pointwise on _reorder_linear_weight weights",
                         "linear_layers": str(n_linear), "gelu_fused": str(fused),
                         **({"verify_max_abs_diff": f"{diff:.3g}"} if diff is not None else {})}
        return model

    @staticmethod
    def _swappable(m, ctx: PluginContext) -> bool:
        from torch import nn

        return type(m) is nn.Linear and m.weight.dtype == ctx.dtype

    @staticmethod
    def _output(model, ctx: PluginContext) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            return _first_tensor(model(**ctx.example_batch)).float()
