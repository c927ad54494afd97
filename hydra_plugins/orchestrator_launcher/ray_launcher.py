"""``hydra/launcher=ray``: every job of a sweep as a Ray task, on a Ray cluster or on a private Ray instance here.

Over Ray's public API only (``ray.init``, ``ray.remote``, ``ray.get``). Each Ray task runs its job in a fresh
Python process of its own on the node Ray picked (``_remote.run_isolated``, the machinery of
``hydra/launcher=isolated``): a Ray worker is reused between tasks, so without that a job would inherit the state of
the jobs before it in that worker. The job records where it ran (``host``, ``cpu.*``, ``ray.node_id``).

- ``address: null`` (default): a private Ray instance on this machine, bound to 127.0.0.1 (single-node mode,
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), no dashboard, no usage stats; stopped when the sweep ends.
  ``address: host:port`` (the head's GCS address, as ``ray start --head`` prints it) or ``auto``: an existing cluster.
- ``num_cpus`` / ``memory_gb`` / ``resources``: what each job's task asks for. Ray runs as many tasks on a node as
  fit; a timing sweep must give each job a whole node: ``num_cpus`` = cores per node, or a custom resource every
  node has once (``ray start --resources='{"node": 1}'`` and ``+hydra.launcher.resources.node=1``).
- ``env``: extra environment for every job process. The launching process's ``ORCH_*`` and ``MLFLOW_*`` variables
  (tracking URI, the sweep's parent run id) are passed on as well: Ray workers do not inherit the driver's environment.
- ``init``: further ``ray.init`` keyword arguments (e.g. ``num_cpus`` of the private instance, ``namespace``).

A job whose task fails outside the job (the worker or node died) is recorded FAILED (``_remote.record_lost_job``)
and the sweep goes on to its summary. Jobs on other machines need a tracking server (``tracking=server``).
"""
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

from ._remote import SweepLauncher

log = logging.getLogger(__name__)
INSTALL = "pip install -e '.[ray]'"


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.orchestrator_launcher.ray_launcher.RayLauncher"
    # null: a private Ray instance on 127.0.0.1 for this sweep; "host:port" or "auto": an existing cluster
    address: Optional[str] = None
    # what each job's Ray task asks for (timing sweeps: a whole node per job)
    num_cpus: float = 1
    memory_gb: Optional[float] = None
    resources: Dict[str, float] = field(default_factory=dict)
    # extra environment for every job process
    env: Dict[str, str] = field(default_factory=dict)
    # further ray.init() keyword arguments
    init: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf,
                             provider="cpu-inference-orchestrator")


def _ray_job(payload: bytes, work_dir: str, env: Dict[str, str]) -> Any:
    """The Ray task: run one job in a fresh process on this node; (JobReturn or None, reason)."""
    import ray

    from . import _remote

    ctx = ray.get_runtime_context()
    env = {**env, "ORCH_RAY_NODE_ID": ctx.get_node_id(), "ORCH_RAY_TASK_ID": ctx.get_task_id() or ""}
    return _remote.run_isolated(payload, Path(work_dir), env)


class RayLauncher(SweepLauncher):
    def __init__(self, address: Optional[str] = None, num_cpus: float = 1, memory_gb: Optional[float] = None,
                 resources: Optional[Dict[str, float]] = None, env: Optional[Dict[str, str]] = None,
                 init: Optional[Dict[str, Any]] = None) -> None:
        self.address = str(address) if address not in (None, "") else None
        self.num_cpus = float(num_cpus)
        self.memory_gb = memory_gb
        self.resources = {str(k): float(v) for k, v in _plain(resources).items()}
        self.env = {str(k): str(v) for k, v in _plain(env).items()}
        self.init = _plain(init)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from orchestrator.errors import ConfigError, first_line

        from . import _remote

        sweep_dir = self.start_sweep()
        configs = _remote.sweep_configs(self, job_overrides, initial_job_idx)
        ray = self._connect()
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            log.info("Ray: %d node(s), %g CPUs; each job asks for %g CPU(s)%s", len(ray.nodes()), cpus,
                     self.num_cpus, f" and {self.resources}" if self.resources else "")
            if self.num_cpus > cpus:
                raise ConfigError(f"hydra.launcher.num_cpus={self.num_cpus:g}: the Ray cluster has {cpus:g} CPUs; "
                                  "no job could ever be scheduled")
            options: Dict[str, Any] = {"num_cpus": self.num_cpus, "max_retries": 0}
            if self.resources:
                options["resources"] = self.resources
            if self.memory_gb:
                options["memory"] = int(float(self.memory_gb) * 2**30)
            task = ray.remote(_ray_job).options(**options)
            env = {**_remote.forwarded_env(), **self.env}
            refs = []
            for i, (overrides, cfg) in enumerate(zip(job_overrides, configs)):
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
                payload = _remote.job_payload(self.hydra_context, self.task_function, cfg)
                refs.append(task.remote(payload, str(sweep_dir.resolve()), env))
            returns: List[JobReturn] = []
            for i, (ref, overrides, cfg) in enumerate(zip(refs, job_overrides, configs)):
                idx = initial_job_idx + i
                try:
                    ret, reason = ray.get(ref)
                except ray.exceptions.RayError as e:
                    ret, reason = None, f"its Ray task failed ({type(e).__name__}: {first_line(e)})"
                returns.append(ret if ret is not None else
                               _remote.record_lost_job(cfg, idx, list(overrides), "FAILED", reason))
            return returns
        finally:
            if self.address is None:
                ray.shutdown()

    def _connect(self) -> Any:
        """ray.init: a private loopback instance (address null) or the named cluster; one line when it fails."""
        from orchestrator.errors import ConfigError, first_line

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address is None or _loopback(self.address):
            # read by Ray at import: single-node mode, every listener on (and every address resolved to) 127.0.0.1;
            # without it Ray rewrites 127.0.0.1:port to this machine's outward address and waits there forever
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError as e:
            raise ConfigError(f"hydra/launcher=ray needs Ray: {INSTALL}") from e
        kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, **self.init}
        if self.address is None:
            kwargs.update(address="local", _node_ip_address="127.0.0.1")
            where = "a private Ray instance on 127.0.0.1"
        else:
            _check_reachable(self.address)
            kwargs["address"] = self.address
            for local_only in ("num_cpus", "num_gpus", "resources", "object_store_memory", "_node_ip_address",
                               "include_dashboard"):
                kwargs.pop(local_only, None)  # Ray refuses these when it joins a running cluster
            where = f"the Ray cluster at {self.address}"
        try:
            ray.init(**kwargs)
        except Exception as e:
            raise ConfigError(f"hydra/launcher=ray: could not start/connect to {where}: "
                              f"{type(e).__name__}: {first_line(e)}") from e
        log.info("Ray: jobs run on %s", where)
        return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A host:port that does not answer is one clear line, not Ray's minute of retries."""
    from orchestrator.errors import ConfigError

    if address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"hydra.launcher.address={address}: no Ray cluster answers there "
                          f"({getattr(e, 'strerror', None) or e}); start one with `ray start --head` or use "
                          "address=null for a private instance") from e


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    return host in ("localhost", "::1") or host.startswith("127.")


def _plain(value: Any) -> Dict[str, Any]:
    if value is None:
        return {}
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    return dict(value)
