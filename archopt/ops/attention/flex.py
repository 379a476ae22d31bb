"""The same attention pattern through ``torch.nn.attention.flex_attention``, for comparison.

FlexAttention is PyTorch's own answer to "attention with an arbitrary mask": a ``mask_mod``
function of (batch, head, query, key) becomes a block-sparse mask, and ``torch.compile`` turns
it into a fused kernel that skips fully masked blocks. It is the anchor the blocked CPU path is
measured against. Without compilation it falls back to an unfused implementation that builds
the full N x N scores (fine for tests, not for long sequences).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


@functools.cache
def available() -> bool:
    """Whether FlexAttention imports and runs a tiny CPU problem in this installation."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        x = torch.zeros(1, 1, 8, 4)
        block_mask = create_block_mask(lambda b, h, i, j: i >= j, 1, 1, 8, 8, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(x, x, x, block_mask=block_mask)
    except Exception:
        return False
    return True


def can_compile() -> bool:
    """Compiling FlexAttention on the CPU needs a C++ compiler for inductor."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++")) or bool(os.environ.get("CXX"))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def make_block_mask(
    batch: int,
    heads: int,
    n: int,
    *,
    window: int,
    dilations: Sequence[int],
    global_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    device: torch.device | str,
    compiled: bool = False,
):
    """The Longformer pattern as a FlexAttention ``BlockMask`` (same rule as the reference)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dil = torch.tensor(list(dilations), device=device)
    glob = (
        torch.zeros(batch, n, dtype=torch.bool, device=device)
        if global_mask is None
        else global_mask
    )
    valid = (
        torch.ones(batch, n, dtype=torch.bool, device=device)
        if key_padding_mask is None
        else ~key_padding_mask
    )

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        d = dil[h]
        band = (diff.abs() <= window * d) & (diff % d == 0)
        keep = (band | glob[b, q_idx] | glob[b, kv_idx]) & valid[b, kv_idx]
        if causal:
            keep = keep & (diff >= 0)
        return keep

    return create_block_mask(mask_mod, batch, heads, n, n, device=device, _compile=compiled)


def local_attention_flex(
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
    compiled: bool | None = None,
    block_mask=None,
) -> Tensor:
    """Local attention with FlexAttention; ``compiled=None`` compiles when a compiler exists.

    ``block_mask`` (from :func:`make_block_mask`) can be built once and reused, which is how a
    model would call it; otherwise it is built here on every call.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if not available():
        raise RuntimeError("FlexAttention is not available in this PyTorch installation")
    if compiled is None:
        compiled = can_compile()
    B, H, N, _ = q.shape
    if block_mask is None:
        block_mask = make_block_mask(
            B,
            H,
            N,
            window=window,
            dilations=dilations,
            global_mask=global_mask,
            key_padding_mask=key_padding_mask,
            causal=causal,
            device=q.device,
            compiled=compiled,
        )
    if compiled:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
