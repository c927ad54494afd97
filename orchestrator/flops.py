"""FLOPs of the model as executed, and the fraction of the CPU's peak a run reaches.

Counting uses ``torch.utils.flop_counter.FlopCounterMode`` on the eager fp32 model, once per run, on three tiny
single-row inputs. An encoder's FLOPs per row are exactly ``c + a*L + b*L**2`` in its sequence length L (linear
layers grow with L, attention scores with L**2, a pooler/head on one token is constant), so three lengths give the
coefficients and every batch of the run is then priced from its shape without running anything. Counted: matmuls
(addmm/mm/bmm) and attention; elementwise ops, layer norms and softmax are not FLOPs in this convention (as in
PaLM/MLPerf model-FLOPs figures). torch 2.13 has no formula for the CPU flash-attention kernel SDPA dispatches to,
so it is registered here with the same formula torch uses for the other SDPA kernels.

Peak = threads x clock x FLOPs per cycle per core of the unit the precision runs on, read from /proc/cpuinfo:
AVX-512 fp32: 2 FMA ports x 16 lanes x 2 = 64; AVX2: 32; AMX-BF16 (TDPBF16PS 16x16x32 tile product every 16
cycles): 1024; AMX-INT8: 2048. The clock is the nominal one /proc/cpuinfo reports (turbo and AVX-512/AMX
frequency licences move it both ways), so the fraction is an estimate, and it is labelled as such.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, Optional, Tuple

import torch

LENGTHS = (8, 16, 32)


@functools.lru_cache(maxsize=1)
def _attention_ops() -> Dict:
    from torch.utils.flop_counter import sdpa_flop_count

    def flash_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = flash_cpu
    return ops


def count(model, input_names: Iterable[str], length: int, pad_id: int = 0) -> int:
    """FLOPs of one forward of a single row of ``length`` tokens (all attended)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {}
    for name in input_names:
        fill = 1 if name == "attention_mask" else (pad_id if name == "input_ids" else 0)
        inputs[name] = torch.full((1, length), fill, dtype=torch.long)
    with FlopCounterMode(display=False, custom_mapping=_attention_ops()) as counter, torch.inference_mode():
        model(**inputs)
    return int(counter.get_total_flops())


def coefficients(model, input_names: Iterable[str], pad_id: int = 0) -> Tuple[float, float, float]:
    """(c, a, b) with FLOPs(L) = c + a*L + b*L**2 per row, solved from three lengths."""
    names = list(input_names)
    ys = [count(model, names, n, pad_id) for n in LENGTHS]
    (l1, l2, l3), (y1, y2, y3) = LENGTHS, ys
    # second differences give b, then a and c
    b = ((y3 - y2) / (l3 - l2) - (y2 - y1) / (l2 - l1)) / (l3 - l1)
    a = (y2 - y1) / (l2 - l1) - b * (l1 + l2)
    c = y1 - a * l1 - b * l1 * l1
    return c, a, b


def batch_flops(coef: Tuple[float, float, float], rows: int, length: int) -> float:
    c, a, b = coef
    return rows * (c + a * length + b * length * length)


def cpu() -> Dict[str, object]:
    """The CPU's flags and nominal clock (read once, by orchestrator/cpu.py)."""
    from . import cpu as cpu_caps

    return {"flags": set(cpu_caps.flags()), "mhz": cpu_caps.mhz()}


def flops_per_cycle(compute: str, flags: Optional[set] = None) -> Tuple[int, str]:
    """(FLOPs per cycle per core, the unit) for a compute type: fp32, bf16 or int8."""
    if flags is None:
        from . import cpu as cpu_caps

        flags = cpu_caps.usable_flags()
    if compute == "bf16" and "amx_bf16" in flags:
        return 1024, "AMX-BF16"
    if compute == "int8" and "amx_int8" in flags:
        return 2048, "AMX-INT8"
    if compute == "bf16" and "avx512_bf16" in flags:
        return 128, "AVX512-BF16"
    # VNNI: one vpdpbusd does 64 (512-bit) or 32 (256-bit) int8 multiply-adds, two per cycle: 4x the fp32 FMA rate
    if compute == "int8" and "avx512_vnni" in flags:
        return 256, "AVX512-VNNI int8"
    if compute == "int8" and "avx_vnni" in flags:
        return 128, "AVX-VNNI int8"
    if "avx512f" in flags:
        return 64, "AVX-512 FMA fp32"
    if "fma" in flags:
        return 32, "AVX2 FMA fp32"
    return 8, "SSE fp32"


def peak_gflops(compute: str, threads: int) -> Optional[Tuple[float, str]]:
    """Theoretical peak GFLOP/s of ``threads`` cores on the unit ``compute`` runs on, and how it was computed."""
    info = cpu()
    if not info["mhz"]:
        return None
    per_cycle, unit = flops_per_cycle(compute)
    peak = threads * info["mhz"] / 1000.0 * per_cycle
    return peak, f"{unit}: {threads} cores x {info['mhz'] / 1000:.2f} GHz x {per_cycle} FLOP/cycle"
