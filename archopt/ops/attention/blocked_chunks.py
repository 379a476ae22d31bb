"""The band path of the blocked backend, one chunk of query blocks at a time.

``blocked.py``'s ``band`` runs these in turn for the heads of one dilation: ``plan_chunks``
cuts the sequences into chunks (runs of sequences, residue classes interleaved, the few blocks
that leave the tensor in chunks of their own); ``chunk_scores`` computes a chunk's masked band
scores (plus its global key columns) and their softmax in one buffer; ``chunk_forward`` writes
the chunk's output rows into the result, ``chunk_backward`` adds its gradients, taken by hand
(``chunk_grads``), into the gradients' rows. ``Workspace`` hands a chunk its buffer from the
rows of the result not written yet. See ``blocked.py`` for the design and its measurements.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from archopt.ops.attention.blocked_rows import (
    NEG,
    add_seq_rows,
    fold_windows,
    mask_edges,
    outside_band,
    rows_view,
    seq_rows,
    split_chunks,
    true_runs,
)


@dataclasses.dataclass
class Spec:
    """What the band part needs besides q, k, v and the global keys: heads by dilation, the
    window, causal, the scale, valid band keys (B, N) or None, global keys visible to each
    query (B, N) or None, the block size or None; and the byte budgets (``blocked.py``'s
    ``CHUNK_BYTES``, ``BACKWARD_CHUNK_BYTES``, ``SPARE_BYTES``, ``SHORT_SEQUENCES``, read
    when the call starts)."""

    groups: dict[int, list[int]]
    window: int
    causal: bool
    scale: float
    key_valid: Tensor | None
    visible: Tensor | None
    block: int | None
    chunk_bytes: int
    backward_chunk_bytes: int
    spare_bytes: int
    short_sequences: bool


@dataclasses.dataclass
class Grads:
    """The backward pass's running sums: the output's gradient (B*H*N, dv) in, and the
    gradients of q, k, v as rows, and of the global keys and values (B, H, G, .), added to."""

    out: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    gk_k: Tensor | None
    gk_v: Tensor | None


class Workspace:
    """Room for a chunk's scores, taken from the rows of the result not written yet.

    ``frontier`` is one past the highest row of the result written so far. A chunk's scores
    and output rows go past it and past the rows the chunk writes itself, at the very end of
    the result; chunks run in increasing row order, so that room shrinks only towards the
    end. The memory above the output is what is left for the last chunks: when the unwritten
    rows hold fewer blocks than ``spare_bytes`` would, a chunk uses a buffer of that size.
    Peak memory: the output, the floor, plus ``spare_bytes``. Those last chunks are smaller
    (each output row needs span / dv times its size in scores), which is what a small
    ``spare_bytes`` costs in time.
    """

    def __init__(self, result: Tensor, spare_bytes: int):
        self.result = result
        self.flat = result.view(-1)
        self.frontier = 0
        self.spare: Tensor | None = None
        self.spare_bytes = spare_bytes

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
        spare_blocks = max(1, self.spare_bytes // (per_block * self.flat.element_size()))
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


class Band:
    """One band call's fixed facts: the heads of one dilation ``dil``, the geometry (window
    ``w`` cut to the sequence, block ``blk``, key ``span``), q/k/v as rows, and the global
    keys ``gk`` (None, or global K (B, H, G, d) times the scale, global V (B, H, G, dv), the
    number of global keys visible to each query (B, N))."""

    def __init__(self, q, k, v, heads, dil, w, blk, span, spec: Spec, gk) -> None:
        self.B, self.H, self.N, self.D = q.shape
        self.dv = v.shape[-1]
        self.heads, self.dil, self.w, self.blk, self.span = heads, dil, w, blk, span
        self.causal, self.scale, self.key_valid = spec.causal, spec.scale, spec.key_valid
        self.dtype, self.device = q.dtype, q.device
        self.q_all, self.k_all, self.v_all = (
            q.view(-1, self.D),
            k.view(-1, self.D),
            v.view(-1, self.dv),
        )
        self.g = 0
        self.gk_k = self.gk_v = self.visible = self.slots = None
        if gk is not None:
            gk_k, gk_v, visible = gk
            self.g = g = gk_k.shape[2]
            self.gk_k = gk_k.reshape(self.B * self.H, g, self.D)  # one (G, d) per (row, head)
            self.gk_v = gk_v.reshape(self.B * self.H, g, self.dv)
            # (B, N + dil*blk): query rows past the end
            self.visible = F.pad(visible, (0, dil * blk))
            self.slots = torch.arange(g, device=q.device)
        # a block's scores, its scores with the global columns, its output rows
        self.block_elems = blk * (span + (span + self.g if self.g else 0) + self.dv)
        self._key_mask: dict[tuple[int, int], tuple[Tensor, list[bool]]] = {}

    def key_mask(self, b: int, r: int, length: int) -> tuple[Tensor, list[bool]]:
        """Which keys of sequence (batch row ``b``, residue class ``r``) are masked, per block
        (nb, span) bool, when some keys are masked; and which blocks have one.

        True on the masked keys and on the positions the sequence does not own (before 0,
        from its length on), over the positions [-w, (nb - 1) * blk + span) its blocks read;
        ``unfold`` gives every block's (span,) slice. Built once per (batch row, residue
        class). Without a mask, ``mask_edges`` does the edges alone. The scores there are
        replaced by NEG, not added to: a bias would let a huge score through.
        """
        if (b, r) not in self._key_mask:
            w, blk, span = self.w, self.blk, self.span
            nb = -(-length // blk)
            kb = torch.ones((nb - 1) * blk + span, dtype=torch.bool, device=self.device)
            kb[w : w + length] = ~self.key_valid[b, r :: self.dil]
            per_block = kb.unfold(0, span, blk)  # (nb, span)
            self._key_mask[(b, r)] = per_block, per_block.any(-1).tolist()
        return self._key_mask[(b, r)]


@dataclasses.dataclass
class Chunk:
    """Blocks [b0, b1) of residue class ``r`` of a run of ``count`` sequences starting at
    (batch row, head) pair ``f0``: positions 0 .. length-1 of sequence i are rows
    base + dil*(i*nb*blk + p) of q/k/v (``nb`` blocks per sequence)."""

    f0: int
    count: int
    r: int
    base: int
    length: int
    nb: int
    b0: int
    b1: int


def plan_chunks(band: Band, per_chunk: int) -> list[Chunk]:
    """The chunks of ``band``, in the order they run.

    Runs of sequences are processed as one: when every sequence is a whole number of blocks,
    residue class r of consecutive (batch row, head) pairs f, f+1, ... is one strided
    sequence of rows f*N + r + dil*p, so chunks can cross from one head into the next (the
    key mask hides what a block reads of its neighbours) and short sequences still make big
    matmuls. With global tokens each sequence stays on its own (one set of global keys).
    """
    B, H, N, dil, blk, w, span = band.B, band.H, band.N, band.dil, band.blk, band.w, band.span
    pairs = [b * H + h for b in range(B) for h in band.heads]
    runs = [[pairs[0], 1]]
    for f in pairs[1:]:
        if not band.g and N % (dil * blk) == 0 and f == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    chunks = []
    for f0, count in runs:
        classes = []
        for r in range(dil):
            base, length = f0 * N + r, -(-(N - r) // dil)
            if length == 0:  # N < dil: this residue class is empty
                continue
            nb = -(-length // blk)
            # Chunks that read rows before the start or past the end of the tensor are padded
            # copies (see seq_rows): keep them to the few blocks that need it.
            head = -(-w // blk) if base < dil * w else 0
            tail = nb - max(0, (length + w - span) // blk + 1) if f0 + count == B * H else 0
            splits = split_chunks(count * nb, per_chunk, head, tail)
            classes.append([Chunk(f0, count, r, base, length, nb, b0, b1) for b0, b1 in splits])
        # the residue classes chunk by chunk: together they read whole stretches of rows
        chunks += [c for group in itertools.zip_longest(*classes) for c in group if c is not None]
    return chunks


@dataclasses.dataclass
class ChunkScores:
    """A chunk's softmax ``probs`` (n, blk, span + G) and the views it was computed from."""

    n: int  # blocks
    rows: int  # query rows that are positions of the sequence
    n_keys: int  # key rows its blocks read
    qb: Tensor  # (n, blk, d)
    k_win: Tensor  # (n, d, span): K^T of every block, a view
    v_win: Tensor  # (n, span, dv)
    probs: Tensor
    gkk: Tensor | None  # the sequence's global keys (G, d), values (G, dv)
    gkv: Tensor | None
    out_buf: Tensor  # (n, blk, dv): room for the output rows


def chunk_scores(band: Band, c: Chunk, buf: Tensor) -> ChunkScores:
    """The band scores of chunk ``c`` (with the global columns), masked, softmaxed in place in
    ``buf`` (at least ``n * band.block_elems`` elements)."""
    blk, span, g, dil, w = band.blk, band.span, band.g, band.dil, band.w
    n = c.b1 - c.b0
    sizes = [n * blk * span, n * blk * (span + g) if g else 0, n * blk * band.dv]
    buf_band, buf_scores, buf_out = buf[: sum(sizes)].split(sizes)
    buf_band, buf_out = buf_band.view(n, blk, span), buf_out.view(n, blk, band.dv)
    n_keys = (n - 1) * blk + span
    rows = min(n * blk, c.count * c.length - c.b0 * blk)
    qc = seq_rows(band.q_all, c.base, dil, c.b0 * blk, n * blk)  # (n*blk, d)
    k_rows = seq_rows(band.k_all, c.base, dil, c.b0 * blk - w, n_keys)
    v_rows = seq_rows(band.v_all, c.base, dil, c.b0 * blk - w, n_keys)
    k_win = k_rows.unfold(0, span, blk)  # (n, d, span): K^T of every block, a view
    v_win = v_rows.unfold(0, span, blk).transpose(1, 2)  # (n, span, dv)
    qb = qc.view(n, blk, band.D)

    # Band scores (n, blk, span), always a contiguous matmul output: with a strided output
    # baddbmm falls back to one small matmul per block. Masks are written in place.
    band_scores = buf_band.baddbmm_(qb, k_win, beta=0, alpha=band.scale)
    outside_band(band_scores).fill_(NEG)
    if band.key_valid is None:  # the only keys to mask are those outside the sequence
        mask_edges(band_scores, c.b0, c.nb, c.length, w)
    # The key mask only on the blocks that read a masked key or leave their sequence.
    for i in () if band.key_valid is None else range(c.b0 // c.nb, (c.b1 - 1) // c.nb + 1):
        b = (c.f0 + i) // band.H
        per_block, needs_mask = band.key_mask(b, c.r, c.length)
        lo, hi = max(c.b0, i * c.nb) - i * c.nb, min(c.b1, (i + 1) * c.nb) - i * c.nb
        at = i * c.nb - c.b0  # block i*nb of the run is block ``at`` of the chunk
        for a, e in true_runs(needs_mask[lo:hi]):
            blocks = band_scores[at + lo + a : at + lo + e]
            blocks.masked_fill_(per_block[lo + a : lo + e, None, :], NEG)

    scores = band_scores
    gkk = gkv = None
    if g:  # a run with global keys is one sequence: (batch row, head) pair f0
        gkk, gkv = band.gk_k[c.f0], band.gk_v[c.f0]
        g_scores = (qc @ gkk.t()).view(n, blk, g)
        b = c.f0 // band.H
        seen = rows_view(band.visible[b], c.r + dil * c.b0 * blk, n * blk, dil).view(n, blk, 1)
        g_scores.masked_fill_(band.slots >= seen, NEG)
        # band and global columns side by side: one softmax normalises both exactly
        scores = torch.cat([band_scores, g_scores], dim=-1, out=buf_scores.view(n, blk, -1))

    # Softmax in place: the kernel reads each row before writing it.
    probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return ChunkScores(n, rows, n_keys, qb, k_win, v_win, probs, gkk, gkv, buf_out)


def chunk_forward(band: Band, c: Chunk, s: ChunkScores, result: Tensor) -> None:
    """Write chunk ``c``'s output rows into ``result`` (B*H*N, dv)."""
    blk, span, dil, dv, n, rows = band.blk, band.span, band.dil, band.dv, s.n, s.rows
    # the chunk's rows are rows of the result: write them in place
    direct = dil == 1 and rows == n * blk
    dst = result[c.base + c.b0 * blk :][:rows].view(n, blk, dv) if direct else s.out_buf
    out = torch.bmm(s.probs[..., :span], s.v_win, out=dst)
    if band.g:
        out.view(n * blk, dv).addmm_(s.probs[..., span:].reshape(n * blk, band.g), s.gkv)
    if not direct:
        rows_view(result, c.base + dil * c.b0 * blk, rows, dil).copy_(out.view(n * blk, dv)[:rows])


def chunk_backward(band: Band, c: Chunk, s: ChunkScores, grads: Grads) -> None:
    """Add chunk ``c``'s gradients into ``grads``' rows."""
    blk, w, dil, n, g = band.blk, band.w, band.dil, s.n, band.g
    # The chunk's output rows' gradient, zero for the rows past its sequence's end.
    d_out = rows_view(grads.out, c.base + dil * c.b0 * blk, s.rows, dil)
    d_out = F.pad(d_out, (0, 0, 0, n * blk - s.rows)).view(n, blk, band.dv)
    d_q, d_k, d_v, d_gk, d_gv = chunk_grads(
        s.probs, band.span, d_out, s.qb, s.k_win, s.v_win, s.gkk, s.gkv, band.scale
    )
    add_seq_rows(grads.q, c.base, dil, c.b0 * blk, d_q.view(n * blk, band.D))
    add_seq_rows(grads.k, c.base, dil, c.b0 * blk - w, fold_windows(d_k, s.n_keys, blk))
    add_seq_rows(grads.v, c.base, dil, c.b0 * blk - w, fold_windows(d_v, s.n_keys, blk))
    if g:
        grads.gk_k.view(band.B * band.H, g, band.D)[c.f0] += d_gk
        grads.gk_v.view(band.B * band.H, g, band.dv)[c.f0] += d_gv


def chunk_grads(probs, span, d_out, qb, k_win, v_win, gkk, gkv, scale):
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
