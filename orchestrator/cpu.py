"""What this CPU can do, read from the CPU itself: ISA flags, the model name, and the capabilities they give.

Machines differ (Intel Xeon with AVX-512 + AMX, AMD EPYC with AVX2 only, AMD Zen 4/5 with AVX-512 BF16 but no
AMX), so nothing in the project may assume one. A capability is what the kernels can actually use: the CPU's flags,
narrowed by ``ONEDNN_MAX_CPU_ISA`` when the user caps oneDNN (``ONEDNN_MAX_CPU_ISA=AVX2`` on an AMX machine
behaves like an AVX2 machine for every oneDNN kernel, bf16 and int8 included).
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence

# the ISA features each run records (tags cpu.isa.<flag>)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni", "avx512_vnni")

# oneDNN's ISA caps, lowest first (oneDNN's docs, "CPU dispatcher control"); AVX10_1_512 is AVX512_CORE_FP16
_ONEDNN_LEVELS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                  "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
                  "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL")
# flags a cap below this level hides from oneDNN
_FLAG_LEVEL = {"avx512f": "AVX512_CORE", "avx512_vnni": "AVX512_CORE_VNNI", "avx512_bf16": "AVX512_CORE_BF16",
               "amx_bf16": "AVX10_1_512_AMX", "amx_int8": "AVX10_1_512_AMX", "avx_vnni": "AVX2_VNNI",
               "avx2": "AVX2"}

# capability -> (flags of which any one gives it, what it means); presets and tests name these
CAPABILITIES: Dict[str, tuple] = {
    "bf16": (("avx512_bf16", "amx_bf16"), "native bf16 matmuls (AVX512-BF16 or AMX-BF16)"),
    "amx": (("amx_bf16",), "AMX tiles (bf16/int8 matmuls on AMX)"),
    "avx512": (("avx512f",), "AVX-512"),
    "vnni": (("avx512_vnni", "avx_vnni", "amx_int8"), "int8 dot products (VNNI or AMX-INT8)"),
}


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> tuple:
    """(model name, flags, nominal MHz) of the first CPU in /proc/cpuinfo."""
    model, flags, mhz = "", frozenset(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split())
            elif key == "cpu MHz" and mhz is None:
                try:
                    mhz = float(value)
                except ValueError:
                    pass
            if model and flags and mhz is not None:
                break
    except OSError:
        pass
    return model or platform.processor() or "unknown", flags, mhz


def model_name() -> str:
    return _proc_cpuinfo()[0]


def flags() -> FrozenSet[str]:
    """The CPU's own flags (/proc/cpuinfo), whatever oneDNN is capped to."""
    return _proc_cpuinfo()[1]


def mhz() -> Optional[float]:
    return _proc_cpuinfo()[2]


def onednn_cap() -> Optional[str]:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap else None


def usable_flags() -> FrozenSet[str]:
    """Flags the kernels may use: the CPU's, minus what ONEDNN_MAX_CPU_ISA caps away."""
    cap = onednn_cap()
    have = flags()
    if not cap or cap not in _ONEDNN_LEVELS:
        return have
    limit = _ONEDNN_LEVELS.index(cap)
    return frozenset(f for f in have if f not in _FLAG_LEVEL or _ONEDNN_LEVELS.index(_FLAG_LEVEL[f]) <= limit)


def has(capability: str) -> bool:
    if capability not in CAPABILITIES:
        raise KeyError(f"unknown CPU capability {capability!r}; valid: {', '.join(CAPABILITIES)}")
    return any(f in usable_flags() for f in CAPABILITIES[capability][0])


def missing(capabilities: Sequence[str]) -> List[str]:
    return [c for c in capabilities if not has(c)]


def describe() -> str:
    """One line for messages and summary headers: the model and what it has."""
    present = [f for f in ISA_FLAGS if f in usable_flags()]
    cap = f", oneDNN capped at {onednn_cap()}" if onednn_cap() else ""
    return f"{model_name()} ({', '.join(present) or 'no AVX2'}{cap})"


def capability_error(capabilities: Sequence[str], what: str) -> Optional[str]:
    """None when this CPU has every capability; else one line saying what is missing and what this CPU has."""
    lacking = missing(capabilities)
    if not lacking:
        return None
    needs = "; ".join(f"{c}: {CAPABILITIES[c][1]}" for c in lacking)
    return f"{what} needs {needs}; this CPU is {describe()}"


def tags() -> Dict[str, str]:
    out = {"cpu.model": model_name()}
    out.update({f"cpu.isa.{f}": str(f in flags()).lower() for f in ISA_FLAGS})
    out.update({f"cpu.can.{c}": str(has(c)).lower() for c in CAPABILITIES})
    if onednn_cap():
        out["cpu.onednn_cap"] = onednn_cap()
    # kept from earlier versions so dashboards filtering on them still work
    out.update({"cpu.avx512": str("avx512f" in flags()), "cpu.amx_bf16": str("amx_bf16" in flags()),
                "cpu.amx_int8": str("amx_int8" in flags())})
    return out
