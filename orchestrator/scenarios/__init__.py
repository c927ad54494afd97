"""Scenarios: how queries reach the prepared model and what a run is judged by, measured by MLPerf's LoadGen.

``scenario=offline|single_stream|multi_stream|server`` (or any scenario another package registers under the
entry-point group ``orchestrator.scenarios``). The contract is in :mod:`.base`; the LoadGen adapter in
:mod:`.loadgen`. Importing this package imports neither LoadGen nor any scenario module.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from .base import (AccuracyResult, Figure, FigureOfMerit, Scenario, ScenarioOptions, ScenarioResult,
                   NOT_COMPLIANT)

__all__ = ["AccuracyResult", "Figure", "FigureOfMerit", "Scenario", "ScenarioOptions", "ScenarioResult",
           "NOT_COMPLIANT", "collate_with", "get", "names", "register_configs"]


def _registry():
    from ..registry import scenarios

    return scenarios


def names() -> List[str]:
    return _registry().names()


def get(name: str) -> type:
    """The scenario class registered as ``name`` (ConfigError naming the valid ones otherwise)."""
    return _registry().get(name)


def _collate(rows: Sequence[dict], batch_size: Optional[int], *, default_batch: int, pad_id: int, padding: str,
             max_length: int, sort_by_length: bool, pad_to_multiple_of: Optional[int]):
    from ..measure import make_batches

    return make_batches(rows, batch_size or default_batch, pad_id, padding, max_length, sort_by_length,
                        pad_to_multiple_of)


def collate_with(pad_id: int, runtime: Any) -> Callable:
    """``make_batches(rows, batch_size)`` for a scenario, from the run's ``runtime`` settings (batch_size is the
    default batch; padding, max_length, sort_by_length and pad_to_multiple_of apply to every batch the SUT forms)."""
    return partial(_collate, default_batch=runtime.batch_size, pad_id=pad_id, padding=str(runtime.padding),
                   max_length=runtime.max_length, sort_by_length=runtime.sort_by_length,
                   pad_to_multiple_of=runtime.pad_to_multiple_of)


def builtin_conf_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "conf" / "scenario"


def register_configs(cs=None) -> None:
    """Each registered scenario's Options in Hydra's ConfigStore, at package ``scenario``.

    ``scenario/schema/<name>``: the typed schema a ``conf/scenario/<name>.yaml`` pulls in (``defaults:
    [schema/<name>@_here_, _self_]``). A scenario without such a file (one from another package) is also stored as
    ``scenario/<name>``, so ``scenario=<name>`` selects it with no YAML at all (a built-in is not: Hydra would
    take its file and match it against a same-named schema, which it deprecates)."""
    import logging

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ..errors import describe

    cs = cs or ConfigStore.instance()
    registry = _registry()

    def broken(name: str, e: Exception) -> None:  # a broken third-party package must not take the CLI down
        logging.getLogger(__name__).warning("scenario %r could not be loaded (%s); it cannot be chosen", name,
                                            describe(e))

    conf = builtin_conf_dir()
    for name, cls in registry.loadable(broken).items():
        node = OmegaConf.structured(cls.Options)
        node.name = name  # the composed config says which scenario it is for
        cs.store(group="scenario/schema", name=name, node=node, package="scenario", provider=registry.group)
        if not (conf / f"{name}.yaml").is_file():
            cs.store(group="scenario", name=name, node=node, package="scenario", provider=registry.group)
