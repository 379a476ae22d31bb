"""Short sequences of the blocked backend: each residue class as one dense masked attention.

Where a block would read more than twice the keys its sequence holds (N <= about
dil * (w + blk/2)), the band path's blocks are mostly padding; ``short_band`` computes the
class's L x L scores directly, in chunks of (batch row, head) pairs of at most
``spec.chunk_bytes``, and its backward pass by autograd on copies of the class's rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archopt.ops.attention.blocked_rows import NEG


def leaf(x: Tensor) -> Tensor:
    """``x`` as a leaf of a new graph (same memory)."""
    return x.detach().requires_grad_()


def short_band(q, k, v, heads, dil, w, spec, gk, ws, grads):
    """``band`` (blocked.py) for sequences at most half a block's key span
    (N <= about dil * (w + blk/2)).

    A block there would read span > length keys, most of them outside its sequence (at N=1024,
    w=256, dilation 4: 574 keys for 256), so each residue class is instead one dense masked
    attention over its own rows, L x L scores with L <= span, in chunks of (batch, head) pairs.
    Its backward pass is autograd's, through a graph of the class's rows (copies) as leaves.
    """
    if grads is not None and not torch.is_grad_enabled():
        with torch.enable_grad():
            return short_band(q, k, v, heads, dil, w, spec, gk, ws, grads)
    B, H, N, D = q.shape
    dv = v.shape[-1]
    dev = q.device
    causal, scale, key_valid = spec.causal, spec.scale, spec.key_valid
    nh = len(heads)
    hs = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
    as_leaf = leaf if grads is not None else (lambda x: x)
    g = 0
    if gk is not None:
        gk_k, gk_v, visible = gk
        g = gk_k.shape[2]
        gk_k = as_leaf(gk_k[:, hs].reshape(B * nh, g, D))  # (pairs, G, d)
        gk_v = as_leaf(gk_v[:, hs].reshape(B * nh, g, dv))
        gk_kt = gk_k.transpose(1, 2)
        slots = torch.arange(g, device=dev)
    for r in range(dil):
        L = -(-(N - r) // dil)  # positions r, r + dil, ... of the sequence
        if L == 0:
            continue
        qr = as_leaf(q[:, hs, r::dil].reshape(B * nh, L, D))  # (pairs, L, d)
        kr = as_leaf(k[:, hs, r::dil].reshape(B * nh, L, D))
        vr = as_leaf(v[:, hs, r::dil].reshape(B * nh, L, dv))
        i = torch.arange(L, device=dev)
        rel = i[:, None] - i[None, :]  # query minus key position, in the sequence
        band = (rel <= w) & (rel >= (0 if causal else -w))
        padded = None
        if key_valid is not None:  # (pairs, 1, L), the batch row's mask for every head
            padded = ~key_valid[:, r::dil].repeat_interleave(nh, dim=0)[:, None, :]
        if g:
            seen = visible[:, r::dil].repeat_interleave(nh, dim=0)[..., None]  # (pairs, L, 1)
        per = max(1, spec.chunk_bytes // (L * (L + g) * q.element_size()))
        outs = []
        for p0 in range(0, B * nh, per):
            p1 = min(B * nh, p0 + per)
            scores = torch.bmm(qr[p0:p1], kr[p0:p1].transpose(1, 2)) * scale
            # masked scores replaced, not biased: a bias would let a huge score through
            masked = ~band if padded is None else ~band | padded[p0:p1]
            scores = scores.masked_fill(masked, NEG)
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
