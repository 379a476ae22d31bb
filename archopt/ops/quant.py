"""Weight-only int8 and int4 quantization for decoding, where a step reads every weight once.

- ``Int8Linear``: symmetric int8, one scale per output channel (absmax / 127) or per block of
  ``group_size`` inputs (GGUF's Q8_0: blocks of 32, ``w = d * q``).
- ``Int4Linear``: asymmetric 4-bit, a scale and a minimum per block of ``group_size`` inputs,
  ``w = d * q + m`` with q in 0..15: exactly GGUF's Q4_1, whose blocks it can take as they are
  (``from_packed``), two weights per byte in Q4_1's order (byte j of a block holds
  element j in its low nibble and element j + group_size/2 in its high one).

For one row of input (the decode step) the product is written as dequantize-multiply-sum in
one expression; inside a compiled step inductor fuses it into one pass over the packed bytes.
Measured on the 2-core machine (one thread, SmolLM2 shapes, compiled): per-channel int8 reads
the 49152 x 576 output projection in 2.0 ms, grouped int8 in 2.8 ms, int4 in 3.1 ms, fp32 in
6.5-8 ms; torch's own ``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` took 21 and
46 ms there for a single row, so they are not used. For several rows (a prompt) the weight is
dequantized once and multiplied normally.
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT_KINDS = ("int8", "int4")


def _check_groups(in_features: int, group_size: int, what: str) -> None:
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(
            f"{what}: group_size must be an even divisor of in_features ({in_features}), "
            f"got {group_size}"
        )


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with ``q`` int8 (out, in) and ``scale`` fp32 (out, groups).

    ``group_size=None``: one scale per output channel; else one per block of ``group_size``
    consecutive inputs.
    """

    def __init__(self, weight: torch.Tensor | None = None, *, group_size: int | None = None):
        super().__init__()
        if weight is None:  # filled by from_quantized
            return
        w = weight.detach().float()
        out_f, in_f = w.shape
        if group_size is not None:
            _check_groups(in_f, group_size, "Int8Linear")
        g = in_f if group_size is None else group_size
        blocks = w.view(out_f, in_f // g, g)
        scale = blocks.abs().amax(-1).clamp(min=1e-12) / 127  # (out, groups)
        q = (blocks / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
        self._set(q.view(out_f, in_f), scale)

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, scale: torch.Tensor) -> Int8Linear:
        """From int8 values (out, in) and fp32 scales (out, groups), kept as they are."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            got = f"{qweight.dtype} {tuple(qweight.shape)}"
            raise ValueError(f"qweight must be 2-D int8, got {got}")
        if scale.dim() != 2 or scale.shape[0] != qweight.shape[0]:
            out_f = qweight.shape[0]
            got = tuple(scale.shape)
            raise ValueError(f"scale must be (out, groups) with out = {out_f}, got {got}")
        _check_groups(qweight.shape[1], qweight.shape[1] // scale.shape[1], "Int8Linear")
        m = cls()
        m._set(qweight, scale.float())
        return m

    def _set(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.out_features, self.in_features = q.shape
        self.groups = scale.shape[1]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, g = self.out_features, self.groups
        w = self.qweight.view(n, g, -1).to(dtype) * self.scale.to(dtype)[..., None]
        return w.view(n, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return nn.functional.linear(x, self.dequantized(x.dtype))
        # one token: a fused multiply-and-sum over the int8 bytes
        n, g = self.out_features, self.groups
        scale = self.scale.to(x.dtype)
        if g == 1:
            rows = (x.reshape(1, 1, -1) * self.qweight.to(x.dtype)).sum(-1) * scale.T
        else:
            w = self.qweight.view(n, g, -1).to(x.dtype) * scale[..., None]
            rows = (x.reshape(1, g, -1) * w).sum((-1, -2))
        return rows.reshape(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        gs = self.in_features // self.groups
        groups = "per channel" if self.groups == 1 else f"groups of {gs}"
        return f"in={self.in_features}, out={self.out_features}, int8 {groups}"


class Int4Linear(nn.Module):
    """``y = x @ w.T`` with ``w = scale * q + minimum`` per block of ``group_size`` inputs,
    q in 0..15 packed two per byte (``qweight`` uint8 (out, in/2), Q4_1's nibble order);
    ``scale`` and ``minimum`` fp32 (out, in/group_size)."""

    def __init__(self, weight: torch.Tensor | None = None, *, group_size: int = 32):
        super().__init__()
        if weight is None:  # filled by from_q4_1_blocks
            return
        w = weight.detach().float()
        out_f, in_f = w.shape
        _check_groups(in_f, group_size, "Int4Linear")
        blocks = w.view(out_f, in_f // group_size, group_size)
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        scale = (hi - lo) / 15
        safe = torch.where(scale > 0, scale, 1.0)  # a constant block: q = 0, w = minimum
        q = ((blocks - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
        half = group_size // 2
        self._set((q[..., :half] | q[..., half:] << 4).view(out_f, in_f // 2), scale, lo)

    @classmethod
    def from_packed(
        cls, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
    ) -> Int4Linear:
        """From packed nibbles uint8 (out, in/2) and scales and minima (out, groups), kept as
        they are (archopt.loading.gguf turns Q4_1 blocks into these without touching a bit)."""
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"packed must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
        out_f, in_f = packed.shape[0], packed.shape[1] * 2
        for name, t in (("scale", scale), ("minimum", minimum)):
            if t.dim() != 2 or t.shape[0] != out_f:
                raise ValueError(
                    f"{name} must be (out, groups) with out = {out_f}, got {tuple(t.shape)}"
                )
        if scale.shape != minimum.shape:
            raise ValueError(
                f"scale and minimum must have the same shape, got {tuple(scale.shape)} and "
                f"{tuple(minimum.shape)}"
            )
        _check_groups(in_f, in_f // scale.shape[1], "Int4Linear")
        m = cls()
        m._set(packed, scale, minimum)
        return m

    def _set(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> None:
        self.register_buffer("qweight", packed.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("minimum", minimum.float().contiguous())
        self.out_features, self.groups = scale.shape
        self.in_features = packed.shape[1] * 2

    def _unpacked(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized low- and high-nibble halves of every block, (out, groups, gs/2) each."""
        p = self.qweight.view(self.out_features, self.groups, -1)
        s, m = self.scale.to(dtype)[..., None], self.minimum.to(dtype)[..., None]
        return (p & 15).to(dtype) * s + m, (p >> 4).to(dtype) * s + m

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        lo, hi = self._unpacked(dtype)
        return torch.cat([lo, hi], dim=-1).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return nn.functional.linear(x, self.dequantized(x.dtype))
        lo, hi = self._unpacked(x.dtype)  # fused with the products below when compiled
        xg = x.reshape(self.groups, 2, -1)
        rows = (lo * xg[:, 0] + hi * xg[:, 1]).sum((-1, -2))
        return rows.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gs = self.in_features // self.groups
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {gs}"


def quantize_weights(model: nn.Module, kind: str = "int8", group_size: int | None = None):
    """Replace every ``nn.Linear`` (and a tied output projection) with a quantized one, in place.

    ``kind``: ``"int8"`` (per channel, or per ``group_size`` block) or ``"int4"`` (blocks of
    ``group_size``, default 32). Embedding lookups stay in full precision: they read one row
    per token.
    """
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"weight quantization kind must be one of {WEIGHT_KINDS}, got {kind!r}")

    def make(weight):
        if kind == "int8":
            return Int8Linear(weight, group_size=group_size)
        return Int4Linear(weight, group_size=group_size or 32)

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}.{child_name}: biased linears are not supported")
                setattr(module, child_name, make(child.weight))
    if getattr(model, "lm_head", "absent") is None and hasattr(model, "embed"):
        model.lm_head = make(model.embed.weight)  # tied: the projection gets its own copy
    return model
