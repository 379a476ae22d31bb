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

from archopt.measure.counting import MacCounter, eval_mode, make_inputs, module_stack

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
    """Paper-style size, batch dim dropped: (B,C,H,W) -> HxWxC; (B,C) -> 1x1xC; (B,N,C) -> NxC."""
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
            out = (
                module.output_size
                if isinstance(module.output_size, tuple)
                else (
                    module.output_size,
                    module.output_size,
                )
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
    """Rows of the model's architecture table for one forward pass on ``inputs`` (shape or tensors).

    Rows come in execution order: a layer when it is called, a composite module (attention)
    when its first own matrix product runs. A norm layer's parameters join the row before it.
    """
    args = make_inputs(model, inputs)
    modules = dict(model.named_modules())
    rows: dict[str, LayerRow] = {}  # insertion order = execution order
    io: dict[str, list] = {}  # name -> [input, output] of its first call
    norms_seen: set[str] = set()

    def add_row(name: str, desc: tuple[str, str], params: int) -> None:
        rows[name] = LayerRow(name, desc[0], desc[1], "-", "-", params, 0, 0.0)

    def pre(mod, inp, name):
        x = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
        io.setdefault(name, [x, None])
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        if isinstance(mod, _NORMS):
            if rows and name not in norms_seen:
                next(reversed(rows.values())).params += own
            norms_seen.add(name)
            return
        desc = _describe(mod, x) if x is not None else None
        if desc is not None and name not in rows:
            add_row(name, desc, own)

    def post(mod, inp, out, name):
        if io[name][1] is None and isinstance(out, torch.Tensor):
            io[name][1] = out

    def on_record(record) -> None:
        if record.module not in rows:  # matmuls a composite module runs itself
            add_row(record.module, (f"{type(modules[record.module]).__name__} (matmul)", "-"), 0)
        rows[record.module].macs += record.macs

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda m, i, n=name: pre(m, i, n)))
        handles.append(module.register_forward_hook(lambda m, i, o, n=name: post(m, i, o, n)))
    try:
        with eval_mode(model), torch.no_grad(), module_stack(model) as stack:
            counter = MacCounter(lambda: stack[-1] if stack else "", on_record)
            with counter:
                model(*args)
    finally:
        for h in handles:
            h.remove()

    total = sum(r.macs for r in rows.values())
    for name, row in rows.items():
        x, y = io.get(name, (None, None))
        row.input_size = _size(x) if x is not None else "-"
        row.output_size = _size(y) if y is not None else "-"
        row.share = row.macs / total if total else 0.0
    return list(rows.values())


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
        cells = [c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(body) - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["LayerRow", "format_table", "layer_table"]
