"""The ``"triton"`` backend of local attention: planning (flags, dilation table, global
lists), tile sizes, launches of the kernels in ``triton_kernels.py`` (forward, and dQ / dK, dV
for the backward pass, with the few global rows merged in PyTorch), and the autograd node.

The design of the kernels is described in ``triton_kernels.py``. Inputs: fp16, bf16 or fp32,
head dims 16, 32, 64, 128 with dv == d, on CUDA (or on the CPU in Triton's interpreter with
``TRITON_INTERPRET=1`` set before triton is first imported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from archopt.errors import ArchoptError
from archopt.ops.attention.triton_kernels import (
    LOG2E,
    delta_kernel,
    dkdv_kernel,
    dq_kernel,
    fwd_kernel,
    interpreting,
)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2 (heads, batch rows)


@dataclass(frozen=True)
class Tiles:
    """Per kernel: (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages)."""

    fwd: tuple[int, int, int, int]  # a program owns BLOCK_M queries, loops over keys
    dq: tuple[int, int, int, int]  # the same
    dkdv: tuple[int, int, int, int]  # a program owns BLOCK_N keys, loops over queries
    split: int  # least rows per chunk of the dense rows and columns of global tokens


def choose_tiles(head_dim: int, dtype: torch.dtype) -> Tiles:
    """Tile sizes: reasoned and checked with ptxas for sm_90 (fp16/bf16: no register spills,
    shared memory well under 227 KB), not timed. fp16/bf16: 128-row query tiles for the
    forward pass (the usual FA2 choice on Hopper), 64 x 64 for the backward kernels (more live
    tiles; 32 x 64 for dK/dV at head dim 128), 8 warps. fp32 (exact, FMA dots, slow):
    small tiles so that shared memory fits. In the interpreter: 16/32-row tiles and 32-row
    chunks, so that tiny test inputs still span several tiles, edge and interior ones, and
    several chunks."""
    if interpreting():
        return Tiles(fwd=(16, 32, 1, 1), dq=(16, 16, 1, 1), dkdv=(16, 32, 1, 1), split=32)
    if dtype == torch.float32:
        return Tiles(fwd=(64, 32, 4, 2), dq=(32, 32, 4, 2), dkdv=(32, 32, 4, 2), split=2048)
    if head_dim == 128:
        return Tiles(fwd=(128, 64, 8, 2), dq=(64, 64, 8, 2), dkdv=(32, 64, 8, 2), split=2048)
    return Tiles(fwd=(128, 64, 8, 3), dq=(64, 64, 8, 2), dkdv=(64, 64, 8, 2), split=2048)


def check_supported(q: Tensor, v: Tensor) -> None:
    """Raise ``ArchoptError`` (a ``ValueError``) for inputs the kernels do not take."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ArchoptError(
            f"backend 'triton' takes dtypes {SUPPORTED_DTYPES}, got {q.dtype}; use 'blocked'"
        )
    d, dv = q.shape[-1], v.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ArchoptError(
            f"backend 'triton' takes head dims {SUPPORTED_HEAD_DIMS}, got {d}; use 'blocked'"
        )
    if dv != d:
        raise ArchoptError(f"backend 'triton' needs dv == d = {d}, got dv = {dv}; use 'blocked'")
    B, H, N, _ = q.shape
    if max(B, H) > MAX_GRID_YZ:
        raise ArchoptError(
            f"backend 'triton' takes at most {MAX_GRID_YZ} batch rows and heads, got B={B}, H={H}"
        )
    if N * d >= 2**31:
        raise ArchoptError(f"backend 'triton' needs N * d < 2**31, got N={N}, d={d}")
    if q.device.type != "cuda" and not interpreting():
        raise ArchoptError(
            f"backend 'triton' runs on CUDA tensors, got device {q.device.type}; for CPU "
            "tensors (Triton's interpreter) set TRITON_INTERPRET=1 before triton is imported"
        )


def _positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> increasing positions of the True entries, padded to the largest count,
    (B, G) int32; and the counts, (B,) int32."""
    count = mask.sum(-1)
    g = max(1, int(count.max()))
    idx = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[:, :g]
    return idx.to(torch.int32).contiguous(), count.to(torch.int32)


@dataclass
class _Plan:
    """Everything the kernels need besides q, k, v: flags, dilation table, global lists."""

    window: int
    dil: Tensor  # (H,) int32
    max_dil: tuple[int, ...]
    flags: Tensor | None  # (B, N) int8: 1 = padding, 2 = global
    grows: tuple[Tensor, Tensor] | None  # global queries: positions (B, G), counts (B,)
    gkeys: tuple[Tensor, Tensor] | None  # global keys that are not padding
    causal: bool
    scale: float


def _plan(q, window, dilations, global_mask, key_padding_mask, causal, scale) -> _Plan:
    B, _, N, _ = q.shape
    flags = None
    grows = gkeys = None
    if global_mask is not None and not bool(global_mask.any()):
        global_mask = None
    if key_padding_mask is not None or global_mask is not None:
        flags = torch.zeros(B, N, dtype=torch.int8, device=q.device)
        if key_padding_mask is not None:
            flags |= key_padding_mask.to(torch.int8)
        if global_mask is not None:
            flags |= global_mask.to(torch.int8) << 1
    if global_mask is not None:
        grows = _positions(global_mask)
        keys = global_mask if key_padding_mask is None else global_mask & ~key_padding_mask
        if bool(keys.any()):
            gkeys = _positions(keys)
    return _Plan(
        window=min(window, N),
        dil=torch.tensor(dilations, dtype=torch.int32, device=q.device),
        max_dil=tuple(dilations),
        flags=flags,
        grows=grows,
        gkeys=gkeys,
        causal=causal,
        scale=scale,
    )


def _prec(x: Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _band_grid(N: int, H: int, B: int, dilations: Sequence[int], block: int) -> tuple:
    """Band mode: (tiles of the head with the most, heads, batch rows)."""
    return (max(d * triton.cdiv(triton.cdiv(N, d), block) for d in set(dilations)), H, B)


def _gather_tile(block: int, g: int) -> int:
    """Rows of a gather-mode tile: no more than the list needs, 16 at least (tl.dot)."""
    return min(block, max(16, triton.next_power_of_2(g)))


def _chunks(n: int, programs: int, min_len: int) -> tuple[int, int]:
    """(chunk length, number of chunks) for the dense rows and columns of global tokens: chunks
    of a multiple of ``min_len`` rows, only as many as it takes to have ~1024 programs (few
    global tokens: many chunks to fill the GPU; many: one, no partial results to store)."""
    want = max(1, 1024 // programs)
    length = triton.cdiv(triton.cdiv(n, want), min_len) * min_len
    return length, triton.cdiv(n, length)


def _warps(block: int, warps: int) -> int:
    return min(warps, 4) if block < 64 else warps


def _forward(q: Tensor, k: Tensor, v: Tensor, p: _Plan) -> tuple[Tensor, Tensor]:
    B, H, N, D = q.shape
    tiles = choose_tiles(D, q.dtype)
    bm, bn, warps, stages = tiles.fwd
    o = torch.empty_like(q)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    none = p.dil  # any tensor, for pointers a launch does not read
    gk_idx, gk_count = p.gkeys if p.gkeys is not None else (none, none)
    args = dict(
        Q=q, K=k, V=v, FLAGS=none if p.flags is None else p.flags, DIL=p.dil, H=H, N=N,
        qk_scale=p.scale * LOG2E, HAS_FLAGS=p.flags is not None, CAUSAL=p.causal,
        BLOCK_N=bn, HEAD_DIM=D, PREC=_prec(q), num_stages=stages,
    )  # fmt: skip
    fwd_kernel[_band_grid(N, H, B, p.max_dil, bm)](
        OUT=o, LSE=lse, ROWS=none, ROW_COUNT=none, GKEYS=gk_idx, GKEY_COUNT=gk_count,
        window=p.window, n_rows=1, n_gkeys=gk_idx.shape[-1], split_len=N,
        GATHER=False, HAS_GKEYS=p.gkeys is not None, BLOCK_M=bm, num_warps=warps, **args,
    )  # fmt: skip
    if p.grows is not None:
        idx, count = p.grows
        G, bg = idx.shape[1], _gather_tile(bm, idx.shape[1])
        split, S = _chunks(N, B * H * triton.cdiv(G, bg), tiles.split)
        o_part = torch.empty(B, H, S, G, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, H, S, G, dtype=torch.float32, device=q.device)
        fwd_kernel[(triton.cdiv(G, bg) * S, H, B)](
            OUT=o_part, LSE=lse_part, ROWS=idx, ROW_COUNT=count, GKEYS=none, GKEY_COUNT=none,
            window=N, n_rows=G, n_gkeys=1, split_len=split,
            GATHER=True, HAS_GKEYS=False, BLOCK_M=bg, num_warps=_warps(bg, warps), **args,
        )  # fmt: skip
        rows, rows_lse = _merge(o_part, lse_part)
        _put_rows(o, idx, count, rows)
        _put_rows(lse, idx, count, rows_lse)
    return o, lse


def _merge(o_part: Tensor, lse_part: Tensor) -> tuple[Tensor, Tensor]:
    """Combine per-chunk softmax results (B, H, S, G, D), (B, H, S, G) over the chunks S.

    A chunk with no key has LSE -inf and weight 0; a row with no key at all gets output 0 and
    LSE +inf (the convention of the band rows)."""
    m = lse_part.amax(2)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weight = torch.exp2(lse_part - m.unsqueeze(2))  # (B, H, S, G)
    total = weight.sum(2)
    out = (weight.unsqueeze(-1) * o_part).sum(2) / total.clamp_min(1e-30).unsqueeze(-1)
    lse = torch.where(total > 0, m + torch.log2(total), torch.full_like(m, math.inf))
    return out, lse


def _put_rows(x: Tensor, idx: Tensor, count: Tensor, rows: Tensor, add: bool = False) -> None:
    """x[b, :, idx[b, s]] = rows[b, :, s] (or +=) for the real slots s < count[b]."""
    slot = torch.arange(idx.shape[1], device=idx.device) < count[:, None]
    b_idx, s_idx = slot.nonzero(as_tuple=True)
    pos = idx[b_idx, s_idx].long()
    values = rows[b_idx, :, s_idx]
    if add:
        values = x[b_idx, :, pos].float() + values
    x[b_idx, :, pos] = values.to(x.dtype)


def _backward(q, k, v, o, lse, do, p: _Plan) -> tuple[Tensor, Tensor, Tensor]:
    B, H, N, D = q.shape
    tiles = choose_tiles(D, q.dtype)
    do = do.contiguous()
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    rows = 16 if interpreting() else 128
    delta_kernel[(triton.cdiv(B * H * N, rows),)](o, do, delta, B * H * N, rows, D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    none = p.dil
    gk_idx, gk_count = p.gkeys if p.gkeys is not None else (none, none)
    gq_idx, gq_count = p.grows if p.grows is not None else (none, none)
    args = dict(
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, FLAGS=none if p.flags is None else p.flags,
        DIL=p.dil, H=H, N=N, qk_scale=p.scale * LOG2E, scale=p.scale,
        HAS_FLAGS=p.flags is not None, CAUSAL=p.causal, HEAD_DIM=D, PREC=_prec(q),
    )  # fmt: skip

    bm, bn, warps, stages = tiles.dq
    dq_kernel[_band_grid(N, H, B, p.max_dil, bm)](
        DQ=dq, ROWS=none, ROW_COUNT=none, GKEYS=gk_idx, GKEY_COUNT=gk_count,
        window=p.window, n_rows=1, n_gkeys=gk_idx.shape[-1], split_len=N,
        GATHER=False, HAS_GKEYS=p.gkeys is not None, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages, **args,
    )  # fmt: skip
    if p.grows is not None:  # dQ of global queries: partial sums over key chunks
        G, bg = gq_idx.shape[1], _gather_tile(bm, gq_idx.shape[1])
        split, S = _chunks(N, B * H * triton.cdiv(G, bg), tiles.split)
        dq_part = torch.empty(B, H, S, G, D, dtype=torch.float32, device=q.device)
        dq_kernel[(triton.cdiv(G, bg) * S, H, B)](
            DQ=dq_part, ROWS=gq_idx, ROW_COUNT=gq_count, GKEYS=none, GKEY_COUNT=none,
            window=N, n_rows=G, n_gkeys=1, split_len=split,
            GATHER=True, HAS_GKEYS=False, BLOCK_M=bg, BLOCK_N=bn,
            num_warps=_warps(bg, warps), num_stages=stages, **args,
        )  # fmt: skip
        _put_rows(dq, gq_idx, gq_count, dq_part.sum(2))

    bm, bn, warps, stages = tiles.dkdv
    dkdv_kernel[_band_grid(N, H, B, p.max_dil, bn)](
        DK=dk, DV=dv, KEYS=none, KEY_COUNT=none, GROWS=gq_idx, GROW_COUNT=gq_count,
        window=p.window, n_keys=1, n_grows=gq_idx.shape[-1], split_len=N,
        GATHER=False, HAS_GROWS=p.grows is not None, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages, **args,
    )  # fmt: skip
    if p.gkeys is not None:  # dK, dV of global keys from all other queries: partial sums
        G, bg = gk_idx.shape[1], _gather_tile(bn, gk_idx.shape[1])
        split, S = _chunks(N, B * H * triton.cdiv(G, bg), tiles.split)
        dk_part = torch.empty(B, H, S, G, D, dtype=torch.float32, device=q.device)
        dv_part = torch.empty_like(dk_part)
        dkdv_kernel[(triton.cdiv(G, bg) * S, H, B)](
            DK=dk_part, DV=dv_part, KEYS=gk_idx, KEY_COUNT=gk_count, GROWS=none, GROW_COUNT=none,
            window=N, n_keys=G, n_grows=1, split_len=split,
            GATHER=True, HAS_GROWS=False, BLOCK_M=bm, BLOCK_N=bg,
            num_warps=_warps(bg, warps), num_stages=stages, **args,
        )  # fmt: skip
        _put_rows(dk, gk_idx, gk_count, dk_part.sum(2), add=True)
        _put_rows(dv, gk_idx, gk_count, dv_part.sum(2), add=True)
    return dq, dk, dv


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.plan)
        return dq, dk, dv, None


def local_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    dilations: Sequence[int],
    global_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
) -> Tensor:
    """Local attention with the Triton kernels; inputs already validated by the dispatcher."""
    check_supported(q, v)
    if q.numel() == 0:
        return q.new_zeros(q.shape)
    plan = _plan(q, window, dilations, global_mask, key_padding_mask, causal, scale)
    return _LocalAttention.apply(q, k, v, plan)
