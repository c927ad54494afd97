"""``hydra/launcher=submitit_slurm`` as this project runs it: hydra-submitit-launcher's SLURM launcher (every option
of it, one sbatch array task per job) with two changes.

- In its array task each job runs in a fresh process of its own (``_remote.run_isolated``, the machinery of
  ``hydra/launcher=isolated``): the run records ``process.isolated=true`` and ``process_startup_s`` like any isolated
  job, and SLURM's SIGTERM (``scancel``, time limit) reaches the job — passed on by the launching process too
  (``_remote.wait_passing_sigterm``) — which ends its run KILLED with what it measured.
- A job SLURM ends before it returns (cancelled while pending, killed after ``KillWait``, node failure) no longer
  stops the sweep with submitit's ``UncompletedJobError``: it is recorded KILLED/FAILED in MLflow and in its
  ``results.json`` (``_remote.record_lost_job``), the sweep waits for the other jobs and writes its summary, and
  ``orchestrator`` exits 1. Finding out needs SLURM accounting (sacct): without it submitit cannot tell a cancelled
  job from a pending one and waits forever.

``conf/hydra/launcher/submitit_slurm.yaml`` selects this class: the primary config dir comes before the plugin's
structured configs in Hydra's search path, and Hydra merges the plugin's schema of the same name into that file (its
"automatic schema matching", with a deprecation warning that :data:`SCHEMA_WARNING` silences; hydra-core is pinned).
"""

import logging
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides, setup_globals
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

SCHEMA_WARNING = r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema"
INSTALL = "pip install -e '.[launchers]'"

try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
except ImportError:  # the plugin is optional: selecting the launcher then says what to install
    _SubmititSlurmLauncher = None

if _SubmititSlurmLauncher is not None:
    class SlurmLauncher(_SubmititSlurmLauncher):
        # -- in the array task ------------------------------------------------------------------------------------
        def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                     singleton_state: Dict[type, Singleton]) -> JobReturn:
            import submitit

            from . import _remote

            assert self.hydra_context is not None and self.config is not None and self.task_function is not None
            Singleton.set_state(singleton_state)
            setup_globals()
            warnings.filterwarnings("ignore", message=SCHEMA_WARNING)
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
                sweep_config.hydra.job.num = job_num
            payload = _remote.job_payload(self.hydra_context, self.task_function, sweep_config)
            ret, reason = _remote.run_isolated(payload, Path(str(sweep_config.hydra.sweep.dir)))
            if ret is not None:
                return ret
            return _remote.record_lost_job(sweep_config, job_num, sweep_overrides, "FAILED", reason)

        # -- in the sweep process ---------------------------------------------------------------------------------
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit
            from submitit.core.utils import FailedJobError, UncompletedJobError

            from . import _remote

            assert self.config is not None and len(job_overrides) > 0
            params = dict(self.params)
            init = {"folder": params.pop("submitit_folder")}
            if "max_num_timeout" in params:
                init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
            common = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in common else f"{self._EXECUTOR}_{k}": v
                                          for k, v in params.items()})
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
            args = []
            for i, overrides in enumerate(job_overrides):
                idx = initial_job_idx + i
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            jobs = executor.map_array(self, *zip(*args))
            log.info("SLURM job %s: %d array task(s)", jobs[0].job_id.split("_")[0], len(jobs))
            configs = None
            returns: List[JobReturn] = []
            for (overrides, _, idx, _, _), job in zip(args, jobs):
                try:
                    returns.append(job.results()[0])
                    continue
                except UncompletedJobError:
                    state = str(job.state)
                    status = _remote.lost_status(state)
                    reason = f"SLURM job {job.job_id} ended {state} before the job returned"
                except FailedJobError as e:  # the task itself raised outside the job (rare: composition)
                    status, reason = "FAILED", f"SLURM job {job.job_id} failed: {_last_line(str(e))}"
                if configs is None:
                    warnings.filterwarnings("ignore", message=SCHEMA_WARNING)
                    configs = _remote.sweep_configs(self, job_overrides, initial_job_idx)
                returns.append(_remote.record_lost_job(configs[idx - initial_job_idx], idx, overrides, status,
                                                       reason))
            return returns

    def _last_line(text: str) -> str:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1][:300] if lines else text[:300]
else:
    class SlurmLauncher:  # type: ignore[no-redef]
        def __init__(self, **_: Any) -> None:
            from orchestrator.errors import ConfigError

            raise ConfigError(f"hydra/launcher=submitit_slurm needs hydra-submitit-launcher: {INSTALL}")

