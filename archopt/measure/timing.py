"""Latency and peak memory, measured the way the benchmarks need them.

Latency: warm-up calls, then timed repeats; the median and the spread (p10/p90, IQR) are
reported with the thread count, torch version and device, because absolute times on shared
machines drift and only same-run ratios are comparable.

Peak memory, three methods:

- ``"cuda"``: the CUDA allocator's ``max_memory_allocated`` above the starting allocation.
- ``"tensors"`` (CPU default): the peak of the bytes held by tensors created during the call,
  tracked at the ATen dispatch level (storages shared by views counted once, freed storages
  subtracted when the last tensor on them dies). Deterministic; it sees what the model
  allocates, not scratch space inside kernels or allocator caching.
- ``"rss"``: the process's peak resident set size (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``) above the resident size before the call: what the operating
  system sees, kernels' scratch space and compiled code's buffers included. Freed heap pages
  are handed back first (glibc ``malloc_trim``) so that reused memory is counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import random
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from archopt.report import log


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[int]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    old = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _as_call(fn_or_model, inputs) -> Callable[[], object]:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(fn_or_model, nn.Module):
        model = fn_or_model

        def call():
            with torch.inference_mode():
                return model(*args)

        return call
    return lambda: fn_or_model(*args)


def _devices(inputs) -> set[str]:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return {a.device.type for a in args if isinstance(a, torch.Tensor)} or {"cpu"}


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    repeats: int
    threads: int
    device: str
    torch_version: str
    cpu: str

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80% of runs."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f})"


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure_latency(
    fn_or_model: Callable | nn.Module,
    inputs=(),
    *,
    warmup: int = 5,
    repeats: int = 30,
    min_time_s: float = 0.0,
    threads: int | None = None,
) -> Latency:
    """Time ``fn_or_model(*inputs)``: ``warmup`` untimed calls, then at least ``repeats`` timed
    calls (more until ``min_time_s`` has passed). Modules run under ``inference_mode``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    call = _as_call(fn_or_model, inputs)
    devices = _devices(inputs)
    cuda = "cuda" in devices
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: list[float] = []
    with num_threads(threads) as n:
        for _ in range(warmup):
            call()
        sync()
        start_all = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
            t0 = time.perf_counter()
            call()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return Latency(
        median_ms=statistics.median(times),
        p10_ms=quantile(times, 0.1),
        p90_ms=quantile(times, 0.9),
        min_ms=min(times),
        mean_ms=statistics.fmean(times),
        repeats=len(times),
        threads=n,
        device="cuda" if cuda else "cpu",
        torch_version=torch.__version__,
        cpu=cpu_name(),
    )


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
    Returns, per contender, the median, p10 and p90 in ms and the number of samples.
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
        log(f"  round {r + 1}/{rounds}", progress)
    return {
        k: {
            "median_ms": statistics.median(v),
            "p10_ms": quantile(v, 0.1),
            "p90_ms": quantile(v, 0.9),
            "samples": len(v),
        }
        for k, v in samples.items()
    }


@dataclass
class PeakMemory:
    bytes: int  # peak above the starting point
    method: str  # "cuda", "tensors", "rss" (or "rss-sampled" without clear_refs)

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not found in /proc/self/status")


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that memory the call
    reuses from earlier allocations shows up in its RSS instead of hiding in the baseline."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks bytes of storages created by dispatched ops while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address -> number of live tensors on it
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def _track(self, t: torch.Tensor, existing: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or t.device.type == "meta":
            return
        if key in existing and key not in self.refs:
            return  # a view of memory that was there before the call (an input, a weight)
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {
            a.untyped_storage().data_ptr()
            for a in tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor) and a.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, existing)
        return out


def measure_peak_memory(
    fn_or_model: Callable | nn.Module, inputs=(), *, method: str = "auto"
) -> PeakMemory:
    """Peak memory of one call of ``fn_or_model(*inputs)`` above the memory in use before it.

    ``method``: ``"auto"`` (``"cuda"`` for CUDA inputs, else ``"tensors"``), ``"tensors"``,
    ``"rss"`` or ``"cuda"``; see the module docstring for what each sees.
    """
    methods = ("auto", "tensors", "rss", "cuda")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    call = _as_call(fn_or_model, inputs)
    auto = method == "auto"
    if method == "auto":
        method = "cuda" if "cuda" in _devices(inputs) else "tensors"
    if method == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        return PeakMemory(torch.cuda.max_memory_allocated() - base, "cuda")
    if method == "tensors":
        tracker = _LiveTensorBytes()
        try:
            with tracker:
                out = call()
        except RuntimeError:
            # A frozen TorchScript graph (optimize_for_inference's "jit") cannot run under the
            # tracking mode; "auto" measures it by the process's RSS instead.
            if auto:
                return measure_peak_memory(fn_or_model, inputs, method="rss")
            raise
        del out
        return PeakMemory(tracker.peak, "tensors")
    if not os.path.exists("/proc/self/status"):
        raise RuntimeError("CPU peak memory needs Linux /proc (VmRSS/VmHWM)")
    _release_free_memory()
    base = _rss_bytes()
    if _reset_hwm():
        call()
        return PeakMemory(max(_rss_bytes("VmHWM") - base, 0), "rss")
    # No clear_refs (old kernel, restricted container): sample RSS from a thread.
    peak = base
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        call()
    finally:
        done.set()
        t.join()
    return PeakMemory(max(peak - base, 0), "rss-sampled")
