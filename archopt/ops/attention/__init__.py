"""Longformer local attention: sliding window, dilated window, global + window (Beltagy et al.,
2020, "Longformer", Sec. 3.1), with one public function and interchangeable backends.

``local_attention`` checks its inputs once and dispatches to

- ``"reference"`` (reference.py): dense masked attention from the definition, O(N^2); the oracle.
- ``"blocked"`` (blocked.py, with blocked_chunks.py, blocked_short.py, blocked_rows.py): the
  exact CPU fast path, O(N*w) memory, its backward pass by hand.
- ``"flex"`` (flex.py): the same mask through ``torch.nn.attention.flex_attention``, to compare.
- ``"triton"`` (triton_band.py: planning, launch, autograd; triton_kernels.py: the kernels):
  FlashAttention-2 style Triton kernels, forward and backward,
  for CUDA tensors (fp16/bf16/fp32, head dims 16-128, dv == d). CPU tensors only under
  ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for tests). Triton is imported lazily,
  so nothing here needs it unless this backend is asked for.
- ``"auto"``: ``triton`` for CUDA inputs it can take when triton is installed, else
  ``blocked``. The environment variable ``ARCHOPT_ATTENTION_BACKEND`` overrides ``"auto"``
  (tests use it to run a whole model on one backend).

The window is one-sided, as in the paper and its TVM kernel: query i attends key j when
``|i - j| <= w * dilation`` and ``(i - j) % dilation == 0``. (HuggingFace's
``attention_window`` is the full width 2w.)

Masks win over values, in every backend: ``local_attention`` sums q, k and v (one read of
each) and, when a sum is not finite, runs the backend on copies with the non-finite entries
zeroed and then writes NaN into the rows that attend one (``_nonfinite_inputs``); the
reference implements the same rule on its own, from its dense mask. A window or dilation
longer than the sequence is cut to its length first (the same pattern), so no backend's work
grows with them.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from archopt.errors import ArchoptError
from archopt.ops.attention import flex
from archopt.ops.attention.blocked import local_attention_blocked
from archopt.ops.attention.reference import band_mask, dense_mask, local_attention_reference

BACKENDS = ("auto", "reference", "blocked", "flex", "triton")
ENV_BACKEND = "ARCHOPT_ATTENTION_BACKEND"

__all__ = ["BACKENDS", "ENV_BACKEND", "band_mask", "dense_mask", "local_attention"]


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    dilation: int | Sequence[int] = 1,
    global_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Sliding-window attention with optional dilation, global tokens, padding and causality.

    q, k: (B, H, N, d); v: (B, H, N, dv); returns (B, H, N, dv) in the input dtype.

    - ``window`` w >= 1, one-sided: 2w+1 keys per query (w+1 when ``causal``).
    - ``dilation``: an int, or one int per head (the paper dilates only some heads).
    - ``global_mask`` (B, N) bool: global queries attend every key and every query attends the
      global keys (each key counted once); rows may have different numbers of global tokens.
    - ``key_padding_mask`` (B, N) bool, True = padding: never attended. A query left with no
      key returns zeros (and zero gradients), not NaN.
    - ``causal``: only keys j <= i, everywhere (global rows and columns included).
    - ``scale``: a finite number, default 1/sqrt(d). Softmax runs in fp32 for fp16/bf16 inputs.

    NaN and Inf. A key that a query does not attend (padding, outside its window or dilation
    pattern, after it when ``causal``) never reaches that query's output, whatever its k and v
    hold, NaN and +-Inf included. A query's output row is NaN (the whole row) when what it does
    attend holds a NaN or +-Inf: its own q row, or the k or v row of a key it attends; a
    query that attends no key returns zeros whatever its q. Every backend gives the same.
    Gradients are those of the inputs with their non-finite entries replaced by 0, none
    flowing back from the NaN rows.

    Arguments are checked before any work (type, range, shapes, dtypes, devices); a bad one
    raises ``archopt.errors.ArchoptError`` (a ``ValueError``) naming it, what was expected and
    what was received. ``window`` and ``dilation`` may be any size: beyond the sequence's
    length they change nothing, and they cost nothing either.
    """
    window, dilations, scale = _check_inputs(
        q, k, v, window, dilation, global_mask, key_padding_mask, causal, scale
    )
    name = _resolve_backend(backend, q, v)
    if v.numel() == 0:  # no batch row, head, position or value channel: nothing to compute
        # (the empty sums keep the output on the autograd graph of q, k and v)
        return v.new_zeros(v.shape) + (q.sum() + k.sum() + v.sum()) * 0
    kwargs = dict(
        window=window,
        dilations=dilations,
        global_mask=global_mask,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=scale,
    )
    run = _backend_function(name)
    # The reference applies the rule for NaN and Inf itself (it is the oracle the rest is
    # tested against); the other backends would let a masked NaN or Inf through (0 * Inf in
    # probs @ V) and run on finite inputs only.
    if name == "reference" or _all_finite(q, k, v):
        return run(q, k, v, **kwargs)
    return _nonfinite_inputs(run, q, k, v, kwargs)


def _backend_function(name: str):
    """The function of backend ``name`` (looked up at call time: tests replace them)."""
    if name == "reference":
        return local_attention_reference
    if name == "flex":
        return flex.local_attention_flex
    if name == "triton":
        return _triton_module().local_attention_triton
    return local_attention_blocked


def _all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite, by the sums of their entries: one read
    of each, no temporary (a sum is NaN or +-Inf when an entry is). A sum that overflows with
    finite entries (all of them near the dtype's maximum) only sends the call down the slower
    path, which gives the same result."""
    with torch.no_grad():
        total = sum(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)) for x in tensors)
    return bool(torch.isfinite(total))


def _nonfinite_inputs(run, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> Tensor:
    """``run`` (a backend) where some input is NaN or +-Inf: the rule of ``local_attention``.

    The backend runs on copies with the non-finite entries zeroed, which no masked key can
    spoil; then the rows that attend a non-finite entry are set to NaN. Which rows those are
    is itself a local attention, through the blocked path (plain PyTorch, any device), with
    equal scores (q = k = 0) and two value channels: an indicator of the keys whose k or v
    row is not finite, and ones. Channel 0 is then > 0 exactly for the rows that attend such
    a key, channel 1 for the rows that attend any key (the others are zeros).
    """
    finite = [torch.isfinite(x).all(-1) for x in (q, k, v)]  # (B, H, N) each
    clean = [torch.where(torch.isfinite(x), x, torch.zeros_like(x)) for x in (q, k, v)]
    out = run(*clean, **kwargs)
    B, H, N, _ = q.shape
    bad_key = ~(finite[1] & finite[2])
    channels = torch.stack([bad_key, torch.ones_like(bad_key)], -1).float()  # (B, H, N, 2)
    zeros = channels.new_zeros(B, H, N, 1)
    with torch.no_grad():
        seen = local_attention_blocked(zeros, zeros, channels, **{**kwargs, "scale": 1.0})
    nan_rows = (seen[..., 0] > 0) | (~finite[0] & (seen[..., 1] > 0))
    return out.masked_fill(nan_rows[..., None], math.nan)


def _triton_module():
    """archopt.ops.attention.triton_band, or None when triton is not installed."""
    try:
        from archopt.ops.attention import triton_band
    except ImportError:
        return None
    return triton_band


def _resolve_backend(backend: str, q: Tensor, v: Tensor) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ArchoptError("backend", f"one of {BACKENDS}", backend)
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env:
            if env not in BACKENDS:
                raise ArchoptError(ENV_BACKEND, f"one of {BACKENDS}", env)
            backend = env
    if backend == "auto":
        # CUDA inputs the Triton kernels take go to them; everything else (CPU, no triton,
        # a head dim or dtype the kernels do not take) runs the blocked path, which is plain
        # PyTorch and therefore works on every device.
        if q.is_cuda:
            module = _triton_module()
            if module is not None and not module.interpreting():
                try:
                    module.check_supported(q, v)
                except ValueError:
                    return "blocked"
                return "triton"
        return "blocked"
    if backend == "triton":
        module = _triton_module()
        if module is None:
            raise ArchoptError(
                "backend 'triton' needs the triton package, which is not installed; "
                "use 'blocked' or 'reference'"
            )
        module.check_supported(q, v)
    if backend == "flex" and not flex.available():
        raise ArchoptError(
            "backend 'flex' needs torch.nn.attention.flex_attention, which does not work in "
            f"this PyTorch installation (torch {torch.__version__}); use 'blocked' or 'reference'"
        )
    return backend


def _check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (any integral type but bool), else an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArchoptError(name, "an int", value)
    if value < minimum:
        raise ArchoptError(name, f">= {minimum}", value)
    return int(value)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ArchoptError(name, "a 4-D tensor (B, H, N, d)", shape)


def _check_inputs(
    q, k, v, window, dilation, global_mask, key_padding_mask, causal, scale
) -> tuple[int, tuple[int, ...], float]:
    """Validate everything once; returns the window and the dilation of every head, both cut
    to the sequence's length N (|i - j| < N, so a window of N or a dilation of N already
    reaches every key the rule can reach: the same pattern), and the scale."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    if k.shape != q.shape:
        raise ArchoptError(
            f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ArchoptError(
            f"v must have shape (B, H, N, dv) with (B, H, N) = {tuple(q.shape[:3])} as in q, "
            f"got {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ArchoptError(
            f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}"
        )
    if not q.dtype.is_floating_point:
        raise ArchoptError(f"q, k and v must be floating point, got {q.dtype}")
    if not q.device == k.device == v.device:
        raise ArchoptError(
            f"q, k and v must be on the same device, got {q.device}, {k.device} and {v.device}"
        )
    if q.shape[-1] == 0:
        raise ArchoptError("q and k", "of head dim d >= 1 (the last axis)", tuple(q.shape))
    window = _check_int("window", window)
    B, H, N, _ = q.shape
    if isinstance(dilation, Sequence) and not isinstance(dilation, str):
        dilations = tuple(dilation)
        if len(dilations) != H:
            raise ArchoptError(
                f"dilation must have one entry per head ({H}), got {len(dilations)} entries"
            )
        dilations = tuple(_check_int("dilation", d) for d in dilations)
    else:
        dilations = (_check_int("dilation", dilation),) * H
    for name, mask in (("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ArchoptError(f"{name} must be a bool tensor, got {got}")
        if tuple(mask.shape) != (B, N):
            raise ArchoptError(f"{name} must have shape (B, N) = {(B, N)}, got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ArchoptError(f"{name} must be on {q.device} like q, got {mask.device}")
    if not isinstance(causal, bool):
        raise ArchoptError("causal", "a bool", causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ArchoptError("scale", "a number or None", scale)
    elif not math.isfinite(scale):
        raise ArchoptError("scale", "finite", scale)
    reach = max(N, 1)
    return min(window, reach), tuple(min(d, reach) for d in dilations), float(scale)
