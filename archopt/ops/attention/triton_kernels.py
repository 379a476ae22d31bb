"""Local attention as Triton kernels, FlashAttention-2 style: the kernels of the ``"triton"``
backend (launched, planned and differentiated by ``triton_band.py``).

Same semantics as ``reference.py``; the design, in the order the work happens:

- Sequences. On the residue class r, r + d, r + 2d, ... of a head with dilation d, the dilated
  band is an ordinary band of one-sided width w. Every kernel therefore works in *class
  coordinates*: row c of class r is position r + d*c, and a tile of rows is loaded with a row
  stride of d*head_dim elements straight from the (B, H, N, head_dim) tensors: dilation is a
  stride, never a copy, and exact by construction (no d times wider masked band). Heads may
  have different dilations: the kernels read theirs from a per-head table, and the grid is
  sized for the head with the most tiles (programs past the end of their head do nothing).
- Forward (``fwd_kernel``). One program per (query tile of BLOCK_M rows of one class, head,
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
- Backward. dQ (``dq_kernel``) mirrors the forward: recompute P = exp2(S - LSE) per tile,
  dS = P * (dP - delta) with delta = rowsum(dO * O). dK/dV (``dkdv_kernel``) is the transpose:
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

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are scaled by log2(e) once, so the softmax runs on exp2


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
def fwd_kernel(
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
def dq_kernel(
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
def dkdv_kernel(
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
def delta_kernel(OUT, DO, DELTA, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 over the (n_rows, HEAD_DIM) rows of all heads."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    o = _rows(OUT, rows, ok, HEAD_DIM).to(tl.float32)
    do = _rows(DO, rows, ok, HEAD_DIM).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, 1), mask=ok)


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when imported)."""
    return not isinstance(fwd_kernel, triton.runtime.JITFunction)
