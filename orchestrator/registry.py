"""Name -> class registries for plugins, tasks and scenarios, filled from entry points.

Built-ins are registered through the same entry-point groups as third-party packages
(``orchestrator.plugins``, ``orchestrator.tasks``), so there is one path to test. Classes load on first use.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Callable, Dict, List, Optional

from .errors import ConfigError


class Registry:
    def __init__(self, group: str, kind: str, base: Optional[str] = None):
        self.group = group
        self.kind = kind
        # "module:Class" every registered class must derive from (resolved on first use: importing the registry
        # must not import torch)
        self.base = base
        self._eps: Dict[str, object] | None = None
        self._loaded: Dict[str, type] = {}

    def _entry_points(self) -> Dict[str, object]:
        if self._eps is None:
            self._eps = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._eps

    def register(self, name: str, cls: type) -> None:
        """Register in-process (tests, notebooks); entry points are the normal route."""
        self._check_class(name, cls, "the registered object")
        self._loaded[name] = cls

    def unregister(self, name: str) -> None:
        """Undo ``register`` (a test's plugin must not outlive the test: the stack-order message lists every name)."""
        self._loaded.pop(name, None)

    def names(self) -> List[str]:
        return sorted(set(self._entry_points()) | set(self._loaded))

    def loadable(self, on_error: Optional[Callable[[str, Exception], None]] = None) -> Dict[str, type]:
        """name -> class for every registered name whose class loads; a broken third-party entry point is passed
        to ``on_error`` (or skipped) instead of taking everything else down."""
        out = {}
        for name in self.names():
            try:
                out[name] = self.get(name)
            except Exception as e:
                if on_error is not None:
                    on_error(name, e)
        return out

    def get(self, name: str) -> type:
        if name in self._loaded:
            return self._loaded[name]
        ep = self._entry_points().get(name)
        if ep is None:
            raise ConfigError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        cls = ep.load()  # type: ignore[attr-defined]
        self._check_class(name, cls, f"entry point {self.group}:{name} = {ep.value}")  # type: ignore[attr-defined]
        self._loaded[name] = cls
        return cls

    def _base_module(self):
        """The module defining the contract (by name: the contract's module uses the registry, not the other way)."""
        return importlib.import_module(str(self.base).partition(":")[0])

    def _check_class(self, name: str, cls: object, where: str) -> None:
        """An entry point must name a class of the contract: anything else (a function, a module, an unrelated
        class) would fail later, somewhere far from the package that registered it."""
        if self.base is None:
            return
        module, _, attr = self.base.partition(":")
        base = getattr(self._base_module(), attr)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            what = f"class {cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else \
                f"{type(cls).__name__} {getattr(cls, '__qualname__', repr(cls))}"
            raise ConfigError(f"{self.kind} '{name}': {where} is a {what}, not a subclass of "
                              f"{module.replace('.plugin', '.plugin_api')}.{attr}; fix or uninstall the package "
                              f"that registers it")


class PluginRegistry(Registry):
    def validate_stack(self, stack: List[str]) -> None:
        """Order and combination rules, checked before any model is loaded."""
        classes = [self.get(n) for n in stack]
        shown = f"optimization=[{','.join(stack)}]"
        alone = [c for c in classes if getattr(c, "runs_alone", "")]
        if alone and len(stack) > 1:
            cls = alone[0]
            others = [n for n in stack if n != cls.name]
            raise ConfigError(f"{shown}: '{cls.name}' {cls.runs_alone}; it cannot be stacked with {', '.join(others)} "
                              f"(use optimization=[{cls.name}] alone)")
        for cls in classes:
            for other in cls.conflicts:
                if other in stack:
                    raise ConfigError(f"{shown}: '{cls.name}' and '{other}' cannot be combined; choose one")
        capture = self._base_module().STAGE_CAPTURE
        capturers = [c.name for c in classes if c.stage >= capture]
        if len(capturers) > 1:
            raise ConfigError(f"{shown}: {' and '.join(capturers)} both capture a graph; use one of them, last")
        for a, b in zip(classes, classes[1:]):
            if b.stage < a.stage:
                raise ConfigError(f"{shown}: '{b.name}' must come before '{a.name}'; valid order: {self.order_hint()}")

    def order_hint(self) -> str:
        by_stage: Dict[int, List[str]] = {}
        alone = []
        for n, cls in self.loadable().items():  # a broken third-party entry point must not hide the hint
            if getattr(cls, "runs_alone", ""):
                alone.append(n)
            else:
                by_stage.setdefault(cls.stage, []).append(n)
        hint = " -> ".join("|".join(sorted(v)) for _, v in sorted(by_stage.items())) + " (graph capture last"
        return hint + (f"; {', '.join(sorted(alone))} run alone)" if alone else ")")


plugins = PluginRegistry("orchestrator.plugins", "optimization plugin", base="orchestrator.plugin:Plugin")
tasks = Registry("orchestrator.tasks", "task", base="orchestrator.tasks.base:Task")
scenarios = Registry("orchestrator.scenarios", "scenario")
