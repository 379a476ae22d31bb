"""Blocked local attention for the CPU: exact, O(N*w) memory, plain autograd.

Where the time goes. Band attention with one-sided window w does 4*N*(2w+1)*d FLOPs per head
and everything else is bytes, so the plan is: no N x N tensor, no gathered copies of K/V, big
enough matmuls, and as few fresh large buffers as possible (on the 2-core VM this was tuned on,
a freshly allocated 50 MB tensor costs 3-4x a copy in page faults).

- Sequences. Each (batch row, head, residue class mod dilation) is one *sequence*: positions
  r, r+d, r+2d, ... On that subsequence the dilated band is an ordinary band of one-sided width
  w, so dilation is exact by construction, not a d times wider masked band. A sequence is a
  strided view of the (B*H*N, d) rows of q/k/v (row stride = dilation), never a copy. Heads
  with different dilations are different sequence sets written into the same output.
- Blocks. A sequence is cut into query blocks of ``blk`` rows; block b sees the ``span`` =
  blk + 2w key rows (blk + w when causal) starting at b*blk - w. Those spans are overlapping
  views (``unfold``) of K and V, so a chunk of blocks is one batched matmul
  (n, blk, d) @ (n, d, span) and one (n, blk, span) @ (n, span, dv). The work is
  (blk + 2w) / (2w + 1) times the band's: 1.12x for w=256, blk=64. The exact band is a
  precomputed (blk, span) additive bias.
- Edges. Chunks that cannot be plain views (blocks whose span leaves the sequence: the first
  ceil(w/blk) and the last few; chunks made of several short sequences) gather their rows with
  one ``index_select`` per tensor, from a map of a "virtual layout" in which sequence s owns
  rows [s*rows, s*rows + length_s) followed by at least w rows of padding. Padding rows point
  at some real row and are neutralised by an additive -1e30 key bias (which padded and global
  keys get too) or, as queries, discarded.
- Chunks. Blocks are processed a chunk (about ``CHUNK_BYTES`` of scores) at a time with
  buffers reused across chunks, softmax in place; under autograd fresh tensors are used instead
  so every intermediate can be saved for the backward pass.
- Global tokens. The scores of every query against the global keys are extra columns
  concatenated to its band scores, so one fp32 softmax normalises both parts exactly; global
  keys are removed from the band part (key bias), so a global key inside the window is counted
  once. With ``causal`` a query sees the global keys at or before it, a prefix of the sorted
  list. Rows of global queries are then recomputed as full attention over all valid keys.
- Empty rows. A query with no valid key gets finite garbage from the softmax (all its scores
  are about -1e30) and is multiplied by 0: output and gradients exactly 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from archopt.ops.attention.reference import masked_softmax_attention

# Added to masked scores. Finite so that a row with no valid key stays finite (it is zeroed
# afterwards) and so that two such biases can be added without overflowing fp32.
NEG = -1e30
# Bytes of scores per chunk. Measured on 2 cores (N=16384, w=256): 12-24 MB is fastest, 3 MB
# (the L2 size) about 1.3x slower, from per-op overheads and the smaller batched matmuls, and
# 96 MB slower again as the scores start to leave the caches. The chunk buffers are reused, so
# this is a constant, not a per-N, amount of memory.
CHUNK_BYTES = 16 * 2**20


def choose_block(window: int) -> int:
    """Query block size: 32 rows below w=128, else 64.

    Smaller blocks waste fewer FLOPs on the masked triangles at both ends of the span (the span
    is blk + 2w for 2w + 1 useful keys: 1.12x at w=256, blk=64); smaller than that, the matmuls
    get too thin to run at full speed. Measured on 2 cores, fp32, d=64, N=16384: within 5% of
    the best of 16/32/64/128 for w in {8, 32, 64, 128, 256, 512}.
    """
    return 32 if window < 128 else 64


def local_attention_blocked(
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
    block: int | None = None,
) -> Tensor:
    """Local attention, same semantics as the reference; inputs already validated."""
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):
        # Scores, softmax and the weighted sum in fp32; only the result goes back to half.
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, _ = q.shape
    dv = v.shape[-1]

    key_valid = None if key_padding_mask is None else ~key_padding_mask  # (B, N)
    glob = global_mask if global_mask is not None and bool(global_mask.any()) else None
    band_valid = key_valid  # keys of the band part: valid and not global
    global_keys = None
    if glob is not None:
        band_valid = ~glob if key_valid is None else key_valid & ~glob
        global_keys = glob if key_valid is None else glob & key_valid

    gk = None
    if global_keys is not None and bool(global_keys.any()):
        idx, count = _positions(global_keys)  # (B, G) sorted, padded; (B,)
        gk_k = _gather_rows(k, idx) * scale  # (B, H, G, d), pre-scaled: it is small
        gk_v = _gather_rows(v, idx)  # (B, H, G, dv)
        # Global keys visible to each query (B, N): all of them, or, when causal, those at
        # positions <= i, which are a prefix of the sorted list.
        visible = global_keys.cumsum(-1) if causal else count[:, None].expand(B, N)
        gk = (gk_k, gk_v, visible.contiguous())

    groups: dict[int, list[int]] = {}
    for h, d in enumerate(dilations):
        groups.setdefault(d, []).append(h)
    reuse = not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    result = q.new_empty(B * H * N, dv) if reuse else None
    pieces: list[tuple[Tensor, Tensor]] = []  # under autograd: (output rows, values)
    keep = None  # (B, H, N): queries with at least one key; only needed when keys are masked
    if band_valid is not None:
        keep = torch.empty(B, H, N, dtype=torch.bool, device=q.device)
    for d, heads in groups.items():
        _band(q, k, v, heads, d, window, causal, scale, band_valid, gk, block, result, pieces)
        if keep is not None:
            count = _band_counts(band_valid, window, d, causal)
            if gk is not None:
                count = count + gk[2]
            keep[:, heads] = (count > 0)[:, None, :]

    if reuse:
        out = result
    elif len(groups) == 1 and next(iter(groups)) == 1:  # pieces are already in row order
        out = torch.cat([values for _, values in pieces])
    else:
        rows = torch.cat([r for r, _ in pieces])
        values = torch.cat([x for _, x in pieces])
        out = values.new_zeros(B * H * N, dv).index_copy(0, rows, values)
    out = out.view(B, H, N, dv)
    if keep is not None:
        out = out.mul_(keep[..., None].to(out.dtype))
    if glob is not None:
        out = _global_rows(q, k, v, out, glob, key_valid, causal, scale)
    return out.to(out_dtype)


def _positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> positions of the True entries in increasing order, padded to the largest
    count with arbitrary positions, (B, G); and the counts, (B,)."""
    count = mask.sum(-1)
    g = int(count.max())
    # a stable sort of 0 (True) before 1 (False) keeps the True positions in order
    idx = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[:, :g]
    return idx, count


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, H, N, e), idx (B, G) -> x[b, :, idx[b]] as (B, H, G, e)."""
    B, H, _, e = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], e))


def _global_rows(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, glob, key_valid, causal: bool, scale: float
) -> Tensor:
    """Replace, in place, the rows of global queries by full attention over every valid key."""
    N = out.shape[2]
    idx, count = _positions(glob)
    g = idx.shape[1]
    slot = torch.arange(g, device=q.device) < count[:, None]  # (B, G) real entries
    mask = slot[:, None, :, None]  # (B, 1, G, 1)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if causal:
        mask = mask & (torch.arange(N, device=q.device) <= idx[:, None, :, None])
    rows = masked_softmax_attention(_gather_rows(q, idx), k, v, mask, scale)  # (B, H, G, dv)
    b_idx, slot_idx = slot.nonzero(as_tuple=True)  # the real (row, slot) pairs
    out[b_idx, :, idx[b_idx, slot_idx]] = rows[b_idx, :, slot_idx]  # (K, H, dv) both sides
    return out


def _band_counts(valid: Tensor, window: int, d: int, causal: bool) -> Tensor:
    """(B, N) bool -> number of valid keys in each query's dilated band, (B, N), by prefix sums
    along each residue class."""
    b, n = valid.shape
    m = -(-n // d)
    classes = F.pad(valid.long(), (0, m * d - n)).view(b, m, d)  # [:, j, r]: position j*d + r
    cs = F.pad(classes.cumsum(1), (0, 0, 1, 0))  # (B, M + 1, d): valid keys before row j
    j = torch.arange(m, device=valid.device)
    lo = (j - window).clamp(min=0)
    hi = j + 1 if causal else (j + window).clamp(max=m - 1) + 1
    return (cs[:, hi] - cs[:, lo]).reshape(b, m * d)[:, :n]


def _rows(src: Tensor, start: int, n: int, step: int) -> Tensor:
    """Rows start, start + step, ... (n of them) of ``src``, as a view."""
    return src[start : start + step * (n - 1) + 1 : step]


def _chunks(n_seq: int, nb: int, T: int, c: int, first_full: int, per_chunk: int):
    """Chunks of query blocks (t0, t1), block t = s*T + b being block b of sequence s.

    Short sequences (at least 4 fit in a chunk): whole sequences, padding blocks included, per
    chunk, gathered. Otherwise the blocks of one sequence, with the blocks whose span may leave
    the sequence (the first c, the last from ``first_full``) in chunks of their own, so that
    every other chunk reads its queries, keys and values as views of the inputs. (Measured:
    the threshold 4 is 1.2-1.35x faster than 1 at N=2048-8192 and as fast for short ones.)
    """
    if per_chunk >= 4 * T:
        step = per_chunk // T
        for s0 in range(0, n_seq, step):
            yield s0 * T, min(n_seq, s0 + step) * T
        return
    lo, hi = min(c, nb), max(min(c, nb), first_full)
    for s in range(n_seq):
        for a, b in ((0, lo), (lo, hi), (hi, nb)):
            for b0 in range(a, b, per_chunk):
                yield s * T + b0, s * T + min(b, b0 + per_chunk)


def _gather(src: Tensor, idx: Tensor, buf: Tensor | None) -> Tensor:
    """``src[idx]`` into the reused ``buf``, or a fresh tensor when autograd needs one."""
    if buf is None:
        return src.index_select(0, idx)
    return torch.index_select(src, 0, idx, out=buf[: idx.shape[0]])


def _band(q, k, v, heads, dil, window, causal, scale, key_valid, gk, block, result, pieces):
    """Band attention (plus global columns) for the heads ``heads``, all with dilation ``dil``.

    Writes the rows of those heads into ``result`` (B*H*N, dv), or, under autograd (``result``
    None), appends (row indices, values) to ``pieces``. ``key_valid`` (B, N) bool or None;
    ``gk`` None or (global K (B, H, G, d) times ``scale``, global V (B, H, G, dv), number of
    global keys visible to each query (B, N)).
    """
    B, H, N, D = q.shape
    dv = v.shape[-1]
    dev = q.device
    # Sequences: s = (b*len(heads) + i)*dil + r is residue class r of head heads[i], row b.
    seqs = [(b, h, r) for b in range(B) for h in heads for r in range(dil)]
    S = len(seqs)
    lengths = [-(-(N - r) // dil) for _, _, r in seqs]
    qkv_base = [(b * H + h) * N + r for b, h, r in seqs]  # first row in (B*H*N, e)
    mask_base = [b * N + r for b, _, r in seqs]  # first entry in (B*N,)
    M = max(lengths)
    w = min(window, M - 1)  # keys further away than the sequence is long do not exist
    blk = block or choose_block(w)
    nb = -(-M // blk)  # query blocks per sequence
    c = -(-w // blk)  # blocks of padding after each sequence: at least w rows
    T = nb + c  # blocks per sequence in the virtual layout
    rows = T * blk
    span = blk + (w if causal else 2 * w)
    # Virtual layout: sequence s owns rows [s*rows, s*rows + lengths[s]), all else is padding.
    # Query block t = s*T + b covers rows [t*blk, (t+1)*blk) and sees the ``span`` key rows
    # from t*blk - w on; from block ``first_full`` on, spans pass the end of the sequence.
    first_full = max(0, (M + w - span) // blk + 1)
    q_all, k_all, v_all = q.view(-1, D), k.view(-1, D), v.view(-1, dv)

    # Where each virtual row lives, for chunks that are not plain views: virtual rows
    # [-w, S*rows + span) as ``vrow + w``; padding points at row 0 of q/k/v (masked or
    # discarded) and at the extra last entry of the (B*N + 1,) per-position tensors.
    vrow = torch.arange(-w, S * rows + span, device=dev)
    s_of = vrow.div(rows, rounding_mode="floor").clamp(0, S - 1)
    m_of = vrow - s_of * rows
    real = (vrow >= 0) & (vrow < S * rows) & (m_of < torch.tensor(lengths, device=dev)[s_of])
    qkv_idx = torch.where(real, torch.tensor(qkv_base, device=dev)[s_of] + dil * m_of, 0)
    mask_idx = torch.where(real, torch.tensor(mask_base, device=dev)[s_of] + dil * m_of, B * N)

    key_bias = torch.zeros(B * N + 1, dtype=q.dtype, device=dev)
    key_bias[-1] = NEG
    valid_all = None
    if key_valid is not None:
        valid_all = key_valid.reshape(-1)
        key_bias[:-1].masked_fill_(~valid_all, NEG)
    r_ = torch.arange(blk, device=dev)[:, None]
    t_ = torch.arange(span, device=dev)[None, :]
    band = (t_ >= r_) & (t_ <= r_ + (w if causal else 2 * w))  # key row t in query row r's band
    band_bias = torch.zeros(blk, span, dtype=q.dtype, device=dev).masked_fill_(~band, NEG)

    g = 0
    if gk is not None:
        gk_k, gk_v, visible = gk
        g = gk_k.shape[2]
        gk_kt = gk_k.reshape(B * H, g, D).transpose(1, 2)  # (B*H, d, G)
        gk_v = gk_v.reshape(B * H, g, dv)
        visible = F.pad(visible.reshape(-1), (0, 1))  # (B*N + 1,)
        g_of_seq = torch.tensor([b * H + h for b, h, _ in seqs], device=dev)
        slots = torch.arange(g, device=dev)

    per_chunk = max(1, CHUNK_BYTES // (blk * (span + g) * q.element_size()))
    chunks = list(_chunks(S, nb, T, c, first_full, per_chunk))
    reuse = result is not None
    bufs = dict.fromkeys(("band", "scores", "out", "q", "k", "v", "bias"))
    if reuse:
        n_max = max(t1 - t0 for t0, t1 in chunks)
        n_keys_max = (n_max - 1) * blk + span
        bufs.update(
            band=q.new_empty(n_max, blk, span),
            scores=q.new_empty(n_max, blk, span + g) if g else None,
            out=q.new_empty(n_max, blk, dv),
            q=q.new_empty(n_max * blk, D),
            k=q.new_empty(n_keys_max, D),
            v=q.new_empty(n_keys_max, dv),
            bias=q.new_empty(n_keys_max),
        )

    for t0, t1 in chunks:
        n = t1 - t0
        n_keys = (n - 1) * blk + span
        s, b0 = divmod(t0, T)
        one_seq = t1 <= (s + 1) * T
        # Rows of the inputs themselves (views) when the chunk lies inside one sequence.
        whole_q = one_seq and (b0 + n) * blk <= lengths[s]
        whole_k = one_seq and b0 * blk >= w and b0 * blk - w + n_keys <= lengths[s]
        q0, k0 = t0 * blk + w, t0 * blk  # first query row, first key row in the index tensors
        if whole_q:
            qc = _rows(q_all, qkv_base[s] + dil * b0 * blk, n * blk, dil)
        else:
            qc = _gather(q_all, qkv_idx[q0 : q0 + n * blk], bufs["q"])
        qc = qc.view(n, blk, D)
        if whole_k:
            first = qkv_base[s] + dil * (b0 * blk - w)
            k_rows, v_rows = _rows(k_all, first, n_keys, dil), _rows(v_all, first, n_keys, dil)
        else:
            k_rows = _gather(k_all, qkv_idx[k0 : k0 + n_keys], bufs["k"])
            v_rows = _gather(v_all, qkv_idx[k0 : k0 + n_keys], bufs["v"])
        k_win = k_rows.unfold(0, span, blk)  # (n, d, span): K^T of every block, a view
        v_win = v_rows.unfold(0, span, blk).transpose(1, 2)  # (n, span, dv)

        # Band scores (n, blk, span), always a contiguous matmul output: with a strided output
        # baddbmm falls back to one small matmul per block.
        if reuse:
            band_scores = bufs["band"][:n].baddbmm_(qc, k_win, beta=0, alpha=scale)
            band_scores.add_(band_bias)
        else:
            band_scores = torch.baddbmm(band_bias, qc, k_win, alpha=scale)
        # Key bias only where some key of the chunk is padding, masked or global.
        if not whole_k or (
            valid_all is not None
            and not bool(_rows(valid_all, mask_base[s] + dil * (b0 * blk - w), n_keys, dil).all())
        ):
            bias = _gather(key_bias, mask_idx[k0 : k0 + n_keys], bufs["bias"])
            band_scores.add_(bias.unfold(0, span, blk)[:, None, :])  # (n, 1, span)

        scores = band_scores
        if gk is not None:
            if one_seq:  # the global keys of one sequence: a single small matmul
                gi = int(g_of_seq[s])
                g_scores = (qc.reshape(n * blk, D) @ gk_kt[gi]).view(n, blk, g)
            else:
                gsel = g_of_seq[torch.arange(t0, t1, device=dev) // T]
                g_scores = torch.bmm(qc, gk_kt[gsel])  # (n, blk, G)
            seen = visible[mask_idx[q0 : q0 + n * blk]].view(n, blk, 1)
            g_scores.masked_fill_(slots >= seen, NEG)
            # band and global columns side by side: one softmax normalises both exactly
            cat_out = {"out": bufs["scores"][:n]} if reuse else {}
            scores = torch.cat([band_scores, g_scores], dim=-1, **cat_out)

        direct = reuse and whole_q and dil == 1  # the chunk's rows are rows of the result
        if reuse:
            # Softmax in place: the kernel reads each row before writing it.
            probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            if direct:
                dst = result[qkv_base[s] + b0 * blk :][: n * blk].view(n, blk, dv)
            else:
                dst = bufs["out"][:n]
            out = torch.bmm(probs[..., :span], v_win, out=dst)
        else:
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs[..., :span], v_win)  # (n, blk, dv)
        if gk is not None:
            p_g = probs[..., span:]  # (n, blk, G)
            if one_seq:
                flat, p_g = out.view(n * blk, dv), p_g.reshape(n * blk, g)
                if reuse:
                    flat.addmm_(p_g, gk_v[gi])
                else:
                    out = torch.addmm(flat, p_g, gk_v[gi]).view(n, blk, dv)
            elif reuse:
                out.baddbmm_(p_g, gk_v[gsel])
            else:
                out = torch.baddbmm(out, p_g, gk_v[gsel])

        # keep the rows of real queries
        if direct:
            continue
        out = out.view(n * blk, dv)
        is_real = real[q0 : q0 + n * blk]
        if whole_q:  # with dilation: every dil-th row of the result
            if reuse:
                _rows(result, qkv_base[s] + dil * b0 * blk, n * blk, dil).copy_(out)
            else:
                pieces.append((qkv_idx[q0 : q0 + n * blk], out))
        else:
            idx = qkv_idx[q0 : q0 + n * blk][is_real]
            if reuse:
                result.index_copy_(0, idx, out[is_real])
            else:
                pieces.append((idx, out[is_real]))
