"""What the numbers were measured on: versions, CPU model and ISA, git SHA, threads."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, Iterator, List, Optional


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def cpu_info() -> Dict[str, str]:
    from . import cpu

    return cpu.tags()


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags() -> Dict[str, str]:
    tags = {f"version.{p}": pkg_version(p) for p in ("torch", "transformers", "datasets", "mlflow", "hydra-core")}
    tags["version.python"] = platform.python_version()
    ipex = pkg_version("intel-extension-for-pytorch")
    if ipex != "not installed":
        tags["version.ipex"] = ipex
    tags.update(cpu_info())
    tags["git_sha"] = git_sha()
    tags["host"] = platform.node()
    tags.update(thread_environment())
    return tags


# what decides how many cores the model's kernels use and where their threads sit
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY",
                    "KMP_BLOCKTIME", "ONEDNN_MAX_CPU_ISA", "LD_PRELOAD")


def available_cpus() -> List[int]:
    """The CPUs this process may run on (its affinity mask; all of them where the OS has no such call)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return list(range(os.cpu_count() or 1))


def thread_environment() -> Dict[str, str]:
    tags = {f"env.{k}": os.environ[k] for k in THREAD_VARIABLES if k in os.environ}
    cpus = available_cpus()
    tags["cpu.affinity"] = ",".join(map(str, cpus))
    tags["cpu.available"] = str(len(cpus))
    return tags


@contextlib.contextmanager
def ipex_fusions_for(stack: List[str]) -> Iterator[Optional[str]]:
    """Keep an earlier job's IPEX out of a run whose stack has no ``ipex``.

    Importing IPEX registers its TorchScript fusion passes for the whole process, so in a sequential sweep a plain
    ``jit`` job after an ``ipex`` job would silently run IPEX's fused kernels (measured: 30 -> 46 features/s on QA
    bf16) and no longer be plain jit. While the run lasts, the passes are switched off through IPEX's own switch
    (``enable_onednn_fusion(False)``) and the process's previous state comes back afterwards. Never imports IPEX:
    nothing happens unless it is already loaded.

    Yields None when IPEX is not loaded or the stack uses it; "off" when its passes are off for this run;
    "unisolated" when this IPEX has no switch (the passes stay on: the caller warns).
    """
    core = sys.modules.get("intel_extension_for_pytorch._C")
    if "intel_extension_for_pytorch" not in sys.modules or "ipex" in stack:
        if core is not None and "ipex" in stack and hasattr(core, "enable_jit_opt"):
            core.enable_jit_opt()  # an ipex run gets IPEX's fusions even if something switched them off
        yield None
        return
    if core is None or not all(hasattr(core, f) for f in ("get_jit_opt", "enable_jit_opt", "disable_jit_opt")):
        yield "unisolated"
        return
    was_on = bool(core.get_jit_opt())
    core.disable_jit_opt()
    try:
        yield "off"
    finally:
        if was_on:
            core.enable_jit_opt()
