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
- Edges. Every chunk reads its queries, keys and values as strided views, even where a span
  leaves its sequence: the rows there belong to the neighbouring residue class or head, are
  finite, and get an additive -1e30 *key bias* (as do padded and global keys), built once per
  sequence length (or per batch row and residue class when there is a padding mask) and added
  only to the blocks that need it. Only spans that leave the tensor itself (the first blocks
  of the first sequence, the last of the last) are small zero-padded copies.
- Runs. When N is a multiple of dilation * blk, residue class r of consecutive (batch row,
  head) pairs is one strided sequence of rows, so a chunk can run from one head into the next
  and short sequences or large dilations still give full-size matmuls: the number of chunks,
  and so the per-op overhead, does not grow with B*H*dilation.
- Chunks. Blocks are processed a chunk (about ``CHUNK_BYTES`` of scores) at a time, softmax
  in place, each chunk's output written straight into the result (dilation 1) or copied into
  its strided rows. A chunk's scores live in the rows of the result not written yet, where
  they fit (``_Workspace``), else in one spare buffer of ``SPARE_BYTES``: peak memory is the
  output plus ``SPARE_BYTES``.
- Backward (``_BandAttention``). Only q, k, v are saved. The backward pass runs every chunk
  again (smaller chunks, ``BACKWARD_CHUNK_BYTES``) with the forward's code up to the softmax,
  takes its gradients by hand (``_chunk_grads``) and adds them into the gradients' rows:
  memory O(N*d) plus one chunk. (Short sequences, ``_short``, use autograd on copies.)
- Global tokens. The scores of every query against the global keys are extra columns
  concatenated to its band scores, so one fp32 softmax normalises both parts exactly; global
  keys are removed from the band part (key bias), so a global key inside the window is counted
  once. With ``causal`` a query sees the global keys at or before it, a prefix of the sorted
  list. Rows of global queries are then recomputed as full attention over all valid keys.
- Empty rows. A query with no valid key gets finite garbage from the softmax (all its scores
  are about -1e30) and is multiplied by 0: output and gradients exactly 0, never NaN.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from archopt.ops.attention.reference import masked_softmax_attention

# Added to masked scores. Finite so that a row with no valid key stays finite (it is zeroed
# afterwards) and so that two such biases can be added without overflowing fp32.
NEG = -1e30
# Bytes of scores per chunk, at most. Measured on 2 cores (N=16384, w=256, fp32, forward):
# 16 MB is fastest; 8, 4 and 2 MB take 1.05x, 1.12x and 1.14x as long (per-op overheads).
# ``_short`` keeps its chunks in buffers of this size.
CHUNK_BYTES = 16 * 2**20
# Bytes of scores per chunk in the backward pass, at most: each chunk holds about four tensors
# that size at once. Measured on 2 cores (w=256, fp32, forward + backward at N=1024 and 4096):
# 2 and 4 MB equally fast (41 and 156 ms), 1 MB 1.2x and 8 MB up to 1.3x slower, for a peak of
# 24-61 MiB (2 MB) and 36-73 MiB (4 MB).
BACKWARD_CHUNK_BYTES = 2 * 2**20
# The buffer a chunk uses when the rows of the result not yet written hold fewer blocks
# (``_Workspace``): peak memory is the output plus this. Smaller saves memory and costs time,
# the last chunks being smaller: measured on 2 cores (w=256, fp32, forward), 2 MiB took 1.01-
# 1.06x as long as 16 MiB at N=16384 and 1.12-1.3x at N=2048 (benchmarks/RESULTS.md).
SPARE_BYTES = 16 * 2**20
# Sequences at most half a block's key span run as dense masked attention (``_short``); the
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
    """Local attention, same semantics as the reference; inputs already validated."""
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
        idx, count = _positions(global_keys)  # (B, G) sorted, padded; (B,)
        gk_k = _gather_rows(k, idx) * scale  # (B, H, G, d), pre-scaled: it is small
        gk_v = _gather_rows(v, idx)  # (B, H, G, dv)
        # Global keys visible to each query (B, N): all of them, or, when causal, those at
        # positions <= i, which are a prefix of the sorted list.
        visible = (global_keys.cumsum(-1) if causal else count[:, None].expand(B, N)).contiguous()

    groups: dict[int, list[int]] = {}
    for h, d in enumerate(dilations):
        groups.setdefault(d, []).append(h)
    spec = _Spec(groups, window, causal, scale, band_valid, visible, block)
    out = _BandAttention.apply(q, k, v, gk_k, gk_v, spec)
    if band_valid is not None:  # zero the queries with no key at all (only masks make them)
        keep = torch.empty(B, H, N, dtype=torch.bool, device=q.device)
        for d, heads in groups.items():
            count = _band_counts(band_valid, window, d, causal)
            if visible is not None:
                count = count + visible
            keep[:, heads] = (count > 0)[:, None, :]
        out = out.mul_(keep[..., None].to(out.dtype))
    if glob is not None:
        out = _global_rows(q, k, v, out, glob, key_valid, causal, scale)
    return out.to(out_dtype)


@dataclasses.dataclass
class _Spec:
    """What the band part needs besides q, k, v and the global keys: heads by dilation, the
    window, causal, the scale, valid band keys (B, N) or None, global keys visible to each
    query (B, N) or None, the block size or None."""

    groups: dict[int, list[int]]
    window: int
    causal: bool
    scale: float
    key_valid: Tensor | None
    visible: Tensor | None
    block: int | None


@dataclasses.dataclass
class _Grads:
    """The backward pass's running sums: the output's gradient (B*H*N, dv) in, and the
    gradients of q, k, v as rows, and of the global keys and values (B, H, G, .), added to."""

    out: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    gk_k: Tensor | None
    gk_v: Tensor | None


class _BandAttention(torch.autograd.Function):
    """The band part (with the global key columns) as one autograd node.

    Forward: the chunked computation, scores in the output's unwritten rows. Backward: every
    chunk again (scores and softmax by the forward's code), its gradients by hand
    (``_chunk_grads``), added into the gradients' rows. So only q, k, v are saved (no scores:
    memory O(N*d), not O(N*w)), and no gradient is ever built at the size of q for one chunk,
    which is what autograd does for a slice of a tensor.
    """

    @staticmethod
    def forward(ctx, q, k, v, gk_k, gk_v, spec: _Spec):
        result = q.new_empty(*q.shape[:3], v.shape[-1])
        ws = _Workspace(result.view(-1, v.shape[-1]))
        gk = None if gk_k is None else (gk_k, gk_v, spec.visible)
        for d, heads in spec.groups.items():
            _band(q, k, v, heads, d, spec, gk, ws=ws)
        ctx.save_for_backward(q, k, v, gk_k, gk_v)
        ctx.spec = spec
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, gk_k, gk_v = ctx.saved_tensors
        spec: _Spec = ctx.spec
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grads = _Grads(
            grad_out.contiguous().view(-1, v.shape[-1]),
            dq.view(-1, q.shape[-1]),
            dk.view(-1, k.shape[-1]),
            dv.view(-1, v.shape[-1]),
            None if gk_k is None else torch.zeros_like(gk_k),
            None if gk_v is None else torch.zeros_like(gk_v),
        )
        gk = None if gk_k is None else (gk_k, gk_v, spec.visible)
        for d, heads in spec.groups.items():
            _band(q, k, v, heads, d, spec, gk, grads=grads)
        return dq, dk, dv, grads.gk_k, grads.gk_v, None


def _leaf(x: Tensor) -> Tensor:
    """``x`` as a leaf of a new graph (same memory)."""
    return x.detach().requires_grad_()


def _chunk_grads(probs, span, d_out, qb, k_win, v_win, gkk, gkv, scale):
    """Gradients of one chunk of band attention, from its softmax ``probs`` (n, blk, span + G)
    and its output's gradient ``d_out`` (n, blk, dv): of its queries (n, blk, d), of its
    blocks' key and value windows (n, span, d) and (n, span, dv), and of its global keys (G, d)
    and values (G, dv) (None without).

    With O = P V: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale,
    dK = dS^T Q * scale; the global columns are more columns of the same P and S (their keys
    already scaled).
    """
    n, blk, _ = probs.shape
    p_band = probs[..., :span]
    v_t = v_win.transpose(1, 2)  # (n, dv, span)
    out = torch.bmm(p_band, v_win)  # the chunk's output again, for rowsum(dO * O)
    d_probs = torch.bmm(d_out, v_t)  # (n, blk, span)
    d_gk = d_gv = None
    flat = d_out.view(n * blk, -1)
    if gkk is not None:
        p_g = probs[..., span:].reshape(n * blk, -1)
        out.view(n * blk, -1).addmm_(p_g, gkv)
        d_probs = torch.cat([d_probs, (flat @ gkv.t()).view(n, blk, -1)], dim=-1)
        d_gv = p_g.t() @ flat
    d_v = torch.bmm(p_band.transpose(1, 2), d_out)  # (n, span, dv)
    delta = (d_out * out).sum(-1, keepdim=True)  # (n, blk, 1)
    d_s = d_probs.sub_(delta).mul_(probs)  # in place
    d_band = d_s[..., :span]
    d_q = torch.bmm(d_band, k_win.transpose(1, 2)).mul_(scale)  # (n, blk, d)
    d_k = torch.bmm(d_band.transpose(1, 2), qb).mul_(scale)  # (n, span, d)
    if gkk is not None:
        d_sg = d_s[..., span:].reshape(n * blk, -1)
        d_q.view(n * blk, -1).addmm_(d_sg, gkk)
        d_gk = d_sg.t() @ qb.reshape(n * blk, -1)
    return d_q, d_k, d_v, d_gk, d_gv


def _fold(windows: Tensor, n_rows: int, step: int) -> Tensor:
    """The sum of overlapping windows (n, span, e), window i at rows i*step .. i*step+span-1,
    as (n_rows, e) rows: the gradient of ``rows.unfold(0, span, step)``."""
    n, span, e = windows.shape
    rows = windows.new_zeros(n * step + span, e)
    for s in range(0, span, step):
        width = min(step, span - s)
        rows[s : s + n * step].view(n, step, e)[:, :width] += windows[:, s : s + width]
    return rows[:n_rows]


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
    """Replace, in place, the rows of global queries by full attention over every valid key.

    Their (G, N) scores are computed a few heads at a time, at most ``SPARE_BYTES`` of them
    (at least one head), masked and normalised in place unless autograd needs them."""
    B, H, N, _ = out.shape
    idx, count = _positions(glob)
    g = idx.shape[1]
    slot = torch.arange(g, device=q.device) < count[:, None]  # (B, G) real entries
    mask = slot[:, None, :, None]  # (B, 1, G, 1)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    if causal:
        mask = mask & (torch.arange(N, device=q.device) <= idx[:, None, :, None])
    qg = _gather_rows(q, idx)  # (B, H, G, d)
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


def _seq_rows(src: Tensor, base: int, dil: int, p0: int, n: int) -> Tensor:
    """Rows ``base + dil * p`` for p in [p0, p0 + n) of ``src`` (rows, e).

    A strided view when all of them exist; otherwise (only at the very start or end of the
    tensor) a copy with zero rows where they do not. Rows that exist but lie outside the
    sequence are read as they are: the key bias masks them and query rows there are discarded.
    """
    first, lo, hi = _existing(src, base, dil, p0, n)
    if lo == 0 and hi == n:
        return _rows(src, first, n, dil)
    if hi <= lo:
        return src.new_zeros(n, src.shape[1])
    return F.pad(_rows(src, first + dil * lo, hi - lo, dil), (0, 0, lo, n - hi))


def _add_seq_rows(dst: Tensor, base: int, dil: int, p0: int, rows: Tensor) -> None:
    """The reverse of ``_seq_rows``: add ``rows`` (n, e) to rows base + dil * p of ``dst``,
    p in [p0, p0 + n), those that exist."""
    first, lo, hi = _existing(dst, base, dil, p0, rows.shape[0])
    if hi > lo:
        _rows(dst, first + dil * lo, hi - lo, dil).add_(rows[lo:hi])


def _existing(src: Tensor, base: int, dil: int, p0: int, n: int) -> tuple[int, int, int]:
    """Row base + dil * p0 of ``src``, and the range [lo, hi) of i < n for which row
    base + dil * (p0 + i) exists."""
    first = base + dil * p0
    lo = max(0, -(first // dil))  # first i with first + dil * i >= 0
    hi = min(n, (src.shape[0] - 1 - first) // dil + 1)  # last i with a row, plus one
    return first, lo, hi


class _Workspace:
    """Room for a chunk's scores, taken from the rows of the result not written yet.

    ``frontier`` is one past the highest row of the result written so far. A chunk's scores
    and output rows go past it and past the rows the chunk writes itself, at the very end of
    the result; chunks run in increasing row order, so that room shrinks only towards the
    end. The memory above the output is what is left for the last chunks: when the unwritten
    rows hold fewer blocks than ``SPARE_BYTES`` would, a chunk uses a buffer of that size.
    Peak memory: the output, the floor, plus ``SPARE_BYTES``. Those last chunks are smaller
    (each output row needs span / dv times its size in scores), which is what a small
    ``SPARE_BYTES`` costs in time.
    """

    def __init__(self, result: Tensor):
        self.result = result
        self.flat = result.view(-1)
        self.frontier = 0
        self.spare: Tensor | None = None

    def take(
        self, n: int, blk: int, per_block: int, first: int, step: int, rows: int
    ) -> tuple[int, Tensor]:
        """(m, buffer of at least m * per_block elements) for the first m <= n blocks of a
        chunk that writes the result rows first, first + step, ... (``rows`` of them at most,
        ``blk`` per block)."""

        def end(m: int) -> int:  # one past the last row the first m blocks write
            return first + step * (min(m * blk, rows) - 1) + 1

        width, total = self.result.shape[1], self.flat.numel()
        m = n
        while m > 0:
            start = max(self.frontier, end(m)) * width
            room = (total - start) // per_block
            if room >= m:
                break
            m = min(m - 1, room)
        spare_blocks = max(1, SPARE_BYTES // (per_block * self.flat.element_size()))
        if m < min(n, spare_blocks):
            m = min(n, spare_blocks)
            if self.spare is None or self.spare.numel() < m * per_block:
                self.spare = None  # freed before its successor is allocated
                self.spare = self.flat.new_empty(m * per_block)
            buf = self.spare
        else:
            # at the very end: the same memory chunk after chunk, while it fits
            buf = self.flat[total - m * per_block :]
        self.frontier = max(self.frontier, end(m))
        return m, buf


def _outside_band(scores: Tensor) -> Tensor:
    """The scores outside the band of a contiguous (n, blk, span) block of band scores, as a
    view (n, blk - 1, blk): query row r's band is keys [r, r + span - blk], and what lies right
    of row r's band and left of row r + 1's is one run of exactly blk consecutive elements."""
    n, blk, span = scores.shape
    return scores.as_strided(
        (n, blk - 1, blk),
        (blk * span, span + 1, 1),
        scores.storage_offset() + span - blk + 1,
    )


def _mask_edges(scores: Tensor, b0: int, nb: int, length: int, w: int) -> None:
    """Set to NEG, in the (n, blk, span) band scores of blocks b0 .. b0 + n - 1 of a run of
    sequences of ``length`` positions (``nb`` blocks each), the keys outside their sequence.

    Block j of a sequence reads positions j*blk - w + t for t < span: those below 0 (the first
    blocks) and from ``length`` on (the last ones). The blocks with the same j are every nb-th
    block of the chunk, one strided view, so this writes only masked columns, a few calls.
    """
    n, blk, span = scores.shape
    head = range(min(nb, -(-w // blk)))
    tail = range(max(head.stop, (length + w - span) // blk + 1), nb)
    for j in itertools.chain(head, tail):
        lo = w - j * blk  # columns [0, lo) lie before the sequence
        hi = length + w - j * blk  # columns [hi, span) lie past its end
        if lo <= 0 and hi >= span:
            continue
        first = (j - b0) % nb  # the chunk's first block with position j
        if first >= n:
            continue
        blocks = scores[first::nb]
        if lo > 0:
            blocks[..., :lo].fill_(NEG)
        if hi < span:
            blocks[..., max(hi, 0) :].fill_(NEG)


def _split(total: int, per_chunk: int, head: int, tail: int):
    """[0, total) as ranges of at most ``per_chunk``, of near-equal sizes, with the first
    ``head`` and the last ``tail`` entries in ranges of their own."""
    head = min(head, total)
    tail = min(tail, total - head)
    lo, hi = head, total - tail
    n = -(-(hi - lo) // per_chunk)
    cuts = [0, *(lo + j * (hi - lo) // n for j in range(n)), hi, total]
    for a, b in itertools.pairwise(cuts):
        for a2 in range(a, b, per_chunk):  # head and tail may be longer than a chunk
            yield a2, min(b, a2 + per_chunk)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in ``flags``."""
    runs, a = [], None
    for i, f in enumerate([*flags, False]):
        if f and a is None:
            a = i
        elif not f and a is not None:
            runs.append((a, i))
            a = None
    return runs


def _short(q, k, v, heads, dil, w, spec, gk, ws, grads):
    """``_band`` for sequences at most half a block's key span (N <= about dil * (w + blk/2)).

    A block there would read span > length keys, most of them outside its sequence (at N=1024,
    w=256, dilation 4: 574 keys for 256), so each residue class is instead one dense masked
    attention over its own rows, L x L scores with L <= span, in chunks of (batch, head) pairs.
    Its backward pass is autograd's, through a graph of the class's rows (copies) as leaves.
    """
    if grads is not None and not torch.is_grad_enabled():
        with torch.enable_grad():
            return _short(q, k, v, heads, dil, w, spec, gk, ws, grads)
    B, H, N, D = q.shape
    dv = v.shape[-1]
    dev = q.device
    causal, scale, key_valid = spec.causal, spec.scale, spec.key_valid
    nh = len(heads)
    hs = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
    leaf = _leaf if grads is not None else (lambda x: x)
    g = 0
    if gk is not None:
        gk_k, gk_v, visible = gk
        g = gk_k.shape[2]
        gk_k = leaf(gk_k[:, hs].reshape(B * nh, g, D))  # (pairs, G, d)
        gk_v = leaf(gk_v[:, hs].reshape(B * nh, g, dv))
        gk_kt = gk_k.transpose(1, 2)
        slots = torch.arange(g, device=dev)
    for r in range(dil):
        L = -(-(N - r) // dil)  # positions r, r + dil, ... of the sequence
        if L == 0:
            continue
        qr = leaf(q[:, hs, r::dil].reshape(B * nh, L, D))  # (pairs, L, d)
        kr = leaf(k[:, hs, r::dil].reshape(B * nh, L, D))
        vr = leaf(v[:, hs, r::dil].reshape(B * nh, L, dv))
        i = torch.arange(L, device=dev)
        rel = i[:, None] - i[None, :]  # query minus key position, in the sequence
        band = (rel <= w) & (rel >= (0 if causal else -w))
        bias = torch.zeros(L, L, dtype=q.dtype, device=dev).masked_fill_(~band, NEG)
        key_bias = None
        if key_valid is not None:  # (pairs, 1, L), the batch row's mask for every head
            kb = torch.zeros(B, L, dtype=q.dtype, device=dev).masked_fill_(
                ~key_valid[:, r::dil], NEG
            )
            key_bias = kb.repeat_interleave(nh, dim=0)[:, None, :]
        if g:
            seen = visible[:, r::dil].repeat_interleave(nh, dim=0)[..., None]  # (pairs, L, 1)
        per = max(1, CHUNK_BYTES // (L * (L + g) * q.element_size()))
        outs = []
        for p0 in range(0, B * nh, per):
            p1 = min(B * nh, p0 + per)
            scores = torch.baddbmm(bias, qr[p0:p1], kr[p0:p1].transpose(1, 2), alpha=scale)
            if key_bias is not None:
                scores = scores + key_bias[p0:p1]
            if g:
                g_scores = (qr[p0:p1] @ gk_kt[p0:p1]).masked_fill(slots >= seen[p0:p1], NEG)
                scores = torch.cat([scores, g_scores], dim=-1)
            probs = torch.softmax(scores, dim=-1)
            out = probs[..., :L] @ vr[p0:p1]  # (n, L, dv)
            if g:
                out = out + probs[..., L:] @ gk_v[p0:p1]
            outs.append(out)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if ws is not None:
            ws.result.view(B, H, N, dv)[:, hs, r::dil] = out.view(B, nh, L, dv)
            ws.frontier = max(ws.frontier, ((B - 1) * H + heads[-1] + 1) * N)
            continue
        d_out = grads.out.view(B, H, N, dv)[:, hs, r::dil].reshape(B * nh, L, dv)
        leaves = [qr, kr, vr] + ([gk_k, gk_v] if g else [])
        d_leaves = torch.autograd.grad(out, leaves, d_out)
        for total, d_x in zip((grads.q, grads.k, grads.v), d_leaves, strict=False):
            total.view(B, H, N, -1)[:, hs, r::dil] += d_x.view(B, nh, L, -1)
        if g:
            grads.gk_k[:, hs] += d_leaves[3].view(B, nh, g, D)
            grads.gk_v[:, hs] += d_leaves[4].view(B, nh, g, dv)


def _band(q, k, v, heads, dil, spec: _Spec, gk, ws=None, grads: _Grads | None = None):
    """Band attention (plus global columns) for the heads ``heads``, all with dilation ``dil``.

    Writes the rows of those heads into ``ws.result`` (B*H*N, dv); or, for the backward pass,
    adds the gradients of the rows' inputs to ``grads``. ``gk`` None or (global K (B, H, G, d)
    times the scale, global V (B, H, G, dv), number of global keys visible to each query
    (B, N)).
    """
    B, H, N, D = q.shape
    dv = v.shape[-1]
    dev = q.device
    window, causal, scale, key_valid = spec.window, spec.causal, spec.scale, spec.key_valid
    M = -(-N // dil)  # the longest sequence (residue class 0)
    w = min(window, M - 1)  # keys further away than the sequence is long do not exist
    blk = spec.block or choose_block(w)
    span = blk + (w if causal else 2 * w)
    # A block would read more than twice the keys its sequence holds: dense per sequence is
    # less work. (Near 1x the band path's reused buffers win: at N=1024, w=256, dilation 2,
    # where span = 1.1 M, dense took 1.4x as long.)
    if span >= 2 * M and SHORT_SEQUENCES:
        _short(q, k, v, heads, dil, w, spec, gk, ws, grads)
        return
    q_all, k_all, v_all = q.view(-1, D), k.view(-1, D), v.view(-1, dv)

    # Key bias of a sequence when some keys are masked: NEG on those and on the positions it
    # does not own (before 0, from its length on), over the positions [-w, (nb - 1) * blk +
    # span) its blocks read; ``unfold`` gives every block's (span,) slice. Built once per
    # (batch row, residue class). Without a mask, ``_mask_edges`` does the edges alone.
    key_bias: dict[tuple[int, ...], tuple[Tensor, list[bool]]] = {}

    def bias_of(b: int, r: int, length: int) -> tuple[Tensor, list[bool]]:
        key = (b, r)
        if key not in key_bias:
            nb = -(-length // blk)
            kb = torch.full(((nb - 1) * blk + span,), NEG, dtype=q.dtype, device=dev)
            kb[w : w + length].masked_fill_(key_valid[b, r::dil], 0)
            per_block = kb.unfold(0, span, blk)  # (nb, span)
            key_bias[key] = per_block, (per_block != 0).any(-1).tolist()
        return key_bias[key]

    g = 0
    if gk is not None:
        gk_k, gk_v, visible = gk
        g = gk_k.shape[2]
        gk_k = gk_k.reshape(B * H, g, D)  # one (G, d) per (batch row, head)
        gk_v = gk_v.reshape(B * H, g, dv)
        visible = F.pad(visible, (0, dil * blk))  # (B, N + dil*blk): query rows past the end
        slots = torch.arange(g, device=dev)

    chunk_bytes = CHUNK_BYTES if grads is None else BACKWARD_CHUNK_BYTES
    per_chunk = max(1, chunk_bytes // (blk * (span + g) * q.element_size()))
    # Runs of sequences processed as one: when every sequence is a whole number of blocks,
    # residue class r of consecutive (batch row, head) pairs f, f+1, ... is one strided
    # sequence of rows f*N + r + dil*p, so chunks can cross from one head into the next (the
    # key bias masks what a block reads of its neighbours) and short sequences still make big
    # matmuls. With global tokens each sequence stays on its own (one set of global keys).
    pairs = [b * H + h for b in range(B) for h in heads]
    runs = [[pairs[0], 1]]
    for f in pairs[1:]:
        if not g and N % (dil * blk) == 0 and f == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    reuse = ws is not None
    if reuse:
        result = ws.result
        # a block's scores, its scores with the global columns, its output rows
        block_elems = blk * (span + (span + g if g else 0) + dv)

    tasks = []
    for f0, count in runs:
        classes = []
        for r in range(dil):
            # Sequence i of the run is (b, h) = divmod(f0 + i, H), residue class r: positions
            # 0 .. length-1 are rows base + dil*(i*nb*blk + p) of q/k/v (i = 0 only, or whole
            # blocks).
            base, length = f0 * N + r, -(-(N - r) // dil)
            if length == 0:  # N < dil: this residue class is empty
                continue
            nb = -(-length // blk)
            # Chunks that read rows before the start or past the end of the tensor are padded
            # copies (see _seq_rows): keep them to the few blocks that need it.
            head = -(-w // blk) if base < dil * w else 0
            tail = nb - max(0, (length + w - span) // blk + 1) if f0 + count == B * H else 0
            splits = _split(count * nb, per_chunk, head, tail)
            classes.append([(f0, count, r, base, length, nb, b0, b1) for b0, b1 in splits])
        # the residue classes chunk by chunk: together they read whole stretches of rows
        tasks += [t for group in itertools.zip_longest(*classes) for t in group if t]
    tasks.reverse()
    while tasks:
        f0, count, r, base, length, nb, b0, b1 = tasks.pop()
        if reuse:
            # the chunk writes result rows base + dil * p for positions p from b0 * blk on
            first, left = base + dil * b0 * blk, count * length - b0 * blk
            m, buf = ws.take(b1 - b0, blk, block_elems, first, dil, left)
            if m < b1 - b0:  # the rest of the chunk next
                tasks.append((f0, count, r, base, length, nb, b0 + m, b1))
                b1 = b0 + m
        n = b1 - b0
        sizes = [n * blk * span, n * blk * (span + g) if g else 0, n * blk * dv]
        if not reuse:
            buf = q.new_empty(sum(sizes))
        buf_band, buf_scores, buf_out = buf[: sum(sizes)].split(sizes)
        buf_band, buf_out = buf_band.view(n, blk, span), buf_out.view(n, blk, dv)
        n_keys = (n - 1) * blk + span
        rows = min(n * blk, count * length - b0 * blk)  # query rows that are positions
        qc = _seq_rows(q_all, base, dil, b0 * blk, n * blk)  # (n*blk, d)
        k_rows = _seq_rows(k_all, base, dil, b0 * blk - w, n_keys)
        v_rows = _seq_rows(v_all, base, dil, b0 * blk - w, n_keys)
        k_win = k_rows.unfold(0, span, blk)  # (n, d, span): K^T of every block, a view
        v_win = v_rows.unfold(0, span, blk).transpose(1, 2)  # (n, span, dv)
        qb = qc.view(n, blk, D)

        # Band scores (n, blk, span), always a contiguous matmul output: with a strided
        # output baddbmm falls back to one small matmul per block. Masks are written in place.
        band_scores = buf_band.baddbmm_(qb, k_win, beta=0, alpha=scale)
        _outside_band(band_scores).fill_(NEG)
        if key_valid is None:  # the only keys to mask are those outside the sequence
            _mask_edges(band_scores, b0, nb, length, w)
        # Key bias only on the blocks that read a masked key or leave their sequence.
        for i in () if key_valid is None else range(b0 // nb, (b1 - 1) // nb + 1):
            b, h = divmod(f0 + i, H)
            per_block, needs_bias = bias_of(b, r, length)
            lo, hi = max(b0, i * nb) - i * nb, min(b1, (i + 1) * nb) - i * nb
            at = i * nb - b0  # block i*nb of the run is block ``at`` of the chunk
            for a, e in _runs(needs_bias[lo:hi]):
                band_scores[at + lo + a : at + lo + e].add_(per_block[lo + a : lo + e, None, :])

        scores = band_scores
        if g:  # one sequence (b, h) per run
            gi = b * H + h
            gkk, gkv = gk_k[gi], gk_v[gi]
            g_scores = (qc @ gkk.t()).view(n, blk, g)
            seen = _rows(visible[b], r + dil * b0 * blk, n * blk, dil).view(n, blk, 1)
            g_scores.masked_fill_(slots >= seen, NEG)
            # band and global columns side by side: one softmax normalises both exactly
            scores = torch.cat([band_scores, g_scores], dim=-1, out=buf_scores.view(n, blk, -1))

        # Softmax in place: the kernel reads each row before writing it.
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        if grads is not None:
            # The chunk's output rows' gradient, zero for the rows past its sequence's end.
            d_out = _rows(grads.out, base + dil * b0 * blk, rows, dil)
            d_out = F.pad(d_out, (0, 0, 0, n * blk - rows)).view(n, blk, dv)
            d_q, d_k, d_v, d_gk, d_gv = _chunk_grads(
                probs, span, d_out, qb, k_win, v_win, gkk if g else None, gkv if g else None,
                scale
            )  # fmt: skip
            _add_seq_rows(grads.q, base, dil, b0 * blk, d_q.view(n * blk, D))
            _add_seq_rows(grads.k, base, dil, b0 * blk - w, _fold(d_k, n_keys, blk))
            _add_seq_rows(grads.v, base, dil, b0 * blk - w, _fold(d_v, n_keys, blk))
            if g:
                grads.gk_k.view(B * H, g, D)[gi] += d_gk
                grads.gk_v.view(B * H, g, dv)[gi] += d_gv
            continue

        # the chunk's rows are rows of the result: write them in place
        direct = dil == 1 and rows == n * blk
        dst = result[base + b0 * blk :][:rows].view(n, blk, dv) if direct else buf_out
        out = torch.bmm(probs[..., :span], v_win, out=dst)
        if g:
            out.view(n * blk, dv).addmm_(probs[..., span:].reshape(n * blk, g), gkv)
        if not direct:
            _rows(result, base + dil * b0 * blk, rows, dil).copy_(out.view(n * blk, dv)[:rows])
