"""The small interface every optimization plugin implements.

Plugins import heavy or optional packages inside ``check``/``apply`` only, so choosing a stack without them
(or importing ``orchestrator``) never touches those packages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

import torch

from .errors import ConfigError, PluginUnavailable


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
    # plugins that follow this one in the stack (e.g. ipex adapts its recipe when jit follows)
    following: list = field(default_factory=list)
    # optional: more batches like example_batch (same keys), for plugins that calibrate (ipex int8 static)
    calibration_batches: list = field(default_factory=list)

    @property
    def autocast(self) -> bool:
        return self.autocast_dtype is not None

    def autocast_context(self):
        return torch.autocast("cpu", dtype=self.autocast_dtype, enabled=self.autocast)


# Stages order the stack: lower stages run first. Graph capture goes last because it freezes what came before.
STAGE_PREPARE = 10  # whole-model rewrites by an extension (ipex)
STAGE_TRANSFORM = 20  # module swaps (bettertransformer, quantize)
STAGE_CAPTURE = 90  # graph capture (jit, compile): at most one, last


@dataclass
class NoOptions:
    pass


class Plugin:
    name: ClassVar[str] = ""
    stage: ClassVar[int] = STAGE_TRANSFORM
    # names this plugin cannot be stacked with
    conflicts: ClassVar[tuple] = ()
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        self._details: Dict[str, str] = {}

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

    def unavailable(self, reason: str) -> PluginUnavailable:
        return PluginUnavailable(self.name, reason)

    @classmethod
    def require_choice(cls, key: str, value: Any, choices: tuple) -> None:
        if value not in choices:
            raise ConfigError(f"optimization.{cls.name}.{key}={value!r}: valid: {', '.join(choices)}")
