"""Per-layer architecture tables in the form of the MobileNet paper's Table 1.

One row per computing layer (convolution, linear, pooling, and any module that runs matrix
products itself, such as an attention block's ``QK^T`` and ``AV``), in execution order, with
"Type / Stride", "Filter Shape" and "Input Size" as the paper prints them, plus parameters
(a layer's own, with those of the norm layers that follow it), MACs and share of the total.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from archopt.measure.counting import (
    count_params,
    eval_mode,
    make_inputs,
    module_stack,
    trace_macs,
)

_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass
class LayerRow:
    name: str  # module path in the model
    type_stride: str  # "Conv dw / s2"
    filter_shape: str  # "3x3x32 dw"
    input_size: str  # "112x112x32" (H x W x C)
    output_size: str
    params: int
    macs: int
    share: float  # fraction of the model's total MACs

    def as_dict(self) -> dict:
        return asdict(self)


def _size(t: torch.Tensor) -> str:
    """Paper-style size without the batch dim: (B,C,H,W) -> HxWxC; (B,C) -> 1x1xC; (B,N,C) -> NxC."""
    if t.ndim == 4:
        return f"{t.shape[2]}x{t.shape[3]}x{t.shape[1]}"
    if t.ndim == 2:
        return f"1x1x{t.shape[1]}"
    return "x".join(str(s) for s in t.shape[1:])


def _stride(s) -> str:
    s = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
    return f"s{s[0]}" if len(set(s)) == 1 else "s" + "x".join(map(str, s))


def _describe(module: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """(type / stride, filter shape) for a computing layer, None for anything else."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        cin, cout, g = module.in_channels, module.out_channels, module.groups
        if g == cin == cout and g > 1:
            return f"Conv dw / {_stride(module.stride)}", f"{kh}x{kw}x{cin} dw"
        kind = "Conv" if g == 1 else f"Conv g{g}"
        return f"{kind} / {_stride(module.stride)}", f"{kh}x{kw}x{cin // g}x{cout}"
    if isinstance(module, nn.Linear):
        return "FC / s1", f"{module.in_features}x{module.out_features}"
    if isinstance(module, _POOLS):
        kind = "Avg Pool" if "Avg" in type(module).__name__ else "Max Pool"
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            out = module.output_size if isinstance(module.output_size, tuple) else (
                module.output_size,
                module.output_size,
            )
            kh, kw = x.shape[-2] // (out[0] or x.shape[-2]), x.shape[-1] // (out[1] or x.shape[-1])
            stride = "s1"
        else:
            k = module.kernel_size
            kh, kw = (k, k) if isinstance(k, int) else k
            stride = _stride(module.stride)
        return f"{kind} / {stride}", f"Pool {kh}x{kw}"
    return None


def layer_table(model: nn.Module, inputs) -> list[LayerRow]:
    """Rows of the model's architecture table for one forward pass on ``inputs`` (shape or tensors)."""
    args = make_inputs(model, inputs)
    records = trace_macs(model, args)
    macs_by_module: dict[str, int] = {}
    for r in records:
        macs_by_module[r.module] = macs_by_module.get(r.module, 0) + r.macs
    total_macs = sum(macs_by_module.values())

    modules = dict(model.named_modules())
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, input, output) in order
    handles = []
    for name, module in modules.items():

        def hook(mod, inp, out, name=name):
            x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            y = out if isinstance(out, torch.Tensor) else None
            calls.append((name, x, y))

        handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad(), module_stack(model):
            model(*args)
    finally:
        for h in handles:
            h.remove()

    rows: list[LayerRow] = []
    seen: set[str] = set()
    for name, x, y in calls:
        module = modules[name]
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, _NORMS) and rows:
            rows[-1].params += own_params if name not in seen else 0
            seen.add(name)
            continue
        desc = _describe(module, x) if x is not None else None
        direct_macs = macs_by_module.get(name, 0)
        is_leaf = not any(True for _ in module.children())
        if desc is None and not (direct_macs and not is_leaf):
            continue
        if desc is None:  # a composite module doing matmuls itself (e.g. attention)
            desc = (f"{type(module).__name__} (matmul)", "-")
            own_params = 0  # its projections get rows of their own
        rows.append(
            LayerRow(
                name=name,
                type_stride=desc[0],
                filter_shape=desc[1],
                input_size=_size(x) if x is not None else "-",
                output_size=_size(y) if y is not None else "-",
                params=own_params if name not in seen else 0,
                macs=direct_macs,
                share=direct_macs / total_macs if total_macs else 0.0,
            )
        )
        seen.add(name)
    return rows


def format_table(rows: list[LayerRow], *, total_params: int | None = None) -> str:
    """Plain-text table with a totals line."""
    head = ("Type / Stride", "Filter Shape", "Input Size", "Params", "MACs", "Share")
    body = [
        (
            r.type_stride,
            r.filter_shape,
            r.input_size,
            f"{r.params:,}",
            f"{r.macs:,}",
            f"{100 * r.share:.2f}%",
        )
        for r in rows
    ]
    macs = sum(r.macs for r in rows)
    params = sum(r.params for r in rows) if total_params is None else total_params
    body.append(("Total", "", "", f"{params:,}", f"{macs:,}", "100.00%"))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = []
    for i, line in enumerate([head, *body]):
        cells = [
            c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(body) - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["LayerRow", "format_table", "layer_table"]
