"""Batching, the accuracy/timing/parity passes, latency statistics and memory.

The accuracy pass runs every feature once. The timing pass is separate: warm-up, then batches in a cycle until
both the minimum iteration count and the minimum duration are reached. Only the model forward and the task head
sit inside the timed region; the share of wall time spent outside it is reported as orchestration overhead.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm


@dataclass
class Batch:
    rows: List[int]  # feature indices in this batch
    inputs: Dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def elements(self) -> int:
        """Rows x width (its largest input): what a forward pass over it costs, up to a constant."""
        return max((v.numel() for v in self.inputs.values() if hasattr(v, "numel")), default=0)


def make_batches(rows: Sequence[Dict[str, List[int]]], batch_size: int, pad_id: int, padding: str,
                 max_length: int, sort_by_length: bool, pad_to_multiple_of: Optional[int] = None) -> List[Batch]:
    """Collate once, up front, so neither pass pays for padding inside its timed loop.

    ``pad_to_multiple_of`` rounds dynamic widths up (capped at ``max_length``): fewer distinct shapes for
    shape-specialising backends (graph capture, per-shape oneDNN kernels) and tile-aligned matmuls, at the price of a few pad tokens.
    """
    order = list(range(len(rows)))
    if sort_by_length:
        order.sort(key=lambda i: len(rows[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max_length if padding == "max_length" else max(len(rows[i]["input_ids"]) for i in idx)
        if pad_to_multiple_of and padding != "max_length":
            width = max(width, min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, max_length))
        inputs = {}
        for key in rows[idx[0]]:
            fill = pad_id if key == "input_ids" else 0
            t = torch.full((len(idx), width), fill, dtype=torch.long)
            for r, i in enumerate(idx):
                seq = rows[i][key][:width]
                t[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            inputs[key] = t
        batches.append(Batch(idx, inputs))
    return batches


def padding_pct(rows: Sequence[Dict[str, List[int]]], batches: List[Batch]) -> float:
    """Share of the tokens the model computes on that are padding."""
    total = sum(b.size * b.inputs["input_ids"].shape[1] for b in batches)
    real = sum(min(len(rows[i]["input_ids"]), b.inputs["input_ids"].shape[1]) for b in batches for i in b.rows)
    return 100.0 * (total - real) / total if total else 0.0


def batch_shapes(batches: List[Batch]) -> int:
    """Distinct input shapes among the batches: each new one costs kernel creation (oneDNN) or re-specialisation."""
    return len({tuple(b.inputs["input_ids"].shape) for b in batches})


def forward_fn(model, head: Callable, autocast_dtype: Optional[torch.dtype]) -> Callable:
    """The timed unit: model forward + task head, in inference mode (and autocast when asked)."""

    def step(inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                                    enabled=autocast_dtype is not None):
            return head(model(**inputs), inputs)

    return step


def run_all(step: Callable, batches: List[Batch], n_rows: int, desc: str = "", progress: bool = False):
    """One pass over every batch: per-row outputs in original feature order, and per-batch latencies (s)."""
    outputs: List[Optional[torch.Tensor]] = [None] * n_rows
    latencies = []
    for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
        t0 = time.perf_counter()
        out = step(b.inputs)
        latencies.append(time.perf_counter() - t0)
        for r, i in enumerate(b.rows):
            outputs[i] = out[r]
    return outputs, latencies


@dataclass
class TimingResult:
    latencies_s: List[float]
    rows: int
    wall_s: float
    # index of the batch each latency belongs to
    batch_ids: List[int] = field(default_factory=list)
    # round each latency belongs to (runtime.repeats)
    round_ids: List[int] = field(default_factory=list)
    batch_rows: List[int] = field(default_factory=list)

    def extend(self, part: "TimingResult", round_id: int) -> None:
        """Add one timing round (a timing_pass's result) as round ``round_id``."""
        self.latencies_s += part.latencies_s
        self.batch_ids += part.batch_ids
        self.batch_rows += part.batch_rows
        self.round_ids += [round_id] * len(part.latencies_s)
        self.rows += part.rows
        self.wall_s += part.wall_s

    def rounds(self) -> List[tuple]:
        """(rows per batch, seconds per batch) of each round."""
        out = []
        for k in sorted(set(self.round_ids)):
            sel = [i for i, r in enumerate(self.round_ids) if r == k]
            out.append(([self.batch_rows[i] for i in sel], [self.latencies_s[i] for i in sel]))
        return out

    def metrics(self) -> Dict[str, float]:
        from .stats import throughput_interval

        lat_ms = np.asarray(self.latencies_s) * 1000.0
        busy = float(np.sum(self.latencies_s))
        mean = float(lat_ms.mean())
        rounds = self.rounds()
        thr, low, high = throughput_interval(rounds)
        return {
            "timing_rounds": float(len(rounds)),
            # median round; the interval covers round-to-round and batch-to-batch variation (orchestrator/stats.py)
            "throughput": thr,
            "throughput_ci_low": low,
            "throughput_ci_high": high,
            "throughput_ci_rel_pct": 100.0 * (high - low) / (2 * thr) if thr > 0 else 0.0,
            "timing_iterations": float(len(lat_ms)),
            "latency_mean_ms": mean,
            "latency_p50_ms": float(np.percentile(lat_ms, 50)),
            "latency_p90_ms": float(np.percentile(lat_ms, 90)),
            "latency_p99_ms": float(np.percentile(lat_ms, 99)),
            "latency_stdev_pct": (100.0 * statistics.stdev(lat_ms.tolist()) / mean) if len(lat_ms) > 1 else 0.0,
            "timing_wall_s": self.wall_s,
            # everything in the timing loop that is not the model forward + head
            "overhead_pct": 100.0 * max(self.wall_s - busy, 0.0) / self.wall_s if self.wall_s > 0 else 0.0,
        }


def timing_order(n_batches: int, seed: int) -> List[int]:
    """A seeded shuffle of the batches: any prefix the timing pass stops after is a fair sample of them.

    With ``sort_by_length`` the batches run shortest first; cycling them in that order would time only the short
    ones whenever the pass ends before the last batch and overstate throughput.
    """
    order = list(range(n_batches))
    random.Random(seed).shuffle(order)
    return order


def timing_rounds(step: Callable, batches: List[Batch], repeats: int, warmup: int, min_iterations: int,
                  min_duration_s: float, max_iterations: Optional[int], seed: int,
                  progress: bool = False, out: Optional[TimingResult] = None) -> TimingResult:
    """``repeats`` timing passes after one warm-up, each over its own seeded order of the batches. ``out``: the
    caller's result to add the rounds to, so that the rounds completed survive an interrupted pass."""
    out = TimingResult([], 0, 0.0) if out is None else out
    for k in range(repeats):
        part = timing_pass(step, batches, warmup if k == 0 else 0, min_iterations, min_duration_s, max_iterations,
                           progress=progress, order=timing_order(len(batches), seed + k),
                           desc=f"timing {k + 1}/{repeats}" if repeats > 1 else "timing")
        out.extend(part, k)
    return out


def timing_pass(step: Callable, batches: List[Batch], warmup: int, min_iterations: int, min_duration_s: float,
                max_iterations: Optional[int] = None, progress: bool = False,
                order: Optional[List[int]] = None, desc: str = "timing") -> TimingResult:
    order = order if order is not None else list(range(len(batches)))
    for i in range(warmup):
        step(batches[order[i % len(order)]].inputs)
    latencies: List[float] = []
    batch_ids: List[int] = []
    rows = 0
    bar = tqdm(desc=desc, disable=not progress, leave=False, unit="batch")
    start = time.perf_counter()
    i = 0
    while True:
        k = order[i % len(order)]
        b = batches[k]
        t0 = time.perf_counter()
        step(b.inputs)
        latencies.append(time.perf_counter() - t0)
        batch_ids.append(k)
        rows += b.size
        i += 1
        bar.update()
        elapsed = time.perf_counter() - start
        if max_iterations is not None and i >= max_iterations:
            break
        if i >= min_iterations and elapsed >= min_duration_s:
            break
    wall = time.perf_counter() - start
    bar.close()
    return TimingResult(latencies, rows, wall, batch_ids, [0] * len(latencies), [batches[k].size for k in batch_ids])


class TimedOutputs:
    """What the timed step returned for a seeded sample of batches (the first time each ran), to check that the
    timed computation is the evaluated one (MLPerf's TEST01). Keeps a reference to the output only: nothing is
    copied or compared inside the timed region."""

    def __init__(self, batches: List[Batch], sample: int, seed: int):
        picked = random.Random(seed).sample(range(len(batches)), min(sample, len(batches)))
        self._index = {id(batches[k].inputs): k for k in picked}
        self.outputs: Dict[int, torch.Tensor] = {}

    def wrap(self, step: Callable) -> Callable:
        index, outputs = self._index, self.outputs

        def timed(inputs):
            out = step(inputs)
            k = index.get(id(inputs))
            if k is not None and k not in outputs:
                # a copy: an engine may hand back a buffer it reuses on the next call
                outputs[k] = out.detach().clone() if isinstance(out, torch.Tensor) else out
            return out

        return timed


class PeakRSS(contextlib.AbstractContextManager):
    """Peak resident memory of this process while the block runs (sampled; ru_maxrss would span earlier jobs)."""

    def __init__(self, interval_s: float = 0.05, idle_interval_s: float = 0.4):
        self.interval_s, self.idle_interval_s = interval_s, idle_interval_s
        self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        # every 50 ms while the memory moves; backing off to idle_interval_s while it stays put. A raced job waits
        # for its rounds for most of its life: sampled 20 times a second, each waiting process took ~0.7 % of a
        # core in wake-ups that preempt the timed job's threads (an OpenMP region waits for its slowest thread)
        interval, last = self.interval_s, None
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            interval = self.interval_s if rss != last else min(2 * interval, self.idle_interval_s)
            last = rss
            self._stop.wait(interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return False

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def model_size_mb(model) -> Optional[float]:
    """Bytes of parameters and buffers after the stack (None when the module hides them, e.g. compiled C++)."""
    try:
        tensors = list(model.parameters()) + list(model.buffers())
    except Exception:
        return None
    if not tensors:
        return None
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20
