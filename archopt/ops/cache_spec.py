"""One door to the KV caches: a spec string (``dense``, ``static``, ``sliding:W``,
``sink:S:W``, ``int8[:R]``, ``paged[:B]``, ``none``) checked and made into a cache.
"""

from __future__ import annotations

import torch

from archopt.ops.int8_cache import Int8Cache
from archopt.ops.kv_cache import DenseCache, KVCache, StaticCache
from archopt.ops.paged_kv import PagedKVCache
from archopt.ops.window_cache import WindowCache

CACHE_KINDS = ("none", "dense", "static", "sliding:W", "sink:S:W", "int8", "int8:R", "paged:B")

_ARITY = {
    "none": [0], "dense": [0], "static": [0], "sliding": [1], "sink": [2], "int8": [0, 1],
    "paged": [0, 1],
}  # fmt: skip
MAX_SPEC_NUMBER = 1 << 40  # far past any context; bounds what a spec can ask to allocate


def check_cache_spec(spec: str) -> tuple[str, list[int]]:
    """(kind, numbers) of a cache spec, or ValueError naming what is wrong; ``"auto"`` (the
    decode planner's choice of static or dense) is accepted too."""
    if not isinstance(spec, str):
        raise ValueError(f"cache must be a spec string or a KVCache, got {type(spec).__name__}")
    kind, *params = spec.strip().lower().split(":")
    if kind == "auto" and not params:
        return kind, []
    if kind not in _ARITY or len(params) not in _ARITY[kind]:
        kinds = ", ".join(("auto", *CACHE_KINDS))
        raise ValueError(f"unknown cache spec {spec!r}: expected one of {kinds}")
    try:
        nums = [int(p) for p in params]
    except ValueError:
        raise ValueError(
            f"cache spec {spec!r}: W and S must be integers (e.g. 'sliding:1024', 'sink:4:1020')"
        ) from None
    if kind in ("sliding", "sink"):
        window, sinks = nums[-1], nums[0] if kind == "sink" else 0
        if window < 1:
            raise ValueError(f"cache spec {spec!r}: window W must be >= 1, got {window}")
        if sinks < 0:
            raise ValueError(f"cache spec {spec!r}: sink count S must be >= 0, got {sinks}")
        if window < sinks:
            raise ValueError(
                f"cache spec {spec!r}: window W ({window}) must be at least the sink count S "
                f"({sinks}): the recent context is what the model mostly attends"
            )
    if kind == "int8" and nums and nums[0] < 0:
        raise ValueError(f"cache spec {spec!r}: R must be >= 0, got {nums[0]}")
    if any(n > MAX_SPEC_NUMBER for n in nums):
        raise ValueError(f"cache spec {spec!r}: numbers must be at most 2**40, got {max(nums)}")
    return kind, nums


def make_cache(
    spec: str | KVCache | None,
    *,
    num_layers: int,
    batch: int,
    kv_heads: int,
    head_dim: int,
    capacity: int,
    reserve: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> KVCache | None:
    """A cache from a spec string (``none``, ``dense``, ``static``, ...) or an existing cache
    (a ``KVCache``, or a cache that attends itself: ``archopt.ops.paged_kv.PagedKVCache``)."""
    if spec is None or isinstance(spec, KVCache) or hasattr(spec, "attend"):
        return spec
    kind, nums = check_cache_spec(spec)
    if kind == "auto":
        raise ValueError("cache 'auto' is chosen by the decode planner (archopt.generate)")
    common = dict(
        num_layers=num_layers,
        batch=batch,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )
    if kind == "none":
        return None
    if kind == "dense":
        return DenseCache(capacity=capacity, reserve=reserve, **common)
    if kind == "static":
        return StaticCache(capacity=min(capacity, reserve or capacity), **common)
    if kind == "paged":  # blocks of B tokens (default 16), one sequence per row
        block = nums[0] if nums else 16
        return PagedKVCache(capacity=capacity, reserve=reserve, block_size=block, **common)
    if kind == "int8":
        recent = nums[0] if nums else 32
        return Int8Cache(capacity=capacity, reserve=reserve, recent=recent, **common)
    window, sinks = nums[-1], nums[0] if kind == "sink" else 0
    return WindowCache(window=window, sinks=sinks, reserve=reserve, **common)
