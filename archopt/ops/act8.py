"""GGUF's blocks times int8 activations on the CPU: llama.cpp's arithmetic for Q4 and Q8 weights.

``Int4Q8Linear`` holds an ``Int4Linear``'s blocks of 32 (GGUF's Q4_0 / Q4_1: ``w = d q + m``)
and ``Int8Q8Linear`` an ``Int8Linear``'s (Q8_0: ``w = d q``), re-laid for archopt's kernels
(``archopt/csrc/act8_linear.cpp``: ``torch.ops.archopt.int4_q8_linear`` and
``int8_q8_linear``). Each row of the input is quantized to int8 per block of 32 (``x ~ sx qx``,
``sx = max|x| / 127``, as llama.cpp's Q8_1), the block products are exact integer sums
(AVX512-VNNI), and the scales are applied in fp32. Where torch's int4 kernel
(``PackedInt4Linear``) turns every weight into bf16 before multiplying (and a Q8_0 weight into
two 4-bit planes), these read each packed block once for up to four rows of input (then two,
then one): on this project's 2-core machine 1.2-2.8x faster per layer, four rows costing
1.1-1.2x one
(``archopt bench quant-linear --rows 4``; benchmarks/RESULTS.md).

The price is the activations' rounding to 8 bits (perplexity: benchmarks/RESULTS.md); the
weights are the checkpoint's own, bit for bit, so their scales must be exact in fp16, as GGUF's
are. ``reference`` is each computation in plain torch (the kernels agree with it to fp32
rounding); a row's result never depends on the other rows of the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from archopt.ops.quant import Int4Linear, Int8Linear

BLOCK = 32
TILE = 16  # output rows per packed tile


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (M, K) -> int8 values (M, K), per-block scales sx and sx * sum(qx) (M, K / 32),
    rounded as the kernels round (to nearest, ties to even; a block holding NaN or Inf gets NaN
    scales, so its row's outputs are NaN)."""
    b = x.float().reshape(x.shape[0], -1, BLOCK)
    amax = b.abs().amax(-1)
    finite = torch.isfinite(b).all(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv[..., None])
    q = torch.where(finite[..., None], q, torch.zeros_like(q))
    sx = torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))
    return q.to(torch.int8).reshape(x.shape), sx, sx * q.sum(-1)


def kernels_here():
    """``torch.ops.archopt``, archopt's CPU kernels loaded (built once per machine) if they are
    not yet; RuntimeError naming why when they cannot be."""
    from archopt.ops import cpu_kernels

    if not cpu_kernels.loaded() and not cpu_kernels.load(build=True):
        why = cpu_kernels.why_unavailable() or "they did not load"
        raise RuntimeError(f"int8 activations need archopt's CPU kernels: {why}")
    return torch.ops.archopt


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI (the kernels' fast loop; elsewhere they run a portable
    loop, correct but slower than torch's int4 kernel)."""
    from archopt.io import cpu_id

    return " avx512_vnni" in f" {cpu_id()} "


def ready() -> bool:
    """Whether int8 activations are the fast choice here and now, without building anything:
    the CPU has AVX512-VNNI and archopt's CPU kernels are built (they load). What
    ``weights="auto"`` asks before choosing them for a GGUF file."""
    from archopt.ops import cpu_kernels

    return cpu_has_vnni() and cpu_kernels.load(build=False)


def _fp16_exact(*tensors: torch.Tensor) -> None:
    if not all(torch.equal(t.half().float(), t) for t in tensors):
        raise ValueError(
            "int8-activation layers keep the weights bit for bit: their scales must be exact in "
            "fp16 (as a GGUF file's are); these are not"
        )


def _tiles(t: torch.Tensor, n: int, g: int) -> torch.Tensor:
    """Per-(row, block) values (n, g) -> per tile (n/16, g, 16)."""
    return t.view(n // TILE, TILE, g).permute(0, 2, 1)


class _Act8Linear(nn.Module):
    """The two layers' common part: buffers ``packed`` and ``scales``, the shape check."""

    op_name = ""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.out_features = packed.shape[0] * TILE
        self.in_features = packed.shape[1] * BLOCK

    @classmethod
    def _check(cls, m, *scales: torch.Tensor) -> tuple[int, int]:
        """``m``'s (out_features, blocks), once its shape and scales are checked."""
        problem = shape_problem(m.out_features, m.in_features, m.in_features // m.groups)
        if problem is not None:
            raise ValueError(f"{cls.__name__}: {problem}")
        _fp16_exact(*scales)
        return m.out_features, m.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        op = getattr(kernels_here(), self.op_name)
        return op(x, self.packed, self.scales, self.out_features)

    def _reference(self, x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m=None):
        """sum over blocks of d sx (q . qx) [+ m sx sum(qx)] in plain torch."""
        rows = x.reshape(-1, self.in_features)
        qx, sx, sxs = quantize_activations(rows)
        n, g = self.out_features, self.in_features // BLOCK
        dots = torch.einsum(  # exact in fp32: every |sum| < 2^24
            "rgj,ngj->rng", qx.float().view(-1, g, BLOCK), q.float().view(n, g, BLOCK)
        )
        y = dots * d * sx[:, None]
        if m is not None:
            y = y + m * sxs[:, None]
        return y.sum(-1).to(x.dtype).view(*x.shape[:-1], n)


class Int4Q8Linear(_Act8Linear):
    """``y = x @ w.T``, Q4 weights, int8 activations. ``packed`` uint8 (out/16, in/32, 4, 64) and
    ``scales`` fp16 (out/16, in/32, 2, 16) in the kernel's layout (``act8_linear.cpp``); build
    it with ``from_int4``."""

    op_name = "int4_q8_linear"

    @classmethod
    def from_int4(cls, m: Int4Linear) -> Int4Q8Linear:
        n, g = cls._check(m, m.scale, m.minimum)
        p = m.qweight.view(n, g, BLOCK // 2)
        q = torch.cat([p & 15, p >> 4], -1)  # (n, g, 32): the block's values in order
        q = q.view(n // TILE, TILE, g, 8, 4).permute(0, 2, 3, 1, 4)  # (tile, g, step, row, k)
        packed = (q[:, :, :4] | q[:, :, 4:] << 4).reshape(n // TILE, g, 4, 64)
        scales = torch.stack([_tiles(t.half(), n, g) for t in (m.scale, m.minimum)], 2)
        return cls(packed.contiguous(), scales.contiguous())

    def values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (out, in) uint8 and d, m (out, in/32) fp32, read back from the layout."""
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
        q, d, m = self.values()
        return self._reference(x, q, d, m)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, Q4 blocks x int8 activations"


class Int8Q8Linear(_Act8Linear):
    """``y = x @ w.T``, Q8_0 weights, int8 activations. ``packed`` uint8 (out/16, in/32, 8, 64),
    the values plus 128, and ``scales`` fp16 (out/16, in/32, 16); build it with ``from_int8``."""

    op_name = "int8_q8_linear"

    @classmethod
    def from_int8(cls, m: Int8Linear) -> Int8Q8Linear:
        n, g = cls._check(m, m.scale)
        q = (m.qweight.to(torch.int16) + 128).to(torch.uint8)  # 1..255: vpdpbusd's unsigned side
        q = q.view(n // TILE, TILE, g, 8, 4).permute(0, 2, 3, 1, 4)  # (tile, g, step, row, k)
        packed = q.reshape(n // TILE, g, 8, 64)
        return cls(packed.contiguous(), _tiles(m.scale.half(), n, g).contiguous())

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q (out, in) int8 and d (out, in/32) fp32, read back from the layout."""
        t, g = self.packed.shape[:2]
        p = self.packed.view(t, g, 8, TILE, 4).permute(0, 3, 1, 2, 4)
        q = (p.to(torch.int16) - 128).to(torch.int8).reshape(self.out_features, self.in_features)
        return q, self.scales.permute(0, 2, 1).reshape(-1, g).float()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, d = self.values()
        w = q.float().view(self.out_features, -1, BLOCK) * d[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        q, d = self.values()
        return self._reference(x, q, d)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, Q8 blocks x int8 activations"


def shape_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why the kernels cannot take this shape, or None."""
    if group_size != BLOCK:
        return f"blocks must be of {BLOCK} inputs (GGUF's), got {group_size}"
    if out_features % TILE:
        return f"out_features must be a multiple of {TILE}, got {out_features}"
    return None


def use_int8_activations(model: nn.Module) -> dict[str, int]:
    """Replace, in place, every ``Int4Linear`` and ``Int8Linear`` the kernels take with its
    int8-activation layer (loading archopt's CPU kernels, built once per machine); how many
    were replaced and how many kept as they were."""
    kernels_here()
    counts = {"replaced": 0, "kept": 0}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, Int4Linear | Int8Linear):
                continue
            gs = child.in_features // child.groups
            fits = shape_problem(child.out_features, child.in_features, gs) is None
            if child.qweight.device.type != "cpu" or not fits:
                counts["kept"] += 1
                continue
            if isinstance(child, Int4Linear):
                setattr(module, name, Int4Q8Linear.from_int4(child))
            else:
                setattr(module, name, Int8Q8Linear.from_int8(child))
            counts["replaced"] += 1
    return counts
