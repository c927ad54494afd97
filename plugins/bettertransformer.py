"""BetterTransformer, rebuilt: BERT-family encoder layers run PyTorch's fused encoder kernel.

optimum 2 removed ``to_bettertransformer``; its effect on encoders was to call ``torch._transformer_encoder_layer_fwd``
(one op per layer: concatenated QKV projection, attention, output projection, residual + LayerNorm, GELU/ReLU FFN,
residual + LayerNorm, post-norm) and to skip padding with nested tensors. This plugin does the same for encoders
whose layers have BERT's structure (BertLayer and the classes copied from it: RoBERTa, XLM-R, ELECTRA, CamemBERT,
MiniLM checkpoints, ...) and for DistilBERT's TransformerBlock:

- The model's encoder container (the module holding ``.layer``) is replaced by :class:`FusedEncoder`, which
  receives the mask transformers builds for the layers (SDPA: 4-D bool, eager: 4-D additive float, or ``None``
  when nothing is padded) and turns it into the key-padding mask the kernel wants.
- Padded batches: with ``nested: true`` the hidden states become a nested tensor (``torch._nested_tensor_from_mask``)
  so padding is never computed; outputs at padded positions come back as 0 (tasks read real tokens only).
  Otherwise (or left padding, or while tracing/compiling) the kernel gets the boolean key-padding mask (mask_type 1).
- Before swapping, the fused encoder is checked against the original on the run's first batch (real tokens only);
  a difference above ``verify_atol`` refuses the plugin instead of reporting numbers of a broken model.

Refused with a one-line reason: layer classes of another structure (named), activations other than exact GELU/ReLU,
decoders/cross-attention, ``output_attentions``/``output_hidden_states``, autocast (the kernel is not autocast-aware:
it would silently run the encoder in fp32), and ``quantize`` in the same stack (the kernel takes float weights).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from orchestrator.plugin_api import STAGE_TRANSFORM, Plugin, PluginContext, first_line


@dataclass
class BetterTransformerOptions:
    # skip padding with nested tensors when a batch is (right-)padded; false: padded kernel with a key-padding mask
    nested: bool = True
    # compare the fused encoder with the original on the first batch before swapping
    verify: bool = True
    # max |delta| allowed on real tokens of the encoder output: fp32 weights / bf16 weights
    verify_atol: float = 1e-4
    verify_atol_bf16: float = 0.25


NAMES = ("FusedEncoderLayer", "FusedEncoder", "keep_mask", "fuse_layer", "find_encoder")


def __getattr__(name: str):
    # the fused modules live in _fused_encoder (torch at import); these names stay importable from here
    if name in NAMES:
        from orchestrator_plugins import _fused_encoder

        return getattr(_fused_encoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BetterTransformerPlugin(Plugin):
    name = "bettertransformer"
    stage = STAGE_TRANSFORM
    # the fused kernel takes float weights: int8 Linear layers cannot be fused, fused layers cannot be quantized
    conflicts = ("quantize",)
    Options = BetterTransformerOptions

    def check(self, ctx: PluginContext) -> None:
        import torch

        if not hasattr(torch, "_transformer_encoder_layer_fwd") or not hasattr(torch, "_nested_tensor_from_mask"):
            raise self.unavailable(f"torch {torch.__version__} has no fused encoder kernel "
                                   "(torch._transformer_encoder_layer_fwd)")
        if ctx.autocast:
            raise self.unavailable("the fused encoder kernel is not autocast-aware (it would run the encoder in "
                                   "float32 under autocast); use precision=bf16 or precision=fp32")
        if ctx.dtype not in (torch.float32, torch.bfloat16):
            raise self.unavailable(f"weights of dtype {ctx.dtype} are not supported; use precision=fp32 or bf16")

    def apply(self, model, ctx: PluginContext):
        from orchestrator_plugins._fused_encoder import FusedEncoder, find_encoder, fuse_layer

        if model.training:
            raise self.unavailable("the fused kernel is inference-only; the model is in training mode")
        config = getattr(model, "config", None)
        for flag in ("output_attentions", "output_hidden_states", "is_decoder", "add_cross_attention"):
            if getattr(config, flag, False):
                raise self.unavailable(f"config.{flag}=True is not supported by the fused encoder kernel")
        pos = getattr(config, "position_embedding_type", "absolute")
        if pos not in (None, "absolute"):
            raise self.unavailable(f"position_embedding_type={pos} changes attention scores; the kernel cannot")
        try:
            parent, attr, encoder = find_encoder(model)
            fused = FusedEncoder([fuse_layer(layer, i) for i, layer in enumerate(encoder.layer)],
                                 nested=self.options.nested, replaced=type(encoder).__name__)
        except TypeError as e:
            raise self.unavailable(str(e)) from None
        fused.eval()
        # torch warns once that nested tensors are a prototype API; the user chose them through this plugin
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        diff = self._verify(model, encoder, fused, ctx) if self.options.verify else None
        setattr(parent, attr, fused)  # the only mutation, after everything succeeded
        layer_cls = sorted({layer.source for layer in fused.layer})
        self._details = {
            "replaced": f"{type(encoder).__name__} ({len(fused.layer)} x {','.join(layer_cls)})",
            "kernel": "torch._transformer_encoder_layer_fwd",
            "activation": "gelu" if fused.layer[0].use_gelu else "relu",
            "nested": str(self.options.nested),
            "weights_dtype": str(ctx.dtype).replace("torch.", ""),
            "verify_max_abs_diff": "skipped" if diff is None else f"{diff:.3e}",
        }
        return model

    def _verify(self, model, encoder, fused, ctx: PluginContext) -> float:
        """Max |delta| between original and fused encoder outputs on the real tokens of the first batch."""
        import torch

        from orchestrator_plugins._fused_encoder import keep_mask

        captured = {}

        def grab(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs

        handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.inference_mode():
                model(**ctx.example_batch)
        finally:
            handle.remove()
        if "args" not in captured:
            raise self.unavailable(f"{type(encoder).__name__} was not called by the model's forward")
        args, kwargs = captured["args"], dict(captured["kwargs"])
        hidden = args[0] if args else kwargs.pop("hidden_states")
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        with torch.inference_mode():
            ref = encoder(hidden, attention_mask=mask)[0]
            try:
                got = fused(hidden, attention_mask=mask)[0]
            except RuntimeError as e:  # e.g. a dtype the kernel refuses
                first = first_line(e)
                raise self.unavailable(f"the fused kernel refused {hidden.dtype} inputs: {first}") from None
        keep = keep_mask(mask)
        if keep is None:
            keep = torch.ones(hidden.shape[:2], dtype=torch.bool)
        diff = float((ref.float() - got.float()).abs()[keep].max())
        atol = self.options.verify_atol if hidden.dtype == torch.float32 else self.options.verify_atol_bf16
        if not diff <= atol:  # also catches NaN
            raise self.unavailable(f"fused encoder differs from the original by {diff:.2e} on real tokens "
                                   f"(> verify_atol {atol:g} for {str(hidden.dtype).replace('torch.', '')})")
        return diff
