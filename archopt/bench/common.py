"""What every benchmark reports next to its figures: the machine, and its measured floors.

Timing itself is ``archopt.measure`` (``measure_latency``, ``interleaved``); tables and plots
are ``archopt.report``.
"""

from __future__ import annotations

import platform
import time

import torch

from archopt.measure import cpu_name, measure_latency


def machine_line(threads: int) -> str:
    return (
        f"{cpu_name()}, {threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul rate here in ``dtype``: the compute floor's denominator."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best_ms = measure_latency(lambda: a @ b, warmup=1, repeats=repeats).min_ms
    return 2 * n**3 / (best_ms / 1e3) / 1e9


def memory_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a matrix-vector product over ``nbytes`` of fp32: how decode reads weights."""
    cols = 1024
    w = torch.randn(max(nbytes // (4 * cols), 1), cols)
    x = torch.randn(cols)
    best_ms = measure_latency(lambda: torch.mv(w, x), warmup=1, repeats=repeats).min_ms
    return w.numel() * 4 / (best_ms / 1e3)
