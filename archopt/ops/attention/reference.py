"""Dense masked attention: the oracle every other backend is tested against.

It builds the full (B, H, N, N) boolean mask from the definition and runs ordinary softmax
attention over it, so it costs O(N^2) time and memory and is only meant for tests and small
inputs. Nothing here is clever on purpose: if a fast backend disagrees with this file, the fast
backend is wrong. That includes NaN and Inf: masks are applied by replacing entries (never by
adding a bias), non-finite inputs are zeroed before they meet a mask, and the rows that attend
one are set to NaN from the dense mask, which is the rule ``local_attention`` documents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def band_mask(
    n: int,
    window: int,
    dilation: int = 1,
    *,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, n) bool: query i may attend key j inside the (dilated) sliding window.

    Longformer's definition (``window`` is one-sided): ``|i - j| <= window * dilation`` and
    ``(i - j) % dilation == 0``, i.e. the 2w+1 keys ``i + dilation*m`` for ``m`` in [-w, w];
    with ``causal`` only ``j <= i``. A window or dilation of n or more is the same as n.
    """
    window, dilation = min(window, max(n, 1)), min(dilation, max(n, 1))  # no int64 overflow
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    diff = i - j
    mask = (diff.abs() <= window * dilation) & (diff % dilation == 0)
    if causal:
        mask &= diff >= 0
    return mask


def dense_mask(
    batch: int,
    n: int,
    window: int,
    dilations: Sequence[int],
    *,
    global_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, H, N, N) bool: the complete attention pattern, one head per entry of ``dilations``.

    Band, then global rows and columns, then padded keys and causality removed from all of it.
    """
    band = torch.stack([band_mask(n, window, d, device=device) for d in dilations])
    mask = band.unsqueeze(0).expand(batch, -1, -1, -1)
    if global_mask is not None:
        rows = global_mask[:, None, :, None]  # a global query sees every key
        cols = global_mask[:, None, None, :]  # every query sees a global key
        mask = mask | rows | cols
    if key_padding_mask is not None:
        mask = mask & ~key_padding_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask.expand(batch, len(dilations), n, n)


def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v over the True entries of ``mask``; rows with none give zeros.

    The scores are computed in fp32 (or fp64 for fp64 inputs). Masked scores are filled with a
    large finite negative number instead of -inf so that an empty row yields finite (uniform)
    weights rather than NaN; the row is then multiplied by 0, which keeps its forward output and
    all its gradients exactly zero.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(dtype).min)
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v.to(dtype)
    out = out * mask.any(dim=-1, keepdim=True).to(dtype)
    return out.to(q.dtype)


def local_attention_reference(
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
    """Local attention by the definition: build the (B, H, N, N) mask, run dense attention.

    NaN and Inf: attention runs on the inputs with their non-finite entries zeroed; a row is
    NaN when the mask lets it attend a key whose k or v row is not finite, or when its own q
    row is not finite and it attends any key.
    """
    mask = dense_mask(
        q.shape[0],
        q.shape[2],
        window,
        dilations,
        global_mask=global_mask,
        key_padding_mask=key_padding_mask,
        causal=causal,
        device=q.device,
    )
    finite_q, finite_k, finite_v = (torch.isfinite(x).all(-1) for x in (q, k, v))  # (B, H, N)
    q, k, v = (torch.where(torch.isfinite(x), x, torch.zeros_like(x)) for x in (q, k, v))
    out = masked_softmax_attention(q, k, v, mask, scale)
    bad_key = ~(finite_k & finite_v)[:, :, None, :]  # (B, H, 1, N)
    nan_rows = (mask & bad_key).any(-1) | (~finite_q & mask.any(-1))  # (B, H, N)
    return out.masked_fill(nan_rows[..., None], math.nan)
