"""KV caches behind one protocol: what a decoder layer stores and what it may attend.

Every cache holds, per layer, keys and values in slots, and for every slot the position of the
token in it (-1: empty or padding). A query at position p attends the slots whose position q
satisfies 0 <= q <= p (plus whatever window rule a cache kind adds), so the attention mask is
derived from positions alone; that is what lets ring buffers, sinks and left padding share one
code path.

The protocol (``KVCache``):

- ``update(layer, k, v, positions) -> (keys, values, mask)``: store the new ``k``/``v``
  (B, kv_heads, T, head_dim) for tokens at ``positions`` (B, T) and return what layer ``layer``
  attends: keys/values (B, kv_heads, S, head_dim) and a bool mask (B, 1, T, S), True = attend,
  or None when every slot is visible to every query. Layers call it in order 0..L-1 once per
  forward; layer 0 allocates the slots for the step and builds the mask the others reuse.
- ``nbytes``: bytes the cache holds in memory for keys and values (and scales, for kinds that
  have them), ``length``: tokens written so far, ``reset()``, ``crop(length)``.

Kinds: ``dense`` (grows by doubling up to a capacity; no per-token copy), ``static``
(preallocated, fixed shapes so a compiled decode step never recompiles), ``sliding:W`` (a ring
of the last W tokens, Mistral's rule) and ``sink:S:W`` (StreamingLLM: the first S tokens kept
for ever plus a ring of the last W).

Position convention for the bounded kinds: keys keep their original positions (they are
rotated once, when written). StreamingLLM instead renumbers positions inside the cache so that
no relative distance exceeds the window; with original positions, distances to the sinks grow
past the model's training length. We keep original positions because then a bounded cache is
exactly dense attention under a mask (what the tests check against), and every model, cache
and kernel here stores rotated keys.
"""

from __future__ import annotations

import torch

CACHE_KINDS = ("none", "dense", "static", "sliding:W", "sink:S:W", "int8", "int8:R", "paged:B")


class KVCache:
    """Slot storage and the position-derived mask; subclasses choose the slots."""

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        window: int | None = None,
        sinks: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 token, got {capacity}")
        # The visibility rule (see position_mask); a dense cache with a rule is the oracle the
        # bounded caches are tested against.
        self.window, self.sinks = window, sinks
        self.num_layers, self.batch = num_layers, batch
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.capacity = capacity
        self.dtype, self.device = dtype, torch.device(device)
        self.length = 0
        self._alloc(self._initial_slots())
        self._step: tuple[int, int] | None = None  # (first slot, slots visible) of this forward
        self._mask: torch.Tensor | None = None

    # -- storage ---------------------------------------------------------------------------
    def _initial_slots(self) -> int:
        return self.capacity

    def _alloc(self, slots: int) -> None:
        shape = (self.batch, self.kv_heads, slots, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self._L]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self._L]
        self.positions = torch.full((self.batch, slots), -1, dtype=torch.long, device=self.device)

    @property
    def _L(self) -> range:
        return range(self.num_layers)

    @property
    def slots(self) -> int:
        return self.positions.shape[1]

    def _per_slot(self) -> tuple[list[torch.Tensor], ...]:
        """The per-layer tensors indexed by slot on dim 2 (what growing copies)."""
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in self._per_slot() for t in group)

    def reset(self) -> None:
        self.length = 0
        self.positions.fill_(-1)

    def crop(self, length: int) -> None:
        """Forget every token after the first ``length`` (e.g. to rewind a rejected draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        self.positions[:, length:] = -1
        self.length = length

    # -- the protocol ----------------------------------------------------------------------
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if layer == 0:
            self._begin(positions)
        start, visible = self._step
        t = k.shape[2]
        self.keys[layer][:, :, start : start + t] = k
        self.values[layer][:, :, start : start + t] = v
        keys, values = self._visible(layer, visible)
        if layer == self.num_layers - 1:
            self.length += t
        return keys, values, self._mask

    def _begin(self, positions: torch.Tensor) -> None:
        b, t = positions.shape
        if b != self.batch:
            raise ValueError(f"cache was made for batch {self.batch}, got positions for {b}")
        if self.length + t > self.capacity:
            raise ValueError(
                f"{type(self).__name__} holds at most {self.capacity} tokens, and "
                f"{self.length} + {t} new ones do not fit: use a larger capacity, or a "
                "bounded cache ('sliding:W' keeps the last W tokens, 'sink:S:W' keeps the "
                "first S plus the last W)"
            )
        if self.length + t > self.slots:
            self._grow(self.length + t)
        start = self.length
        self.positions[:, start : start + t] = positions
        visible = self._visible_slots(start + t)
        self._step = (start, visible)
        self._mask = position_mask(
            positions, self.positions[:, :visible], window=self.window, sinks=self.sinks
        )

    def _visible_slots(self, used: int) -> int:
        return used

    def _visible(self, layer: int, visible: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, :visible], self.values[layer][:, :, :visible]

    def _grow(self, needed: int) -> None:
        raise AssertionError("unreachable: fixed-size caches allocate their capacity up front")


class DenseCache(KVCache):
    """Grows by doubling (amortized O(1) per token, no per-token copy) up to ``capacity``.

    ``reserve`` sets the first allocation (``generate`` passes prompt + new tokens, so a run
    never grows); ``nbytes`` counts what is allocated, which is at most twice what is used.
    """

    def __init__(self, *, reserve: int | None = None, **kwargs) -> None:
        self._reserve = reserve
        super().__init__(**kwargs)

    def _initial_slots(self) -> int:
        return min(self.capacity, self._reserve or 256)

    def _grow(self, needed: int) -> None:
        old, old_pos = self._per_slot(), self.positions
        self._alloc(min(self.capacity, max(needed, 2 * self.slots)))
        n = old_pos.shape[1]
        for new_group, old_group in zip(self._per_slot(), old):
            for new, prev in zip(new_group, old_group):
                new[:, :, :n] = prev
        self.positions[:, :n] = old_pos


class StaticCache(KVCache):
    """Preallocated to ``capacity``; every step sees all slots, so shapes never change.

    Empty slots carry position -1 and are masked out. Attention reads the whole capacity each
    step: the price of fixed shapes. The write cursor is a tensor and the mask is always a
    tensor, so a compiled decode step traces no Python number that changes per token: it never
    recompiles and never waits on the device (``length`` reads the cursor, a sync, for callers
    outside the step).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cursor = torch.zeros((), dtype=torch.long, device=self.device)

    @classmethod
    def over(
        cls,
        cursor: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> StaticCache:
        """A static cache whose state is the given tensors, written in place: how a step
        exported as a graph (archopt.decode_step) takes its cache as inputs."""
        kv = cls.__new__(cls)
        kv.cursor, kv.positions, kv.keys, kv.values = cursor, positions, list(keys), list(values)
        kv.num_layers, (kv.batch, kv.capacity) = len(kv.keys), positions.shape
        kv.kv_heads, kv.head_dim = keys[0].shape[1], keys[0].shape[3]
        kv.dtype, kv.device = keys[0].dtype, positions.device
        kv.window, kv.sinks, kv._step, kv._mask = None, 0, None, None
        return kv

    @property
    def length(self) -> int:
        return int(self.cursor)

    @length.setter
    def length(self, value: int) -> None:
        if hasattr(self, "cursor"):
            self.cursor.fill_(value)

    def update(self, layer, k, v, positions):
        t = k.shape[2]
        if layer == 0:
            b = positions.shape[0]
            if b != self.batch:
                raise ValueError(f"cache was made for batch {self.batch}, got positions for {b}")
            if not torch.compiler.is_compiling() and self.length + t > self.capacity:
                super()._begin(positions)  # raises the capacity error
            self._slots = self.cursor + torch.arange(t, device=self.device)
            self.positions.index_copy_(1, self._slots, positions)
            self._mask = position_mask(positions, self.positions, always_tensor=True)
        self.keys[layer].index_copy_(2, self._slots, k)
        self.values[layer].index_copy_(2, self._slots, v)
        if layer == self.num_layers - 1:
            self.cursor += t
        return self.keys[layer], self.values[layer], self._mask


class Int8Cache(DenseCache):
    """Keys and values in int8 with one fp32 scale per token and head (symmetric absmax); a
    query also sees the ``recent`` tokens nearest it (itself included) in full precision, since
    those are the keys it attends most.

    The full-precision rule is relative to each query, so chunked and one-shot prefill see the
    same values: attention gets the dequantized keys of every slot plus full-precision copies
    of the last ``recent`` slots, and the mask picks one of the two per (query, key). About
    3.8x smaller than fp32 at head_dim 64 (64 bytes + a 4-byte scale vs 256, per token and
    head); reading dequantizes, so it saves memory, not time, on a CPU.
    """

    def __init__(self, *, recent: int = 32, **kwargs) -> None:
        if recent < 0:
            raise ValueError(f"int8 cache: recent must be >= 0, got {recent}")
        # A ring longer than the cache can ever hold keeps every token either way: cap it, so
        # that 'int8:<huge>' allocates what the capacity needs and no more.
        self.recent = min(recent, kwargs.get("capacity", recent))
        super().__init__(**kwargs)

    def _alloc(self, slots: int) -> None:
        b, h, d, dev = self.batch, self.kv_heads, self.head_dim, self.device
        self.keys = [torch.zeros(b, h, slots, d, dtype=torch.int8, device=dev) for _ in self._L]
        self.values = [torch.zeros(b, h, slots, d, dtype=torch.int8, device=dev) for _ in self._L]
        self.key_scales = [torch.zeros(b, h, slots, 1, device=dev) for _ in self._L]
        self.value_scales = [torch.zeros(b, h, slots, 1, device=dev) for _ in self._L]
        self.positions = torch.full((b, slots), -1, dtype=torch.long, device=dev)
        if not hasattr(self, "recent_keys"):  # a ring of the last `recent` tokens, by slot
            shape = (b, h, max(self.recent, 1), d)
            self.recent_keys = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in self._L]
            self.recent_values = [torch.zeros_like(t) for t in self.recent_keys]

    def _per_slot(self) -> tuple[list[torch.Tensor], ...]:
        return self.keys, self.values, self.key_scales, self.value_scales

    @property
    def nbytes(self) -> int:
        ring = (*self.recent_keys, *self.recent_values) if self.recent else ()
        return super().nbytes + sum(t.numel() * t.element_size() for t in ring)

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 values and fp32 scales (..., 1), one per vector along the last dim."""
        scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale

    def _begin(self, positions: torch.Tensor) -> None:
        super()._begin(positions)
        start, visible = self._step
        t, r = positions.shape[1], self.recent
        base = self._mask
        if base is None:
            base = torch.ones(self.batch, 1, t, visible, dtype=torch.bool, device=self.device)
        # Slot distance = position distance for every real token (slots advance in step).
        query = torch.arange(start, start + t, device=self.device)[:, None]
        self._fp_lo = max(start - r + 1, 0) if r else start + t
        near = query - torch.arange(visible, device=self.device) < r  # (T, S)
        self._mask = torch.cat([base & ~near, (base & near)[..., self._fp_lo :]], dim=-1)
        self._mask |= ~self._mask.any(dim=-1, keepdim=True)  # padding queries: never all-False

    def update(self, layer, k, v, positions):
        if layer == 0:
            self._begin(positions)
        start, visible = self._step
        t, r, lo = k.shape[2], self.recent, self._fp_lo
        end = start + t
        out = []
        for store, scales, ring, x in (
            (self.keys, self.key_scales, self.recent_keys, k),
            (self.values, self.value_scales, self.recent_values, v),
        ):
            store[layer][:, :, start:end], scales[layer][:, :, start:end] = self.quantize(x)
            deq = (store[layer][:, :, :visible] * scales[layer][:, :, :visible]).to(self.dtype)
            if r:
                old = ring[layer][:, :, torch.arange(lo, start, device=x.device) % r]
                out.append(torch.cat([deq, old, x], dim=2))  # (B, Hkv, S + end - lo, d)
                keep = torch.arange(max(end - r, start), end, device=x.device)
                ring[layer][:, :, keep % r] = x[:, :, keep - start]
            else:
                out.append(deq)
        if layer == self.num_layers - 1:
            self.length += t
        return out[0], out[1], self._mask


class WindowCache(KVCache):
    """Bounded memory: ``sinks`` slots for positions 0..S-1, and a ring of ``window`` slots.

    A token at position p lives in slot p (p < S) or S + (p - S) mod W: slots follow each
    row's positions, so left-padded rows keep exactly their own first S and last W tokens.
    One more slot, the last, takes padding and evicted writes and is never visible. One-token
    steps write in place (the slot they overwrite, p - W, is already out of p's window); a chunk
    attends over the old slots plus its own keys, then keeps its survivors.

    Memory grows with the tokens held: slots are allocated as positions reach them (doubling,
    from ``reserve`` or 256), up to S + W; a huge W costs nothing until it fills.
    """

    def __init__(self, *, window: int, sinks: int = 0, reserve: int | None = None, **kwargs):
        self._reserve = reserve
        kwargs["capacity"] = sinks + window + 1
        super().__init__(window=window, sinks=sinks, **kwargs)
        self.capacity = float("inf")  # never full: eviction instead

    def _initial_slots(self) -> int:
        return min(self.sinks + self.window, self._reserve or 256) + 1

    @property
    def _trash(self) -> int:
        return self.slots - 1

    def _grow_to(self, needed: int) -> None:
        """Room for slots 0..needed-1 (and the trash slot after them)."""
        held = self.slots - 1
        if needed <= held:
            return
        real = min(self.sinks + self.window, max(needed, 2 * held))
        old, old_pos = self._per_slot(), self.positions
        self._alloc(real + 1)
        for new_group, old_group in zip(self._per_slot(), old):
            for new, prev in zip(new_group, old_group):
                new[:, :, :held] = prev[:, :, :held]
        self.positions[:, :held] = old_pos[:, :held]

    def _slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        s, w = self.sinks, self.window
        ring = s + (positions - s).remainder(w)
        slot = torch.where(positions < s, positions, ring)
        # Survivors only: the chunk's last W tokens (and sinks); others would collide.
        newest = positions.max(dim=1, keepdim=True).values
        keep = (positions >= 0) & ((positions > newest - w) | (positions < s))
        return torch.where(keep, slot, self._trash)

    def crop(self, length: int) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot crop: evicted tokens are gone (use a dense cache "
            "to rewind)"
        )

    def _begin(self, positions: torch.Tensor) -> None:
        b, t = positions.shape
        if b != self.batch:
            raise ValueError(f"cache was made for batch {self.batch}, got positions for {b}")
        if self.slots - 1 < self.sinks + self.window:  # still growing: before the ring wraps
            self._grow_to(min(self.sinks + self.window, int(positions.max()) + 1))
        slot = self._slot_of(positions)
        rows = torch.arange(b, device=positions.device)[:, None].expand(b, t)
        # A chunk also attends the slots it is about to overwrite: their positions, first.
        before = torch.cat([self.positions, positions], dim=1) if t > 1 else None
        self.positions[rows, slot] = positions
        self.positions[:, self._trash] = -1
        key_pos = self.positions if before is None else before
        self._step = (rows, slot)
        self._mask = position_mask(positions, key_pos, window=self.window, sinks=self.sinks)

    def update(self, layer, k, v, positions):
        if layer == 0:
            self._begin(positions)
        rows, slot = self._step
        t = k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if t > 1:  # attend over the old slots and the whole chunk, before overwriting
            keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        # (B, Hkv, T, d) -> (B, T, Hkv, d): one row of heads per (row, slot) written.
        self.keys[layer][rows, :, slot] = k.transpose(1, 2)
        self.values[layer][rows, :, slot] = v.transpose(1, 2)
        if layer == self.num_layers - 1:
            self.length += t
        return keys, values, self._mask


def position_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int | None = None,
    sinks: int = 0,
    always_tensor: bool = False,
) -> torch.Tensor | None:
    """Bool mask (B, 1, T, S): query at position p sees a key at q when 0 <= q <= p, and, with
    a ``window`` W, p - W < q (the last W tokens, itself included) or q < ``sinks``.

    None when everything is visible (SDPA's unmasked path is faster; checking is a host sync,
    which ``always_tensor`` skips for compiled steps). Query rows that see no
    key (padding queries) are opened fully: their outputs are never used, and an all-False row
    would make softmax return NaN.
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    valid = (k >= 0) & (k <= q)  # (B, T, S)
    if window is not None:
        valid &= (k > q - window) | (k < sinks)
    if not always_tensor and bool(valid.all()):
        return None
    valid |= ~valid.any(dim=-1, keepdim=True)
    return valid[:, None]


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
        from archopt.ops.paged_kv import PagedKVCache

        block = nums[0] if nums else 16
        return PagedKVCache(capacity=capacity, reserve=reserve, block_size=block, **common)
    if kind == "int8":
        recent = nums[0] if nums else 32
        return Int8Cache(capacity=capacity, reserve=reserve, recent=recent, **common)
    window, sinks = nums[-1], nums[0] if kind == "sink" else 0
    return WindowCache(window=window, sinks=sinks, reserve=reserve, **common)
