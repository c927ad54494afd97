"""Every change this project makes to Hydra's internals, in one place, checked against the Hydra it was written for.

Two private names of hydra-core 1.3.8 are replaced:

- ``hydra._internal.utils.run_and_report``: Hydra's error reporter (multi-line reports, tracebacks for errors raised
  inside the job) becomes the CLI's one-line reporter (``orchestrator.cli.report_error``).
- ``hydra._internal.config_loader_impl.ConfigLoaderImpl.load_configuration``: every config Hydra composes (the
  primary one, each sweep job's, ``--cfg``/``--info``) goes through :func:`orchestrator.allowlist.check_config`
  before Hydra instantiates, configures logging from, or launches anything in it.

Both are private, so :func:`problems` checks that each still exists with the parameters the replacement assumes;
on another hydra-core the patches refuse to install in one line when a name changed (a Hydra upgrade must not
silently drop the allowlist) and warn once when the version differs but the names still fit. tests/test_hydra_patches
fails when an upgrade breaks them.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Any, Callable, List, Optional, Tuple

from .errors import OrchestratorError

HYDRA_VERSION = "1.3.8"
PIN = f"pip install hydra-core=={HYDRA_VERSION}"

# (module, attribute path, the parameters the replacement is written against)
PATCHED: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("hydra._internal.utils", "run_and_report", ("func",)),
    ("hydra._internal.config_loader_impl", "ConfigLoaderImpl.load_configuration",
     ("self", "config_name", "overrides", "run_mode", "from_shell", "validate_sweep_overrides")),
)
_MARK = "_orch_patched"


class HydraPatchError(OrchestratorError):
    """The installed hydra-core no longer has a private name this project patches."""


def _lookup(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _original(fn: Any) -> Any:
    return getattr(fn, "__wrapped__", fn) if getattr(fn, _MARK, False) else fn


def problems() -> List[str]:
    """What does not match in the installed Hydra: a patched name missing or with other parameters."""
    out = []
    for module, path, params in PATCHED:
        try:
            fn = _original(_lookup(module, path))
        except (ImportError, AttributeError):
            out.append(f"{module}.{path} is gone")
            continue
        got = tuple(inspect.signature(fn).parameters)
        if got != params:
            out.append(f"{module}.{path}({', '.join(got)}) instead of ({', '.join(params)})")
    return out


def check_version() -> None:
    """Raise HydraPatchError when a patched name changed; warn once when only the version differs."""
    import hydra

    found = problems()
    if found:
        raise HydraPatchError(f"hydra-core {hydra.__version__}: the orchestrator patches private names of hydra-core "
                              f"{HYDRA_VERSION} that changed ({'; '.join(found)}); {PIN}")
    if hydra.__version__ != HYDRA_VERSION:
        warnings.warn(f"hydra-core {hydra.__version__} is not the tested {HYDRA_VERSION}: its private names the "
                      f"orchestrator patches still fit, but untested ({PIN})", stacklevel=2)


def _checked_load_configuration(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_configuration(self, config_name, overrides, run_mode, from_shell=True, validate_sweep_overrides=True):
        from . import allowlist

        cfg = original(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        allowlist.check_config(cfg, list(overrides))
        check_output_dir(cfg, run_mode)
        return cfg

    setattr(load_configuration, _MARK, True)
    return load_configuration


def check_output_dir(cfg: Any, run_mode: Any) -> None:
    """The run (or sweep) folder Hydra will create must be creatable: said with its key, before Hydra's own mkdir
    fails with a bare OSError naming no key. A sweep folder must also be free (records.refuse_taken_sweep_dir):
    checked here, before anything launches, because Hydra turns an exception in a sweep callback into a warning."""
    import os
    from pathlib import Path

    from omegaconf import OmegaConf

    from .errors import ConfigError

    key = "hydra.sweep.dir" if getattr(run_mode, "name", "") == "MULTIRUN" else "hydra.run.dir"
    try:
        value = OmegaConf.select(cfg, key, default=None)
    except Exception:  # an interpolation that only resolves later: Hydra reports it itself
        return
    if not value:
        return
    folder = Path(str(value)).expanduser().absolute()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    problem = None
    if existing is None or not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    elif existing.resolve().is_relative_to("/proc") or existing.resolve().is_relative_to("/sys"):
        problem = f"{existing} is a kernel file system"
    if problem:
        raise ConfigError(f"{key}={value}: the folder cannot be created there ({problem}); choose a writable folder")
    if key == "hydra.sweep.dir":
        from .records import refuse_changed_overrides, refuse_taken_sweep_dir

        resume = bool(OmegaConf.select(cfg, "resume", default=False))
        refuse_taken_sweep_dir(folder, resume)
        if resume:
            refuse_changed_overrides(folder, [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task",
                                                                                 default=[]) or []])


def install_checks() -> None:
    """Put :func:`orchestrator.allowlist.check_config` in front of everything Hydra composes (idempotent)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    check_version()
    current = ConfigLoaderImpl.load_configuration
    if not getattr(current, _MARK, False):
        ConfigLoaderImpl.load_configuration = _checked_load_configuration(current)


def install(report_error: Optional[Callable[[Any], Any]] = None) -> None:
    """All of the project's Hydra patches: the allowlist check on every composed config and, when given, the
    one-line error reporter in place of Hydra's ``run_and_report``."""
    import hydra._internal.utils as hydra_utils

    install_checks()
    if report_error is not None:
        hydra_utils.run_and_report = report_error
