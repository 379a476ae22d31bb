"""The ``int8[:R]`` KV cache: keys and values in int8, the recent ones also in full precision.

See ``archopt.ops.kv_cache`` for the protocol every cache follows.
"""

from __future__ import annotations

import torch

from archopt.ops.kv_cache import DenseCache


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
