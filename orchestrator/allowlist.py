"""What a composed config may make Hydra instantiate or execute: the project's own launchers, sweeper and callback
(and Hydra's basic ones and the launcher plugins the project supports), the standard library's logging classes,
nothing else; options that name something to execute come from the command line only.

A preset shared as a file (``--config-dir ... experiment=shared``) or a config dir is data a user did not write.
Hydra instantiates ``hydra.launcher``, ``hydra.sweeper`` and each ``hydra.callbacks.<name>`` *recursively* (a
``_target_`` anywhere in their options is called: ``hydra.launcher.env.x: {_target_: shutil.copyfile, ...}``), hands
``hydra.*_logging`` to ``logging.config.dictConfig`` (a handler ``class`` or ``()`` factory is called, a file
handler's ``filename`` is opened), and the launchers run what ``hydra.launcher.python`` names. :func:`check_config`
runs on every config Hydra composes (installed by :mod:`orchestrator.hydra_patches`) and refuses, in one line naming
the key and the value (exit 2, nothing run):

- a ``_target_`` that is not in :data:`TARGETS` for its place (``hydra.launcher``, ``hydra.sweeper``,
  ``hydra.callbacks.<name>``), and any other ``_target_`` anywhere in the config;
- a logging ``class``/``()`` that is not a handler, formatter or filter class of the ``logging`` package;
- a value of an option that executes something (:func:`executes`) unless the command line gave that value:
  the interpreter of a launcher, shell setup lines, a Ray runtime environment, environment variables other than
  thread/ISA tuning ones, a log file outside the run's folder, ``model.trust_remote_code=true``;
- ``hydra.overrides`` written by a config (Hydra re-applies it to every sweep job as if typed), and
  ``hydra.sweeper.params`` entries (from a config) that sweep such options or carry a ``_target_``.

The allowlist is extended by an environment variable, not a config key, on purpose: a preset must not be able to
allow itself.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from .errors import ConfigError

ENV = "ORCH_ALLOWED_TARGETS"
_OWN = "hydra_plugins.orchestrator_launcher"
# the one table: every class a composed config may name, and the one place it may name it
TARGETS: Dict[str, str] = {
    "orchestrator.sweep.MlflowSweepCallback": "callback",
    f"{_OWN}.isolated_launcher.IsolatedLauncher": "launcher",
    f"{_OWN}.ray_launcher.RayLauncher": "launcher",
    f"{_OWN}.slurm_launcher.SlurmLauncher": "launcher",
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher": "launcher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher": "launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": "launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": "launcher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper": "sweeper",
}
OWN_CALLBACKS = frozenset(t for t, role in TARGETS.items() if role == "callback")
# environment variables a config may set for jobs (hydra.launcher.env, hydra.job.env_set): thread and ISA tuning.
# Others can load code (LD_PRELOAD, PYTHONPATH, CC/CXX for inductor, cache folders) and come from the command line.
TUNING_ENV = re.compile(r"^(OMP|KMP|GOMP|MKL|ONEDNN|DNNL|OPENBLAS|NUMEXPR)_[A-Z0-9_]+$|^TOKENIZERS_PARALLELISM$")
# ray.init() arguments a config may set; the rest (runtime_env: pip installs, py_executable, setup hooks;
# job_config, _system_config, ...) come from the command line
RAY_INIT_SAFE = frozenset({"num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard",
                           "dashboard_host", "dashboard_port", "namespace", "ignore_reinit_error", "log_to_driver",
                           "logging_level", "configure_logging"})
EXT_STREAMS = frozenset({"ext://sys.stdout", "ext://sys.stderr"})
# a log file handler's filename a config may set: inside the run's own folder
LOG_DIR = "${hydra.runtime.output_dir}/"
_TIP = f"add a trusted one with {ENV}=<module.Name>"


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
    return ConfigError(f"{key}={value!r}: {what} is not allowed; allowed: {allowed} ({_TIP})")


def _allowed_text(role: str) -> str:
    return ", ".join(sorted({t for t, r in TARGETS.items() if r == role} | user_allowed()))


def _logging_text() -> str:
    return ", ".join(["logging handler/formatter/filter classes", *sorted(user_allowed())])


def _roles() -> Dict[str, str]:
    return {**TARGETS, **{t: "any" for t in user_allowed()}}


def _check_targets(node: Any, where: str, role: str) -> None:
    """``node._target_`` must be allowed as ``role``; a ``_target_`` further down is refused (Hydra would call it
    while instantiating ``node``), unless the user allowed that class."""
    roles, extra = _roles(), user_allowed()
    target = node.get("_target_") if isinstance(node, dict) else None
    if roles.get(target) not in (role, "any"):
        raise _refuse(f"{where}._target_", target, f"a {role} outside the allowlist", _allowed_text(role))
    rest = {k: v for k, v in node.items() if k != "_target_"}
    for key, k, v in _walk(rest, where):
        if k == "_target_" and v not in extra:
            raise ConfigError(f"{key}={v!r}: a nested _target_ is not allowed; only hydra.launcher, hydra.sweeper "
                              f"and hydra.callbacks.<name> name a class, from: {_allowed_text(role)} ({_TIP})")


def check_callbacks(callbacks: Any, where: str = "hydra.callbacks") -> None:
    """Each callback's ``_target_`` must be allowed, and nothing inside its arguments may instantiate more."""
    for name, params in (callbacks or {}).items():
        _check_targets(params if isinstance(params, dict) else {}, f"{where}.{name}", "callback")


def _is_logging_class(name: str) -> bool:
    """A handler, formatter or filter class of the logging package (not just any ``logging.*`` name:
    ``logging.config.listen`` would open a port that accepts configs)."""
    import importlib
    import logging

    module, _, attr = name.rpartition(".")
    if module not in ("logging", "logging.handlers"):
        return False
    obj = getattr(importlib.import_module(module), attr, None)
    return isinstance(obj, type) and issubclass(obj, (logging.Handler, logging.Formatter, logging.Filter))


def check_logging(conf: Any, where: str) -> None:
    """Handler/formatter/filter classes and ``()`` factories in a logging dictConfig: stdlib logging classes only."""
    allowed = user_allowed()
    for key, k, v in _walk(conf or {}, where):
        if k in ("()", "class") and isinstance(v, str) and not (_is_logging_class(v) or v in allowed):
            raise _refuse(key, v, f"a logging {'factory' if k == '()' else 'class'} outside the logging module",
                          _logging_text())
        if k == "()" and not isinstance(v, str):
            raise _refuse(key, v, "a logging factory that is not a name", _logging_text())
        # dictConfig imports whatever module an ext:// value names
        if isinstance(v, str) and v.startswith("ext://") and v not in EXT_STREAMS:
            raise _refuse(key, v, "an ext:// object other than a standard stream", ", ".join(sorted(EXT_STREAMS)))


def check_hydra(cfg: Any) -> None:
    """The targets and logging classes of a composed config's ``hydra`` node (no command-line provenance)."""
    from omegaconf import OmegaConf

    hydra = OmegaConf.to_container(cfg.hydra, resolve=False) if "hydra" in cfg else {}
    _check_hydra_targets(hydra)


def _check_hydra_targets(hydra: Dict[str, Any]) -> None:
    check_callbacks(hydra.get("callbacks"))
    for section, role in (("launcher", "launcher"), ("sweeper", "sweeper")):
        if hydra.get(section) is not None:
            _check_targets(hydra[section], f"hydra.{section}", role)
    extra = user_allowed()
    for section, node in hydra.items():
        if section in ("callbacks", "launcher", "sweeper"):
            continue
        if section in ("hydra_logging", "job_logging"):
            check_logging(node, f"hydra.{section}")
        for key, k, v in _walk(node, f"hydra.{section}"):
            if k == "_target_" and v not in extra:
                raise ConfigError(f"{key}={v!r}: a _target_ is not allowed here; only hydra.launcher, hydra.sweeper "
                                  f"and hydra.callbacks.<name> name a class ({_TIP})")


def _check_job_targets(job: Dict[str, Any]) -> None:
    # the same words as orchestrator.config's own check, which a run without this module still meets
    for key, k, v in _walk(job, ""):
        if k == "_target_":
            raise ConfigError(f"{key}={v!r}: _target_ is not accepted in user config; choose plugins and tasks by "
                              "name (optimization=[...], dataset.task=...)")


# -- options that execute something: their values come from the command line ------------------------------------------

def executes(key: str, value: Any) -> Optional[str]:
    """Why the option ``key`` (a dotted path in the composed config) set to ``value`` runs something, or None."""
    if value is None or value == {} or value == []:
        return None
    parts = key.split(".")
    if key in ("hydra.launcher.python", "hydra.launcher.setup"):
        return "names what the launcher executes"
    if key.startswith("hydra.launcher.init.") and len(parts) >= 4 and parts[3] not in RAY_INIT_SAFE:
        return "is a ray.init() argument that can install or run code"
    if (key.startswith("hydra.launcher.env.") or key.startswith("hydra.job.env_set.")) and len(parts) == 4:
        return None if TUNING_ENV.match(parts[3]) else \
            "is an environment variable for the jobs (only thread/ISA tuning ones, e.g. OMP_*, ONEDNN_*, may come " \
            "from a config)"
    if re.fullmatch(r"hydra\.(job|hydra)_logging\.handlers\.[^.]+\.filename", key):
        text = str(value)
        return None if text.startswith(LOG_DIR) and ".." not in text else "is a log file outside the run's folder"
    if key == "model.trust_remote_code" and value is True:
        return "runs code shipped with the checkpoint"
    return None


def _leaves(node: Any, path: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}")
    else:
        yield path, node


def _executing_options(cfg: Dict[str, Any]) -> Iterator[Tuple[str, Any, str]]:
    hydra = cfg.get("hydra") or {}
    roots = [("hydra.launcher", hydra.get("launcher")), ("hydra.job.env_set", (hydra.get("job") or {}).get("env_set")),
             ("hydra.job_logging", hydra.get("job_logging")), ("hydra.hydra_logging", hydra.get("hydra_logging")),
             ("model.trust_remote_code", (cfg.get("model") or {}).get("trust_remote_code"))]
    for root, node in roots:
        for key, value in _leaves(node, root):
            why = executes(key, value)
            if why:
                yield key, value, why


def _command_line(overrides: Sequence[str]) -> Dict[str, Any]:
    """dotted key -> value for every leaf the command-line overrides set (a dict value sets each of its leaves)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: Dict[str, Any] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        if o.is_delete() or o.is_sweep_override() or "/" in o.key_or_group:
            continue
        key = o.key_or_group if not o.package else f"{o.package}.{o.key_or_group}"
        out.update(dict(_leaves(o.value(), key)))
    return out


def _from_command_line(key: str, value: Any, given: Dict[str, Any]) -> bool:
    return key in given and given[key] == value


def _check_provenance(cfg: Dict[str, Any], overrides: Sequence[str]) -> None:
    hydra = cfg.get("hydra") or {}
    recorded = hydra.get("overrides") or {}
    if recorded and sorted([*(recorded.get("hydra") or []), *(recorded.get("task") or [])]) != sorted(overrides):
        # Hydra appends the command line to these lists and replays them for every sweep job: pre-filled by a
        # config, they would run as if typed
        extra = [o for o in [*(recorded.get("hydra") or []), *(recorded.get("task") or [])] if o not in overrides]
        raise ConfigError(f"hydra.overrides={extra!r}: set by a config; not allowed (Hydra fills it from the command "
                          "line)")
    given = _command_line(overrides)
    for key, value, why in _executing_options(cfg):
        if not _from_command_line(key, value, given):
            raise ConfigError(f"{key}={value!r}: {why}, so it is taken from the command line only, never from a "
                              f"preset or config file (give {key}=... on the command line)")
    params = (hydra.get("sweeper") or {}).get("params") or {}
    for name, values in params.items() if isinstance(params, dict) else ():
        key = str(name).lstrip("+~")
        if _from_command_line(f"hydra.sweeper.params.{name}", values, given):
            continue
        swept = [executes(key, v) for v in _sweep_values(values)]
        why = next((w for w in swept if w), None)
        if why is None and (key.startswith("hydra.overrides") or key.startswith("hydra.launcher.python")):
            why = "is an option a sweep must not change"
        if why is None and "_target_" in f"{name}{values}":
            why = "carries a _target_"
        if why:
            raise ConfigError(f"hydra.sweeper.params.{name}={values!r}: sweeps {key}, which {why}; not allowed from "
                              f"a preset or config file (sweep it on the command line: -m {key}=...)")


def _sweep_values(values: Any) -> List[Any]:
    """The values a sweeper ``params`` entry (``"a,b"``) expands to, parsed as the command line would."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        o = OverridesParser.create().parse_override(f"x={values}")
    except Exception:  # Hydra refuses it itself while sweeping
        return [values]
    return list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]


def check_config(cfg: Any, overrides: Sequence[str] = ()) -> None:
    """Every check of this module on a config Hydra composed from ``overrides`` (the command line, or for a sweep
    job the sweep's Hydra overrides and the job's own)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    hydra = container.get("hydra") or {}
    _check_hydra_targets(hydra)
    _check_job_targets({k: v for k, v in container.items() if k != "hydra"})
    _check_provenance(container, overrides)

