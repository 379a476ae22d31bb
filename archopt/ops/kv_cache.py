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

Kinds here: ``dense`` (grows by doubling up to a capacity; no per-token copy) and ``static``
(preallocated, fixed shapes so a compiled decode step never recompiles). Elsewhere in
``archopt.ops``: ``window_cache`` (``sliding:W``, a ring of the last W tokens, Mistral's rule;
``sink:S:W``, StreamingLLM: the first S tokens kept for ever plus a ring of the last W),
``int8_cache`` (``int8[:R]``) and ``paged_kv`` (``paged[:B]``, which attends itself);
``cache_spec.make_cache`` makes any of them from a spec string.

Position convention for the bounded kinds: keys keep their original positions (they are
rotated once, when written). StreamingLLM instead renumbers positions inside the cache so that
no relative distance exceeds the window; with original positions, distances to the sinks grow
past the model's training length. We keep original positions because then a bounded cache is
exactly dense attention under a mask (what the tests check against), and every model, cache
and kernel here stores rotated keys.
"""

from __future__ import annotations

import torch

from archopt.ops.capture import in_graph


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
            if not in_graph() and self.length + t > self.capacity:
                super()._begin(positions)  # raises the capacity error
            self._slots = self.cursor + torch.arange(t, device=self.device)
            self.positions.index_copy_(1, self._slots, positions)
            self._mask = position_mask(positions, self.positions, always_tensor=True)
        self.keys[layer].index_copy_(2, self._slots, k)
        self.values[layer].index_copy_(2, self._slots, v)
        if layer == self.num_layers - 1:
            self.cursor += t
        return self.keys[layer], self.values[layer], self._mask


class StaticDecodeView(StaticCache):
    """A static cache inside a compiled one-token step (``archopt.step_graphs``) whose attention
    is archopt's C++ kernel (``torch.ops.archopt.static_decode_attention``, loaded by
    ``archopt.ops.cpu_kernels``): it writes the token as ``update`` does, then scores only the
    slots each row sees, where the torch expression scores the whole capacity under a mask.
    Equal to it to rounding, each row's sums in an order that does not depend on its batch."""

    def attend(self, layer, q, k, v, positions):
        keys, values, _ = self.update(layer, k, v, positions)
        return torch.ops.archopt.static_decode_attention(
            q, keys, values, self.positions, positions, q.shape[-1] ** -0.5
        )


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
