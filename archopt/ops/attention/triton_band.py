"""Local attention as Triton kernels, FlashAttention-2 style: the ``"triton"`` backend.

Same semantics as ``reference.py``; the design, in the order the work happens:

- Sequences. On the residue class r, r + d, r + 2d, ... of a head with dilation d, the dilated
  band is an ordinary band of one-sided width w. Every kernel therefore works in *class
  coordinates*: row c of class r is position r + d*c, and a tile of rows is loaded with a row
  stride of d*head_dim elements straight from the (B, H, N, head_dim) tensors: dilation is a
  stride, never a copy, and exact by construction (no d times wider masked band). Heads may
  have different dilations: the kernels read theirs from a per-head table, and the grid is
  sized for the head with the most tiles (programs past the end of their head do nothing).
- Forward (``_fwd_kernel``). One program per (query tile of BLOCK_M rows of one class, head,
  batch row). It loops only over the key tiles the band touches: class rows
  [c_lo - w, c_hi + w] (up to c_hi when causal). A tile whose every (query, key) pair is inside
  the band and the sequence is *interior* and runs without any structural mask; only edge
  tiles build one. Scores and the online softmax are fp32 (exp2, scale folded in); each row
  stores its output and its log-sum-exp (LSE), the only thing the backward pass keeps.
- Global tokens. Global keys are removed from the band (a per-position flag), then visited
  by a second loop over their positions (gathered, padded to the longest row, with counts),
  so a global key inside the window is counted exactly once and one softmax normalises both
  parts. Rows of global queries are recomputed afterwards by the same kernel in *gather* mode:
  its rows are the listed positions and its "band" is every key (dilation 1, window N). Those
  few rows see all N keys, so the key range is cut into chunks that run in parallel (as many
  as it takes to fill the GPU; flash-decoding); partial outputs and LSEs are merged in PyTorch.
- Backward. dQ (``_dq_kernel``) mirrors the forward: recompute P = exp2(S - LSE) per tile,
  dS = P * (dP - delta) with delta = rowsum(dO * O). dK/dV (``_dkdv_kernel``) is the transpose:
  one program per key tile of one class, looping over the query tiles whose band touches it,
  then over the global queries (every key is attended by them). Each program owns its rows
  of dQ, dK and dV, so nothing is accumulated across programs: no atomics. The one reduction
  that does not fit - a global key is attended by *every* query - is the gather mode of the
  dK/dV kernel over query chunks, writing per-chunk partials that PyTorch sums (a small
  (B, H, chunks, G, d) tensor). Rows of global queries get their dQ from the gather mode of
  the dQ kernel; in the band kernels their LSE is replaced by +inf, which makes their P zero.
- Masking and empty rows. Masked scores are -inf; the running max starts at a finite -1e30,
  so a row with no valid key keeps l = 0 and never computes inf - inf: its output is 0, its
  LSE +inf (P = 0 in the backward pass, so zero gradients), never NaN. Key padding and the
  global/band split come from one int8 flag per position (1 = padding, 2 = global).

Dtypes fp16, bf16 (tensor-core dots, fp32 accumulation) and fp32 (``input_precision="ieee"``,
no TF32, to stay exact); head dims 16, 32, 64, 128 with dv == d. Under ``TRITON_INTERPRET=1``
(set before triton is first imported: triton decorates its own ``tl.max``/``tl.sum`` at import)
the same kernels run on CPU tensors in Triton's interpreter, which is how they are tested
without a GPU. The tile sizes for the GPU are reasoned, not tuned (no autotuning: it would cost
compile time on every new shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MAX_GRID_YZ = 65535  # CUDA limit of grid axes 1 and 2 (heads, batch rows)


# --- kernels ---------------------------------------------------------------------------------


@triton.jit
def _setup(
    pid,
    b,
    h,
    N,
    window,
    split,
    split_len,
    DIL,
    IDX,
    COUNT,
    n_idx,
    GATHER: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The rows a program owns and the range of the rows it loops over, in class coordinates.

    Band mode: tile ``pid`` of the classes of head ``h`` (dilation DIL[h]), tiles of one class
    consecutive. Gather mode: tile ``pid`` of the positions IDX[b, :COUNT[b]], as a class of
    dilation 1 with window N. CAUSAL: 0, -1 (loop rows <= own rows: keys of a query tile) or
    +1 (loop rows >= own rows: queries of a key tile). The loop range is cut to
    [split * split_len, (split + 1) * split_len) and is empty when the tile has no row.
    """
    if GATHER:
        slot = pid * BLOCK + tl.arange(0, BLOCK)
        ok = slot < tl.load(COUNT + b)
        own = tl.load(IDX + b * n_idx + slot, mask=ok, other=0)
        r = 0
        dil = 1
        length = N
        w = N
    else:
        dil = tl.load(DIL + h)
        per_class = tl.cdiv(tl.cdiv(N, dil), BLOCK)
        r = pid // per_class
        own = (pid % per_class) * BLOCK + tl.arange(0, BLOCK)
        length = tl.cdiv(N - r, dil)
        ok = (own < length) & (r < dil)
        w = window
    own_lo = tl.min(tl.where(ok, own, N), 0)
    own_hi = tl.max(tl.where(ok, own, -1), 0)
    lo = own_lo - w
    hi = own_hi + w + 1
    if CAUSAL == -1:
        hi = own_hi + 1
    if CAUSAL == 1:
        lo = own_lo
    lo = tl.maximum(lo, split * split_len)
    hi = tl.minimum(hi, tl.minimum(length, split * split_len + split_len))
    hi = tl.where(own_hi >= own_lo, hi, lo)
    return own, ok, r, dil, w, lo, hi, own_lo, own_hi


@triton.jit
def _band_mask(
    s, own, other, start, own_lo, own_hi, hi, w, CAUSAL: tl.constexpr, BLOCK: tl.constexpr
):
    """-inf outside the band on an edge tile; an interior tile is returned untouched.

    ``s`` (own rows, loop rows): rows ``own``, columns ``other`` = start + arange(BLOCK) < hi.
    Pair (a, c) is in the band when |c - a| <= w, and, causal, c <= a (-1) or c >= a (+1).
    """
    edge = (start < own_hi - w) | (start + BLOCK - 1 > own_lo + w) | (start + BLOCK > hi)
    if CAUSAL == -1:
        edge = edge | (start + BLOCK - 1 > own_lo)
    if CAUSAL == 1:
        edge = edge | (start < own_hi)
    if edge:
        diff = other[None, :] - own[:, None]
        ok = (diff >= -w) & (diff <= w) & (other[None, :] < hi)
        if CAUSAL == -1:
            ok = ok & (diff <= 0)
        if CAUSAL == 1:
            ok = ok & (diff >= 0)
        s = tl.where(ok, s, float("-inf"))
    return s


# Triton 3.8's interpreter multiplies the raw bits of bf16 operands in tl.dot (it stores bf16
# as uint16); there, and only there, bf16 operands are widened first (exactly: a bf16 product
# is exact in fp32, as on tensor cores).
_WIDEN_BF16 = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """a @ b (+ acc, accumulated in place when given), fp32."""
    if _WIDEN_BF16 and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _rows(ptr, pos, ok, HEAD_DIM: tl.constexpr):
    """Rows ``pos`` of a (rows, HEAD_DIM) matrix; rows not ``ok`` read as 0."""
    cols = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + pos[:, None] * HEAD_DIM + cols[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v, PREC: tl.constexpr):
    """One online-softmax update (base 2) with the scores ``s`` of a key tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC)
    return acc, m_new, l_i


@triton.jit
def _dq_step(dq, s, k, v, do, lse, delta, PREC: tl.constexpr):
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), None, PREC)
    ds = p * (dp - delta[:, None])
    return _dot(ds.to(k.dtype), k, dq, PREC)


@triton.jit
def _dkdv_step(dk, dv, s_t, k, v, q, do, lse, delta, PREC: tl.constexpr):
    """``s_t``: transposed scores (keys, queries)."""
    p_t = tl.exp2(s_t - lse[None, :])
    dv = _dot(p_t.to(do.dtype), do, dv, PREC)
    dp_t = _dot(v, tl.trans(do), None, PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _dot(ds_t.to(q.dtype), q, dk, PREC)
    return dk, dv


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    FLAGS,
    DIL,
    ROWS,
    ROW_COUNT,
    GKEYS,
    GKEY_COUNT,
    H,
    N,
    window,
    n_rows,
    n_gkeys,
    split_len,
    qk_scale,
    GATHER: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    HAS_GKEYS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
):
    """Band mode: O and LSE of a query tile. Gather mode: partial O and LSE (fp32, empty = -inf)
    of a tile of global queries over key chunk ``split``, at (b, h, split, slot)."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (b * H + h).to(tl.int64)
    split = 0
    if GATHER:
        tiles = tl.cdiv(n_rows, BLOCK_M)
        split = pid // tiles
        pid = pid % tiles
        key_flags = 1  # every valid key, global ones included
    else:
        key_flags = 3  # band keys: neither padding nor global
    i, row_ok, r, dil, w, lo, hi, i_lo, i_hi = _setup(
        pid, b, h, N, window, split, split_len, DIL, ROWS, ROW_COUNT, n_rows,
        GATHER, -1 if CAUSAL else 0, BLOCK_M,
    )  # fmt: skip
    qpos = r + dil * i
    base = bh * N * HEAD_DIM
    q = _rows(Q + base, qpos, row_ok, HEAD_DIM)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        kpos = r + dil * j
        k_ok = j < hi
        k = _rows(K + base, kpos, k_ok, HEAD_DIM)
        v = _rows(V + base, kpos, k_ok, HEAD_DIM)
        s = _dot(q, tl.trans(k), None, PREC) * qk_scale
        s = _band_mask(s, i, j, start, i_lo, i_hi, hi, w, -1 if CAUSAL else 0, BLOCK_N)
        if HAS_FLAGS:
            f = tl.load(FLAGS + b * N + kpos, mask=k_ok, other=0)
            s = tl.where((f & key_flags)[None, :] == 0, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PREC)
    if HAS_GKEYS:
        count = tl.load(GKEY_COUNT + b)
        for start in range(0, count, BLOCK_N):
            g = start + tl.arange(0, BLOCK_N)
            g_ok = g < count
            kpos = tl.load(GKEYS + b * n_gkeys + g, mask=g_ok, other=0)
            k = _rows(K + base, kpos, g_ok, HEAD_DIM)
            v = _rows(V + base, kpos, g_ok, HEAD_DIM)
            s = _dot(q, tl.trans(k), None, PREC) * qk_scale
            ok = g_ok[None, :]
            if CAUSAL:
                ok = ok & (kpos[None, :] <= qpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v, PREC)

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = m_i + tl.log2(tl.where(has_key, l_i, 1.0))
    cols = tl.arange(0, HEAD_DIM)
    if GATHER:
        row = (bh * (tl.num_programs(0) // tiles) + split) * n_rows
        row = row + pid * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(OUT + row[:, None] * HEAD_DIM + cols[None, :], out, mask=row_ok[:, None])
        tl.store(LSE + row, tl.where(has_key, lse, float("-inf")), mask=row_ok)
    else:
        out_ptr = OUT + base + qpos[:, None] * HEAD_DIM + cols[None, :]
        tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + bh * N + qpos, tl.where(has_key, lse, float("inf")), mask=row_ok)


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    FLAGS,
    DIL,
    ROWS,
    ROW_COUNT,
    GKEYS,
    GKEY_COUNT,
    H,
    N,
    window,
    n_rows,
    n_gkeys,
    split_len,
    qk_scale,
    scale,
    GATHER: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    HAS_GKEYS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ of a query tile, the same loops as the forward pass. Gather mode: partial dQ (fp32)
    of global queries over key chunk ``split``."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (b * H + h).to(tl.int64)
    split = 0
    if GATHER:
        tiles = tl.cdiv(n_rows, BLOCK_M)
        split = pid // tiles
        pid = pid % tiles
        key_flags = 1
    else:
        key_flags = 3
    i, row_ok, r, dil, w, lo, hi, i_lo, i_hi = _setup(
        pid, b, h, N, window, split, split_len, DIL, ROWS, ROW_COUNT, n_rows,
        GATHER, -1 if CAUSAL else 0, BLOCK_M,
    )  # fmt: skip
    qpos = r + dil * i
    base = bh * N * HEAD_DIM
    q = _rows(Q + base, qpos, row_ok, HEAD_DIM)
    do = _rows(DO + base, qpos, row_ok, HEAD_DIM)
    lse = tl.load(LSE + bh * N + qpos, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * N + qpos, mask=row_ok, other=0.0)
    if HAS_FLAGS and not GATHER:  # rows of global queries belong to the gather mode
        qf = tl.load(FLAGS + b * N + qpos, mask=row_ok, other=0)
        lse = tl.where((qf & 2) != 0, float("inf"), lse)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        kpos = r + dil * j
        k_ok = j < hi
        k = _rows(K + base, kpos, k_ok, HEAD_DIM)
        v = _rows(V + base, kpos, k_ok, HEAD_DIM)
        s = _dot(q, tl.trans(k), None, PREC) * qk_scale
        s = _band_mask(s, i, j, start, i_lo, i_hi, hi, w, -1 if CAUSAL else 0, BLOCK_N)
        if HAS_FLAGS:
            f = tl.load(FLAGS + b * N + kpos, mask=k_ok, other=0)
            s = tl.where((f & key_flags)[None, :] == 0, s, float("-inf"))
        dq = _dq_step(dq, s, k, v, do, lse, delta, PREC)
    if HAS_GKEYS:
        count = tl.load(GKEY_COUNT + b)
        for start in range(0, count, BLOCK_N):
            g = start + tl.arange(0, BLOCK_N)
            g_ok = g < count
            kpos = tl.load(GKEYS + b * n_gkeys + g, mask=g_ok, other=0)
            k = _rows(K + base, kpos, g_ok, HEAD_DIM)
            v = _rows(V + base, kpos, g_ok, HEAD_DIM)
            s = _dot(q, tl.trans(k), None, PREC) * qk_scale
            ok = g_ok[None, :]
            if CAUSAL:
                ok = ok & (kpos[None, :] <= qpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            dq = _dq_step(dq, s, k, v, do, lse, delta, PREC)

    dq = dq * scale
    cols = tl.arange(0, HEAD_DIM)
    if GATHER:
        row = (bh * (tl.num_programs(0) // tiles) + split) * n_rows
        row = row + pid * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(DQ + row[:, None] * HEAD_DIM + cols[None, :], dq, mask=row_ok[:, None])
    else:
        dq_ptr = DQ + base + qpos[:, None] * HEAD_DIM + cols[None, :]
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    FLAGS,
    DIL,
    KEYS,
    KEY_COUNT,
    GROWS,
    GROW_COUNT,
    H,
    N,
    window,
    n_keys,
    n_grows,
    split_len,
    qk_scale,
    scale,
    GATHER: tl.constexpr,
    HAS_FLAGS: tl.constexpr,
    HAS_GROWS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PREC: tl.constexpr,
):
    """dK, dV of a key tile of one class: the band's query tiles, then every global query.
    Gather mode: partial dK, dV (fp32) of global keys over query chunk ``split``, from the
    queries that are not global (those are counted by the band mode's second loop)."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh = (b * H + h).to(tl.int64)
    split = 0
    if GATHER:
        tiles = tl.cdiv(n_keys, BLOCK_N)
        split = pid // tiles
        pid = pid % tiles
    j, key_ok, r, dil, w, lo, hi, j_lo, j_hi = _setup(
        pid, b, h, N, window, split, split_len, DIL, KEYS, KEY_COUNT, n_keys,
        GATHER, 1 if CAUSAL else 0, BLOCK_N,
    )  # fmt: skip
    kpos = r + dil * j
    base = bh * N * HEAD_DIM
    k = _rows(K + base, kpos, key_ok, HEAD_DIM)
    v = _rows(V + base, kpos, key_ok, HEAD_DIM)
    if HAS_FLAGS and not GATHER:
        kf = tl.load(FLAGS + b * N + kpos, mask=key_ok, other=0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        i = start + tl.arange(0, BLOCK_M)
        qpos = r + dil * i
        q_ok = i < hi
        q = _rows(Q + base, qpos, q_ok, HEAD_DIM)
        do = _rows(DO + base, qpos, q_ok, HEAD_DIM)
        lse = tl.load(LSE + bh * N + qpos, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * N + qpos, mask=q_ok, other=0.0)
        if HAS_FLAGS:  # global queries: their rows are dense, counted below
            qf = tl.load(FLAGS + b * N + qpos, mask=q_ok, other=0)
            lse = tl.where((qf & 2) != 0, float("inf"), lse)
        s_t = _dot(k, tl.trans(q), None, PREC) * qk_scale
        s_t = _band_mask(s_t, j, i, start, j_lo, j_hi, hi, w, 1 if CAUSAL else 0, BLOCK_M)
        if HAS_FLAGS and not GATHER:  # band keys only: neither padding nor global
            s_t = tl.where(kf[:, None] == 0, s_t, float("-inf"))
        dk, dv = _dkdv_step(dk, dv, s_t, k, v, q, do, lse, delta, PREC)
    if HAS_GROWS:
        count = tl.load(GROW_COUNT + b)
        for start in range(0, count, BLOCK_M):
            g = start + tl.arange(0, BLOCK_M)
            g_ok = g < count
            qpos = tl.load(GROWS + b * n_grows + g, mask=g_ok, other=0)
            q = _rows(Q + base, qpos, g_ok, HEAD_DIM)
            do = _rows(DO + base, qpos, g_ok, HEAD_DIM)
            lse = tl.load(LSE + bh * N + qpos, mask=g_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * N + qpos, mask=g_ok, other=0.0)
            s_t = _dot(k, tl.trans(q), None, PREC) * qk_scale
            ok = g_ok[None, :]
            if HAS_FLAGS:
                ok = ok & ((kf & 1) == 0)[:, None]
            if CAUSAL:
                ok = ok & (kpos[:, None] <= qpos[None, :])
            s_t = tl.where(ok, s_t, float("-inf"))
            dk, dv = _dkdv_step(dk, dv, s_t, k, v, q, do, lse, delta, PREC)

    dk = dk * scale
    cols = tl.arange(0, HEAD_DIM)
    if GATHER:
        row = (bh * (tl.num_programs(0) // tiles) + split) * n_keys
        row = (row + pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * HEAD_DIM + cols[None, :]
        tl.store(DK + row, dk, mask=key_ok[:, None])
        tl.store(DV + row, dv, mask=key_ok[:, None])
    else:
        row = base + kpos[:, None] * HEAD_DIM + cols[None, :]
        tl.store(DK + row, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + row, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _delta_kernel(OUT, DO, DELTA, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 over the (n_rows, HEAD_DIM) rows of all heads."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    o = _rows(OUT, rows, ok, HEAD_DIM).to(tl.float32)
    do = _rows(DO, rows, ok, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=ok)


# --- launch ----------------------------------------------------------------------------------


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


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when imported)."""
    return not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def check_supported(q: Tensor, v: Tensor) -> None:
    """Raise ValueError for inputs the kernels do not take."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"backend 'triton' takes dtypes {SUPPORTED_DTYPES}, got {q.dtype}; use 'blocked'"
        )
    d, dv = q.shape[-1], v.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"backend 'triton' takes head dims {SUPPORTED_HEAD_DIMS}, got {d}; use 'blocked'"
        )
    if dv != d:
        raise ValueError(f"backend 'triton' needs dv == d = {d}, got dv = {dv}; use 'blocked'")
    B, H, N, _ = q.shape
    if max(B, H) > MAX_GRID_YZ:
        raise ValueError(
            f"backend 'triton' takes at most {MAX_GRID_YZ} batch rows and heads, got B={B}, H={H}"
        )
    if N * d >= 2**31:
        raise ValueError(f"backend 'triton' needs N * d < 2**31, got N={N}, d={d}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
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
    _fwd_kernel[_band_grid(N, H, B, p.max_dil, bm)](
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
        _fwd_kernel[(triton.cdiv(G, bg) * S, H, B)](
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
    _delta_kernel[(triton.cdiv(B * H * N, rows),)](o, do, delta, B * H * N, rows, D)
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
    _dq_kernel[_band_grid(N, H, B, p.max_dil, bm)](
        DQ=dq, ROWS=none, ROW_COUNT=none, GKEYS=gk_idx, GKEY_COUNT=gk_count,
        window=p.window, n_rows=1, n_gkeys=gk_idx.shape[-1], split_len=N,
        GATHER=False, HAS_GKEYS=p.gkeys is not None, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages, **args,
    )  # fmt: skip
    if p.grows is not None:  # dQ of global queries: partial sums over key chunks
        G, bg = gq_idx.shape[1], _gather_tile(bm, gq_idx.shape[1])
        split, S = _chunks(N, B * H * triton.cdiv(G, bg), tiles.split)
        dq_part = torch.empty(B, H, S, G, D, dtype=torch.float32, device=q.device)
        _dq_kernel[(triton.cdiv(G, bg) * S, H, B)](
            DQ=dq_part, ROWS=gq_idx, ROW_COUNT=gq_count, GKEYS=none, GKEY_COUNT=none,
            window=N, n_rows=G, n_gkeys=1, split_len=split,
            GATHER=True, HAS_GKEYS=False, BLOCK_M=bg, BLOCK_N=bn,
            num_warps=_warps(bg, warps), num_stages=stages, **args,
        )  # fmt: skip
        _put_rows(dq, gq_idx, gq_count, dq_part.sum(2))

    bm, bn, warps, stages = tiles.dkdv
    _dkdv_kernel[_band_grid(N, H, B, p.max_dil, bn)](
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
        _dkdv_kernel[(triton.cdiv(G, bg) * S, H, B)](
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
