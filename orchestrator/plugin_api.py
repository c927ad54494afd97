"""The public API for optimization plugins and engines: everything a plugin (built-in or from another package) may
import from the orchestrator. The built-ins in ``plugins/`` import from here only, so an out-of-tree plugin can do
all they do. Names not listed in ``__all__`` are private and may change.

- The contract: :class:`Plugin`, :class:`PluginContext`, :class:`NoOptions`, the stages, the errors a plugin raises
  (:class:`ConfigError` from ``validate_options``, :class:`PluginUnavailable` from ``check``/``apply``).
- Helpers: :func:`quiet_transformers`, :func:`first_line`/:func:`describe` (one-line messages), :mod:`cpu`
  capabilities (``cpu.has("amx")``), :func:`stack_label` (how a run names a stack: ``a+b``, the empty one).
- Engines (the whole model in another runtime, or exported first): :class:`EngineModel`, :class:`TupleOutputs`,
  :func:`export_example`, :func:`output_names`, :func:`shape_variants`, :class:`Stopwatch`, :func:`file_mb`,
  :func:`calibration_inputs`, :class:`quiet_loggers`, :class:`export_step` (exporter output into
  ``<run_dir>/<plugin>_export.log``, a failure as one line naming the cause).
- :func:`check_plugin`: the conformance check a third-party package runs in its own tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import cpu
from .engines import (EXPORT_LOG, EngineModel, Stopwatch, calibration_inputs, export_example,
                      export_step, failure_cause, file_mb, output_names, quiet_loggers, shape_variants)
from .errors import ConfigError, OrchestratorError, PluginUnavailable, RunInterrupted, describe, first_line
from .plugin import (STAGE_CAPTURE, STAGE_PREPARE, STAGE_TRANSFORM, NoOptions, Plugin, PluginContext,
                     quiet_transformers)
from .records import stack_label

__all__ = [
    "Plugin", "PluginContext", "NoOptions", "STAGE_PREPARE", "STAGE_TRANSFORM", "STAGE_CAPTURE",
    "ConfigError", "OrchestratorError", "PluginUnavailable", "RunInterrupted", "describe", "first_line",
    "quiet_transformers", "cpu", "stack_label",
    "EngineModel", "TupleOutputs", "export_example", "output_names", "shape_variants", "Stopwatch", "file_mb",
    "calibration_inputs", "quiet_loggers", "export_step", "failure_cause", "EXPORT_LOG",
    "check_plugin", "PluginContractError",
]


def __getattr__(name: str):
    # TupleOutputs is an nn.Module (orchestrator/tuple_outputs.py): imported when asked for, so that importing this
    # module for a plugin's options, as every CLI start does, does not import torch
    if name == "TupleOutputs":
        from .tuple_outputs import TupleOutputs

        return TupleOutputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PluginContractError(AssertionError):
    """What :func:`check_plugin` found wrong, every problem on its own line."""


def _static_problems(cls: Any) -> List[str]:
    from omegaconf import OmegaConf

    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        return [f"{cls!r} is not a subclass of orchestrator.plugin_api.Plugin"]
    out = []
    if not (isinstance(cls.name, str) and cls.name.isidentifier() and cls.name == cls.name.lower()):
        out.append(f"name={cls.name!r}: must be a lower-case identifier (what users type in optimization=[...])")
    if not isinstance(cls.stage, int) or isinstance(cls.stage, bool):
        out.append(f"stage={cls.stage!r}: must be an int (STAGE_PREPARE, STAGE_TRANSFORM or STAGE_CAPTURE)")
    for attr in ("conflicts", "packages"):
        value = getattr(cls, attr)
        if not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            out.append(f"{attr}={value!r}: must be a tuple of names")
    if not isinstance(cls.runs_alone, str):
        out.append(f"runs_alone={cls.runs_alone!r}: must be a reason string ('' when it stacks)")
    if not isinstance(cls.process_wide, bool):
        out.append(f"process_wide={cls.process_wide!r}: must be True or False")
    if not dataclasses.is_dataclass(cls.Options):
        out.append(f"Options={cls.Options!r}: must be a dataclass (the plugin's config schema)")
    else:
        try:
            OmegaConf.structured(cls.Options)
            defaults = cls.Options()
            cls.validate_options(defaults)
        except Exception as e:
            out.append(f"Options: the defaults must make a valid config schema and pass validate_options "
                       f"({describe(e)})")
    for method, params in (("check", ["self", "ctx"]), ("apply", ["self", "model", "ctx"])):
        got = list(inspect.signature(getattr(cls, method)).parameters)
        if len(got) != len(params):
            out.append(f"{method}({', '.join(got)}): must take ({', '.join(params)})")
    if cls.apply is Plugin.apply:
        out.append("apply: not implemented")
    state = inspect.getattr_static(cls, "process_state")
    if not isinstance(state, classmethod):
        out.append("process_state: must stay a classmethod context manager")
    return out


def _dynamic_problems(cls: Any, model: Any, batch: Dict[str, Any], run_dir: Optional[Path]) -> List[str]:
    import torch

    out: List[str] = []
    plugin = cls()
    ctx = PluginContext(task="sentence_similarity", dtype=torch.float32, autocast_dtype=None, example_batch={},
                        threads=torch.get_num_threads(), run_dir=run_dir)
    try:
        plugin.check(ctx)  # as before the model loads: an empty batch
        ctx.example_batch = batch
        plugin.check(ctx)
    except PluginUnavailable as e:
        return [f"check refused this environment, so apply was not tried: {e.reason}"]
    except Exception as e:
        return [f"check must raise PluginUnavailable (self.unavailable(...)) when it cannot run, not {describe(e)}"]
    with torch.inference_mode():
        eager = model(**batch)
    names = [k for k, v in eager.items() if isinstance(v, torch.Tensor)]
    try:
        result = plugin.apply(model, ctx)
    except PluginUnavailable as e:
        return [f"apply refused the example model: {e.reason}"]
    if not callable(result):
        return [f"apply returned {type(result).__name__}: it must return a callable model(**inputs)"]
    with torch.inference_mode():
        got = result(**batch)
    if not hasattr(got, "keys") or not hasattr(got, "__getitem__"):
        out.append(f"the optimized model returned {type(got).__name__}: it must return a mapping of named outputs")
        return out
    for name in names:
        if name not in got.keys():
            out.append(f"the optimized model's outputs lack {name!r} (eager has {', '.join(names)})")
        elif not (isinstance(got[name], torch.Tensor) and got[name].is_floating_point()):
            out.append(f"output {name!r} is {type(got[name]).__name__}: it must be a float tensor")
        elif got[name].shape[0] != eager[name].shape[0]:
            out.append(f"output {name!r} has shape {tuple(got[name].shape)}: the batch must come first "
                       f"(eager: {tuple(eager[name].shape)})")
    described, measured, files = plugin.describe(), plugin.metrics(), plugin.artifacts()
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in described.items()):
        out.append(f"describe() must return Dict[str, str] (MLflow tags): {described!r}")
    if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
               for k, v in measured.items()):
        out.append(f"metrics() must return Dict[str, float]: {measured!r}")
    for f in files:
        if not Path(f).is_file():
            out.append(f"artifacts() lists {f}, which is no file")
    precision = plugin.compute_precision(ctx)
    if precision not in (None, "fp32", "bf16", "int8"):
        out.append(f"compute_precision()={precision!r}: must be fp32, bf16, int8 or None")
    weights = plugin.weight_precision(ctx)
    if weights not in (None, "fp32", "bf16", "int8"):
        out.append(f"weight_precision()={weights!r}: must be fp32, bf16, int8 or None")
    with contextlib.ExitStack() as stack:
        hook = stack.enter_context(cls.process_state([cls.name]))
        if hook is not None and not isinstance(hook([cls.name]), dict):
            out.append("process_state must yield None or a function applied -> Dict[str, str] of tags")
    return out


def check_plugin(cls: Any, model: Any = None, example_batch: Optional[Dict[str, Any]] = None,
                 run_dir: Optional[Path] = None) -> None:
    """Raise :class:`PluginContractError` listing every way ``cls`` departs from the plugin contract
    (docs/plugins.md).

    Without a model: the class itself (name, stage, Options schema and defaults, method signatures). With
    ``model`` (e.g. a tiny transformers model) and ``example_batch`` (``input_ids``, ``attention_mask``, ... int64
    ``[batch, width]``): also ``check`` before and after the model loads, ``apply`` with default options, and what
    the result returns (the eager model's named outputs, float, batch first) and reports (tags, metrics,
    artifacts, precision)."""
    problems = _static_problems(cls)
    if not problems and model is not None:
        if example_batch is None:
            raise ValueError("check_plugin: give example_batch with the model")
        problems = _dynamic_problems(cls, model, example_batch, run_dir)
    if problems:
        name = getattr(cls, "__qualname__", repr(cls))
        raise PluginContractError(f"{name} breaks the orchestrator plugin contract:\n- " + "\n- ".join(problems))
