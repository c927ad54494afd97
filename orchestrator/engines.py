"""What an engine plugin (one that runs the whole model outside PyTorch, or exports it first) needs from the core:
the outputs a task reads, a tuple-returning wrapper an exporter can trace, an example input with dynamic batch and
width, the callable the runner calls afterwards, phase timers, and :class:`export_step`, which keeps an exporter's
console output in a log file of the run and turns its failure into one line naming the cause.

Public through :mod:`orchestrator.plugin_api`; built-in and third-party engines use the same helpers.

An exporter needs positional tensor outputs; the runner's task heads read named ones (``logits``,
``start_logits``/``end_logits``, ``last_hidden_state``). The names are taken from one eager call on the run's
example batch, so each task gets what its head reads without the engine knowing the task.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from .errors import PluginUnavailable, RunInterrupted, first_line

if TYPE_CHECKING:  # annotations only: importing the engine helpers must not import torch
    import torch


def __getattr__(name: str):
    # TupleOutputs is an nn.Module: it lives in tuple_outputs (torch at import) and stays importable from here
    if name == "TupleOutputs":
        from .tuple_outputs import TupleOutputs

        return TupleOutputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def output_names(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the tensor outputs of one eager call (a ModelOutput or a dict), in order."""
    import torch

    with torch.inference_mode():
        out = model(**batch)
    return [k for k, v in out.items() if isinstance(v, torch.Tensor)]


def export_example(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The run's example batch with at least 2 rows and 2 tokens: exporters specialise a dimension whose example
    size is 1 (batch size 1 in runtime=single_stream), and the engine would then refuse every other batch."""
    import torch

    out = dict(batch)
    if out["input_ids"].shape[0] < 2:
        out = {k: torch.cat([v, v]) for k, v in out.items()}
    if out["input_ids"].shape[1] < 2:
        out = {k: torch.cat([v, v], dim=1) for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def shape_variants(batch: Dict[str, torch.Tensor], dynamic: Optional[bool] = None) -> List[Dict[str, torch.Tensor]]:
    """The example batch, and when shapes may change (``dynamic`` not False), the same rows one token shorter and
    one row fewer: warming a graph on these makes it serve other widths and batch sizes."""
    out = [batch]
    if dynamic is False:
        return out
    b, n = batch["input_ids"].shape[:2]
    if n > 2:
        out.append({k: (v[:, :n - 1] if v.dim() > 1 else v).contiguous() for k, v in batch.items()})
    if b > 1:  # contiguous like the runner's batches, or stride guards fail and the graph is built again
        out.append({k: v[:b - 1].contiguous() for k, v in batch.items()})
    return out


def file_mb(*paths: Path) -> float:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists()) / 2**20


class EngineModel:
    """What the runner calls after an engine took over: ``model(**inputs) -> {name: float tensor}``.

    ``run`` takes ``{input name: int64 numpy array}`` (only the inputs the engine's graph kept) and returns the
    outputs in ``outputs`` order. It is not an ``nn.Module``: the run's ``model_size_mb`` comes from the plugin."""

    def __init__(self, run: Callable[[Dict[str, object]], Sequence[object]], inputs: Sequence[str],
                 outputs: Sequence[str], engine: str):
        self._run, self.inputs, self.outputs, self.engine = run, list(inputs), list(outputs), engine

    def __call__(self, **inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
        import torch

        feed = {k: inputs[k].numpy() for k in self.inputs}
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, self._run(feed))}

    def __repr__(self) -> str:
        return f"EngineModel({self.engine}, inputs={self.inputs}, outputs={self.outputs})"


class Stopwatch:
    """Named phase times of an engine's apply (export, conversion, ...), reported as plugin metrics."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch.seconds[f"{name}_s"] = time.perf_counter() - self.t0
                return False

        return _Phase()


def calibration_inputs(ctx, limit: int) -> Optional[List[Dict[str, torch.Tensor]]]:
    """Up to ``limit`` calibration batches from ``dataset.calibration_split`` (None when the run has none)."""
    batches = list(getattr(ctx, "calibration_batches", None) or [])[:limit]
    return batches or None


class quiet_loggers:
    """Raise the named loggers to ERROR for the duration (exporters and quantizers log at INFO/WARNING)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
        return False


# -- export failures: one line with the cause, the full log in the run's folder ----------------------------------------

EXPORT_LOG = "{plugin}_export.log"
_STEP = re.compile(r"^(Failed to .+?)\.\s*This is step (\d+/\d+)")
_CALL_SITE = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\S+)')


def _chain(error: BaseException) -> List[BaseException]:
    out, seen = [], set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def failure_cause(error: BaseException) -> str:
    """One line for an exporter's failure: the root exception's type and first line, and the model code that
    raised it when the exporter says so (torch.export's "The following call raised this error")."""
    chain = _chain(error)
    root = chain[-1]
    # symbolic-shape errors append the unsimplified expression; the first form names the guard well enough
    cause = first_line(root, limit=1000).split(" (unhinted:")[0]
    cause = cause if len(cause) <= 160 else cause[:159] + "…"
    if not cause.startswith(type(root).__name__):
        cause = f"{type(root).__name__}: {cause}"
    # torch.onnx wraps the cause in "Failed to export the model with torch.export. This is step 1/3 of ..."
    step = _STEP.search(first_line(chain[0], limit=1000)) if len(chain) > 1 else None
    if step:  # said as "<step> failed in step 1/3 (torch.export): <cause>"
        cause = f"in step {step.group(2)} ({step.group(1).rsplit(' with ', 1)[-1]}): {cause}"
    site = next((m for m in (_CALL_SITE.search(str(e)) for e in chain) if m), None)
    if site:
        cause += f" (at {Path(site.group(1)).name}:{site.group(2)} in {site.group(3)})"
    return cause


class export_step:
    """Run an engine's export/conversion with everything it prints (stdout, stderr, Python warnings; the C++ side
    too) going to ``<run_dir>/<plugin>_export.log`` instead of the console; on failure raise ``PluginUnavailable``
    whose one line names the step, the cause (:func:`failure_cause`) and the log file, which then also holds the
    traceback (``self.path``; the runner keeps it as a run artifact). After a success the log is removed (nothing
    in it the user must act on).

    ``with export_step(self, ctx, "torch.export") as step: ...; step.now("prepare_pt2e"); ...`` names the phase
    under way when a block covers several. ``explain(error)`` may give an engine's own one-line cause (a
    converter's report of the operations it could not convert); None falls back to :func:`failure_cause`."""

    def __init__(self, plugin: Any, ctx: Any, step: str,
                 explain: Optional[Callable[[BaseException], Optional[str]]] = None):
        self.plugin = plugin.name if hasattr(plugin, "name") else str(plugin)
        self.step = step
        self.explain = explain
        self.path = Path(getattr(ctx, "run_dir", None) or ".") / EXPORT_LOG.format(plugin=self.plugin)

    def now(self, step: str) -> None:
        self.step = step

    def __enter__(self) -> "export_step":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.path, "a", encoding="utf-8", errors="replace")
        self._log.write(f"== {self.step}\n")
        self._log.flush()
        self._redirect = _Redirect(self._log)
        self._redirect.__enter__()
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, kind, error, tb) -> bool:
        self._warnings.__exit__(None, None, None)
        self._redirect.__exit__(None, None, None)
        for w in self._caught:
            self._log.write(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n")
        if error is None:
            self._log.close()
            self.path.unlink(missing_ok=True)
            return False
        self._log.write("".join(traceback.format_exception(kind, error, tb)))
        self._log.close()
        if isinstance(error, (RunInterrupted, KeyboardInterrupt, PluginUnavailable)) or \
                not isinstance(error, Exception):
            return False
        cause = (self.explain(error) if self.explain else None) or failure_cause(error)
        joint = " " if cause.startswith("in step ") else ": "
        # the log by its name: the line stays short enough for results.json and the run's folder is printed anyway
        raise PluginUnavailable(self.plugin, f"{self.step} failed{joint}{cause}; full log: {self.path.name} in the "
                                             "run folder") from error


class _Switch:
    """A text stream writing to ``log`` until :meth:`switch_back`, then to ``after``."""

    def __init__(self, log: Any, after: Any):
        self._target, self._after = log, after

    def switch_back(self) -> None:
        self._target = self._after

    def write(self, text: str) -> int:
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def close(self) -> None:  # the log is closed by its owner; the stream after it is not the closer's to close
        pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of whichever stream is current
        return getattr(self._target, name)


def _stream_handlers() -> List[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    # in-memory streams (StringIO) are buffers someone reads back (torch.onnx's own capture, pytest's caplog): kept
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and h.stream is not None and not hasattr(h.stream, "getvalue")]  # None: a file opened lazily


class _Redirect:
    """File descriptors 1 and 2 (what C/C++ code and every Python stream on them write), ``sys.stdout``/
    ``sys.stderr`` and the streams of logging's console handlers (which keep the stream they were made with, e.g.
    a test's capture or a notebook's) into ``log`` for the block."""

    def __init__(self, log: io.TextIOBase):
        self.log = log

    def __enter__(self):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self.saved_fds = []
        for fd in (1, 2):
            try:
                self.saved_fds.append((fd, os.dup(fd)))
                os.dup2(self.log.fileno(), fd)
            except OSError:  # no such descriptor (an embedded interpreter): Python streams only
                pass
        self.saved_streams = (sys.stdout, sys.stderr)
        # proxies, not the log itself: a handler made during the block (torch sets its loggers up lazily) keeps
        # the object it found in sys.stderr, which must reach the real stream again once the block is over
        self.proxies = (_Switch(self.log, sys.stdout), _Switch(self.log, sys.stderr))
        sys.stdout, sys.stderr = self.proxies
        self.saved_handlers = []
        for handler in _stream_handlers():  # not setStream: it flushes the old stream, which may be closed
            stream = handler.stream
            try:
                handler.stream = _Switch(self.log, stream)
            except AttributeError:  # a handler whose stream follows sys.stderr (logging's last resort)
                continue
            self.saved_handlers.append((handler, stream))
        return self

    def __exit__(self, *exc):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for handler, stream in reversed(self.saved_handlers):
            handler.stream = stream
        for proxy in self.proxies:
            proxy.switch_back()
        sys.stdout, sys.stderr = self.saved_streams
        for fd, saved in reversed(self.saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        return False


__all__ = ["EXPORT_LOG", "EngineModel", "Stopwatch", "TupleOutputs", "calibration_inputs", "export_example",
           "export_step", "failure_cause", "file_mb", "output_names", "quiet_loggers", "shape_variants"]
