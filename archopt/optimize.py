"""``optimize_for_inference``: the same function, fewer memory passes.

Steps, each optional: fold every BatchNorm into the conv before it (depthwise included), run
in channels_last (NHWC) where that is faster on the given input, and hand the graph to a
compiler: ``"jit"`` (TorchScript freeze + ``torch.jit.optimize_for_inference``, which swaps in
oneDNN convolutions with pre-packed weights), ``"inductor"`` (``torch.compile`` with weight
freezing) or ``"onnxruntime"`` (export and run the ONNX graph). Outputs equal the input
model's within fp32 rounding (1e-4 relative), which the tests check for every mode.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Literal

import torch
from torch import nn

from archopt.measure.timing import measure_latency
from archopt.ops.conv import fold_batchnorm

Compiler = Literal["jit", "inductor", "onnxruntime"]
COMPILERS = ("jit", "inductor", "onnxruntime")


class ChannelsLast(nn.Module):
    """Runs ``inner`` on an NHWC copy of a 4-D input; callers keep passing NCHW tensors."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous(memory_format=torch.channels_last))


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime CPU session called like an ``nn.Module`` (torch tensors in and out)."""

    def __init__(self, onnx_path: str, *, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})
        return torch.from_numpy(out)


def _faster_in_channels_last(model: nn.Module, example: torch.Tensor) -> bool:
    nhwc = ChannelsLast(copy.deepcopy(model))
    t_nchw = measure_latency(model, example, warmup=2, repeats=7).median_ms
    t_nhwc = measure_latency(nhwc, example, warmup=2, repeats=7).median_ms
    return t_nhwc < t_nchw


def optimize_for_inference(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    fold_bn: bool = True,
    channels_last: bool | None = None,
    compile: Compiler | None = None,
) -> nn.Module:
    """An eval-mode copy of ``model`` optimized for inference; ``model`` is left untouched.

    ``channels_last=None`` measures both layouts on ``example_input`` and keeps the faster
    (without an example it stays NCHW). ``compile`` needs ``example_input`` for ``"jit"``
    (tracing) and ``"onnxruntime"`` (export); the compiled model is specialised to its rank and
    channel count, and for ``"jit"`` also to its batch size and resolution.
    """
    if compile is not None and compile not in COMPILERS:
        raise ValueError(f"compile must be None or one of {COMPILERS}, got {compile!r}")
    if compile in ("jit", "onnxruntime") and example_input is None:
        raise ValueError(f"compile={compile!r} needs an example_input to trace, got None")
    model = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(False)
    is_image = example_input is not None and example_input.ndim == 4
    if channels_last is None:
        channels_last = bool(is_image and compile is None) and _faster_in_channels_last(
            model, example_input
        )
    if channels_last:
        model = ChannelsLast(model)

    if compile == "jit":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer chatter
            traced = torch.jit.trace(model, example_input, check_trace=False)
            frozen = torch.jit.freeze(traced)
            return torch.jit.optimize_for_inference(frozen)
    if compile == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant-fold weights, pre-pack them for oneDNN
        return torch.compile(model, dynamic=False)
    if compile == "onnxruntime":
        fd, path = tempfile.mkstemp(suffix=".onnx")
        os.close(fd)
        try:
            from archopt.export import export_onnx

            export_onnx(model, path, example_input)
            return OnnxRuntimeModule(path)
        finally:
            os.unlink(path)
    return model
