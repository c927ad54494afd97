"""BetterTransformer's fused modules (plugins/bettertransformer.py): apart from the plugin so that importing the
plugin for its options schema, as every CLI start does, does not import torch."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from orchestrator_plugins.activations import probe_activation

# --------------------------------------------------------------------------------------------------------------
# the fused modules


class FusedEncoderLayer(nn.Module):
    """One post-norm encoder layer as a single ``torch._transformer_encoder_layer_fwd`` call."""

    def __init__(self, w: Dict[str, torch.Tensor], num_heads: int, use_gelu: bool, eps: float, source: str):
        super().__init__()
        for k, v in w.items():
            self.register_parameter(k, nn.Parameter(v.detach().clone(), requires_grad=False))
        self.embed_dim = int(w["in_proj_weight"].shape[1])
        self.num_heads = num_heads
        self.use_gelu = use_gelu
        self.eps = eps
        self.source = source

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"activation={'gelu' if self.use_gelu else 'relu'}, eps={self.eps}, from={self.source}")

    def forward(self, x: torch.Tensor, pad_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch._transformer_encoder_layer_fwd(
            x, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.out_proj_weight,
            self.out_proj_bias, self.use_gelu, False, self.eps, self.norm1_weight, self.norm1_bias,
            self.norm2_weight, self.norm2_bias, self.linear1_weight, self.linear1_bias, self.linear2_weight,
            self.linear2_bias, pad_mask, 1 if pad_mask is not None else None)


def keep_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Boolean [batch, keys] (True = real token) from the mask transformers hands the layers; None = no padding."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4:
        raise ValueError(f"bettertransformer: unexpected attention mask of shape {tuple(mask.shape)}")
    # [batch, heads|1, queries, keys]: a key is real when some query may attend to it
    if mask.dtype == torch.bool:
        allowed = mask
    else:  # additive: 0 where allowed, a large negative number (or -inf) where masked
        allowed = mask > torch.finfo(mask.dtype).min / 2
    return allowed[:, 0].any(dim=1)


class FusedEncoder(nn.Module):
    """Drop-in for BertEncoder / DistilBERT's Transformer: ``forward(hidden_states, attention_mask, **kwargs)``."""

    def __init__(self, layers: List[FusedEncoderLayer], nested: bool, replaced: str):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        self.nested = nested
        self.replaced = replaced

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        # what BertEncoder returns (DistilBERT's callers only read last_hidden_state / [0])
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.get(flag):
                raise ValueError(f"bettertransformer: {flag}=True is not supported by the fused encoder kernel")
        keep = keep_mask(attention_mask)
        h = hidden_states
        capturing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if keep is None or (not capturing and bool(keep.all())):
            for layer in self.layer:
                h = layer(h)
        elif self.nested and not capturing and bool(torch._nested_tensor_from_mask_left_aligned(h, keep)):
            x = torch._nested_tensor_from_mask(h, keep, mask_check=False)
            for layer in self.layer:
                x = layer(x)
            h = x.to_padded_tensor(0.0, hidden_states.shape)
        else:
            pad = ~keep
            for layer in self.layer:
                h = layer(h, pad)
        return Output(last_hidden_state=h)


# --------------------------------------------------------------------------------------------------------------
# reading a layer's weights


def _plain_linear(m, what: str) -> nn.Linear:
    if type(m) is not nn.Linear or m.bias is None:
        raise TypeError(f"{what} is {type(m).__name__} (needs a plain nn.Linear with bias; "
                        "was it rewritten by another plugin?)")
    return m


def _plain_norm(m, what: str) -> nn.LayerNorm:
    if not isinstance(m, nn.LayerNorm) or m.weight is None or m.bias is None:
        raise TypeError(f"{what} is {type(m).__name__} (needs nn.LayerNorm with affine weights)")
    return m


def _layer_parts(layer: nn.Module):
    """(q, k, v, out, norm1, ffn1, act, ffn2, norm2, heads) for a BERT-structured or DistilBERT layer, else None."""
    att = getattr(layer, "attention", None)
    if att is not None and hasattr(att, "self") and hasattr(att, "output") and hasattr(layer, "intermediate"):
        if getattr(layer, "is_decoder", False) or hasattr(layer, "crossattention"):
            raise TypeError(f"{type(layer).__name__} is a decoder layer (causal/cross-attention)")
        s = att.self
        return (s.query, s.key, s.value, att.output.dense, att.output.LayerNorm, layer.intermediate.dense,
                layer.intermediate.intermediate_act_fn, layer.output.dense, layer.output.LayerNorm,
                s.num_attention_heads)
    if att is not None and hasattr(att, "q_lin") and hasattr(layer, "ffn") and hasattr(layer, "sa_layer_norm"):
        return (att.q_lin, att.k_lin, att.v_lin, att.out_lin, layer.sa_layer_norm, layer.ffn.lin1,
                layer.ffn.activation, layer.ffn.lin2, layer.output_layer_norm, att.n_heads)
    return None


def fuse_layer(layer: nn.Module, index: int) -> FusedEncoderLayer:
    cls = type(layer).__name__
    parts = _layer_parts(layer)
    if parts is None:
        raise TypeError(f"layer class {cls} is not supported (supported: BERT-structured layers such as BertLayer, "
                        "RobertaLayer, ElectraLayer, and DistilBERT's TransformerBlock)")
    q, k, v, out, n1, f1, act, f2, n2, heads = parts
    where = f"{cls}[{index}]"
    q, k, v = (_plain_linear(m, f"{where} attention projection") for m in (q, k, v))
    out, f1, f2 = (_plain_linear(m, f"{where} dense layer") for m in (out, f1, f2))
    n1, n2 = _plain_norm(n1, f"{where} LayerNorm"), _plain_norm(n2, f"{where} LayerNorm")
    if n1.eps != n2.eps:
        raise TypeError(f"{where}: the two LayerNorms use different eps ({n1.eps}, {n2.eps}); the kernel takes one")
    use_gelu = probe_activation(act)
    if use_gelu is None:
        raise TypeError(f"{where}: activation {type(act).__name__} is neither exact GELU nor ReLU")
    w = {
        "in_proj_weight": torch.cat([q.weight, k.weight, v.weight]),
        "in_proj_bias": torch.cat([q.bias, k.bias, v.bias]),
        "out_proj_weight": out.weight, "out_proj_bias": out.bias,
        "norm1_weight": n1.weight, "norm1_bias": n1.bias,
        "linear1_weight": f1.weight, "linear1_bias": f1.bias,
        "linear2_weight": f2.weight, "linear2_bias": f2.bias,
        "norm2_weight": n2.weight, "norm2_bias": n2.bias,
    }
    return FusedEncoderLayer(w, int(heads), use_gelu, float(n1.eps), cls)


def find_encoder(model: nn.Module) -> Tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, encoder): the module whose ``.layer`` ModuleList holds the transformer layers."""
    for name, module in model.named_modules():
        layers = getattr(module, "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and module is not model:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            return parent, attr, module
    raise TypeError(f"{type(model).__name__} has no encoder with a .layer list (bettertransformer supports "
                    "BERT-family encoders: BERT, RoBERTa, DistilBERT, ELECTRA, MiniLM, ...)")


# --------------------------------------------------------------------------------------------------------------
# the plugin
