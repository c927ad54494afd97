"""The ``orchestrator`` command: Hydra composes the config, :func:`orchestrator.runner.run` does the work.

Errors end in one line (``error: ...``) naming the bad key/value and what is valid. Hydra prints multi-line
reports (and tracebacks for errors raised inside the job), so its reporter is replaced by :func:`report_error`;
``HYDRA_FULL_ERROR=1`` still gives the full traceback.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from . import hydra_patches
from .config import register_configs
from .errors import OrchestratorError, describe, first_line
from .interrupts import DoubleInterrupt, restore_sigint

# the repository's conf/, shipped inside the package (orchestrator/conf links to it in a checkout)
CONF_DIR = str(Path(__file__).parent / "conf")
log = logging.getLogger("orchestrator")


def _valid_keys(object_type: Any) -> Optional[str]:
    fields = getattr(object_type, "__dataclass_fields__", None)
    return ", ".join(fields) if fields else None


def one_line(ex: BaseException) -> str:
    """A single line for any error Hydra, OmegaConf or the run can raise."""
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(ex, OrchestratorError):
        return str(ex)
    m = re.search(r"Could not (?:find|load) '([^']+)/([^'/]+)'", str(ex))
    if m and isinstance(ex, (MissingConfigException, ConfigCompositionException)):
        group, choice = m.groups()
        options = getattr(ex, "options", None) or group_options(group)
        return f"{group}={choice}: unknown choice; valid: {', '.join(options) or '(none)'}"
    cause = ex.__cause__ if isinstance(ex.__cause__, OmegaConfBaseException) else None
    if cause is None and isinstance(ex, ConfigCompositionException) and isinstance(ex.__context__,
                                                                                   OmegaConfBaseException):
        # "In 'experiment/x': ValidationError raised while composing config:" and the reason on the next line
        where = re.match(r"In '([^']+)'", str(ex))
        return (f"in {where.group(1)}: " if where else "") + one_line(ex.__context__)
    if isinstance(ex, OmegaConfBaseException) and cause is None:
        cause = ex
    if cause is not None:
        key = getattr(cause, "full_key", None) or ""
        msg = first_line(cause)
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key:
            valid = _valid_keys(getattr(cause, "object_type", None))
            return f"{key}: unknown key" + (f"; valid keys here: {valid}" if valid else f" ({msg})")
        return f"{key}: {msg}" if key and key not in msg else msg
    return describe(ex)


def group_options(group: str) -> list:
    """A config group's choices: YAML files in conf/ and schemas in the ConfigStore (e.g. installed plugins)."""
    from hydra.core.config_store import ConfigStore

    names = {p.stem for p in Path(CONF_DIR, group).glob("*.yaml")}
    try:
        names |= {Path(n).stem for n in ConfigStore.instance().list(group)}
    except (OSError, KeyError, IOError):  # the group has no schema entries
        pass
    return sorted(names)


def report_error(func: Any) -> Any:
    """Drop-in for hydra._internal.utils.run_and_report: one line on stderr, exit 2 (user error) or 1."""
    try:
        return func()
    except Exception as ex:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stderr.write(f"error: {one_line(ex)}\n")
        sys.exit(exit_code(ex))


def exit_code(ex: BaseException) -> int:
    """2 for input the user can fix (config, data, model, plugin choice); an error's own ``exit_status`` where it
    has one (a measured failure 1, SIGTERM 143); 1 for anything else."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, OrchestratorError):
        return int(ex.exit_status)
    yaml = sys.modules.get("yaml")  # a config file with broken YAML syntax is input the user can fix
    if yaml is not None and isinstance(ex, yaml.YAMLError):
        return 2
    return 2 if isinstance(ex, (HydraException, OmegaConfBaseException)) else 1


_interrupts = DoubleInterrupt()


def _race_worker():
    """This job's race worker when its launcher races the sweep's jobs (orchestrator/race.py), else None."""
    try:
        from .race import worker_from_env
    except ImportError:  # a checkout without racing
        return None
    return worker_from_env()


def _task(cfg: DictConfig) -> Any:
    """The edge: who this job is (JobContext, built once here from Hydra), then the plain ``run(cfg, ctx)``."""
    from .context import JobContext

    ctx = JobContext()
    try:
        ctx = JobContext.from_hydra(race=_race_worker())
        config = cfg
        if not ctx.in_sweep:  # a bad value is refused before torch loads; a sweep's job records its refusal
            from .config import check_values, to_run_config

            config = to_run_config(cfg)
            check_values(config)
        from .runner import run

        results = run(config, ctx)
        if results.get("tracking_error") and not ctx.in_sweep:
            # tracking was asked for: a run that could not be recorded must not look like one that was
            run_dir = results.get("run_dir")
            sys.stderr.write(f"error: MLflow tracking failed ({results['tracking_error']}); the run "
                             f"{results.get('status')} untracked, its results are in {run_dir}/results.json "
                             f"(orchestrator-import {run_dir} puts them into MLflow)\n")
            sys.exit(1)
        return results
    except (Exception, KeyboardInterrupt) as ex:
        if not ctx.in_sweep:
            if isinstance(ex, KeyboardInterrupt) or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            # report here: letting it reach Hydra adds its own "Error executing job with overrides" line
            sys.stderr.write(f"error: {one_line(ex)}\n")
            sys.exit(exit_code(ex))
        if isinstance(ex, KeyboardInterrupt) and _interrupts.press():
            raise  # the second of a double Ctrl-C: stop the sweep
        # Hydra's sweeper re-raises a job's exception after the batch, which would skip the sweep summary:
        # report the failure (its MLflow run is already FAILED/KILLED) and let the sweep go on.
        reason = one_line(ex) if not isinstance(ex, KeyboardInterrupt) else "interrupted (Ctrl-C)"
        log.error("job %s failed: %s", ctx.job_num, reason)
        return {"status": "FAILED", "error": reason}


def main() -> None:
    restore_sigint()  # started with SIGINT ignored (nohup, a backgrounded script), kill -INT must still stop it
    register_configs()
    # every composed config through the allowlist, and one-line errors: all Hydra patches, version-checked, in
    # orchestrator/hydra_patches.py
    try:
        hydra_patches.install(report_error)
    except hydra_patches.HydraPatchError as e:  # a Hydra upgrade broke a patched private name: say which
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    # conf/hydra/launcher/submitit_slurm.yaml extends the submitit plugin's schema of the same name on purpose
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore")
    app = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(_task)
    from . import sweep

    try:
        app()
    except ValueError as e:  # Hydra checks its own flags outside run_and_report (e.g. -m together with --info)
        if "HYDRA_FULL_ERROR" in os.environ or not str(e).startswith("Only one of"):
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _stopped("Ctrl-C", 130)
    except SystemExit as e:
        # the isolated launcher stops a sweep on SIGTERM with 128 + 15, which skips on_multirun_end; other exits
        # (an error already reported in its one line) pass
        if not sweep.sweep_under_way() or e.code != 128 + signal.SIGTERM:
            raise
        _stopped("SIGTERM", e.code)

    outcome = sweep.take_outcome()
    if outcome is None:  # a single run: its own exit status was decided in _task
        return
    if outcome.failed_jobs:
        sys.stderr.write(f"error: {outcome.failed_jobs} sweep job(s) did not finish; see the summary above\n")
        sys.exit(1)
    if outcome.unasked_fallbacks:
        jobs = ", ".join(map(str, outcome.unasked_fallbacks))
        sys.stderr.write(f"error: sweep job(s) {jobs} fell back to a smaller stack (column 'fell back'); give "
                         "runtime.on_plugin_error=fallback on the command line to accept fallbacks\n")
        sys.exit(1)
    if outcome.store_error or outcome.untracked_jobs:
        jobs = ", ".join(map(str, outcome.untracked_jobs)) or "none"
        sys.stderr.write(f"error: MLflow tracking failed ({outcome.store_error or 'see the log'}); jobs missing "
                         f"from MLflow in whole or in part: {jobs}; their results.json are in {outcome.sweep_dir} "
                         f"(orchestrator-import {outcome.sweep_dir} puts the sweep into MLflow)\n")
        sys.exit(1)


def _stopped(reason: str, code: int) -> None:
    """Stopped from outside: the partial summary of a sweep's jobs that ran, then one line and ``code``."""
    from . import sweep

    try:
        summary = sweep.stop_current(f"the sweep was stopped ({reason})")
    except KeyboardInterrupt:  # a further Ctrl-C while summarizing: stop now
        summary = None
    except Exception as e:
        log.error("partial sweep summary failed: %s", describe(e))
        summary = None
    if summary is not None:
        sys.stderr.write(f"error: sweep stopped ({reason}) after {len(summary['rows'])} job(s), summarized above; "
                         "the same command with resume=true runs the rest\n")
    else:
        sys.stderr.write(f"error: interrupted ({reason}); a run under way ends KILLED with what it measured\n")
    sys.exit(code)
