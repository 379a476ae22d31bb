"""Weight-only int8 and int4 quantization for decoding, where a step reads every weight once.

- ``Int8Linear``: symmetric int8, one scale per output channel (absmax / 127) or per block of
  ``group_size`` inputs (GGUF's Q8_0: blocks of 32, ``w = d * q``).
- ``Int4Linear``: asymmetric 4-bit, a scale and a minimum per block of ``group_size`` inputs,
  ``w = d * q + m`` with q in 0..15: exactly GGUF's Q4_1, whose blocks it can take as they are
  (``from_packed``), two weights per byte in Q4_1's order (byte j of a block holds
  element j in its low nibble and element j + group_size/2 in its high one).

Both are exact, portable references: ``dequantized()`` is the weight they multiply by, and the
product runs on any device. For one row of input (the decode step) it is written as
dequantize-multiply-sum in one expression, which inductor fuses into one pass over the packed
bytes; for several rows the weight is dequantized once and multiplied normally.

``PackedInt4Linear`` is the fast path on the CPU: the same weights re-encoded for torch's CPU
int4 kernel (``torch._weight_int4pack_mm_for_cpu``: bf16 activations, a bf16 scale and zero per
group, w = scale * (q - 8) + zero). An int4 weight is one 4-bit plane; an int8 weight is two,
exactly (q + 128 = 16 a + b, so w = d q = 16 d (a - 8) + 8 d + d (b - 8)), multiplied in one
call with the input repeated. `archopt bench quant-linear` (2 threads, SmolLM2 shapes, one
row, ~150 MB of distinct weights, each product feeding the next as in a decode step) measured
3072 x 576 in 111 us (int4) and 189 us (int8) against 376 us for fp32 and 260 / 213 us for the
inductor-fused Int4Linear / Int8Linear, whose fusion with the consumer's reduction can serialize
it (576 x 1536: 109 us against 1202 us; the 49152 x 576 output projection 1.6 ms against 57 ms).
torch's int8 kernel (``_weight_int8pack_mm``) is as fast only with bf16 activations; with fp32
ones it takes a slow path (720 us), and so does the int4 kernel with fp16 or fp32 ones.
``pack_for_cpu`` (or ``quantize_weights(..., kernel="auto")``) swaps it in where the kernel
takes the shape: out_features a multiple of 16, groups of 32, 64, 128 or 256. The price is bf16
rounding of activations, scales and outputs; its perplexity cost is measured in
benchmarks/RESULTS.md.
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


KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes


def check_kernel_arg(kernel) -> None:
    if kernel not in ("auto", True, False):
        raise ValueError(f"kernel must be 'auto', True or False, got {kernel!r}")


def _kernel_group_size(m: Int4Linear | Int8Linear) -> int:
    """The group size ``m`` packs with: its own, or for per-channel int8 the largest group the
    kernel takes that divides in_features (the channel's scale repeated over its groups)."""
    gs = m.in_features // m.groups
    if isinstance(m, Int8Linear) and m.groups == 1:
        gs = next((g for g in reversed(KERNEL_GROUP_SIZES) if gs % g == 0), gs)
    return gs


def cpu_kernel_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why torch's CPU int4 kernel cannot take this shape, or None when it can."""
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no CPU int4 kernel (_weight_int4pack_mm_for_cpu)"
    if out_features % 16:
        return f"out_features must be a multiple of 16, got {out_features}"
    if group_size not in KERNEL_GROUP_SIZES or in_features % group_size:
        return (
            f"group_size must be one of {KERNEL_GROUP_SIZES} and divide in_features "
            f"({in_features}), got {group_size}"
        )
    return None


class PackedInt4Linear(nn.Module):
    """``y = x @ w.T`` by torch's CPU int4 kernel, w the sum of one or two 4-bit planes.

    Plane p holds q_p in 0..15 with ``scale`` and ``zero`` per group: w_p = scale (q_p - 8) +
    zero. ``qweight`` is uint8 (out, planes * in / 2) in the kernel's layout, the planes side by
    side along the input; ``scales_zeros`` is bf16 (planes * in / group_size, out, 2). Build it
    with ``from_int4`` or ``from_int8`` (or ``pack_for_cpu`` on a model).
    """

    def __init__(self, qweight, scales_zeros, *, in_features: int, group_size: int) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_zeros", scales_zeros)
        self.out_features, self.in_features, self.group_size = (
            qweight.shape[0],
            in_features,
            group_size,
        )
        self.planes = qweight.shape[1] * 2 // in_features

    @classmethod
    def _pack(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int):
        """From values q (out, planes * in) in 0..15 and per-group scale and zero (out, groups)."""
        out_f, group_size = q.shape[0], q.shape[1] // scale.shape[1]
        problem = cpu_kernel_problem(out_f, in_features, group_size)
        if problem is not None:
            raise ValueError(f"PackedInt4Linear: {problem}")
        packed = _int4pack(q)
        sz = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, sz, in_features=in_features, group_size=group_size)

    @classmethod
    def from_int4(cls, m: Int4Linear) -> PackedInt4Linear:
        """One plane: q - 8 scaled by d, plus m + 8 d (Q4_1's w = d q + m)."""
        n, g = m.out_features, m.groups
        p = m.qweight.view(n, g, -1)
        q = torch.cat([p & 15, p >> 4], dim=-1).view(n, m.in_features)  # Q4_1 order, undone
        return cls._pack(q, m.scale, m.minimum + 8 * m.scale, m.in_features)

    @classmethod
    def from_int8(cls, m: Int8Linear) -> PackedInt4Linear:
        """Two planes: q + 128 = 16 a + b, w = 16 d (a - 8) + 8 d  +  d (b - 8) + 0."""
        n, k = m.out_features, m.in_features
        d = m.scale.expand(n, k // _kernel_group_size(m))  # per channel: repeated per group
        d = d.to(torch.bfloat16).float()  # 16 d and 8 d stay exact in bf16
        u = m.qweight.view(torch.uint8) ^ 128  # q + 128, in bytes (a quarter of int32's traffic)
        q = torch.cat([u >> 4, u & 15], dim=1)
        zero = torch.cat([8 * d, torch.zeros_like(d)], 1)
        return cls._pack(q, torch.cat([16 * d, d], 1), zero, k)

    def values(self) -> torch.Tensor:
        """The 4-bit values q (out, planes * in), read back through the kernel itself (scale 1,
        zero 8, one-hot rows), since its byte layout depends on the CPU's vector width."""
        n, k = self.out_features, self.qweight.shape[1] * 2
        unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16).repeat(k // self.group_size, n, 1)
        eye = torch.eye(k, dtype=torch.bfloat16)
        cols = [
            torch._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, unit)
            for rows in eye.split(256)
        ]  # (k, n): small integers, exact in bf16
        return torch.cat(cols).T.to(torch.uint8)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernel multiplies by (its bf16 scales and zeros, planes summed)."""
        n, k, gs = self.out_features, self.in_features, self.group_size
        q = self.values().float().view(n, -1, gs)  # (out, planes * groups, gs)
        s, z = self.scales_zeros.float().permute(2, 1, 0)[..., None]  # (out, planes*groups, 1)
        w = (q - 8) * s + z
        return w.view(n, self.planes, k).sum(1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(
                f"PackedInt4Linear runs torch's CPU kernel: expected a CPU input, "
                f"got one on {x.device}"
            )
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, in)
        if self.planes > 1:
            rows = rows.repeat(1, self.planes)  # (M, planes * in): the planes add up
        y = torch._weight_int4pack_mm_for_cpu(
            rows, self.qweight, self.group_size, self.scales_zeros
        )
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = "int4" if self.planes == 1 else "int8 as two int4 planes"
        return (
            f"in={self.in_features}, out={self.out_features}, {kind}, groups of "
            f"{self.group_size}, torch's CPU kernel (bf16 activations)"
        )


PACK_ROWS = 1024  # a multiple of the packing's row blocks (16 to 64, by vector width)


def _int4pack(q: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 packing of values q (out, in) in 0..15, ``PACK_ROWS`` rows at a time:
    it takes int32 values, and widening a whole head (98304 x 576) to int32 and packing it
    went through memory at 0.40 s where chunks that stay in cache take 0.12 s (the packing
    is row-blocked, so the chunks' results are the whole's, rows in order; tested)."""
    pack = torch._convert_weight_to_int4pack_for_cpu
    return torch.cat([pack(c.int().contiguous(), 1) for c in q.split(PACK_ROWS)])


def pack_for_cpu(model: nn.Module, *, strict: bool = False) -> dict[str, int]:
    """Replace, in place, every Int4Linear and Int8Linear whose shape torch's CPU int4 kernel
    takes with a ``PackedInt4Linear``; ``strict``: a shape it cannot take is a ValueError
    naming the constraint. Returns how many were packed and how many were left as they are."""
    counts = {"packed": 0, "kept": 0}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Int4Linear | Int8Linear):
                continue
            if child.qweight.device.type != "cpu":
                problem = f"its weights must be on the CPU, got {child.qweight.device}"
            else:
                gs = _kernel_group_size(child)
                problem = cpu_kernel_problem(child.out_features, child.in_features, gs)
            if problem is not None:
                if strict:
                    raise ValueError(f"{name}.{child_name}: cannot use the CPU kernel: {problem}")
                counts["kept"] += 1
                continue
            packed = (
                PackedInt4Linear.from_int4
                if isinstance(child, Int4Linear)
                else PackedInt4Linear.from_int8
            )(child)
            setattr(module, child_name, packed)
            counts["packed"] += 1
    return counts


def quantize_weights(
    model: nn.Module,
    kind: str = "int8",
    group_size: int | None = None,
    *,
    kernel: bool | str = "auto",
    head: str | None = None,
):
    """Replace every ``nn.Linear`` (and a tied output projection) with a quantized one, in place.

    ``kind``: ``"int8"`` (per channel, or per ``group_size`` block) or ``"int4"`` (blocks of
    ``group_size``, default 32). Embedding lookups stay in full precision: they read one row
    per token. ``head``: another kind for the output projection ``model.lm_head``, as
    llama.cpp's quantizers keep it finer (per channel when it differs from ``kind``): on
    SmolLM2-135M, int4 everywhere costs +4.3% perplexity, int4 with an int8 head +0.5%.
    ``kernel``: ``"auto"`` packs the layers torch's CPU int4 kernel takes for it
    (``pack_for_cpu``), ``True`` requires it for every layer, ``False`` keeps the exact
    portable modules.
    """
    check_kernel_arg(kernel)
    for what, k in (("kind", kind), ("head kind", head or kind)):
        if k not in WEIGHT_KINDS:
            raise ValueError(f"weight quantization {what} must be one of {WEIGHT_KINDS}, got {k!r}")
    if head is not None and not hasattr(model, "lm_head"):
        raise ValueError(f"head={head!r} needs a model with an lm_head, got {type(model).__name__}")

    def make(weight, k=kind):
        gs = group_size if k == kind else None
        if k == "int8":
            return Int8Linear(weight, group_size=gs)
        return Int4Linear(weight, group_size=gs or 32)

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}.{child_name}: biased linears are not supported")
                is_head = module is model and child_name == "lm_head"
                setattr(module, child_name, make(child.weight, head if is_head and head else kind))
    if getattr(model, "lm_head", "absent") is None and hasattr(model, "embed"):
        # tied: the projection gets its own copy
        model.lm_head = make(model.embed.weight, head or kind)
    if kernel:
        pack_for_cpu(model, strict=kernel is True)
    return model
