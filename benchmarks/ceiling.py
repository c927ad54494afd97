"""What the matrix units give in practice: one large square matmul per precision, best and median of N.

The nominal peak in orchestrator/flops.py (cores x nominal clock x FLOP/cycle) is what every run's
``peak_fraction`` divides by; this is the attainable ceiling beside it, for reading those fractions. Not a test.

int8 is ``torch._int_mm`` (int8 x int8 -> int32, oneDNN; VNNI or AMX-INT8 when the CPU has them), counted as
2 ops per multiply-accumulate like the float rows.

    python benchmarks/ceiling.py                 # 2 threads, 4096^3, fp32, bf16 and int8
    python benchmarks/ceiling.py --threads 1 --n 2048
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import torch

    from orchestrator import flops

    torch.set_num_threads(args.threads)
    n = args.n
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        if dtype == torch.int8:
            a, b = (torch.randint(-128, 128, (n, n), dtype=dtype) for _ in range(2))
            mm = torch._int_mm
        else:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            mm = torch.matmul
        for _ in range(2):  # first calls pick kernels and fault in the output
            mm(a, b)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mm(a, b)
            times.append(time.perf_counter() - t0)
        gf = 2 * n ** 3 / 1e9
        best, med = gf / min(times), gf / statistics.median(times)
        nominal = flops.peak_gflops(name, args.threads)
        vs = (f"; nominal peak {nominal[0]:.0f} ({nominal[1]}) -> {100 * best / nominal[0]:.0f} % of it"
              if nominal else "; no nominal peak for this CPU (flags or clock unknown)")
        print(f"{name}: {best:7.0f} GFLOP/s best, {med:7.0f} median of {args.repeats}{vs}")
    print(f"torch {torch.__version__}, {args.threads} threads, {n}x{n} @ {n}x{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
