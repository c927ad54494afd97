"""The contract between the orchestrator and an optimization plugin (built-in or from another package).

A plugin is a class registered under the entry-point group ``orchestrator.plugins``; its ``Options`` dataclass is
its config schema (registered as ``optimization/<name>``: the one place its defaults live). For each run:

1. ``validate_options(options)`` (classmethod) while the config is validated: option values that are wrong
   anywhere raise ``ConfigError`` (never a fallback).
2. ``check(ctx)`` before the model loads (``ctx.example_batch`` empty) and again before ``apply``: raise
   ``PluginUnavailable`` when the plugin cannot run here (missing package or version, precision, CPU, stack).
   Under ``runtime.on_plugin_error=fallback`` the plugin is then skipped and the run labelled with what ran.
3. ``apply(model, ctx)`` returns the optimized model: **a callable taking the input tensors by keyword**
   (``input_ids``, ``attention_mask``, ``token_type_ids`` — the tokenizer's ``model_input_names`` — as int64
   tensors ``[batch, width]``) **and returning a mapping of named float outputs** indexable by the names the task's
   head reads (``last_hidden_state``, ``logits``, ``start_logits``/``end_logits``): a transformers ``ModelOutput``
   or a plain dict, on CPU, ``[batch, width, ...]`` or ``[batch, ...]``. Widths vary between batches unless
   ``runtime.padding=max_length``; the runner calls it under ``torch.inference_mode()`` (and autocast when
   ``ctx.autocast``). It may be an ``nn.Module`` or anything else (a wrapper around another runtime's session).
4. After ``apply``, the runner reads what the plugin reports: ``describe()`` -> MLflow tags
   ``plugin.<name>.<key>``; ``metrics()`` -> metrics ``plugin_<name>_<key>`` (export time, file size, ...; a
   ``model_size_mb`` entry stands in for the run's ``model_size_mb`` when the result holds no torch parameters);
   ``artifacts()`` -> files logged under ``plugins/<name>/`` (an exported graph); ``compute_precision()`` -> the
   unit the work runs on (``fp32``/``bf16``/``int8``), used for the peak-FLOPs figure.
5. ``process_state(stack)`` (classmethod context manager) is entered around a run whose stack names the plugin;
   with ``process_wide = True`` around **every** run in this process, whether the plugin is in the stack or not: a
   plugin whose package changes process-wide state (fusion passes registered for the whole process) keeps other
   runs free of it there. It yields a function ``applied -> tags`` or None. :func:`process_states` lists the ones
   to enter.

Plugins import heavy or optional packages inside ``check``/``apply`` only, so choosing a stack without them
(or importing ``orchestrator``) never touches those packages. What a plugin may import from the orchestrator is
in :mod:`orchestrator.plugin_api`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional

from .errors import ConfigError, PluginUnavailable

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import torch


@dataclass
class PluginContext:
    """What a plugin may need to know about the run it is applied in."""

    task: str
    dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype]
    example_batch: Dict[str, torch.Tensor]
    threads: int
    # plugins that precede this one in the stack (already applied)
    applied: list = field(default_factory=list)
    # plugins that follow this one in the stack (e.g. a rewrite adapts its recipe when graph capture follows)
    following: list = field(default_factory=list)
    # optional: more batches like example_batch (same keys), for plugins that calibrate (static int8)
    calibration_batches: list = field(default_factory=list)
    # dataset.calibration_split (known before the model loads; the batches come later): static int8 needs it
    calibration_split: Optional[str] = None
    # the transformers config and tokenizer of the loaded model (None before the model loads)
    hf_config: Any = None
    tokenizer: Any = None
    # the run's directory: where a plugin writes files it reports as artifacts (an exported graph)
    run_dir: Optional[Path] = None

    @property
    def autocast(self) -> bool:
        return self.autocast_dtype is not None

    def autocast_context(self):
        import torch

        return torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast)


# Stages order the stack: lower stages run first. Graph capture goes last because it freezes what came before.
STAGE_PREPARE = 10  # whole-model rewrites by an extension library
STAGE_TRANSFORM = 20  # module swaps (fused kernels, int8 layers)
STAGE_CAPTURE = 90  # graph capture: at most one, last


@dataclass
class NoOptions:
    pass


class Plugin:
    name: ClassVar[str] = ""
    stage: ClassVar[int] = STAGE_TRANSFORM
    # names this plugin cannot be stacked with
    conflicts: ClassVar[tuple] = ()
    # why the plugin must be the whole stack, e.g. "runs the whole model in its own runtime" (an inference
    # engine: nothing done to the torch model before it carries over, nothing after it has a torch model to
    # work on); empty: it stacks by the stage and conflict rules
    runs_alone: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    # distributions whose versions the run records (tags version.<name>) when this plugin is in the stack
    packages: ClassVar[tuple] = ()
    # True: process_state is entered around every run in the process, not only runs whose stack names the plugin
    process_wide: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        self._details: Dict[str, str] = {}
        self._metrics: Dict[str, float] = {}
        self._artifacts: List[Path] = []

    @classmethod
    def validate_options(cls, options: Any) -> None:
        """Raise ConfigError for option values that are wrong anywhere (a choice not in the list, a range).

        Called while the config is validated, before any model or data loads; the error is never a fallback."""

    def check(self, ctx: PluginContext) -> None:
        """Raise PluginUnavailable(reason) when this plugin cannot run here.

        Called before the model loads (``ctx.example_batch`` is empty then) and again just before ``apply``: it may
        look at the precision, the stack, the installed packages and the CPU, never at the model or the data."""

    def apply(self, model: torch.nn.Module, ctx: PluginContext) -> Any:
        raise NotImplementedError

    def describe(self) -> Dict[str, str]:
        """What the plugin did, logged as MLflow tags ``plugin.<name>.<key>``."""
        return dict(self._details)

    def metrics(self) -> Dict[str, float]:
        """Numbers the plugin measured, logged as metrics ``plugin_<name>_<key>``."""
        return dict(self._metrics)

    def artifacts(self) -> List[Path]:
        """Files the plugin produced (in ``ctx.run_dir``), logged under ``plugins/<name>/``."""
        return list(self._artifacts)

    def wants_calibration(self) -> bool:
        """True when ``apply`` reads ``ctx.calibration_batches`` (static int8): only then does the runner load
        and tokenize ``dataset.calibration_split``."""
        return False

    def compute_precision(self, ctx: PluginContext) -> Optional[str]:
        """The unit the optimized model computes on (fp32, bf16, int8) when the plugin decides it; None: the
        run's precision decides."""
        return None

    def weight_precision(self, ctx: PluginContext) -> Optional[str]:
        """The precision the weights are stored in when it is not the arithmetic's (``int8`` for weight-only
        compression, whose matmuls still run in fp32/bf16); None otherwise. Rows then say ``fp32+int8w``."""
        return None

    @classmethod
    @contextlib.contextmanager
    def process_state(cls, stack: List[str]) -> Iterator[Optional[Callable[[List[str]], Dict[str, str]]]]:
        """Entered around a run whose stack names this plugin, or around every run when ``process_wide`` (see the
        module docstring); nothing to do by default."""
        yield None

    def unavailable(self, reason: str) -> PluginUnavailable:
        return PluginUnavailable(self.name, reason)

    @classmethod
    def require_at_least(cls, key: str, value: Any, minimum: int) -> None:
        if value < minimum:
            raise ConfigError(f"optimization.{cls.name}.{key}={value}: must be >= {minimum}")

    @classmethod
    def require_choice(cls, key: str, value: Any, choices: tuple) -> None:
        if value not in choices:
            raise ConfigError(f"optimization.{cls.name}.{key}={value!r}: valid: {', '.join(choices)}")


def process_states(stack: List[str], classes: Optional[Iterable[type]] = None) -> List[Any]:
    """The ``process_state(stack)`` context managers to enter around a run of ``stack``: those of the plugin
    classes in the stack, and of those that set ``process_wide``, each once, in registry order (``classes``:
    every loadable registered plugin class unless given)."""
    from .registry import plugins

    out = []
    for cls in (plugins.loadable().values() if classes is None else classes):
        if cls.name in stack or getattr(cls, "process_wide", False):
            out.append(cls.process_state(list(stack)))
    return out


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers at error level for the block, then back to the caller's level: loading prints a multi-line
    LOAD REPORT, and tracing/exporting calls the loss setup, which warns about ``loss_type=None`` every time."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
