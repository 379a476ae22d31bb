"""Row views, positions and score masks of the blocked backend (``blocked.py``).

A *sequence* (one batch row, head and residue class mod dilation) is a strided view of the
(B*H*N, e) rows of q/k/v; these helpers read and write such rows without copies where they
exist, gather global tokens, and mask the (n, blk, span) band scores of a chunk in place.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

# Written over masked scores (never added to them: a bias would let a huge score through).
# Finite so that a row with no valid key stays finite (it is zeroed afterwards).
NEG = -1e30


def fold_windows(windows: Tensor, n_rows: int, step: int) -> Tensor:
    """The sum of overlapping windows (n, span, e), window i at rows i*step .. i*step+span-1,
    as (n_rows, e) rows: the gradient of ``rows.unfold(0, span, step)``."""
    n, span, e = windows.shape
    rows = windows.new_zeros(n * step + span, e)
    for s in range(0, span, step):
        width = min(step, span - s)
        rows[s : s + n * step].view(n, step, e)[:, :width] += windows[:, s : s + width]
    return rows[:n_rows]


def positions(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, N) bool -> positions of the True entries in increasing order, padded to the largest
    count with arbitrary positions, (B, G); and the counts, (B,)."""
    count = mask.sum(-1)
    g = int(count.max())
    # a stable sort of 0 (True) before 1 (False) keeps the True positions in order
    idx = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[:, :g]
    return idx, count


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, H, N, e), idx (B, G) -> x[b, :, idx[b]] as (B, H, G, e)."""
    B, H, _, e = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], e))


def band_counts(valid: Tensor, window: int, d: int, causal: bool) -> Tensor:
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


def rows_view(src: Tensor, start: int, n: int, step: int) -> Tensor:
    """Rows start, start + step, ... (n of them) of ``src``, as a view."""
    return src[start : start + step * (n - 1) + 1 : step]


def seq_rows(src: Tensor, base: int, dil: int, p0: int, n: int) -> Tensor:
    """Rows ``base + dil * p`` for p in [p0, p0 + n) of ``src`` (rows, e).

    A strided view when all of them exist; otherwise (only at the very start or end of the
    tensor) a copy with zero rows where they do not. Rows that exist but lie outside the
    sequence are read as they are: the key mask hides them and query rows there are discarded.
    """
    first, lo, hi = existing_rows(src, base, dil, p0, n)
    if lo == 0 and hi == n:
        return rows_view(src, first, n, dil)
    if hi <= lo:
        return src.new_zeros(n, src.shape[1])
    return F.pad(rows_view(src, first + dil * lo, hi - lo, dil), (0, 0, lo, n - hi))


def add_seq_rows(dst: Tensor, base: int, dil: int, p0: int, rows: Tensor) -> None:
    """The reverse of ``seq_rows``: add ``rows`` (n, e) to rows base + dil * p of ``dst``,
    p in [p0, p0 + n), those that exist."""
    first, lo, hi = existing_rows(dst, base, dil, p0, rows.shape[0])
    if hi > lo:
        rows_view(dst, first + dil * lo, hi - lo, dil).add_(rows[lo:hi])


def existing_rows(src: Tensor, base: int, dil: int, p0: int, n: int) -> tuple[int, int, int]:
    """Row base + dil * p0 of ``src``, and the range [lo, hi) of i < n for which row
    base + dil * (p0 + i) exists."""
    first = base + dil * p0
    lo = max(0, -(first // dil))  # first i with first + dil * i >= 0
    hi = min(n, (src.shape[0] - 1 - first) // dil + 1)  # last i with a row, plus one
    return first, lo, hi


def outside_band(scores: Tensor) -> Tensor:
    """The scores outside the band of a contiguous (n, blk, span) block of band scores, as a
    view (n, blk - 1, blk): query row r's band is keys [r, r + span - blk], and what lies right
    of row r's band and left of row r + 1's is one run of exactly blk consecutive elements."""
    n, blk, span = scores.shape
    return scores.as_strided(
        (n, blk - 1, blk),
        (blk * span, span + 1, 1),
        scores.storage_offset() + span - blk + 1,
    )


def mask_edges(scores: Tensor, b0: int, nb: int, length: int, w: int) -> None:
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


def split_chunks(total: int, per_chunk: int, head: int, tail: int):
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


def true_runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of True in ``flags``."""
    runs, a = [], None
    for i, f in enumerate([*flags, False]):
        if f and a is None:
            a = i
        elif not f and a is not None:
            runs.append((a, i))
            a = None
    return runs
