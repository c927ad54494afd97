"""int8 dynamic quantization of the model's nn.Linear layers (weights int8 ahead of time, activations per batch).

Two mechanisms, chosen with ``backend`` (measured on torch 2.13.0+cpu, 2-core Xeon with AMX; see docs/plugins.md):

- ``ao_dynamic`` (default): ``torch.ao.quantization.quantize_dynamic`` -> ``torch.ao.nn.quantized.dynamic.Linear``
  (x86 engine: fbgemm/oneDNN int8 GEMMs). Deprecated: torch 2.13 warns that ``torch.ao.quantization`` moves to
  torchao, yet it is the one that is fast in eager mode and traces with ``jit``. Needs fp32 weights, no autocast
  (its kernels take float32 activations only; they raise on bfloat16).
- ``torchao``: ``torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())``, what PyTorch
  recommends now (``pip install torchao``; 0.18 works on CPU here). Weights become ``Int8Tensor`` subclasses: in
  eager mode they run slower than fp32 (they are meant for ``compile``), ``torch.jit.trace`` fails on them (refused
  before loading), bf16 weights and autocast work.

Both keep the original model untouched on failure (``quantize_dynamic`` returns a copy; torchao quantizes a deep copy).
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Optional

from orchestrator.plugin_api import STAGE_TRANSFORM, Plugin, PluginContext

class Backend(StrEnum):
    ao_dynamic = "ao_dynamic"
    torchao = "torchao"


@dataclass
class QuantizeOptions:
    # ao_dynamic: torch.ao.quantization.quantize_dynamic (deprecated, fast in eager, jit-traceable)
    # torchao: torchao.quantization.quantize_ with Int8DynamicActivationInt8WeightConfig (pip install torchao)
    backend: Backend = Backend.ao_dynamic
    # ao_dynamic only: per-output-channel weight scales instead of one per tensor
    per_channel: bool = False


class QuantizePlugin(Plugin):
    name = "quantize"
    stage = STAGE_TRANSFORM
    # int8 from two plugins: ipex brings its own (optimization.ipex.int8=dynamic|static); the fused
    # bettertransformer kernel takes float weights
    conflicts = ("ipex", "bettertransformer")
    Options = QuantizeOptions
    packages = ("torchao",)

    def compute_precision(self, ctx: PluginContext) -> Optional[str]:
        return "int8"

    def check(self, ctx: PluginContext) -> None:
        import torch

        o = self.options
        if o.backend == "ao_dynamic":
            if ctx.dtype != torch.float32 or ctx.autocast:
                raise self.unavailable("backend=ao_dynamic quantizes fp32 models only (its int8 Linear takes "
                                       "float32 activations); use precision=fp32, or backend=torchao")
            if "x86" not in torch.backends.quantized.supported_engines and \
                    "fbgemm" not in torch.backends.quantized.supported_engines:
                raise self.unavailable(f"no x86 int8 engine in this torch build "
                                       f"({torch.backends.quantized.supported_engines})")
        else:
            if importlib.util.find_spec("torchao") is None:
                raise self.unavailable("backend=torchao needs the torchao package (pip install torchao)")
            if "jit" in ctx.following:
                raise self.unavailable("torch.jit.trace fails on torchao's int8 tensor subclasses; with jit use "
                                       "backend=ao_dynamic, or use compile instead of jit")

    def apply(self, model, ctx: PluginContext):
        import torch

        n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        if n_linear == 0:
            raise self.unavailable(f"{type(model).__name__} has no nn.Linear layers to quantize")
        if self.options.backend == "torchao":
            out, details = self._torchao(model, ctx)
        else:
            out, details = self._ao_dynamic(model)
        self._details = {"backend": self.options.backend, "linear_layers": str(n_linear),
                         "weights": "int8", "activations": "int8, dynamic per batch", **details}
        return out

    def _ao_dynamic(self, model):
        import torch

        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if self.options.per_channel else default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's DeprecationWarning, noted in the tags
            out = quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=False)
        from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

        done = sum(isinstance(m, DynamicQuantizedLinear) for m in out.modules())
        return out.eval(), {
            "mechanism": "torch.ao.quantization.quantize_dynamic (deprecated in torch 2.13; successor: torchao)",
            "engine": str(torch.backends.quantized.engine),
            "weight_scales": "per_channel" if self.options.per_channel else "per_tensor",
            "quantized_layers": str(done),
        }

    def _torchao(self, model, ctx: PluginContext):
        import torch

        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        out = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(out, Int8DynamicActivationInt8WeightConfig())
        done = sum(isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"
                   and type(m.weight) is not torch.Tensor for m in out.modules())
        return out.eval(), {
            "mechanism": "torchao.quantization.quantize_(Int8DynamicActivationInt8WeightConfig)",
            "torchao_version": str(getattr(torchao, "__version__", "?")),
            "quantized_layers": str(done),
        }
