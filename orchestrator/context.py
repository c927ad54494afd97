"""Who a run is: its folder, job number, the sweep it belongs to. Built once at the edge, passed in.

``run(cfg, ctx)`` takes a :class:`JobContext`; it never reads Hydra's global config, environment variables or files
of the sweep folder itself. The edge — the Hydra task function in a job's process — builds it with
:meth:`JobContext.from_hydra`, the one place that reads how a sweep process tells its jobs who they are:

- the parent MLflow run id and the keys the sweep varies, from the environment the sweep process set
  (local, joblib/loky and submitit workers inherit it; the cluster launchers forward it), else from the files the
  sweep callback wrote into the sweep folder (jobs started without that environment, e.g. ``--export=NONE``);
- the job's folder, number, overrides and config-group choices, from Hydra's config of this job.

From Python, ``JobContext()`` (or ``JobContext(run_dir=...)``) is a single run with a fresh folder under
``outputs/runs``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from .records import PARENT_RUN_FILE, SWEPT_KEYS_FILE, override_values

PARENT_RUN_ENV = "ORCH_PARENT_RUN_ID"  # set by the sweep callback: the sweep's parent run
SWEPT_KEYS_ENV = "ORCH_SWEPT_KEYS"  # set by the sweep callback: the keys its sweep varies

# MLflow's runs list shows ~18 characters of a name: the keys swept most often get short names there
SHORT_KEYS = {"runtime.batch_size": "bs", "runtime.max_length": "len", "runtime.pad_to_multiple_of": "pad",
              "dataset.max_samples": "n", "model.name_or_path": "model", "dataset.data_files": "data"}
# what a run name says anyway (stack, precision, model, data): not repeated as a swept value
_NAMED_ANYWAY = ("optimization", "precision", "model", "dataset")


@dataclass(frozen=True)
class JobContext:
    run_dir: Optional[Path] = None  # None: a fresh folder under outputs/runs
    job_num: Optional[int] = None  # set for a job of a multirun sweep
    sweep_dir: Optional[Path] = None
    parent_run_id: Optional[str] = None  # the sweep's MLflow parent run
    swept_keys: Tuple[str, ...] = ()  # the keys the sweep varies
    overrides: Tuple[str, ...] = ()  # this job's command-line overrides
    choices: Mapping[str, str] = field(default_factory=dict)  # config-group choices (model=..., dataset=...)
    race: Any = None  # this job's race worker (orchestrator.race) when its launcher races the sweep's jobs

    @property
    def in_sweep(self) -> bool:
        return self.job_num is not None

    def with_run_dir(self) -> "JobContext":
        """This context with its run folder decided (a fresh, unique one for a run outside Hydra)."""
        if self.run_dir is not None:
            return self
        return replace(self, run_dir=Path("outputs/runs") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f"))

    def swept_values(self) -> Dict[str, str]:
        """This job's values of the keys its sweep varies, by short name (the key's last part unless two share it),
        leaving out what the run name says anyway (stack, precision, model, data)."""
        if not self.in_sweep:
            return {}
        given = override_values(self.overrides)
        keys = [k.lstrip("+~") for k in self.swept_keys]
        keys = [k for k in keys if k not in _NAMED_ANYWAY and k in given]
        last = [SHORT_KEYS.get(k, k.rsplit(".", 1)[-1]) for k in keys]
        # a path's last part tells swept models or files apart; the whole path is in the tag overrides
        value = {k: Path(given[k].rstrip("/")).name if "/" in given[k] else given[k] for k in keys}
        return {(short if last.count(short) == 1 else k): value[k] for k, short in zip(keys, last)}

    @classmethod
    def from_hydra(cls, race: Any = None) -> "JobContext":
        """The context of the job Hydra is running in this process (a plain JobContext outside Hydra)."""
        try:
            from hydra.core.hydra_config import HydraConfig

            hc = HydraConfig.get()
        except (ImportError, ValueError):
            return cls(race=race)
        from omegaconf import OmegaConf

        from .errors import ConfigError

        if hc.job.get("chdir"):
            # relative paths (the default sqlite store, data files, models) are meant against where the command ran
            raise ConfigError("hydra.job.chdir=true: not supported; runs resolve relative paths against the folder "
                              "the command ran in (with chdir the default MLflow store would move into each run "
                              "folder); leave it false")
        overrides = tuple(str(o) for o in hc.overrides.task)
        output_dir = OmegaConf.select(hc, "runtime.output_dir", default=None, throw_on_missing=False)
        ctx = cls(run_dir=Path(output_dir) if output_dir else None, overrides=overrides,
                  choices=dict(hc.runtime.choices), race=race)
        if hc.mode is None or hc.mode.name != "MULTIRUN":
            return ctx  # a single run never nests under a sweep, even one whose variables linger
        sweep_dir = Path(hc.runtime.cwd or ".", str(hc.sweep.dir))  # sweep.dir may be relative
        num = hc.job.get("num")
        return replace(ctx, job_num=int(num) if num is not None else None, sweep_dir=sweep_dir,
                       parent_run_id=_from_sweep(PARENT_RUN_ENV, sweep_dir / PARENT_RUN_FILE) or None,
                       swept_keys=tuple((_from_sweep(SWEPT_KEYS_ENV, sweep_dir / SWEPT_KEYS_FILE) or "").split()))


def _from_sweep(env: str, path: Path) -> Optional[str]:
    """What the sweep process said: its environment wins, else the file it wrote into the sweep folder."""
    value = os.environ.get(env)
    if value is not None:
        return value.strip()
    try:
        return path.read_text().strip() if path.is_file() else None
    except OSError:
        return None
