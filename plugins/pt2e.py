"""int8 through PT2E: ``torch.export`` -> ``X86InductorQuantizer`` -> ``torch.compile`` (inductor), the int8 path
PyTorch documents for x86 CPUs now that ``torch.ao.quantization`` moves to torchao.

1. ``torch.export.export`` of the loaded model on the run's example batch, batch and sequence dimensions dynamic
   (length-sorted batches of every width use one graph; no re-export per width).
2. ``prepare_pt2e`` with torchao's ``X86InductorQuantizer`` (``torchao.quantization.pt2e``; torch 2.13 no longer
   ships ``torch.ao.quantization.quantize_pt2e``): ``static`` observes activation ranges on batches of
   ``dataset.calibration_split`` (refused without one, so the evaluated rows never calibrate themselves);
   ``dynamic`` quantizes activations per batch at run time (no calibration data).
3. ``convert_pt2e``, then ``torch.compile`` with inductor **freezing**: only with the weights folded as constants
   does inductor fuse quantize/dequantize + matmul into oneDNN's int8 ``qlinear`` kernels (without freezing the
   graph runs dequantized fp32 matmuls, slower than eager). Freezing is a process-wide inductor setting here
   (``options={"freezing": True}`` fails to prepack int8 weights on torch 2.13); ``process_state`` restores it
   after the run. Compile time is measured in ``apply`` on the example shape and two more (``compile_s``).

fp32 weights only (int8 kernels with fp32 at the boundaries); needs ``pip install -e '.[pt2e]'`` (torchao).
VNNI (AVX512-VNNI / AVX-VNNI) or AMX makes int8 fast; without it oneDNN falls back to slower int8 code.
"""
from __future__ import annotations

import contextlib
import importlib.util
import shutil
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Optional

from orchestrator.plugin_api import (STAGE_CAPTURE, Plugin, PluginContext, calibration_inputs, cpu, export_example,
                                     export_step, quiet_loggers, quiet_transformers, shape_variants)


class Mode(StrEnum):
    static = "static"
    dynamic = "dynamic"


@dataclass
class Pt2eOptions:
    # dynamic: activations quantized per batch (no calibration data); static: calibrated activation ranges
    # (dataset.calibration_split), usually faster
    mode: Mode = Mode.dynamic
    # static: at most this many calibration batches
    calibration_batches: int = 8


class Pt2ePlugin(Plugin):
    name = "pt2e"
    stage = STAGE_CAPTURE
    runs_alone = "exports the whole model (torch.export) and compiles it"
    Options = Pt2eOptions
    packages = ("torchao",)

    @classmethod
    def validate_options(cls, o) -> None:
        cls.require_at_least("calibration_batches", o.calibration_batches, 1)

    def wants_calibration(self) -> bool:
        return self.options.mode == Mode.static

    def compute_precision(self, ctx: PluginContext) -> Optional[str]:
        return "int8"

    @classmethod
    @contextlib.contextmanager
    def process_state(cls, stack):
        if cls.name not in stack:
            yield None
            return
        from torch._inductor import config as inductor_config

        before = inductor_config.freezing
        try:
            yield None
        finally:
            inductor_config.freezing = before

    def check(self, ctx: PluginContext) -> None:
        import torch

        if importlib.util.find_spec("torchao") is None:
            raise self.unavailable("needs torchao for X86InductorQuantizer (pip install -e '.[pt2e]')")
        if ctx.dtype != torch.float32 or ctx.autocast:
            raise self.unavailable("PT2E int8 quantizes an fp32 model (int8 kernels, fp32 between them); use "
                                   "precision=fp32")
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise self.unavailable("inductor's CPU backend needs a C++ compiler (g++) on PATH")
        if self.options.mode == Mode.static and not ctx.calibration_split:
            raise self.unavailable("mode=static calibrates on dataset.calibration_split, which this dataset does "
                                   "not set (e.g. dataset.calibration_split=train); or use mode=dynamic")

    def apply(self, model, ctx: PluginContext):
        import torch

        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torch._inductor import config as inductor_config
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        o = self.options
        example = export_example(ctx.example_batch)
        seconds = {}
        # torch.export prints a graph dump when it fails, inductor its C++ errors: into the run's pt2e_export.log,
        # and a failure is one line naming the step and the cause
        with export_step(self, ctx, "torch.export") as step, quiet_loggers("torch.export", "torch._dynamo", "torchao"), \
                quiet_transformers():
            t0 = time.perf_counter()
            # AUTO: export finds the range itself (the sequence is bounded by the position embeddings)
            auto = torch.export.Dim.AUTO
            exported = torch.export.export(model, (), kwargs=dict(example), strict=False,
                                           dynamic_shapes={k: {0: auto, 1: auto} for k in example}).module()
            seconds["export_s"] = time.perf_counter() - t0
            step.now(f"prepare_pt2e/convert_pt2e ({o.mode})")
            t0 = time.perf_counter()
            quantizer = xiq.X86InductorQuantizer().set_global(
                xiq.get_default_x86_inductor_quantization_config(is_dynamic=o.mode == Mode.dynamic))
            prepared = prepare_pt2e(exported, quantizer)
            calib = calibration_inputs(ctx, o.calibration_batches) if o.mode == Mode.static else None
            if o.mode == Mode.static and not calib:
                raise self.unavailable("mode=static: dataset.calibration_split gave no batches")
            with torch.no_grad():
                for b in calib or [example]:
                    prepared(**b)
            converted = convert_pt2e(prepared)
            seconds["quantize_s"] = time.perf_counter() - t0
            inductor_config.freezing = True  # restored by process_state after the run
            step.now("torch.compile (inductor)")
            compiled = torch.compile(converted, backend="inductor", dynamic=True)
            t0 = time.perf_counter()
            shapes = shape_variants(ctx.example_batch)
            with torch.inference_mode():
                for b in shapes:
                    compiled(**b)
            seconds["compile_s"] = time.perf_counter() - t0
        self._metrics = seconds
        self._details = {
            "mode": str(o.mode), "quantizer": "torchao X86InductorQuantizer", "backend": "inductor",
            "freezing": "True", "dynamic_dims": "batch,sequence",
            "calibration": (f"{len(calib)} batches from dataset.calibration_split={ctx.calibration_split}" if calib
                            else "none (activations quantized per batch)"),
            "warm_shapes": ";".join("x".join(str(s) for s in b["input_ids"].shape) for b in shapes),
            "int8_isa": "amx" if cpu.has("amx") else ("vnni" if cpu.has("vnni") else "none (no VNNI: slow int8)"),
        }
        return compiled
