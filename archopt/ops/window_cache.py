"""The bounded KV caches: ``sliding:W`` (a ring of the last W tokens) and ``sink:S:W`` (the
first S tokens kept, plus the ring): memory bounded by S + W whatever the length.

See ``archopt.ops.kv_cache`` for the protocol and the position convention they share.
"""

from __future__ import annotations

import torch

from archopt.ops.kv_cache import KVCache, position_mask


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
