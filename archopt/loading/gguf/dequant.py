"""Dequantizing GGUF tensors to fp32.

F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are dequantized with vectorized torch ops,
bit-identical to ``gguf.quants.dequantize`` (each value is one fp32 multiply, plus one fp32 add
for the ``_1`` types, in the same order); every other type ``gguf.quants`` can dequantize (the
K-quants, IQ and TQ types, MXFP4, ...) goes through it, at numpy speed.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from archopt.errors import CheckpointError

QType = GGMLQuantizationType


_OWN_TYPES = {QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1}
_OWN_TYPES |= {QType.Q5_0, QType.Q5_1}


@cache
def _gguf_can_dequantize(qtype: GGMLQuantizationType) -> bool:
    # gguf.quants has no public list of what it can decode: ask it on one zero block.
    from gguf.quants import dequantize as reference

    try:
        reference(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def supported_types() -> list[GGMLQuantizationType]:
    """Tensor types this module can dequantize (ours, then gguf.quants' numpy ones)."""
    return [t for t in QType if t in _OWN_TYPES or _gguf_can_dequantize(t)]


def check_supported(qtype: GGMLQuantizationType, what: str) -> None:
    if qtype not in _OWN_TYPES and not _gguf_can_dequantize(qtype):
        names = ", ".join(t.name for t in supported_types())
        raise CheckpointError(
            f"{what} has type {qtype.name}, which cannot be dequantized; supported types: {names}"
        )


def fp16_scales(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 scale at byte ``at`` of each block, as fp32 (n_blocks, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) values: low nibbles are elements 0-15, high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """Q5's fifth bits: a little-endian uint32 at byte ``at``, bit j for element j, as (n, 32)."""
    qh = blocks[:, at : at + 4].to(torch.int64)
    qh = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
    shifts = torch.arange(32, device=blocks.device)
    return ((qh[:, None] >> shifts) & 1).to(torch.uint8) << 4


def _dequant_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) fp32, as ggml's reference does."""
    if qtype == QType.Q8_0:
        return blocks[:, 2:].contiguous().view(torch.int8).float() * fp16_scales(blocks, 0)
    if qtype == QType.Q4_0:
        return (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float() * fp16_scales(blocks, 0)
    if qtype == QType.Q4_1:
        return fp16_scales(blocks, 0) * _nibbles(blocks[:, 4:]).float() + fp16_scales(blocks, 2)
    if qtype == QType.Q5_0:
        q = _nibbles(blocks[:, 6:]) | _high_bits(blocks, 2)
        return (q.to(torch.int8) - 16).float() * fp16_scales(blocks, 0)
    if qtype == QType.Q5_1:
        q = _nibbles(blocks[:, 8:]) | _high_bits(blocks, 4)
        return fp16_scales(blocks, 0) * q.float() + fp16_scales(blocks, 2)
    raise AssertionError(qtype)


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]):
    """fp32 tensor of ``shape`` from raw GGUF bytes ``data`` (uint8) of type ``qtype``.

    Bit-identical to ``gguf.quants.dequantize`` (but for NaN payloads: torch quiets signaling
    NaNs, numpy keeps them). The result never shares memory with ``data``.
    """
    qtype = QType(qtype)
    check_supported(qtype, "the data to dequantize")
    raw = data.contiguous().view(-1)
    if qtype == QType.F32:
        out = raw.view(torch.float32).clone()
    elif qtype == QType.F16:
        out = raw.view(torch.float16).float()
    elif qtype == QType.BF16:
        # bf16 is the top half of an fp32: shift the bits up (exact, NaN payloads included).
        out = (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    elif qtype in _OWN_TYPES:
        out = _dequant_blocks(raw.view(-1, GGML_QUANT_SIZES[qtype][1]), qtype)
    else:
        from gguf.quants import dequantize as reference

        out = torch.from_numpy(reference(raw.numpy().reshape(1, -1), qtype).copy())
    return out.reshape(shape)
