"""torch.compile with the inductor backend: the successor of TorchScript capture.

Compilation is lazy in PyTorch (it happens on the first call); this plugin triggers it inside ``apply`` with the
run's first batch (plus a second sequence length and a smaller batch when shapes may vary), so the compile time lands
in the plugin's own time (``plugin_compile_s``) and not in the accuracy or timing pass. The calls run under
``torch.inference_mode`` and the run's autocast, exactly as the runner calls the model, so the guards match.

``freezing`` (inductor's constant folding of weights, which lets it prepack them for oneDNN on CPU) is passed per
compile through ``options`` (``mode`` is expanded into the same options dict, since torch.compile takes one or the
other), so it also applies to recompilations later in the run.
"""
from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

from orchestrator.plugin_api import STAGE_CAPTURE, Plugin, PluginContext, shape_variants

if TYPE_CHECKING:  # annotations only: importing this module (as every CLI start does) must not import torch
    import torch

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileOptions:
    # torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    mode: str = "default"
    # true: error on any graph break instead of falling back to Python between graphs
    fullgraph: bool = False
    # null: torch decides (static first, dynamic after a shape change); true/false force it
    dynamic: Optional[bool] = None
    # inductor freezing: fold weights into the graph as constants (prepacked for oneDNN on CPU)
    freezing: bool = True
    # compile for more shapes inside apply() (a shorter sequence, a smaller batch) unless dynamic=false
    warm_shapes: bool = True
    # with dynamic=null: mark batch and sequence dimensions dynamic on the first call, so one symbolic graph
    # serves every width of length-sorted batches (no static compile first, no recompile at the next width)
    mark_dynamic: bool = True


def _marked(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Copies of the batch's tensors with batch and sequence dimensions marked dynamic for dynamo."""
    import torch

    out = {}
    for k, v in batch.items():
        t = v.clone()
        for dim in range(min(t.dim(), 2)):
            if t.shape[dim] >= 2:  # dynamo specialises sizes 0 and 1 whatever is marked
                torch._dynamo.mark_dynamic(t, dim)
        out[k] = t
    return out


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompilePlugin(Plugin):
    name = "compile"
    stage = STAGE_CAPTURE
    conflicts = ("jit",)
    Options = CompileOptions

    @classmethod
    def validate_options(cls, o) -> None:
        cls.require_choice("mode", o.mode, MODES)

    def check(self, ctx: PluginContext) -> None:
        import torch

        if not hasattr(torch, "compile"):
            raise self.unavailable(f"torch {torch.__version__} has no torch.compile")
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx[-1] if isinstance(inductor_config.cpp.cxx, tuple) else inductor_config.cpp.cxx
        if not any(shutil.which(c) for c in (cxx, "g++", "clang++")):
            raise self.unavailable(f"inductor's CPU backend needs a C++ compiler ({cxx}) on PATH")

    def _compile_options(self) -> Dict[str, object]:
        import torch

        opts: Dict[str, object] = {}
        if self.options.mode != "default":
            opts.update(torch._inductor.list_mode_options(self.options.mode))
        opts["freezing"] = bool(self.options.freezing)
        return opts

    def apply(self, model, ctx: PluginContext):
        import torch

        o = self.options
        import torch._dynamo

        compiled = torch.compile(model, backend="inductor", fullgraph=o.fullgraph, dynamic=o.dynamic,
                                 options=self._compile_options())
        shapes = shape_variants(ctx.example_batch, o.dynamic) if o.warm_shapes else [ctx.example_batch]
        marked = o.dynamic is None and o.mark_dynamic
        if marked:
            shapes[0] = _marked(ctx.example_batch)
        graphs_before = _graph_count()
        seconds = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for batch in shapes:
                t0 = time.perf_counter()
                with torch.inference_mode(), ctx.autocast_context():
                    compiled(**batch)
                seconds.append(time.perf_counter() - t0)
        # a steady-state call on the example shape: what remains of the first call is compile time
        with torch.inference_mode(), ctx.autocast_context():
            t0 = time.perf_counter()
            compiled(**ctx.example_batch)
            steady = time.perf_counter() - t0
        self._details = {
            "backend": "inductor", "mode": o.mode, "fullgraph": str(o.fullgraph), "dynamic": str(o.dynamic),
            "freezing": str(o.freezing), "autocast": str(ctx.autocast),
            "compile_s": f"{sum(seconds) - steady * len(seconds):.2f}",
            "first_call_s": f"{seconds[0]:.2f}",
            "warm_shapes": ";".join("x".join(str(s) for s in b["input_ids"].shape) for b in shapes),
            "steady_call_s": f"{steady:.4f}",
            "mark_dynamic": str(marked),
            # graphs dynamo compiled for the warm shapes: 1 when one symbolic graph serves them all
            "graphs": str(_graph_count() - graphs_before),
        }
        return compiled
