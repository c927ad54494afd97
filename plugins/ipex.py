"""Intel Extension for PyTorch: ``ipex.optimize`` (fp32/bf16) or ``ipex.quantization`` (int8), in place of
Trainer's removed ``--use_ipex``.

IPEX 2.8.0 is the last release and works only with torch 2.8.x (and transformers <= 5.23), so it runs in a second
environment (requirements/ipex.txt, docs/ipex.md). ``check`` reads the installed versions with
``importlib.metadata`` and refuses in one line *before* anything imports IPEX: on the wrong torch, IPEX's own import
prints an error and raises AttributeError, not ImportError. ``apply`` imports IPEX with file descriptor 2 redirected
(its .so prints C++ kernel-registration warnings straight to fd 2, and a logging line about CUDA), and replays what
it captured in the error if the import fails.

Precision (the runner applies it before the stack):

- ``fp32``: ``ipex.optimize(dtype=float32)``.
- ``bf16_autocast`` (IPEX's own recipe): fp32 weights come in, ``ipex.optimize(dtype=bfloat16)`` casts and prepacks
  the Linear weights in bf16, the forward runs under the runner's ``torch.autocast``. With ``jit`` after ``ipex``,
  the jit plugin traces under autocast and freezes: optimize -> trace(autocast) -> freeze -> 2 warm-up calls.
- ``bf16``: weights (LayerNorm included) were already cast by ``model.to(bfloat16)``; ``ipex.optimize(dtype=bfloat16)``
  still fuses and prepacks, no autocast. Works; parity is the same as bf16_autocast's on the models tested.
- ``int8`` (option): dynamic or static quantization of an fp32 model (precision=fp32 only); static calibrates on
  ``ctx.calibration_batches`` (filled by the runner) or, failing that, on the example batch.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import List, Optional, Tuple

from orchestrator.plugin_api import STAGE_PREPARE, Plugin, PluginContext, first_line, stack_label

log = logging.getLogger(__name__)

IPEX_MODULE = "intel_extension_for_pytorch"
# what ``check`` tells a user in the main environment (README commands, also in docs/ipex.md)
SETUP_HINT = ("set up the IPEX environment: python -m venv .venv-ipex && .venv-ipex/bin/pip install -r "
              "requirements/ipex.txt && .venv-ipex/bin/pip install --no-deps -e . (docs/ipex.md)")
class Level(StrEnum):
    O0 = "O0"
    O1 = "O1"


class Dtype(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"


class Int8(StrEnum):
    none = "none"
    dynamic = "dynamic"
    static = "static"


@dataclass
class IpexOptions:
    # ipex.optimize level: O1 fuses and prepacks weights (IPEX's default); O0 only casts to dtype
    level: Level = Level.O1
    # auto: from precision (fp32 -> float32; bf16 or bf16_autocast -> bfloat16); an explicit value must agree with it
    dtype: Dtype = Dtype.auto
    # none | dynamic | static: int8 through ipex.quantization instead of ipex.optimize (needs precision=fp32)
    int8: Int8 = Int8.none
    # static int8: how many batches calibrate the activation observers
    calibration_batches: int = 8
    # ipex.optimize knobs; null = IPEX's default for the level
    weights_prepack: Optional[bool] = None
    auto_kernel_selection: Optional[bool] = None
    concat_linear: Optional[bool] = None
    # false: IPEX works on a copy (its default); true: rewrites the loaded model, saving one model's memory
    inplace: bool = False


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _major_minor(version: Optional[str]) -> Optional[Tuple[int, int]]:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def environment_problem() -> Optional[str]:
    """None when torch/transformers/IPEX are versions IPEX 2.8 works with; else what was found and what is needed.

    Reads package metadata only: nothing is imported.
    """
    torch_v, tf_v, ipex_v = _version("torch"), _version("transformers"), _version("intel-extension-for-pytorch")
    ok = (_major_minor(torch_v) == (2, 8) and _major_minor(tf_v) is not None and _major_minor(tf_v) <= (5, 23)
          and _major_minor(ipex_v) == (2, 8))
    if ok:
        return None
    found = (f"found torch {torch_v or 'not installed'}, transformers {tf_v or 'not installed'}, "
             f"intel-extension-for-pytorch {ipex_v or 'not installed'}")
    return (f"{found}; needs torch 2.8.x, transformers<=5.23 and intel-extension-for-pytorch 2.8 "
            f"(IPEX 2.8 is the last release); {SETUP_HINT}")


def _fusion_tags(state: str, applied: List[str]) -> dict:
    """Tags (and a log line) saying whether IPEX's process-wide passes touched a run without ipex."""
    stack = stack_label(applied)
    if state == "off":
        log.info("intel_extension_for_pytorch was imported earlier in this process: its TorchScript fusion passes "
                 "are off for this run (%s)", stack)
    else:
        log.warning("intel_extension_for_pytorch is loaded in this process and its TorchScript fusions stay on "
                    "(%s): they also apply to this run's stack (%s); run ipex and non-ipex stacks in separate "
                    "processes to compare them (hydra/launcher=isolated)",
                    "ipex fell back" if state == "on" else "this version has no switch", stack)
    return {"ipex.loaded_in_process": "true", "ipex.fusions": state}


def import_ipex_quietly():
    """Import IPEX with its import-time stderr noise (C++ warnings on fd 2, a CUDA logging line) kept out of sight.

    Returns the module; on failure raises RuntimeError whose message carries the exception and the last line IPEX
    printed. IPEX fails with AttributeError/NameError/SystemExit as often as ImportError, so all are caught.
    """
    if IPEX_MODULE in sys.modules:
        return sys.modules[IPEX_MODULE]
    sys.stderr.flush()
    saved_fd = os.dup(2)
    py_err = io.StringIO()
    failure: Optional[BaseException] = None
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stderr(py_err), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import intel_extension_for_pytorch as ipex  # noqa: F401
        except (Exception, SystemExit) as e:  # noqa: BLE001 - AttributeError/NameError/os.exit on a wrong torch
            failure = e
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        tmp.seek(0)
        captured = tmp.read().decode(errors="replace") + py_err.getvalue()
    if failure is not None:
        sys.modules.pop(IPEX_MODULE, None)  # a half-imported module must not look importable next time
        lines = [ln.strip() for ln in captured.splitlines() if ln.strip()]
        said = f"; it printed: {lines[-1][:200]}" if lines else ""
        first = first_line(failure) if str(failure).strip() else ""
        raise RuntimeError(f"import {IPEX_MODULE} failed: {type(failure).__name__}: {first}{said}") from failure
    return sys.modules[IPEX_MODULE]


@contextlib.contextmanager
def _quiet_runtime():
    """Harmless warnings on the optimize/trace/quantize path with torch 2.8 + IPEX 2.8 + transformers 5.23."""
    import torch

    ipex_log = logging.getLogger("IPEX")
    level = ipex_log.level
    ipex_log.setLevel(logging.ERROR)  # e.g. "[NotSupported]BatchNorm folding failed during the prepare process"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
            warnings.filterwarnings("ignore", message=r"JIT pass will be deprecated.*")
            yield
    finally:
        ipex_log.setLevel(level)


class IpexPlugin(Plugin):
    name = "ipex"
    stage = STAGE_PREPARE
    Options = IpexOptions
    packages = ("intel-extension-for-pytorch",)
    # importing IPEX changes the whole process (see process_state): guard every run, not only ipex ones
    process_wide = True

    def compute_precision(self, ctx: PluginContext) -> Optional[str]:
        return "int8" if self.options.int8 != "none" else None

    @classmethod
    @contextlib.contextmanager
    def process_state(cls, stack: List[str]):
        """Keep an earlier job's IPEX out of a run whose stack has no ``ipex``.

        Importing IPEX registers its TorchScript fusion passes for the whole process, so in a sweep run in one
        process a plain ``jit`` job after an ``ipex`` job would silently run IPEX's fused kernels (measured: 30 -> 46
        features/s on QA bf16) and no longer be plain jit. While the run lasts, the passes are switched off through
        IPEX's own switch and the process's previous state comes back afterwards. Never imports IPEX: nothing
        happens unless it is already loaded. (The isolated launcher, the default for sweeps, avoids the question.)
        """
        core = sys.modules.get("intel_extension_for_pytorch._C")
        if IPEX_MODULE not in sys.modules or "ipex" in stack:
            if core is not None and "ipex" in stack and hasattr(core, "enable_jit_opt"):
                core.enable_jit_opt()  # an ipex run gets IPEX's fusions even if something switched them off
            # ipex asked for but fell back after importing IPEX: its passes stayed on for the stack that ran
            yield lambda applied: (_fusion_tags("on", applied)
                                   if "ipex" not in applied and IPEX_MODULE in sys.modules else {})
            return
        if core is None or not all(hasattr(core, f) for f in ("get_jit_opt", "enable_jit_opt", "disable_jit_opt")):
            yield lambda applied: _fusion_tags("unisolated", applied)
            return
        was_on = bool(core.get_jit_opt())
        core.disable_jit_opt()
        try:
            yield lambda applied: _fusion_tags("off", applied)
        finally:
            if was_on:
                core.enable_jit_opt()

    # ---- checks (no IPEX import) --------------------------------------------------------------------------------
    @classmethod
    def validate_options(cls, o) -> None:
        cls.require_at_least("calibration_batches", o.calibration_batches, 1)

    def wants_calibration(self) -> bool:
        return self.options.int8 == "static"

    def check(self, ctx: PluginContext) -> None:
        import torch

        o = self.options
        problem = environment_problem()
        if problem:
            raise self.unavailable(problem)
        if o.int8 != "none" and (ctx.dtype != torch.float32 or ctx.autocast):
            raise self.unavailable(f"optimization.ipex.int8={o.int8} quantizes an fp32 model; use precision=fp32")
        wanted = self._precision_dtype(ctx)
        if o.int8 == "none" and wanted not in ("float32", "bfloat16"):
            raise self.unavailable(f"ipex.optimize runs float32 or bfloat16, not {wanted}")
        if o.dtype != "auto" and o.int8 == "none" and o.dtype != wanted:
            raise self.unavailable(f"optimization.ipex.dtype={o.dtype} disagrees with the precision "
                                   f"({self._precision_name(ctx)} -> {wanted}); use dtype=auto or change precision")

    @staticmethod
    def _precision_dtype(ctx: PluginContext) -> str:
        import torch

        low = ctx.autocast_dtype if ctx.autocast else ctx.dtype
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(low, str(low).replace("torch.", ""))

    @staticmethod
    def _precision_name(ctx: PluginContext) -> str:
        if ctx.autocast:
            return f"fp32 weights + autocast {str(ctx.autocast_dtype).replace('torch.', '')}"
        return f"{str(ctx.dtype).replace('torch.', '')} weights"

    # ---- apply ------------------------------------------------------------------------------------------------
    def apply(self, model, ctx: PluginContext):
        import torch

        t0 = time.perf_counter()
        ipex = import_ipex_quietly()
        import_s = time.perf_counter() - t0
        o = self.options
        model = model.eval()
        details = {"version": str(getattr(ipex, "__version__", "?")), "import_s": f"{import_s:.2f}",
                   "precision_in": self._precision_name(ctx), "level": o.level, "inplace": str(o.inplace)}
        with _quiet_runtime():
            if o.int8 != "none":
                model = self._quantize(ipex, model, ctx, details)
            else:
                dtype = self._precision_dtype(ctx)
                kwargs = {k: getattr(o, k) for k in ("weights_prepack", "auto_kernel_selection", "concat_linear")
                          if getattr(o, k) is not None}
                with torch.no_grad():
                    model = ipex.optimize(model, dtype=getattr(torch, dtype), level=o.level, inplace=o.inplace,
                                          **kwargs)
                details.update({"dtype": dtype, "dtype_source": "option" if o.dtype != "auto" else "precision",
                                **{k: str(v) for k, v in kwargs.items()}})
                details["recipe"] = self._recipe(ctx, dtype)
        self._details = details
        return model

    def _recipe(self, ctx: PluginContext, dtype: str) -> str:
        jit = "jit" in ctx.following
        if dtype == "float32":
            steps = "ipex.optimize(float32)"
        elif ctx.autocast:
            steps = "fp32 weights -> ipex.optimize(bfloat16) -> forward under autocast (IPEX's recipe)"
        else:
            steps = ("weights already bf16 (precision=bf16) -> ipex.optimize(bfloat16), no autocast; "
                     "IPEX's own recipe is precision=bf16_autocast")
        return steps + (" -> jit trace+freeze" if jit else " (eager; add jit after ipex to trace+freeze)")

    def _quantize(self, ipex, model, ctx: PluginContext, details: dict):
        import torch

        from intel_extension_for_pytorch.quantization import convert, prepare

        o = self.options
        batch = dict(ctx.example_batch)
        if o.int8 == "dynamic":
            qconfig = ipex.quantization.default_dynamic_qconfig_mapping
        else:
            qconfig = ipex.quantization.default_static_qconfig_mapping
        with torch.no_grad():
            prepared = prepare(model, qconfig, example_kwarg_inputs=batch, inplace=o.inplace, bn_folding=False)
            calib: List[dict] = []
            if o.int8 == "static":
                given = list(getattr(ctx, "calibration_batches", None) or [])
                calib = given[:o.calibration_batches] or [batch]
                details["calibration"] = (f"{len(calib)} batches from ctx.calibration_batches" if given
                                          else "the example batch only (the runner gave no calibration batches)")
                # observers must see keys the model was prepared with; calibrate in fp32, outside autocast
                for b in calib:
                    prepared(**{k: v for k, v in b.items() if k in batch})
            model = convert(prepared)
        details.update({"int8": o.int8, "dtype": "int8", "recipe": f"ipex.quantization {o.int8} int8"
                        + (" -> jit trace+freeze" if "jit" in ctx.following
                           else " (eager; add jit after ipex to trace+freeze)")})
        return model
