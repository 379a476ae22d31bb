"""Attention over a paged KV cache's pool: the eager plans, and the view a compiled step uses.

A layer's pool is ``keys``/``values`` (Hkv, slots, d); a sequence's tokens sit in the slots of
its block table. Masks are bool (B, 1, T, S), True = attend, built from each slot's position
(``visible``). The plans (``plan_attention``, run by ``attend_planned``; ``PagedKVCache``
picks one per step by its ``attention``):

- ``"auto"`` (the default): every row alone, as if it were the only sequence. A row whose
  blocks are consecutive (the usual case: the allocator hands out the lowest free ids) reads
  them in place, a strided view of each layer's pool; other rows copy their own blocks out.
  One SDPA call per row, over that row's whole blocks only: its sums are then the same numbers
  in the same order whether it runs alone or batched, which is what keeps greedy decoding
  identical alone and batched even with bf16 activations (as the GGUF kernels use), where any
  other order of summation flips near ties. Padding rows to a common width does not: SDPA
  tiles keys by their padded length (benchmarks/RESULTS.md, serving);
- ``"span"``: no copy at any batch size. The batch's blocks lie within one span of block ids, a
  strided view of the pool; all rows are scored against the span at once under a mask from the
  block tables (llama.cpp's unified KV cache does the same). It reads every slot once but
  multiplies rows by slots, and its sums depend on where the other rows' blocks lie, so it is
  exact only up to rounding.
- ``"gather"``: the reference, every step copied out (what ``update`` returns too).

``DecodeView`` is the cache a compiled one-token step sees (``archopt.step_graphs``): the
pools and each row's slots as tensors, so the whole step is one graph with no Python between
layers. It writes each row's token, copies each row's slots out (one copy per layer, the
price of a graph whose shapes do not follow the block tables) and attends with two batched
products, each row's sums in the same order whatever the batch, so a request's greedy tokens
do not depend on who shares its batch. Its reference is ``attend_gathered`` (tests compare
them). With ``kernel=True`` the attention is one call per layer to archopt's C++ kernel
(``archopt.ops.cpu_kernels``), which reads each row's slots in place instead of copying them:
the same per-row order of sums (a row's result does not depend on its batch), equal to the
torch expression to rounding (tests compare them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "span", "gather")


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, T, S) bool: a query at p sees slots holding positions 0..p (rows that see
    nothing, padding queries, fully open); None when every slot is visible."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    seen = (k >= 0) & (k <= q)  # (B, T, S)
    if q_pos.shape[1] == 1 and bool(seen.all()):
        return None
    seen |= ~seen.any(dim=-1, keepdim=True)
    return seen[:, None]


def grouped(mask: torch.Tensor | None, t: int, g: int) -> torch.Tensor | None:
    """A (B, 1, T, S) mask for queries laid out as (g, T) rows per kv head."""
    if mask is not None and t > 1 and g > 1:
        return mask.repeat(1, 1, g, 1)
    return mask


def table_slots(
    tables: list[list[int]], block_size: int, trash: int, device: torch.device
) -> torch.Tensor:
    """(B, S): each row's slots in table order, padded with the ``trash`` slot (never
    visible) to the widest row, S a multiple of the block size."""
    width = max(max((len(tb) for tb in tables), default=0), 1)
    table = torch.tensor([tb + [-1] * (width - len(tb)) for tb in tables], dtype=torch.long)
    slots = table.unsqueeze(-1).mul(block_size).add(torch.arange(block_size))
    slots = slots.view(len(tables), -1)  # a padding block's slots are all negative
    return slots.masked_fill_(slots < 0, trash).to(device)


def plan_attention(
    attention: str,
    tables: list[list[int]],
    positions: torch.Tensor,
    slot_pos: torch.Tensor,
    block_size: int,
    trash: int,
) -> tuple:
    """How a step's attention reads the pool: ``("rows", [row plan, ...])``, every row alone
    (``row_plan``); ``("span", lo, hi, mask)``, every row against the span of the batch's
    blocks; ``("gather", slots, mask)``, each row's blocks copied out in table order, padded
    to the widest. ``tables``: each row's blocks; ``positions`` (B, T): the step's queries."""
    bs, device = block_size, slot_pos.device
    b = positions.shape[0]
    if attention == "auto":
        rows = enumerate(tables)
        return ("rows", [row_plan(tb, positions[r : r + 1], slot_pos, bs, trash) for r, tb in rows])
    if attention == "span":
        used = [x for tb in tables for x in tb]
        lo_b, hi_b = min(used), max(used) + 1
        member = torch.zeros(b, hi_b - lo_b, dtype=torch.bool)
        for r, tb in enumerate(tables):
            if tb:
                member[r, torch.tensor(tb) - lo_b] = True
        member = member.to(device).repeat_interleave(bs, dim=1)  # (B, S)
        k_pos = torch.where(member, slot_pos[lo_b * bs : hi_b * bs], -1)
        return ("span", lo_b * bs, hi_b * bs, visible(positions, k_pos))
    slots = table_slots(tables, bs, trash, device)  # (B, S)
    return ("gather", slots, visible(positions, slot_pos[slots]))


def row_plan(table, positions, slot_pos, block_size, trash) -> tuple:
    """One row alone: ``(lo, hi, mask)`` for consecutive blocks read in place, or
    ``(slots, None, mask)`` for its own blocks copied out; whole blocks either way."""
    bs = block_size
    if table and table == list(range(table[0], table[0] + len(table))):
        lo, hi = table[0] * bs, (table[0] + len(table)) * bs
        return (lo, hi, visible(positions, slot_pos[lo:hi][None]))
    slots = table_slots([table], bs, trash, slot_pos.device)
    return (slots.reshape(-1), None, visible(positions, slot_pos[slots]))


def grouped_plan(plan: tuple, t: int, g: int) -> tuple:
    """``plan`` with its masks laid out for queries of ``t`` tokens, ``g`` heads per kv head."""
    kind, *rest = plan
    if kind == "rows":
        return (kind, [(a, z, grouped(m, t, g)) for a, z, m in rest[0]])
    return (kind, *rest[:-1], grouped(rest[-1], t, g))


def attend_planned(plan: tuple, q, keys, values):
    """Attention (B, Hq, T, d) of q (B, Hq, T, d) over a layer's pools by a grouped plan."""
    b, hq, t, d = q.shape
    h = keys.shape[0]
    kind, *where = plan
    qg = q.reshape(b, h, hq // h * t, d)  # grouped-query heads as extra query rows
    if kind == "rows":
        out = [attend_row(qg[r : r + 1], keys, values, *p) for r, p in enumerate(where[0])]
        return torch.cat(out).reshape(b, hq, t, d)
    *where, mask = where
    if kind == "span":
        return attend_span(q, keys, values, *where, mask)
    return attend_gathered(qg, keys, values, where[0], mask).reshape(b, hq, t, d)


def attend_row(q, keys, values, lo, hi, mask):
    """One row's attention (q: (1, Hkv, g*T, d)) over its own blocks: the pool's slots
    ``lo:hi`` read in place (``hi`` given), or the slots ``lo`` (a tensor) copied out."""
    if hi is not None:
        k, v = keys[None, :, lo:hi], values[None, :, lo:hi]  # (1, Hkv, S, d), in place
    else:
        k, v = keys.index_select(1, lo)[None], values.index_select(1, lo)[None]
    k, v = k.to(q.dtype), v.to(q.dtype)  # a half-precision cache: widened (a copy) to q's
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attend_span(q, keys, values, lo, hi, mask):
    """Every row of q (B, Hq, T, d) against the pool slots ``lo:hi`` holding the batch's
    blocks, masked; (B, Hq, T, d)."""
    b, hq, t, d = q.shape
    h = keys.shape[0]
    g = hq // h
    keys, values = keys[:, lo:hi].to(q.dtype), values[:, lo:hi].to(q.dtype)  # (Hkv, S, d)
    # (B, Hkv, g*T, d) -> (Hkv, B*g*T, d): all rows of a kv head against its span at once
    qs = q.reshape(b, h, g * t, d).transpose(0, 1).reshape(h, b * g * t, d)
    if mask is not None:  # (B, 1, g*T, S) -> (B*g*T, S), rows as qs's
        mask = mask.expand(b, 1, g * t, hi - lo).reshape(b * g * t, hi - lo)
    if t == 1:
        scores = torch.matmul(qs, keys.transpose(-1, -2)) * d**-0.5  # (Hkv, rows, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.matmul(scores.softmax(dim=-1), values)
    else:
        y = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)
    # (Hkv, B*g*T, d) -> (B, Hq, T, d)
    return y.reshape(h, b, g * t, d).transpose(0, 1).reshape(b, hq, t, d)


def gathered(keys, values, slots):
    """Every row's slots (B, S) copied out of a layer's pools: (B, Hkv, S, d) each."""
    b, h, d = slots.shape[0], keys.shape[0], keys.shape[-1]
    k = keys.index_select(1, slots.reshape(-1)).view(h, b, -1, d).transpose(0, 1)
    v = values.index_select(1, slots.reshape(-1)).view(h, b, -1, d).transpose(0, 1)
    return k, v


def attend_gathered(qg, keys, values, slots, mask):
    """The reference: rows (qg: (B, Hkv, g*T, d)) against their slots copied out."""
    k, v = gathered(keys, values, slots)
    return F.scaled_dot_product_attention(qg, k.to(qg.dtype), v.to(qg.dtype), attn_mask=mask)


class DecodeView:
    """The paged cache inside a compiled one-token step (see the module docstring).

    ``write_slots`` (B,): where each row's new token goes; ``read_slots`` (B, S): each row's
    slots in table order, padded with an empty slot (position -1); ``slot_pos``: the pool's
    positions, this step's tokens already recorded; ``keys``/``values``: per layer, the pool
    (Hkv, slots, d), written in place. ``kernel``: attend with
    ``torch.ops.archopt.paged_decode_attention`` (loaded by ``archopt.ops.cpu_kernels``).
    """

    def __init__(self, write_slots, read_slots, slot_pos, keys, values, kernel=False) -> None:
        self.write_slots, self.read_slots, self.slot_pos = write_slots, read_slots, slot_pos
        self.keys, self.values = keys, values
        self.kernel = kernel
        self.read_pos = None if kernel else slot_pos[read_slots]  # (B, S)

    def attend(self, layer, q, k, v, positions):
        b, hq, _, d = q.shape
        h = k.shape[1]
        keys, values = self.keys[layer], self.values[layer]
        # (Hkv, B, d), in the pool's dtype (a half-precision cache rounds them here)
        keys.index_copy_(1, self.write_slots, k[:, :, 0].transpose(0, 1).to(keys.dtype))
        values.index_copy_(1, self.write_slots, v[:, :, 0].transpose(0, 1).to(values.dtype))
        if self.kernel:
            return torch.ops.archopt.paged_decode_attention(
                q, keys, values, self.read_slots, self.slot_pos, positions, d**-0.5
            )
        rk = keys[:, self.read_slots].to(q.dtype)  # (Hkv, B, S, d)
        rv = values[:, self.read_slots].to(q.dtype)
        qg = q.view(b, h, hq // h, d).transpose(0, 1)  # (Hkv, B, g, d)
        scores = torch.matmul(qg, rk.transpose(-1, -2)) * d**-0.5  # (Hkv, B, g, S)
        seen = (self.read_pos >= 0) & (self.read_pos <= positions)  # (B, S): own token seen
        scores = scores.masked_fill(~seen[None, :, None], float("-inf"))
        y = torch.matmul(scores.softmax(dim=-1), rv)  # (Hkv, B, g, d)
        return y.transpose(0, 1).reshape(b, hq, 1, d)
