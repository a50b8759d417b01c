"""What machine a benchmark ran on: the CPU's name and its float32 GEMM speed
at the moment (a loaded machine shows as a low figure).

A leaf that imports only the standard library (torch when measuring): the
speed benchmarks import it into the subprocesses whose peak memory they
report, where `common`'s imports would add to that figure.
"""
from __future__ import annotations

import platform
import time


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def gemm_gflops(n: int = 1536, reps: int = 4) -> float:
    """float32 GFLOP/s of an n x n matrix product, the best of `reps` timed
    runs after one warm-up."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
