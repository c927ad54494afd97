"""What a composed config may make Hydra call: only the project's own callbacks and the standard library's logging
classes, unless the user names more in ``ORCH_ALLOWED_TARGETS``.

The run's own config refuses ``_target_`` (orchestrator/config.py). Hydra's own section is another way in: a preset
shared as a file (``--config-dir ... experiment=shared``) or a command line can set
``hydra.callbacks.x._target_=builtins.open`` with ``_args_``, and Hydra instantiates it before the run starts; a
``hydra.job_logging``/``hydra_logging`` dict can name any callable as a handler ``class`` or a ``()`` factory, which
``logging.config.dictConfig`` calls. This module checks those sections before Hydra uses them and refuses anything
else in one line (exit 2), naming the key, the value and how to allow it.

The allowlist is an environment variable, not a config key, on purpose: a preset must not be able to allow itself.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Set, Tuple

from .errors import ConfigError

ENV = "ORCH_ALLOWED_TARGETS"
OWN_CALLBACKS = frozenset({"orchestrator.sweep.MlflowSweepCallback"})
# logging.config.dictConfig resolves these itself; the stdlib's handlers/formatters/filters are what Hydra ships
LOGGING_PREFIXES = ("logging.",)


def user_allowed() -> Set[str]:
    return {t.strip() for t in os.environ.get(ENV, "").split(",") if t.strip()}


def _walk(node: Any, path: str) -> Iterator[Tuple[str, str, Any]]:
    """(dotted key, key, value) for every entry of nested dicts/lists."""
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            yield key, str(k), v
            yield from _walk(v, key)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _refuse(key: str, value: Any, what: str, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {what} is not allowed; allowed: {allowed} (add a trusted one with "
                       f"{ENV}=<module.Name>)")


def _callbacks_text() -> str:
    return ", ".join(sorted(OWN_CALLBACKS | user_allowed()))


def _logging_text() -> str:
    return ", ".join(["logging.*", *sorted(user_allowed())])


def check_callbacks(callbacks: Any, where: str = "hydra.callbacks") -> None:
    """Each callback's ``_target_`` must be allowed, and nothing inside its arguments may instantiate more."""
    allowed = OWN_CALLBACKS | user_allowed()
    for name, params in (callbacks or {}).items():
        target = (params or {}).get("_target_") if isinstance(params, dict) else None
        if target not in allowed:
            raise _refuse(f"{where}.{name}._target_", target, "a callback outside the allowlist", _callbacks_text())
        for key, k, v in _walk({kk: vv for kk, vv in params.items() if kk != "_target_"}, f"{where}.{name}"):
            if k == "_target_" and v not in allowed:
                raise _refuse(key, v, "a nested _target_", _callbacks_text())


def check_logging(conf: Any, where: str) -> None:
    """Handler/formatter/filter classes and ``()`` factories in a logging dictConfig: stdlib logging only."""
    allowed = user_allowed()
    for key, k, v in _walk(conf or {}, where):
        if k in ("()", "class") and isinstance(v, str) and not (v.startswith(LOGGING_PREFIXES) or v in allowed):
            raise _refuse(key, v, f"a logging {'factory' if k == '()' else 'class'} outside the logging module",
                          _logging_text())
        if k == "()" and not isinstance(v, str):
            raise _refuse(key, v, "a logging factory that is not a name", _logging_text())


def check_hydra(cfg: Any) -> None:
    """Every section of a composed config's ``hydra`` node that Hydra instantiates or hands to dictConfig."""
    from omegaconf import OmegaConf

    hydra = OmegaConf.to_container(cfg.hydra, resolve=False) if "hydra" in cfg else {}
    check_callbacks(hydra.get("callbacks"))
    for section in ("hydra_logging", "job_logging"):
        check_logging(hydra.get(section), f"hydra.{section}")


def install() -> None:
    """Put the checks in front of Hydra (hydra-core is pinned to 1.3.8): before the hydra_logging dictConfig that
    composing applies, and before the callbacks are instantiated (run and multirun)."""
    import hydra._internal.callbacks as hydra_callbacks
    import hydra._internal.hydra as hydra_internal

    if getattr(hydra_callbacks.Callbacks, "_orch_checked", False):
        return
    original_init = hydra_callbacks.Callbacks.__init__
    original_configure = hydra_internal.configure_log

    def checked_init(self, config=None):
        if config is not None:
            check_hydra(config)
        original_init(self, config)

    def checked_configure(log_config, verbose_config=False):
        from omegaconf import OmegaConf

        conf = OmegaConf.to_container(log_config, resolve=False) if log_config is not None else None
        check_logging(conf, "hydra.hydra_logging")
        return original_configure(log_config, verbose_config)

    hydra_callbacks.Callbacks.__init__ = checked_init
    hydra_callbacks.Callbacks._orch_checked = True
    hydra_internal.configure_log = checked_configure
