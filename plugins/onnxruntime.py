"""ONNX Runtime: export the loaded model to ONNX and run it in an ``InferenceSession`` on the CPU execution provider.

- Export: ``torch.onnx.export`` with the dynamo exporter (torch.export; the TorchScript exporter is deprecated in
  torch 2.13 and kept as ``exporter=torchscript``), batch and sequence dimensions dynamic, so length-sorted batches
  of any width run without re-export. The ``.onnx`` file is written to the run directory and logged as an artifact.
- Session: graph optimizations at ``graph_optimization_level``, ``intra_op_num_threads`` = the run's threads,
  one inter-op thread, sequential execution (the runner calls it one batch at a time).
- int8 (optional): ``onnxruntime.quantization``. ``dynamic`` quantizes weights ahead of time and activations per
  batch (MatMulInteger); ``static`` writes QDQ nodes with activation ranges calibrated on ``dataset.calibration_split``
  (refused without one: calibrating on the evaluated rows would flatter the accuracy).

fp32 only: ONNX Runtime's CPU provider has no bf16 kernels for these graphs, so bf16 precisions are refused in one
line (use openvino for bf16). Needs ``pip install -e '.[onnxruntime]'`` (onnxruntime, onnx, onnxscript).
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Dict, List, Optional

from orchestrator.plugin_api import (STAGE_CAPTURE, ConfigError, EngineModel, Plugin, PluginContext, Stopwatch,
                                     calibration_inputs, export_example, export_step, file_mb,
                                     output_names, quiet_loggers, quiet_transformers)


class Exporter(StrEnum):
    dynamo = "dynamo"
    torchscript = "torchscript"


class Level(StrEnum):
    disable = "disable"
    basic = "basic"
    extended = "extended"
    all = "all"


class Int8(StrEnum):
    none = "none"
    dynamic = "dynamic"
    static = "static"


@dataclass
class OnnxRuntimeOptions:
    # dynamo: torch.onnx.export(dynamo=True), the maintained exporter; torchscript: the deprecated tracer
    exporter: Exporter = Exporter.dynamo
    opset: int = 18
    # ONNX Runtime graph optimizations: disable | basic | extended | all (layout optimizations too)
    graph_optimization_level: Level = Level.all
    # none | dynamic (int8 weights, activations quantized per batch) | static (QDQ, calibrated activations)
    int8: Int8 = Int8.none
    # static int8: per-output-channel weight scales
    per_channel: bool = True
    # static int8: at most this many calibration batches from dataset.calibration_split
    calibration_batches: int = 8
    # log the exported .onnx as an MLflow artifact (it is written to the run directory either way)
    log_model: bool = True


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class OnnxRuntimePlugin(Plugin):
    name = "onnxruntime"
    stage = STAGE_CAPTURE
    runs_alone = "runs the whole model in its own runtime"
    Options = OnnxRuntimeOptions
    packages = ("onnxruntime", "onnx", "onnxscript")

    def __init__(self, options=None):
        super().__init__(options)
        self._calibration = ""

    @classmethod
    def validate_options(cls, o) -> None:
        if not 14 <= o.opset <= 23:
            raise ConfigError(f"optimization.onnxruntime.opset={o.opset}: valid: 14..23")
        cls.require_at_least("calibration_batches", o.calibration_batches, 1)

    def wants_calibration(self) -> bool:
        return self.options.int8 == Int8.static

    def compute_precision(self, ctx: PluginContext) -> Optional[str]:
        return "int8" if self.options.int8 != Int8.none else "fp32"

    def check(self, ctx: PluginContext) -> None:
        import torch

        o = self.options
        missing = [m for m in ("onnxruntime", "onnx") + (("onnxscript",) if o.exporter == Exporter.dynamo else ())
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise self.unavailable(f"needs {', '.join(missing)} (pip install -e '.[onnxruntime]')")
        if ctx.dtype != torch.float32 or ctx.autocast:
            raise self.unavailable("ONNX Runtime's CPU provider runs these graphs in fp32 (or int8 with "
                                   "optimization.onnxruntime.int8); use precision=fp32, or openvino for bf16")
        if o.int8 == Int8.static and not ctx.calibration_split:
            raise self.unavailable("int8=static calibrates activation ranges on dataset.calibration_split, which "
                                   "this dataset does not set (e.g. dataset.calibration_split=train); or use "
                                   "int8=dynamic")

    def apply(self, model, ctx: PluginContext):
        import onnxruntime as ort

        o = self.options
        out_dir = Path(ctx.run_dir or ".") / "onnxruntime"
        out_dir.mkdir(parents=True, exist_ok=True)
        example = export_example(ctx.example_batch)
        inputs = list(example)
        outputs = output_names(model, example)
        watch = Stopwatch()
        path = out_dir / "model.onnx"
        # the exporters print progress, per-op warnings and, when they fail, a graph dump: into the run's
        # <plugin>_export.log, and a failure is one line naming the cause
        step = "torch.onnx.export" + (" (dynamo)" if o.exporter == Exporter.dynamo else " (torchscript)")
        with watch("export"), export_step(self, ctx, step):
            self._export(_tuple_outputs()(model, inputs, outputs).eval(), example, inputs, outputs, path)
        fp32_mb = file_mb(path, Path(f"{path}.data"))
        if o.int8 != Int8.none:
            with watch("quantize"), export_step(self, ctx, f"onnxruntime.quantization ({o.int8})"):
                path = self._quantize(path, ctx, inputs)
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[o.graph_optimization_level])
        so.intra_op_num_threads = ctx.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # errors only: its warnings about unused initializers are not the user's concern
        with watch("session"):
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        kept = [i.name for i in session.get_inputs()]
        names = [x.name for x in session.get_outputs()]
        engine = EngineModel(lambda feed: session.run(names, feed), kept, names, "onnxruntime")
        with watch("first_call"):  # a kernel that cannot run here fails inside apply, not mid-evaluation
            engine(**example)
        self._metrics = {**watch.seconds, "model_size_mb": file_mb(path, Path(f"{path}.data")),
                         "fp32_model_size_mb": fp32_mb}
        self._details = {
            "exporter": str(o.exporter), "opset": str(o.opset), "provider": session.get_providers()[0],
            "graph_optimization_level": str(o.graph_optimization_level), "int8": str(o.int8),
            "intra_op_threads": str(ctx.threads), "inputs": ",".join(kept), "outputs": ",".join(names),
            "dynamic_axes": "batch,sequence", "file": path.name,
            **({"calibration": self._calibration} if o.int8 != Int8.none else {}),
        }
        if o.log_model:
            self._artifacts = [p for p in out_dir.iterdir() if p.is_file()]
        return engine

    def _export(self, module, example, inputs: List[str], outputs: List[str], path: Path) -> None:
        import torch

        args = tuple(example[k] for k in inputs)
        # the exporters log per-op warnings (and onnxscript's optimizer progress) the user cannot act on
        with warnings.catch_warnings(), quiet_loggers("torch.onnx", "onnxscript", "onnx_ir", "torch.export",
                                                                "torch._dynamo"), \
                quiet_transformers():
            warnings.simplefilter("ignore")
            if self.options.exporter == Exporter.dynamo:
                batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
                torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                                  opset_version=self.options.opset, dynamo=True, external_data=False,
                                  dynamic_shapes=(tuple({0: batch, 1: seq} for _ in inputs),), verbose=False)
            else:
                axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
                axes.update({n: {0: "batch"} for n in outputs})
                torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                                  opset_version=self.options.opset, dynamo=False, dynamic_axes=axes)

    def _quantize(self, path: Path, ctx: PluginContext, inputs: List[str]) -> Path:
        from onnxruntime import quantization as q

        o = self.options
        out = path.with_name("model.int8.onnx")
        with quiet_loggers("", "onnxruntime"):
            if o.int8 == Int8.dynamic:
                q.quantize_dynamic(str(path), str(out), weight_type=q.QuantType.QInt8)
                self._calibration = "none (activations quantized per batch)"
                return out
            batches = calibration_inputs(ctx, o.calibration_batches)
            if not batches:
                raise self.unavailable("int8=static: dataset.calibration_split gave no batches")

            class Reader(q.CalibrationDataReader):
                def __init__(self):
                    self.it = iter([{k: b[k].numpy() for k in inputs} for b in batches])

                def get_next(self) -> Optional[Dict[str, object]]:
                    return next(self.it, None)

            q.quantize_static(str(path), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                              per_channel=o.per_channel, activation_type=q.QuantType.QInt8,
                              weight_type=q.QuantType.QInt8,
                              extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        self._calibration = f"{len(batches)} batches from dataset.calibration_split={ctx.calibration_split}"
        return out


def _tuple_outputs():
    """plugin_api.TupleOutputs, imported on use: it is an nn.Module, and importing this plugin for its options (as
    every CLI start does) must not import torch."""
    from orchestrator.plugin_api import TupleOutputs

    return TupleOutputs
