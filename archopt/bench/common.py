"""Shared benchmark plumbing: interleaved timing rounds and machine facts."""

from __future__ import annotations

import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from archopt.measure import cpu_name
from archopt.measure.timing import quantile


def machine_line(threads: int) -> str:
    return (
        f"{cpu_name()}, {threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Measured matmul rate here in ``dtype``: the compute floor's denominator."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def interleaved(
    contenders: dict[str, Callable[[], object]],
    *,
    rounds: int = 7,
    per_round: int = 10,
    warmup: int = 5,
    progress: bool = True,
    min_round_ms: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Time each contender in turn, ``rounds`` x ``per_round`` calls, so drift hits all alike.

    The order is shuffled (seeded) from round to round: a call right after another
    contender's can pay for its leftovers (measured: our attention 1.45x slower right after a
    compiled FlexAttention call), and that must not always land on the same contender, as it
    does with a fixed or merely rotated order. ``min_round_ms`` gives a fast contender more
    calls per round (at least that many ms, judged by its last warm-up call), so that its
    median is not decided by which contenders happened to run just before its few calls.
    """
    calls = {}
    for name, fn in contenders.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            fn()
        ms = (time.perf_counter() - t0) * 1e3 if warmup else float("inf")
        calls[name] = max(per_round, math.ceil(min_round_ms / ms) if min_round_ms else 1)
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    names, rng = list(contenders), random.Random(0)
    for r in range(rounds):
        for name in rng.sample(names, len(names)):
            fn = contenders[name]
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
        if progress:
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return {
        k: {
            "median_ms": statistics.median(v),
            "p10_ms": quantile(v, 0.1),
            "p90_ms": quantile(v, 0.9),
            "samples": len(v),
        }
        for k, v in samples.items()
    }
