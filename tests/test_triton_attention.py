"""The ``"triton"`` local-attention backend against the dense reference.

Three kinds of checks:

- Interpreter (CPU). Triton reads TRITON_INTERPRET when it is first imported (it decorates its
  own ``tl.max``/``tl.sum`` then), so the kernel tests (``interp``) run only in a process
  started with TRITON_INTERPRET=1. In a normal run they are skipped, and ``test_interpreter``
  (a fast subset) and ``test_interpreter_slow`` (everything, ``--runslow``) rerun this file in
  such a child process. To run them directly, with per-test output:
  ``TRITON_INTERPRET=1 pytest tests/test_triton_attention.py [--runslow]``.
- Compilation for sm_90 (CPU, no GPU needed): every kernel, with the GPU tile sizes, through
  the real Triton compiler and ptxas; shared memory within an H100/H200's limit.
- GPU (``@pytest.mark.gpu``): realistic shapes, bf16, against the reference in fp32.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import archopt.ops.attention as attention
from archopt.ops.attention import local_attention, triton_band, triton_kernels

from .attention_cases import NONFINITE, attended, nan_rows
from .test_local_attention import padding_mask as _padding_mask

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = triton_band.interpreting()
interp = pytest.mark.skipif(
    not INTERPRETING, reason="needs TRITON_INTERPRET=1 at import; run by test_interpreter*"
)
not_interp = pytest.mark.skipif(INTERPRETING, reason="runs in the parent process")


def make_qkv(b, h, n, d, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, h, n, d, dtype=dtype, device=device) for _ in range(3)]


def globals_mask(n, counts, device="cpu"):
    """Row i gets counts[i] global tokens at random positions."""
    mask = torch.zeros(len(counts), n, dtype=torch.bool)
    for i, count in enumerate(counts):
        mask[i, torch.randperm(n)[: min(count, n)]] = True
    return mask.to(device)


def padding_mask(b, n, kind, device="cpu"):
    return _padding_mask(b, n, kind).to(device)


def compare(q, k, v, atol, grad_atol=None, ref_dtype=None, **kwargs):
    """Forward (and backward when ``grad_atol``) of triton vs reference; returns the output.

    ``ref_dtype``: run the reference on inputs upcast to it (for half-precision inputs)."""
    inputs = [x.detach().requires_grad_(grad_atol is not None) for x in (q, k, v)]
    cast = [
        x.detach().to(ref_dtype or x.dtype).requires_grad_(grad_atol is not None) for x in (q, k, v)
    ]
    out = local_attention(*inputs, backend="triton", **kwargs)
    ref = local_attention(*cast, backend="reference", **kwargs)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.to(ref.dtype), ref, rtol=0, atol=atol)
    if grad_atol is not None:
        dout = torch.randn_like(ref)
        grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
        ref_grads = torch.autograd.grad(ref, cast, dout)
        for name, g, r in zip("qkv", grads, ref_grads):
            assert torch.isfinite(g).all(), name
            torch.testing.assert_close(g.to(r.dtype), r, rtol=0, atol=grad_atol, msg=name)
    return out


# --- interpreter: fast subset ----------------------------------------------------------------

FAST = [
    # (n, window, dilation, causal)
    (1, 3, 1, False),
    (7, 1, 2, True),
    (37, 3, [1, 2, 3], False),
    (70, 100, 1, True),
    (70, 3, 3, False),
]


@interp
@pytest.mark.parametrize("n,window,dilation,causal", FAST, ids=str)
def test_band_matches_reference(n, window, dilation, causal):
    q, k, v = make_qkv(2, 3, n, 16)
    compare(q, k, v, 1e-5, 1e-5, window=window, dilation=dilation, causal=causal)


@interp
def test_globals_and_padding_causal():
    n = 70
    q, k, v = make_qkv(3, 3, n, 16)
    glob = globals_mask(n, [0, 1, 5])
    pad = padding_mask(3, n, "random")
    pad[1, glob[1]] = True  # a padded global token: a global query, but never a key
    kwargs = dict(window=4, dilation=[1, 2, 3], causal=True)
    compare(q, k, v, 1e-5, 1e-5, global_mask=glob, key_padding_mask=pad, **kwargs)


@interp
def test_empty_rows_give_zeros_and_zero_grads():
    b, h, n = 2, 3, 37
    q, k, v = make_qkv(b, h, n, 16)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[0] = True  # batch row 0: every key is padding
    pad[1, 10:30] = True  # row 1: queries around 20 see no key in their window
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[0, 3] = True  # a global query with no valid key either
    kwargs = dict(window=2, global_mask=glob, key_padding_mask=pad)
    out = compare(q, k, v, 1e-5, 1e-5, **kwargs)
    assert (out[0] == 0).all() and (out[1, :, 18:22] == 0).all()
    inputs = [x.requires_grad_() for x in (q, k, v)]
    local_attention(*inputs, backend="triton", **kwargs)[0].sum().backward()
    assert all(x.grad is not None and (x.grad[0] == 0).all() for x in inputs)


@interp
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_forward(dtype, atol):
    q, k, v = make_qkv(2, 3, 70, 32, dtype=dtype)
    glob = globals_mask(70, [2, 0])
    kwargs = dict(window=5, dilation=[1, 2, 1], global_mask=glob)
    compare(q, k, v, atol, ref_dtype=torch.float32, **kwargs)


@interp
def test_masked_nonfinite_never_reach_outputs():
    """NaN and Inf in padded keys' k and v and in an unpadded key (attended by its neighbours
    only): the rows that attend it are NaN, the others are the clean run's, exactly
    (tests/test_attention_hostile.py holds the CPU backends to the same rule)."""
    n = 37
    q, k, v = make_qkv(2, 3, n, 16)
    pad = padding_mask(2, n, "internal")
    pad[:, 0] = False
    kwargs = dict(window=3, dilation=[1, 2, 3], global_mask=globals_mask(n, [1, 2]))
    kwargs["key_padding_mask"] = pad
    clean = local_attention(q, k, v, backend="triton", **kwargs)
    for value in NONFINITE:
        hk, hv = (x.masked_fill(pad[:, None, :, None], value) for x in (k, v))
        hk[:, :, 0, 0] = value
        rows = nan_rows(q, hk, hv, attended(q, **kwargs))
        out = local_attention(q, hk, hv, backend="triton", **kwargs)
        assert rows.any() and not rows.all()
        assert out[rows].isnan().all()
        torch.testing.assert_close(out[~rows], clean[~rows], rtol=0, atol=0)


# --- interpreter: everything (slow) ----------------------------------------------------------


@interp
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [1, 2, 3, [1, 2, 3]], ids=str)
@pytest.mark.parametrize("window", [1, 3, 100])
@pytest.mark.parametrize("n", [1, 7, 37, 70])
def test_band_matches_reference_all(n, window, dilation, causal):
    q, k, v = make_qkv(2, 3, n, 16)
    compare(q, k, v, 1e-5, 1e-5, window=window, dilation=dilation, causal=causal)


@interp
@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [None, "leading", "trailing", "internal", "random"])
@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 0, 3], [6, 2, 37]], ids=str)
@pytest.mark.parametrize("n,window,dilation", [(37, 3, [1, 2, 3]), (70, 20, 2)], ids=str)
def test_globals_and_padding_all(n, window, dilation, counts, pad, causal):
    q, k, v = make_qkv(3, 3, n, 16)
    kwargs = dict(window=window, dilation=dilation, causal=causal)
    kwargs["global_mask"] = globals_mask(n, counts)
    kwargs["key_padding_mask"] = None if pad is None else padding_mask(3, n, pad)
    compare(q, k, v, 1e-5, 1e-5, **kwargs)


@interp
@pytest.mark.slow
def test_global_key_inside_window_counted_once():
    q, k, v = make_qkv(1, 3, 37, 16)
    glob = torch.zeros(1, 37, dtype=torch.bool)
    glob[0, [17, 18, 20]] = True  # inside the window of query 18
    compare(q, k, v, 1e-5, 1e-5, window=3, dilation=[1, 2, 3], global_mask=glob)


@interp
@pytest.mark.slow
@pytest.mark.parametrize("d", [32, 64])
def test_head_dims_scale_and_strided_inputs(d):
    q, k, v = (x.transpose(1, 2) for x in make_qkv(2, 37, 3, d))  # (B, H, N, d) views
    assert not q.is_contiguous()
    compare(q, k, v, 1e-5, 1e-5, window=5, dilation=2, scale=0.3, causal=True)


@interp
@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,atol,grad_atol", [(torch.float16, 2e-3, 5e-3), (torch.bfloat16, 2e-2, 4e-2)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision(dtype, atol, grad_atol, causal):
    n = 70
    q, k, v = make_qkv(2, 3, n, 16, dtype=dtype)
    kwargs = dict(window=6, dilation=[3, 1, 2], causal=causal)
    kwargs["global_mask"] = globals_mask(n, [3, 1])
    kwargs["key_padding_mask"] = padding_mask(2, n, "internal")
    compare(q, k, v, atol, grad_atol, ref_dtype=torch.float32, **kwargs)


@interp
@pytest.mark.slow
def test_grads_accumulate_over_steps():
    """Training step: grads of a loss through the op accumulate like any autograd op."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 3, 37, 16))
    glob = globals_mask(37, [2])
    for _ in range(2):
        local_attention(
            q, k, v, window=3, global_mask=glob, backend="triton"
        ).square().sum().backward()
    q2, k2, v2 = (x.detach().requires_grad_() for x in (q, k, v))
    local_attention(
        q2, k2, v2, window=3, global_mask=glob, backend="reference"
    ).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, 2 * b.grad, rtol=0, atol=1e-5)


# --- the parent process: dispatch, errors, child runs ------------------------------------------


def _child(*args: str, timeout: int) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "needs TRITON_INTERPRET" not in proc.stdout


@not_interp
def test_interpreter():
    """The unmarked interpreter tests, in a TRITON_INTERPRET=1 child process."""
    _child("-m", "not gpu and not slow", "-k", "not interpreter", timeout=600)


@not_interp
@pytest.mark.slow
def test_interpreter_slow():
    _child("--runslow", "-m", "slow and not gpu", "-k", "not interpreter", timeout=3600)


@not_interp
def test_cpu_without_interpreter_is_a_clear_error():
    q, k, v = make_qkv(1, 2, 16, 16)
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors, got device cpu"):
        local_attention(q, k, v, window=2, backend="triton")


def test_unsupported_shapes_are_clear_errors():
    q, k, v = make_qkv(1, 2, 16, 24)
    with pytest.raises(ValueError, match=r"head dims \(16, 32, 64, 128\), got 24"):
        local_attention(q, k, v, window=2, backend="triton")
    q, k, v = make_qkv(1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"needs dv == d = 16, got dv = 32"):
        local_attention(q, k, torch.randn(1, 2, 16, 32), window=2, backend="triton")
    with pytest.raises(ValueError, match=r"got torch\.float64"):
        local_attention(q.double(), k.double(), v.double(), window=2, backend="triton")


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(attention, "_triton_module", lambda: None)
    q, k, v = make_qkv(1, 2, 16, 16)
    with pytest.raises(ValueError, match="backend 'triton' needs the triton package"):
        local_attention(q, k, v, window=2, backend="triton")
    local_attention(q, k, v, window=2)  # auto still works


def test_auto_on_cpu_is_blocked(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_band, "local_attention_triton", lambda *a, **k: calls.append(1))
    q, k, v = make_qkv(1, 2, 16, 16)
    local_attention(q, k, v, window=2)
    assert calls == []
    assert "triton" in attention.BACKENDS


@not_interp
@pytest.mark.slow
def test_gpu_benchmark_dry_run():
    """``archopt bench attention-gpu`` end to end on a tiny shape (CPU, interpreter)."""
    cmd = [sys.executable, "-m", "archopt.bench.attention_gpu", "--dry-run"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| N | w | dil | glob | pass | ours ms")
    assert len(table) == 1 + 8  # header + 2 dilations x 2 global counts x (fwd, fwd+bwd)
    assert all(row.split("|")[6].strip() != "-" for row in table[1:])  # ours timed everywhere


# --- compilation for sm_90 without a GPU -------------------------------------------------------

POINTERS = {"Q", "K", "V", "DO", "OUT", "DQ", "DK", "DV", "LSE", "DELTA", "FLAGS"}
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_sm90(kernel, dtype, head_dim, tiles, gather, **flags):
    """Compile one specialisation with the real compiler (ptxas included) for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, warps, stages = tiles
    const = dict(
        GATHER=gather, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, **flags,
        PREC="ieee" if dtype == torch.float32 else "tf32",
    )  # fmt: skip
    partial = {"OUT", "LSE", "DQ", "DK", "DV"} if gather else {"LSE"}
    sig = {}
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = "*fp32" if name in partial | {"DELTA"} else f"*{TRITON_DTYPES[dtype]}"
            sig[name] = "*i8" if name == "FLAGS" else sig[name]
        elif name.isupper() and name not in ("H", "N"):
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if "scale" in name else "i32"
    # what the launcher specialises at run time: 16-byte aligned pointers
    attrs = {
        (kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig if sig[n][0] == "*"
    }
    src = ASTSource(kernel, sig, constexprs=const, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _compile_cases(dtype, head_dim, n_global=16):
    """Every kernel specialisation the launcher uses, with its tiles (gather mode: the tile
    for ``n_global`` listed rows)."""
    tiles = triton_band.choose_tiles(head_dim, dtype)
    kernels = (
        (triton_kernels.fwd_kernel, tiles.fwd, 0, "HAS_GKEYS"),
        (triton_kernels.dq_kernel, tiles.dq, 0, "HAS_GKEYS"),
        (triton_kernels.dkdv_kernel, tiles.dkdv, 1, "HAS_GROWS"),
    )
    for kernel, config, owned, extra in kernels:
        for gather in (False, True):
            for causal in (False, True):
                config_ = list(config)
                if gather:
                    config_[owned] = triton_band._gather_tile(config[owned], n_global)
                    config_[2] = triton_band._warps(config_[owned], config[2])
                flags = dict(HAS_FLAGS=True, CAUSAL=causal, **{extra: not gather})
                yield kernel, tuple(config_), gather, flags
    plain = dict(HAS_FLAGS=False, HAS_GKEYS=False, CAUSAL=False)
    yield triton_kernels.fwd_kernel, tiles.fwd, False, plain


@not_interp
@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,head_dim",
    [(torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 16), (torch.float32, 32)],
    ids=str,
)
def test_kernels_compile_for_sm90(dtype, head_dim):
    for kernel, tiles, gather, flags in _compile_cases(dtype, head_dim):
        compiled = compile_sm90(kernel, dtype, head_dim, tiles, gather, **flags)
        assert "cubin" in compiled.asm
        assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, compiled.metadata.shared)


# --- GPU ---------------------------------------------------------------------------------------


def _gpu_case(n=4096, h=4, d=64, dilation=(1, 4, 1, 4), n_global=16, pad=True, seed=0):
    torch.manual_seed(seed)
    dev = "cuda"
    q, k, v = make_qkv(2, h, n, d, dtype=torch.bfloat16, device=dev)
    glob = torch.zeros(2, n, dtype=torch.bool, device=dev)
    glob[0, torch.randperm(n, device=dev)[:n_global]] = True
    glob[1, torch.randperm(n, device=dev)[: n_global // 2]] = True
    kpm = None
    if pad:
        kpm = torch.zeros(2, n, dtype=torch.bool, device=dev)
        kpm[1, n - n // 5 :] = True
        kpm[0, 100:300] = True
    return q, k, v, dict(dilation=list(dilation), global_mask=glob, key_padding_mask=kpm)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [(1, 1, 1, 1), (4, 4, 4, 4), (1, 4, 1, 4)], ids=str)
def test_gpu_realistic_bf16(dilation, causal):
    q, k, v, kwargs = _gpu_case(dilation=dilation)
    kwargs.update(window=256, causal=causal)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    out = local_attention(*inputs, **kwargs)  # auto: triton on CUDA
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = local_attention(*ref_in, backend="reference", **kwargs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, dout.bfloat16())
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert _rel(g, r) < 2e-2, (name, _rel(g, r))


@pytest.mark.gpu
def test_gpu_auto_selects_triton(monkeypatch):
    calls = []
    real = triton_band.local_attention_triton
    monkeypatch.setattr(
        triton_band, "local_attention_triton", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    q, k, v = make_qkv(1, 2, 256, 64, dtype=torch.bfloat16, device="cuda")
    local_attention(q, k, v, window=16)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,d,tol",
    [(torch.float32, 64, 2e-5), (torch.float16, 128, 5e-3)],
)
def test_gpu_dtypes_and_head_dims(dtype, d, tol):
    q, k, v, kwargs = _gpu_case(n=1000, d=d, n_global=5)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    compare(q, k, v, tol, 4 * tol, ref_dtype=torch.float32, window=37, causal=True, **kwargs)


@pytest.mark.gpu
def test_gpu_empty_rows_and_long_sequence():
    n = 20000  # several chunks for the rows and columns of global tokens
    q, k, v, kwargs = _gpu_case(n=n, h=2, dilation=(1, 3), n_global=16, pad=False)
    kpm = torch.zeros(2, n, dtype=torch.bool, device="cuda")
    kpm[0] = True  # a row with no key at all
    kpm[1, 5000:6000] = True
    kwargs.update(window=64, key_padding_mask=kpm)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    out = local_attention(*inputs, backend="triton", **kwargs)
    out.float().sum().backward()
    assert (out[0] == 0).all() and all((x.grad[0] == 0).all() for x in inputs)
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    blocked = local_attention(q.float(), k.float(), v.float(), backend="blocked", **kwargs)
    torch.testing.assert_close(out.float(), blocked, rtol=0, atol=2e-2)
