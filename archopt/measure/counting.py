"""Parameter and multiply-accumulate (MAC) counting.

MACs are counted at the ATen level while the model really runs, so functional calls count as
well as modules: convolutions (grouped and depthwise: each output element costs
``C_in/groups * K*K`` MACs), matrix products (mm, addmm, bmm, baddbmm) and every fused
scaled-dot-product-attention kernel (``QK^T`` plus ``AV``: ``B*H*L*S*(E + Ev)``). torch's
``FlopCounterMode`` has no formula for the CPU flash kernel and counts it as zero; this does not.
Element-wise work (norms, activations, residual adds, pooling, biases) is not counted, as in
the papers' tables.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def count_params(model: nn.Module, *, trainable_only: bool = False, norm: bool = True) -> int:
    """Number of parameters; ``norm=False`` leaves out normalization layers' affine weights."""
    skip: set[int] = set()
    if not norm:
        norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        for m in model.modules():
            if isinstance(m, norm_types):
                skip.update(id(p) for p in m.parameters(recurse=False))
    return sum(
        p.numel()
        for p in model.parameters()
        if id(p) not in skip and (p.requires_grad or not trainable_only)
    )


def _conv_macs(args, out: torch.Tensor) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    kernel = math.prod(w.shape[2:])
    if transposed:
        # weight (C_in, C_out/groups, k...): every input element feeds C_out/groups * K outputs.
        return x.numel() * w.shape[1] * kernel
    # weight (C_out, C_in/groups, k...): every output element sums C_in/groups * K products.
    return out.numel() * w.shape[1] * kernel


def _sdpa_macs(args) -> int:
    q, k, v = args[0], args[1], args[2]
    *batch, length, e = q.shape
    s, ev = k.shape[-2], v.shape[-1]
    return math.prod(batch) * length * s * (e + ev)


_SDPA_OPS = {
    getattr(aten, name)
    for name in (
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    if hasattr(aten, name)
}


def op_macs(func, args, out) -> int:
    """MACs of one ATen call (0 for ops that are not counted)."""
    packet = func.overloadpacket
    if packet in (aten.convolution, aten._convolution):
        return _conv_macs(args, out)
    if packet is aten.mm:
        return args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
    if packet is aten.addmm:
        return args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
    if packet is aten.bmm:
        b, n, k = args[0].shape
        return b * n * k * args[1].shape[2]
    if packet is aten.baddbmm:
        b, n, k = args[1].shape
        return b * n * k * args[2].shape[2]
    if packet in _SDPA_OPS:
        return _sdpa_macs(args)
    return 0


@dataclass
class OpRecord:
    module: str  # qualified name of the innermost module running when the op ran ("" = root)
    op: str
    macs: int


class MacCounter(TorchDispatchMode):
    """Records every counted op with the module running it; ``on_record`` sees each one live."""

    def __init__(
        self,
        current_module: Callable[[], str],
        on_record: Callable[[OpRecord], None] | None = None,
    ) -> None:
        super().__init__()
        self.current_module = current_module
        self.on_record = on_record
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        macs = op_macs(func, args, out)
        if macs:
            record = OpRecord(self.current_module(), str(func.overloadpacket), macs)
            self.records.append(record)
            if self.on_record is not None:
                self.on_record(record)
        return out


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[list[str]]:
    """Hooks that keep the stack of module names currently inside ``forward``."""
    stack: list[str] = []
    handles = []
    for name, module in model.named_modules():

        def pre(mod, args, name=name):
            stack.append(name)

        def post(mod, args, out):
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def make_inputs(
    model: nn.Module, inputs: torch.Tensor | tuple | torch.Size | list[int]
) -> tuple[torch.Tensor, ...]:
    """Accept a shape (list/tuple of ints), a tensor or a tuple of tensors; return a tuple."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list, torch.Size)) and all(isinstance(i, int) for i in inputs):
        from math import prod

        from archopt.io import check_fits

        if any(i < 1 for i in inputs):
            raise ValueError(f"an input shape's sizes must be >= 1, got {tuple(inputs)}")
        # the input itself, and room for a few activations of its size
        check_fits(f"a {tuple(inputs)} input", 8 * 4 * prod(inputs))
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return (torch.randn(tuple(inputs), device=device, dtype=dtype),)
    return tuple(inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily eval() (no BN statistics updates from a measurement run)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def trace_macs(model: nn.Module, inputs) -> list[OpRecord]:
    """Run ``model`` once (eval, no grad) and return every counted op with its module."""
    args = make_inputs(model, inputs)
    with eval_mode(model), torch.no_grad(), module_stack(model) as stack:
        counter = MacCounter(lambda: stack[-1] if stack else "")
        with counter:
            model(*args)
    return counter.records


def count_macs(model: nn.Module, inputs) -> int:
    """Total multiply-accumulates of one forward pass.

    ``inputs`` is an input shape such as ``(1, 3, 224, 224)``, a tensor, or a tuple of tensors.
    """
    return sum(r.macs for r in trace_macs(model, inputs))
