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
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

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
    - ``scale``: default 1/sqrt(d). Softmax runs in fp32 for fp16/bf16 inputs.
    """
    dilations = _check_inputs(q, k, v, window, dilation, global_mask, key_padding_mask)
    name = _resolve_backend(backend, q, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    kwargs = dict(
        window=window,
        dilations=dilations,
        global_mask=global_mask,
        key_padding_mask=key_padding_mask,
        causal=causal,
        scale=float(scale),
    )
    if name == "reference":
        return local_attention_reference(q, k, v, **kwargs)
    if name == "flex":
        return flex.local_attention_flex(q, k, v, **kwargs)
    if name == "triton":
        return _triton_module().local_attention_triton(q, k, v, **kwargs)
    return local_attention_blocked(q, k, v, **kwargs)


def _triton_module():
    """archopt.ops.attention.triton_band, or None when triton is not installed."""
    try:
        from archopt.ops.attention import triton_band
    except ImportError:
        return None
    return triton_band


def _resolve_backend(backend: str, q: Tensor, v: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
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
            raise ValueError(
                "backend 'triton' needs the triton package, which is not installed; "
                "use 'blocked' or 'reference'"
            )
        module.check_supported(q, v)
    if backend == "flex" and not flex.available():
        raise ValueError(
            "backend 'flex' needs torch.nn.attention.flex_attention, which does not work in "
            f"this PyTorch installation (torch {torch.__version__}); use 'blocked' or 'reference'"
        )
    return backend


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_inputs(q, k, v, window, dilation, global_mask, key_padding_mask) -> tuple[int, ...]:
    """Validate everything once; returns the dilation of every head."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, d), got {shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape (B, H, N, dv) with (B, H, N) = {tuple(q.shape[:3])} as in q, "
            f"got {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}"
        )
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k and v must be floating point, got {q.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(
            f"q, k and v must be on the same device, got {q.device}, {k.device} and {v.device}"
        )
    _check_int("window", window)
    B, H, N, _ = q.shape
    if isinstance(dilation, Sequence) and not isinstance(dilation, str):
        dilations = tuple(dilation)
        if len(dilations) != H:
            raise ValueError(
                f"dilation must have one entry per head ({H}), got {len(dilations)} entries"
            )
        for d in dilations:
            _check_int("dilation", d)
    else:
        _check_int("dilation", dilation)
        dilations = (dilation,) * H
    for name, mask in (("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{name} must be a bool tensor, got {got}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"{name} must have shape (B, N) = {(B, N)}, got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {mask.device}")
    return dilations
