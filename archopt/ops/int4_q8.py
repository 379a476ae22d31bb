"""4-bit weights times int8 activations on the CPU: llama.cpp's arithmetic for Q4 blocks.

``Int4Q8Linear`` holds an ``Int4Linear``'s blocks of 32 (GGUF's Q4_0 / Q4_1: ``w = d q + m``)
re-laid for archopt's kernel (``archopt/csrc/int4_linear.cpp``, ``torch.ops.archopt.
int4_q8_linear``): each row of the input is quantized to int8 per block of 32 (``x ~ sx qx``,
``sx = max|x| / 127``, as llama.cpp's Q8_1), the block products are exact integer sums
(AVX512-VNNI), and the scales are applied in fp32. Where torch's int4 kernel
(``PackedInt4Linear``) dequantizes every weight to bf16 before multiplying, this reads each
packed weight block once for up to four rows: 2-3x faster for one row and about 2x for four on
this project's 2-core machine (``archopt bench quant-linear``), which is what a batch of
decoding streams multiplies.

The price is the activations' rounding to 8 bits (its perplexity cost is measured in
benchmarks/RESULTS.md); the weights are the checkpoint's own, bit for bit, so the scales must
be exact in fp16, as GGUF's are. ``reference`` is the same computation in plain torch (the
kernel agrees with it to fp32 rounding); a row's result never depends on the other rows.
"""

from __future__ import annotations

import torch
from torch import nn

from archopt.ops.quant import Int4Linear

BLOCK = 32
TILE = 16  # output rows per packed tile


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (M, K) -> int8 values (M, K), per-block scales sx and sx * sum(qx) (M, K / 32),
    exactly as the kernel rounds (to nearest, ties to even; a block with NaN or Inf gets NaN
    scales)."""
    b = x.float().reshape(x.shape[0], -1, BLOCK)
    amax = b.abs().amax(-1)
    finite = torch.isfinite(b).all(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv[..., None])
    q = torch.where(finite[..., None], q, torch.zeros_like(q))
    sx = torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))
    sxs = sx * q.sum(-1)
    return q.to(torch.int8).reshape(x.shape), sx, sxs


class Int4Q8Linear(nn.Module):
    """``y = x @ w.T`` with Q4 weights and int8 activations (see the module docstring).

    ``packed`` uint8 (out/16, in/32, 4, 64) and ``scales`` fp16 (out/16, in/32, 2, 16), in the
    kernel's layout; build it with ``from_int4``."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.out_features = packed.shape[0] * TILE
        self.in_features = packed.shape[1] * BLOCK

    @classmethod
    def from_int4(cls, m: Int4Linear) -> Int4Q8Linear:
        n, k, g = m.out_features, m.in_features, m.groups
        problem = shape_problem(n, k, k // g)
        if problem is not None:
            raise ValueError(f"Int4Q8Linear: {problem}")
        d, lo = m.scale.half(), m.minimum.half()
        if not (torch.equal(d.float(), m.scale) and torch.equal(lo.float(), m.minimum)):
            raise ValueError(
                "Int4Q8Linear keeps the weights bit for bit: their scales and minima must be "
                "exact in fp16 (as a GGUF file's are); these are not"
            )
        p = m.qweight.view(n, g, BLOCK // 2)
        q = torch.cat([p & 15, p >> 4], -1)  # (n, g, 32): the block's values in order
        q = q.view(n // TILE, TILE, g, 8, 4).permute(0, 2, 3, 1, 4)  # (tile, g, step, row, k)
        packed = (q[:, :, :4] | q[:, :, 4:] << 4).reshape(n // TILE, g, 4, 64)
        per_tile = [t.view(n // TILE, TILE, g).permute(0, 2, 1) for t in (d, lo)]
        scales = torch.stack(per_tile, 2)  # (tile, g, 2, 16)
        return cls(packed.contiguous(), scales.contiguous())

    def values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights' q (out, in) uint8 and d, m (out, in/32) fp32, read back from the layout."""
        t, g = self.packed.shape[:2]
        p = self.packed.view(t, g, 4, TILE, 4)  # (tile, g, step, row, k)
        q = torch.cat([p & 15, p >> 4], 2)  # (tile, g, 8 steps, row, k)
        q = q.permute(0, 3, 1, 2, 4).reshape(self.out_features, self.in_features)
        d, m = (self.scales[:, :, i].permute(0, 2, 1).reshape(-1, g).float() for i in (0, 1))
        return q, d, m

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, d, m = self.values()
        w = q.float().view(self.out_features, -1, BLOCK) * d[..., None] + m[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's result in plain torch (fp32 sums in another order: equal to rounding)."""
        rows = x.reshape(-1, self.in_features)
        qx, sx, sxs = quantize_activations(rows)
        q, d, m = self.values()
        n, g = self.out_features, self.in_features // BLOCK
        dots = torch.einsum(  # exact: |sum| < 2^24
            "rgj,ngj->rng", qx.float().view(-1, g, BLOCK), q.float().view(n, g, BLOCK)
        )
        y = (dots * d * sx[:, None] + m * sxs[:, None]).sum(-1)
        return y.to(x.dtype).view(*x.shape[:-1], n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        return kernel()(x, self.packed, self.scales, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, int4 blocks of 32, int8 "
            "activations (archopt's CPU kernel)"
        )


def shape_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why the kernel cannot take this shape, or None."""
    if group_size != BLOCK:
        return f"blocks must be of {BLOCK} inputs (GGUF's Q4), got {group_size}"
    if out_features % TILE:
        return f"out_features must be a multiple of {TILE}, got {out_features}"
    return None


def kernel():
    """``torch.ops.archopt.int4_q8_linear``, archopt's CPU kernels loaded (built once per
    machine) if they are not yet; RuntimeError naming why when they cannot be."""
    from archopt.ops import cpu_kernels

    if not cpu_kernels.loaded() and not cpu_kernels.load(build=True):
        why = cpu_kernels.why_unavailable() or "they did not load"
        raise RuntimeError(f"int8 activations need archopt's CPU kernels: {why}")
    return torch.ops.archopt.int4_q8_linear


def use_int8_activations(model: nn.Module) -> dict[str, int]:
    """Replace, in place, every ``Int4Linear`` the kernel takes with an ``Int4Q8Linear``
    (loading archopt's CPU kernels, built once per machine); how many were replaced and kept."""
    kernel()
    counts = {"replaced": 0, "kept": 0}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, Int4Linear):
                continue
            gs = child.in_features // child.groups
            if child.qweight.device.type != "cpu" or shape_problem(
                child.out_features, child.in_features, gs
            ):
                counts["kept"] += 1
                continue
            setattr(module, name, Int4Q8Linear.from_int4(child))
            counts["replaced"] += 1
    return counts
