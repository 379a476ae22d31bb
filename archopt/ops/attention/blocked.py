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
  (blk + 2w) / (2w + 1) times the band's: 1.12x for w=256, blk=64. The exact band is cut out
  by filling the scores outside it with -1e30 (one strided view, ``outside_band``).
- Edges. Every chunk reads its queries, keys and values as strided views, even where a span
  leaves its sequence: the rows there belong to the neighbouring residue class or head, are
  finite (``local_attention`` runs this path on finite inputs only), and their scores are
  replaced by -1e30 (a *key mask*, as are those of padded and global keys), built once per
  batch row and residue class when there is a padding mask (``mask_edges`` without) and
  applied only to the blocks that need it. Masked scores are replaced, never biased: a bias
  would let a huge finite score through. Only spans that leave the tensor itself (the first
  blocks of the first sequence, the last of the last) are small zero-padded copies.
- Runs. When N is a multiple of dilation * blk, residue class r of consecutive (batch row,
  head) pairs is one strided sequence of rows, so a chunk can run from one head into the next
  and short sequences or large dilations still give full-size matmuls: the number of chunks,
  and so the per-op overhead, does not grow with B*H*dilation.
- Chunks. Blocks are processed a chunk (about ``CHUNK_BYTES`` of scores) at a time, softmax
  in place, each chunk's output written straight into the result (dilation 1) or copied into
  its strided rows. A chunk's scores live in the rows of the result not written yet, where
  they fit (``Workspace``), else in one spare buffer of ``SPARE_BYTES``: peak memory is the
  output plus ``SPARE_BYTES``.
- Backward (``_BandAttention``). Only q, k, v are saved. The backward pass runs every chunk
  again (smaller chunks, ``BACKWARD_CHUNK_BYTES``) with the forward's code up to the softmax,
  takes its gradients by hand (``chunk_grads``) and adds them into the gradients' rows:
  memory O(N*d) plus one chunk. (Short sequences, ``short_band``, use autograd on copies.)
- Global tokens. The scores of every query against the global keys are extra columns
  concatenated to its band scores, so one fp32 softmax normalises both parts exactly; global
  keys are removed from the band part (key mask), so a global key inside the window is counted
  once. With ``causal`` a query sees the global keys at or before it, a prefix of the sorted
  list. Rows of global queries are then recomputed as full attention over all valid keys.
- Empty rows. A query with no valid key gets finite garbage from the softmax (all its scores
  are about -1e30) and is multiplied by 0: output and gradients exactly 0, never NaN.

Where it lives: this file holds the entry point, the autograd node, ``band`` (one dilation's
heads: plan, then chunk by chunk) and the rows of global queries; ``blocked_chunks.py`` the
planning (``plan_chunks``), a chunk's scores, forward and backward (``chunk_scores``,
``chunk_forward``, ``chunk_backward``) and the ``Workspace``; ``blocked_short.py`` the dense
path for short sequences; ``blocked_rows.py`` the row views and score masks they share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from archopt.ops.attention.blocked_chunks import (
    Band,
    Grads,
    Spec,
    Workspace,
    chunk_backward,
    chunk_forward,
    chunk_scores,
    plan_chunks,
)
from archopt.ops.attention.blocked_rows import NEG, band_counts, gather_rows, positions
from archopt.ops.attention.blocked_short import short_band
from archopt.ops.attention.reference import masked_softmax_attention

# Bytes of scores per chunk, at most. Measured on 2 cores (N=16384, w=256, fp32, forward):
# 16 MB is fastest; 8, 4 and 2 MB take 1.05x, 1.12x and 1.14x as long (per-op overheads).
# ``short_band`` keeps its chunks in buffers of this size.
CHUNK_BYTES = 16 * 2**20
# Bytes of scores per chunk in the backward pass, at most: each chunk holds about four tensors
# that size at once. Measured on 2 cores (w=256, fp32, forward + backward at N=1024 and 4096):
# 2 and 4 MB equally fast (41 and 156 ms), 1 MB 1.2x and 8 MB up to 1.3x slower, for a peak of
# 24-61 MiB (2 MB) and 36-73 MiB (4 MB).
BACKWARD_CHUNK_BYTES = 2 * 2**20
# The buffer a chunk uses when the rows of the result not yet written hold fewer blocks
# (``Workspace``): peak memory is the output plus this. Smaller saves memory and costs time,
# the last chunks being smaller: measured on 2 cores (w=256, fp32, forward), 2 MiB took 1.01-
# 1.06x as long as 16 MiB at N=16384 and 1.12-1.3x at N=2048 (benchmarks/RESULTS.md).
SPARE_BYTES = 16 * 2**20
# Sequences at most half a block's key span run as dense masked attention (``short_band``); the
# tests also run with this off, so the band path sees their small shapes too.
SHORT_SEQUENCES = True


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
    """Local attention, same semantics as the reference; inputs already validated and finite
    (``local_attention`` sees to NaN and Inf). A window or dilation of N or more is the same as
    N: cut to it, so that no loop runs over residue classes that hold no position."""
    reach = max(q.shape[2], 1)
    window, dilations = min(window, reach), [min(d, reach) for d in dilations]
    out_dtype = q.dtype
    if q.dtype in (torch.float16, torch.bfloat16):
        # Scores, softmax and the weighted sum in fp32; only the result goes back to half.
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, _ = q.shape

    key_valid = None if key_padding_mask is None else ~key_padding_mask  # (B, N)
    glob = global_mask if global_mask is not None and bool(global_mask.any()) else None
    band_valid = key_valid  # keys of the band part: valid and not global
    global_keys = None
    if glob is not None:
        band_valid = ~glob if key_valid is None else key_valid & ~glob
        global_keys = glob if key_valid is None else glob & key_valid

    gk_k = gk_v = visible = None
    if global_keys is not None and bool(global_keys.any()):
        idx, count = positions(global_keys)  # (B, G) sorted, padded; (B,)
        gk_k = gather_rows(k, idx) * scale  # (B, H, G, d), pre-scaled: it is small
        gk_v = gather_rows(v, idx)  # (B, H, G, dv)
        # Global keys visible to each query (B, N): all of them, or, when causal, those at
        # positions <= i, which are a prefix of the sorted list.
        visible = (global_keys.cumsum(-1) if causal else count[:, None].expand(B, N)).contiguous()

    groups: dict[int, list[int]] = {}
    for h, d in enumerate(dilations):
        groups.setdefault(d, []).append(h)
    spec = Spec(
        groups, window, causal, scale, band_valid, visible, block,
        CHUNK_BYTES, BACKWARD_CHUNK_BYTES, SPARE_BYTES, SHORT_SEQUENCES,
    )  # fmt: skip
    out = _BandAttention.apply(q, k, v, gk_k, gk_v, spec)
    if band_valid is not None:  # zero the queries with no key at all (only masks make them)
        keep = torch.empty(B, H, N, dtype=torch.bool, device=q.device)
        for d, heads in groups.items():
            count = band_counts(band_valid, window, d, causal)
            if visible is not None:
                count = count + visible
            keep[:, heads] = (count > 0)[:, None, :]
        out = out.mul_(keep[..., None].to(out.dtype))
    if glob is not None:
        out = _global_rows(q, k, v, out, glob, key_valid, causal, scale)
    return out.to(out_dtype)


class _BandAttention(torch.autograd.Function):
    """The band part (with the global key columns) as one autograd node.

    Forward: the chunked computation, scores in the output's unwritten rows. Backward: every
    chunk again (scores and softmax by the forward's code), its gradients by hand
    (``chunk_grads``), added into the gradients' rows. So only q, k, v are saved (no scores:
    memory O(N*d), not O(N*w)), and no gradient is ever built at the size of q for one chunk,
    which is what autograd does for a slice of a tensor.
    """

    @staticmethod
    def forward(ctx, q, k, v, gk_k, gk_v, spec: Spec):
        result = q.new_empty(*q.shape[:3], v.shape[-1])
        ws = Workspace(result.view(-1, v.shape[-1]), spec.spare_bytes)
        gk = None if gk_k is None else (gk_k, gk_v, spec.visible)
        for d, heads in spec.groups.items():
            band(q, k, v, heads, d, spec, gk, ws=ws)
        ctx.save_for_backward(q, k, v, gk_k, gk_v)
        ctx.spec = spec
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, gk_k, gk_v = ctx.saved_tensors
        spec: Spec = ctx.spec
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grads = Grads(
            grad_out.contiguous().view(-1, v.shape[-1]),
            dq.view(-1, q.shape[-1]),
            dk.view(-1, k.shape[-1]),
            dv.view(-1, v.shape[-1]),
            None if gk_k is None else torch.zeros_like(gk_k),
            None if gk_v is None else torch.zeros_like(gk_v),
        )
        gk = None if gk_k is None else (gk_k, gk_v, spec.visible)
        for d, heads in spec.groups.items():
            band(q, k, v, heads, d, spec, gk, grads=grads)
        return dq, dk, dv, grads.gk_k, grads.gk_v, None


def band(q, k, v, heads, dil, spec: Spec, gk, ws: Workspace | None = None, grads=None) -> None:
    """Band attention (plus global columns) for the heads ``heads``, all with dilation ``dil``.

    Writes the rows of those heads into ``ws.result`` (B*H*N, dv); or, for the backward pass,
    adds the gradients of the rows' inputs to ``grads``. ``gk`` None or (global K (B, H, G, d)
    times the scale, global V (B, H, G, dv), number of global keys visible to each query
    (B, N)). Plan the chunks, then per chunk: a buffer (from the workspace in the forward
    pass, which may cut the chunk), its scores, then its output or its gradients.
    """
    N = q.shape[2]
    M = -(-N // dil)  # the longest sequence (residue class 0)
    w = min(spec.window, M - 1)  # keys further away than the sequence is long do not exist
    blk = spec.block or choose_block(w)
    span = blk + (w if spec.causal else 2 * w)
    # A block would read more than twice the keys its sequence holds: dense per sequence is
    # less work. (Near 1x the band path's reused buffers win: at N=1024, w=256, dilation 2,
    # where span = 1.1 M, dense took 1.4x as long.)
    if span >= 2 * M and spec.short_sequences:
        short_band(q, k, v, heads, dil, w, spec, gk, ws, grads)
        return
    layout = Band(q, k, v, heads, dil, w, blk, span, spec, gk)
    chunk_bytes = spec.chunk_bytes if grads is None else spec.backward_chunk_bytes
    per_chunk = max(1, chunk_bytes // (blk * (span + layout.g) * q.element_size()))
    chunks = plan_chunks(layout, per_chunk)
    chunks.reverse()
    while chunks:
        c = chunks.pop()
        if ws is not None:
            # the chunk writes result rows base + dil * p for positions p from b0 * blk on
            first, left = c.base + dil * c.b0 * blk, c.count * c.length - c.b0 * blk
            m, buf = ws.take(c.b1 - c.b0, blk, layout.block_elems, first, dil, left)
            if m < c.b1 - c.b0:  # the rest of the chunk next
                chunks.append(dataclasses.replace(c, b0=c.b0 + m))
                c = dataclasses.replace(c, b1=c.b0 + m)
        else:
            buf = q.new_empty((c.b1 - c.b0) * layout.block_elems)
        scores = chunk_scores(layout, c, buf)
        if grads is not None:
            chunk_backward(layout, c, scores, grads)
        else:
            chunk_forward(layout, c, scores, ws.result)


def _global_rows(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, glob, key_valid, causal: bool, scale: float
) -> Tensor:
    """Replace, in place, the rows of global queries by full attention over every valid key.

    Their (G, N) scores are computed a few heads at a time, at most ``SPARE_BYTES`` of them
    (at least one head), masked and normalised in place unless autograd needs them."""
    B, H, N, _ = out.shape
    idx, count = positions(glob)
    g = idx.shape[1]
    slot = torch.arange(g, device=q.device) < count[:, None]  # (B, G) real entries
    mask = slot[:, None, :, None]  # (B, 1, G, 1)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if causal:
        mask = mask & (torch.arange(N, device=q.device) <= idx[:, None, :, None])
    qg = gather_rows(q, idx)  # (B, H, G, d)
    b_idx, slot_idx = slot.nonzero(as_tuple=True)  # the real (row, slot) pairs
    graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    per = max(1, SPARE_BYTES // (B * g * N * q.element_size()))
    for h0 in range(0, H, per):
        hs = slice(h0, h0 + per)
        if graph:
            rows = masked_softmax_attention(qg[:, hs], k[:, hs], v[:, hs], mask, scale)
        else:  # one (B, heads, G, N) tensor
            scores = torch.matmul(qg[:, hs], k[:, hs].transpose(-1, -2)).mul_(scale)
            scores.masked_fill_(~mask, NEG)
            probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            rows = torch.matmul(probs, v[:, hs]).mul_(mask.any(-1, keepdim=True))
        out[b_idx, hs, idx[b_idx, slot_idx]] = rows[b_idx, :, slot_idx]  # (K, heads, dv)
    return out
