"""OpenVINO: convert the loaded model (``openvino.convert_model`` with the run's example batch) and run it on the CPU
plugin. Intel's recommended successor for CPU inference now that IPEX is archived.

- Dynamic shapes: the converted model keeps batch and sequence dimensions dynamic (``[?,?]``), so length-sorted
  batches of any width run on one compiled model.
- Precision: the run's precision decides, set explicitly as ``INFERENCE_PRECISION_HINT``: fp32 runs ``f32`` (on
  CPUs with bf16, OpenVINO's *default* is bf16, which would pass a bf16 result off as fp32), ``precision=bf16`` /
  ``bf16_autocast`` run ``bf16`` and are refused on CPUs without native bf16 (OpenVINO would quietly run f32).
  The precision the compiled model reports is tagged (``plugin.openvino.inference_precision``).
- int8 (optional, through NNCF): ``weights`` compresses weights to int8 (compute stays in the run's precision);
  ``static`` quantizes weights and activations (``nncf.quantize``, transformer preset) calibrated on
  ``dataset.calibration_split`` (refused without one).
- ``performance_hint``: ``LATENCY`` (one stream: the runner makes one synchronous call per batch) or ``THROUGHPUT``.
- ``INFERENCE_NUM_THREADS`` = the run's threads. The IR (``model.xml``/``.bin``) is written to the run directory;
  its size is the run's ``model_size_mb``.
- Telemetry only by consent: OpenVINO's converter and NNCF send usage telemetry to Google Analytics unless the
  user has opted out (``opt_in_out --opt_out``); each event forks this process from a thread pool (39 forks in one
  model's convert and compile), tries the network, and writes a client id under ``~/intel``. On the AMD EPYC, a
  MiniLM-sized model: ``convert_s`` 1.60 s with it against 0.82 s without, ``compile_s`` 0.50 against 0.13 s
  (medians of 6 interleaved pairs, ``benchmarks/openvino_telemetry.py``), time the stack's optimization time would
  otherwise include. This process treats "no consent file" as "no" (a user who ran
  ``opt_in_out --opt_in`` still sends); ``plugin.openvino.telemetry`` says which applied.

Needs ``pip install -e '.[openvino]'`` (openvino, nncf).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Optional

from orchestrator.plugin_api import (STAGE_CAPTURE, EngineModel, Plugin, PluginContext, Stopwatch,
                                     calibration_inputs, cpu, export_example, export_step, file_mb, output_names,
                                     quiet_loggers, quiet_transformers)


class Hint(StrEnum):
    LATENCY = "LATENCY"
    THROUGHPUT = "THROUGHPUT"


class Int8(StrEnum):
    none = "none"
    weights = "weights"
    static = "static"


@dataclass
class OpenVinoOptions:
    # LATENCY: one stream for synchronous batches (what the runner does); THROUGHPUT: several streams
    performance_hint: Hint = Hint.LATENCY
    # none | weights (int8 weight compression, NNCF) | static (int8 weights + activations, NNCF, calibrated)
    int8: Int8 = Int8.none
    # static int8: at most this many calibration batches from dataset.calibration_split
    calibration_batches: int = 8
    # log the IR (model.xml/model.bin) as an MLflow artifact (it is written to the run directory either way)
    log_model: bool = True


# the frontend's report: "Summary: -- Conversion is failed for: SequenceMark, aten::cat", above it the checks that
# failed ("Axis -2 out of the tensor rank range [-1, 0].")
_UNCONVERTED = re.compile(r"Conversion is failed for:\s*([^\n]+)")
_NOT_DETAIL = ("Check '", "While validating", "Exception happened", "FrontEnd API", "Model wasn't", "--", "Summary",
               "This is OpenVINO")


def unconverted_ops(error: BaseException) -> Optional[str]:
    """The operations OpenVINO's PyTorch frontend could not convert, and the first check that failed."""
    text = str(error)
    found = _UNCONVERTED.search(text)
    if not found:
        return None
    # SequenceMark is the frontend's own bookkeeping type around a list input, not an operation of the model
    names = [n.strip() for n in found.group(1).split(",") if n.strip()]
    shown = ", ".join(n for n in names if n != "SequenceMark") or ", ".join(names)
    details = [ln.strip() for ln in text.split("Summary:")[0].splitlines()
               if ln.strip() and not ln.strip().startswith(_NOT_DETAIL)]
    return f"unconverted operations: {shown}" + (f" ({details[0]})" if details else "")


_PRECISIONS = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "f16": "fp16"}


class OpenVinoPlugin(Plugin):
    name = "openvino"
    stage = STAGE_CAPTURE
    runs_alone = "runs the whole model in its own runtime"
    Options = OpenVinoOptions
    packages = ("openvino", "nncf")

    def __init__(self, options=None):
        super().__init__(options)
        self._compute: Optional[str] = None
        self._calibration = ""

    @classmethod
    def validate_options(cls, o) -> None:
        cls.require_at_least("calibration_batches", o.calibration_batches, 1)

    @staticmethod
    def _wants_bf16(ctx: PluginContext) -> bool:
        import torch

        return ctx.dtype == torch.bfloat16 or ctx.autocast_dtype == torch.bfloat16

    def wants_calibration(self) -> bool:
        return self.options.int8 == Int8.static

    def compute_precision(self, ctx: PluginContext) -> Optional[str]:
        if self.options.int8 == Int8.static:
            return "int8"
        return self._compute or ("bf16" if self._wants_bf16(ctx) else "fp32")

    def weight_precision(self, ctx: PluginContext) -> Optional[str]:
        return "int8" if self.options.int8 == Int8.weights else None

    def check(self, ctx: PluginContext) -> None:
        import torch

        o = self.options
        missing = [m for m in ("openvino",) + (("nncf",) if o.int8 != Int8.none else ())
                   if importlib.util.find_spec(m) is None]
        if missing:
            raise self.unavailable(f"needs {', '.join(missing)} (pip install -e '.[openvino]')")
        if ctx.dtype == torch.float16 or ctx.autocast_dtype == torch.float16:
            raise self.unavailable("fp16 is not a CPU precision here; use precision=fp32 or bf16")
        if self._wants_bf16(ctx) and not cpu.has("bf16"):
            raise self.unavailable(f"bf16 needs native bf16 on this CPU ({cpu.describe()}); OpenVINO would run f32 "
                                   f"instead: use precision=fp32")
        if o.int8 == Int8.static and not ctx.calibration_split:
            raise self.unavailable("int8=static calibrates on dataset.calibration_split, which this dataset does not "
                                   "set (e.g. dataset.calibration_split=train); or use int8=weights")

    def apply(self, model, ctx: PluginContext):
        import torch

        telemetry = telemetry_only_by_consent()  # before openvino or nncf start their telemetry
        import openvino as ov

        o = self.options
        out_dir = Path(ctx.run_dir or ".") / "openvino"
        out_dir.mkdir(parents=True, exist_ok=True)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            # precision=bf16 cast the torch weights; OpenVINO converts fp32 and runs bf16 by its precision hint
            model = copy.deepcopy(model).float()
        example = export_example(ctx.example_batch)
        inputs = list(example)
        outputs = output_names(model, example)
        watch = Stopwatch()
        # the converter prints warnings and, when it fails, a report of every operation it could not convert: into
        # the run's openvino_export.log, and the failure is one line naming those operations
        with watch("convert"), export_step(self, ctx, "openvino.convert_model", explain=unconverted_ops), \
                quiet_loggers("torch", "openvino"), quiet_transformers():
            ov_model = ov.convert_model(_tuple_outputs()(model, inputs, outputs).eval(),
                                        example_input=tuple(example[k] for k in inputs))
        # positional example inputs come out named input.1...; the runner feeds by the tokenizer's names
        for port, name in zip(ov_model.inputs, inputs):
            port.get_tensor().set_names({name})
        for port, name in zip(ov_model.outputs, outputs):
            port.get_tensor().set_names({name})
        if o.int8 != Int8.none:
            with watch("quantize"), export_step(self, ctx, f"nncf ({o.int8})"):
                ov_model = self._quantize(ov_model, ctx, inputs)
        xml = out_dir / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        precision = "bf16" if self._wants_bf16(ctx) else "f32"
        config = {"PERFORMANCE_HINT": str(o.performance_hint), "INFERENCE_NUM_THREADS": int(ctx.threads),
                  "INFERENCE_PRECISION_HINT": precision}
        with watch("compile"):
            compiled = ov.Core().compile_model(ov_model, "CPU", config)
        used = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._compute = _PRECISIONS.get(used.split("'")[1] if "'" in used else used, used)
        kept = [p.get_any_name() for p in compiled.inputs]
        request = compiled.create_infer_request()

        def run(feed):
            # share_outputs=False: copies, so a batch's outputs survive the next call on the same request
            res = request.infer(feed, share_outputs=False)
            return [res[port] for port in compiled.outputs]

        # one call now: a kernel OpenVINO cannot create here fails inside apply (one line, fallback possible),
        # not in the middle of the accuracy pass
        run({k: example[k].numpy() for k in kept})
        streams = compiled.get_property("NUM_STREAMS")
        self._metrics = {**watch.seconds, "model_size_mb": file_mb(xml, xml.with_suffix(".bin"))}
        self._details = {
            "device": "CPU", "performance_hint": str(o.performance_hint), "int8": str(o.int8),
            "inference_precision": self._compute, "precision_hint": precision, "num_streams": str(streams),
            "threads": str(ctx.threads), "inputs": ",".join(kept), "outputs": ",".join(outputs),
            "shapes": ";".join(str(p.get_partial_shape()) for p in compiled.inputs),
            "version": ov.get_version().split("-")[0], "telemetry": telemetry,
            **({"calibration": self._calibration} if o.int8 != Int8.none else {}),
        }
        if o.log_model:
            self._artifacts = [xml, xml.with_suffix(".bin")]
        return EngineModel(run, kept, outputs, "openvino")

    def _quantize(self, ov_model, ctx: PluginContext, inputs):
        import nncf

        nncf.set_log_level(logging.ERROR)
        o = self.options
        if o.int8 == Int8.weights:
            self._calibration = "none (weights only)"
            return nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        batches = calibration_inputs(ctx, o.calibration_batches)
        if not batches:
            raise self.unavailable("int8=static: dataset.calibration_split gave no batches")
        data = nncf.Dataset([{k: b[k].numpy() for k in inputs} for b in batches])
        self._calibration = f"{len(batches)} batches from dataset.calibration_split={ctx.calibration_split}"
        out = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=sum(
            b["input_ids"].shape[0] for b in batches))
        return out


def telemetry_only_by_consent() -> str:
    """Make openvino_telemetry's consent check read a missing consent file as "declined" (its default reads it as
    "accepted") for this process, once; an explicit opt-in or opt-out is kept. Returns what applies, for the tag."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:
        return "not installed"
    changed = "as openvino_telemetry decides (its consent check changed)"
    check = getattr(OptInChecker, "check", None)
    if check is None or not all(hasattr(ConsentCheckResult, n) for n in ("NO_FILE", "DECLINED", "ACCEPTED")):
        return changed  # an openvino_telemetry this was not written against: its own behaviour, said in the tag
    if not getattr(check, "by_consent_only", False):
        def by_consent(self, *args, **kwargs):
            result = check(self, *args, **kwargs)
            return ConsentCheckResult.DECLINED if result == ConsentCheckResult.NO_FILE else result

        by_consent.by_consent_only = True
        OptInChecker.check = by_consent
    try:
        answer = OptInChecker().check(False)
    except TypeError:  # another signature: the telemetry must not stop the run
        return changed
    return "sent (the user opted in)" if answer == ConsentCheckResult.ACCEPTED else "off"


def _tuple_outputs():
    """plugin_api.TupleOutputs, imported on use: it is an nn.Module, and importing this plugin for its options (as
    every CLI start does) must not import torch."""
    from orchestrator.plugin_api import TupleOutputs

    return TupleOutputs
