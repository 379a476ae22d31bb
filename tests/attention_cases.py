"""What the local-attention tests share: the CPU backends as the dispatcher reaches them, the
rule for NaN and Inf written from the dense mask, and the tolerance of each dtype."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from archopt.ops.attention import ENV_BACKEND, blocked, dense_mask, flex, local_attention

# Every backend that runs on the CPU, as ``local_attention`` reaches it. "blocked-band": the
# blocked backend with its dense path for short sequences off and chunks of one block, so small
# shapes take the band path and every chunk edge; "flex": FlexAttention eager (compiling each
# new shape would take seconds); "auto": whatever the dispatcher picks here.
CPU_BACKENDS = ("reference", "blocked", "blocked-band", "flex", "auto")


@contextlib.contextmanager
def backend(name: str):
    """The ``backend=`` argument for ``name``, with the settings it needs while inside."""
    if name == "flex" and not flex.available():
        pytest.skip("FlexAttention does not work in this PyTorch installation")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ENV_BACKEND, raising=False)
        if name == "blocked-band":
            mp.setattr(blocked, "SHORT_SEQUENCES", False)
            mp.setattr(blocked, "CHUNK_BYTES", 1)
            mp.setattr(blocked, "BACKWARD_CHUNK_BYTES", 1)
            mp.setattr(blocked, "SPARE_BYTES", 1)
            yield "blocked"
        elif name == "flex":
            mp.setattr(flex, "can_compile", lambda: False)
            yield "flex"
        else:
            yield name


def run(name: str, q, k, v, **kwargs):
    with backend(name) as chosen:
        return local_attention(q, k, v, backend=chosen, **kwargs)


def attended(
    q, window, dilation=1, global_mask=None, key_padding_mask=None, causal=False, scale=None
):
    """(B, H, N, N) bool: query i attends key j, from the definition (``dense_mask``); the
    scale, among the arguments of ``local_attention``, plays no part."""
    b, h, n, _ = q.shape
    dilations = list(dilation) if isinstance(dilation, (list, tuple)) else [dilation] * h
    return dense_mask(
        b, n, window, dilations, global_mask=global_mask, key_padding_mask=key_padding_mask,
        causal=causal,
    )  # fmt: skip


def nan_rows(q, k, v, mask):
    """(B, H, N) bool: the rows ``local_attention`` documents as NaN: a non-finite entry in the
    k or v row of a key the row attends, or in its own q row when it attends any key."""
    bad_key = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    return (mask & bad_key[:, :, None, :]).any(-1) | (~torch.isfinite(q).all(-1) & mask.any(-1))


def assert_matches(out, q, k, v, name, **kwargs):
    """``out`` (backend ``name`` on the finite q, k, v) against the reference, at the dtype's
    tolerance:

    - fp64 and fp32: absolute 1e-12 and 1e-5 (the reference in the same dtype; outputs are
      averages of values of order 1).
    - bf16, our backends: within one bf16 step (relative 2^-7) of the reference's bf16 output:
      both compute in fp32 and round once.
    - bf16, FlexAttention: absolute 2e-2 from the reference in fp32 on the upcast inputs (the
      tolerance tests/test_local_attention.py holds bf16 to); flex's eager path keeps its
      probabilities in bf16, so its result is not the fp32 result rounded once.
    """
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    if q.dtype == torch.bfloat16 and name == "flex":
        ref = local_attention(q.float(), k.float(), v.float(), backend="reference", **kwargs)
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
        return
    ref = local_attention(q, k, v, backend="reference", **kwargs)
    if q.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-5)
    else:
        atol = 1e-12 if q.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def plant(x, where, value):
    """A copy of ``x`` with ``value`` written at ``where`` (a bool mask broadcast to x)."""
    return x.masked_fill(where, value)


NONFINITE = (math.nan, math.inf, -math.inf)
