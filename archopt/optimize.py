"""``optimize_for_inference``: the same function, fewer memory passes.

Steps, each optional: fold every BatchNorm into the conv before it (depthwise included), run
in channels_last (NHWC) where that is faster on the given input, and hand the graph to a
compiler: ``"jit"`` (TorchScript freeze + ``torch.jit.optimize_for_inference``, which swaps in
oneDNN convolutions with pre-packed weights), ``"inductor"`` (``torch.compile`` with weight
freezing) or ``"onnxruntime"`` (export and run the ONNX graph). Outputs equal the input
model's within fp32 rounding (1e-4 relative), which the tests check for every mode.
"""

from __future__ import annotations

import contextlib
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


class InputAdapter(nn.Module):
    """Runs ``inner`` on an NHWC and/or reduced-precision copy of the input; callers keep
    passing fp32 NCHW tensors and get fp32 outputs back."""

    def __init__(
        self, inner: nn.Module, *, channels_last: bool, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.dtype = dtype
        if channels_last:
            inner = inner.to(memory_format=torch.channels_last)
        self.inner = inner.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self.inner(x.to(self.dtype))
        return y.float() if self.dtype != torch.float32 else y


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
    nhwc = InputAdapter(copy.deepcopy(model), channels_last=True)
    t_nchw = measure_latency(model, example, warmup=2, repeats=7).median_ms
    t_nhwc = measure_latency(nhwc, example, warmup=2, repeats=7).median_ms
    return t_nhwc < t_nchw


def optimize_for_inference(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    fold_bn: bool = True,
    channels_last: bool | None = None,
    compile: Compiler | Literal["auto"] | None = "auto",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An eval-mode copy of ``model`` optimized for inference; ``model`` is left untouched.

    ``compile="auto"`` (the default) builds eager, ``"jit"`` and (if installed)
    ``"onnxruntime"``, checks each against the model, and returns the fastest on
    ``example_input`` (see :func:`choose_backend`); the choice is remembered in archopt's
    cache folder per model structure, input shape, dtype and machine, so a later call, in any
    process, builds only the chosen backend (and still checks it). Without ``example_input``
    the model's own ``example_inputs()`` is used, and the result runs the chosen backend on
    inputs of that shape and the eager optimized model on any other. ``compile=None``: eager
    only (BN folded, layout chosen). ``channels_last=None`` measures both layouts on
    ``example_input`` and keeps the faster (without an example it stays NCHW). ``"jit"``
    (tracing) and ``"onnxruntime"`` (export) need ``example_input`` and are specialised to its
    rank and channel count, ``"jit"`` also to its batch size and resolution.
    ``dtype=torch.bfloat16`` runs the weights and activations in bf16 (AMX / tensor cores);
    inputs and outputs stay fp32, and outputs differ from fp32 at bf16 precision (~1e-2).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if example_input is not None:
        if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
            got = getattr(example_input, "dtype", type(example_input).__name__)
            raise ValueError(f"example_input must be a floating-point tensor, got {got}")
        if not bool(torch.isfinite(example_input).all()):
            # the backends are compared on its outputs, which NaN or Inf would make meaningless
            raise ValueError("example_input must be finite: it holds NaN or Inf")
    if compile is not None and compile not in (*COMPILERS, "auto"):
        raise ValueError(f"compile must be None, 'auto' or one of {COMPILERS}, got {compile!r}")
    if compile in ("jit", "onnxruntime") and example_input is None:
        raise ValueError(f"compile={compile!r} needs an example_input to trace, got None")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if compile == "onnxruntime" and dtype != torch.float32:
        raise ValueError(f"compile='onnxruntime' runs float32 only, got dtype={dtype}")
    if compile == "onnxruntime" and example_input.device.type != "cpu":
        where = example_input.device
        raise ValueError(f"compile='onnxruntime' runs on the CPU, got an example_input on {where}")
    if compile == "auto":
        example = example_input
        if example is None and hasattr(model, "example_inputs"):
            (example,) = model.example_inputs()
            weight = next(model.parameters(), None)
            if weight is not None:  # the model's own example, where the model is
                example = example.to(weight.device)
        if example is None or example.ndim != 4:  # the backends are built for image models
            compile = None
        else:
            best = choose_backend(model, example, fold_bn=fold_bn, dtype=dtype, remember=True)[1]
            if example_input is not None:
                return best
            eager = optimize_for_inference(model, fold_bn=fold_bn, compile=None, dtype=dtype)
            return ShapeDispatch(best, eager, tuple(example.shape))
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
    if channels_last or dtype != torch.float32:
        model = InputAdapter(model, channels_last=bool(channels_last), dtype=dtype).eval()

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


class ShapeDispatch(nn.Module):
    """``fast`` on inputs of ``shape`` (what it was built and checked for), ``general`` on
    any other: what ``optimize_for_inference(model)`` returns without an example input."""

    def __init__(self, fast: nn.Module, general: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.fast, self.general, self.shape = fast, general, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x) if tuple(x.shape) == self.shape else self.general(x)


def _backends(dtype: torch.dtype, device: torch.device | str = "cpu") -> list[str]:
    """The backends :func:`choose_backend` tries: ONNX Runtime's session here is a CPU one, so
    it runs only for float32 inputs on the CPU."""
    names = ["eager", "jit"]
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        try:
            import onnxruntime  # noqa: F401

            names.append("onnxruntime")
        except ImportError:
            pass
    return names


def _build(name: str, model, example_input, fold_bn: bool, dtype, channels_last=None):
    compile = None if name == "eager" else name
    return optimize_for_inference(
        model, example_input, fold_bn=fold_bn, dtype=dtype, compile=compile,
        channels_last=channels_last,
    )  # fmt: skip


def _tf32(device: torch.device) -> bool:
    """Whether float32 convolutions or matrix products on ``device`` may round to TF32."""
    if device.type != "cuda":
        return False
    return torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32


def _choice_file(model, example_input, fold_bn: bool, dtype):
    from archopt.io import fingerprint, writable_cache_dir

    folder = writable_cache_dir("optimize")
    if folder is None:
        return None
    device = example_input.device
    names = _backends(dtype, device)
    extra = [torch.cuda.get_device_name(device), _tf32(device)] if device.type == "cuda" else []
    key = fingerprint(model, tuple(example_input.shape), str(dtype), fold_bn, names, *extra)
    return folder / f"{type(model).__name__.lower()}-{key}.json"


def choose_backend(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    fold_bn: bool = True,
    dtype: torch.dtype = torch.float32,
    repeats: int = 15,
    remember: bool = False,
) -> tuple[str, nn.Module, dict[str, float]]:
    """Build every quick-to-build backend, check it against ``model``, time it on
    ``example_input``, and return ``(name, module, median ms by name)`` of the fastest.

    A backend whose outputs differ from the model's by more than the dtype allows (1e-4
    relative in fp32, 3e-2 in bf16/fp16) is rejected, never chosen. ``remember``: keep the
    choice in archopt's cache folder and, when one is there, build and check only that
    backend (its times are the ones measured when it was chosen).
    """
    import json

    from archopt.io import atomic_write_text

    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if dtype == torch.float32 and _tf32(example_input.device):
        tolerance = 5e-3  # TF32 products (10-bit mantissa) on a GPU that allows them
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(example_input)
    model.train(was_training)
    scale = expected.abs().max().item() or 1.0

    def checked(candidate: nn.Module) -> bool:
        with torch.no_grad():
            err = (candidate(example_input) - expected).abs().max().item() / scale
        return err <= tolerance

    record = _choice_file(model, example_input, fold_bn, dtype) if remember else None
    if record is not None and record.exists():
        try:
            saved = json.loads(record.read_text())
            name, times = saved["backend"], {k: float(v) for k, v in saved["times_ms"].items()}
            if name in _backends(dtype, example_input.device):
                layout = bool(saved.get("channels_last")) if name == "eager" else None
                candidate = _build(name, model, example_input, fold_bn, dtype, layout)
                if checked(candidate):
                    return name, candidate, times
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable or stale: measure again and rewrite it
    candidates = {
        n: _build(n, model, example_input, fold_bn, dtype)
        for n in _backends(dtype, example_input.device)
    }
    times: dict[str, float] = {}
    for name, candidate in candidates.items():
        if checked(candidate):
            times[name] = measure_latency(
                candidate, example_input, warmup=3, repeats=repeats
            ).median_ms
    if not times:
        raise RuntimeError("no backend reproduced the model's outputs within tolerance")
    best = min(times, key=times.__getitem__)
    if record is not None:
        summary = f"{type(model).__name__} {tuple(example_input.shape)} {dtype}: {best}"
        layout = isinstance(candidates[best], InputAdapter) and candidates[best].channels_last
        body = {"backend": best, "times_ms": times, "channels_last": layout, "summary": summary}
        with contextlib.suppress(OSError):
            atomic_write_text(record, json.dumps(body, indent=1))
    return best, candidates[best], times
