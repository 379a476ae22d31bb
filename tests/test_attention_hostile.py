"""Hostile inputs to ``local_attention``, case by case, on every CPU backend: NaN and Inf in
masked keys (padding, outside the window or the dilation pattern, in the future of a causal
query, a padded global token), huge finite values in padded keys, and NaN and Inf in attended
inputs; windows and dilations far past the
length (these hung the blocked backend); degenerate sizes; and bad arguments, each refused at
the door with an ``ArchoptError`` naming it, what was expected and what was received."""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest
import torch

from archopt.errors import ArchoptError
from archopt.measure import num_threads
from archopt.ops.attention import local_attention

from .attention_cases import CPU_BACKENDS, NONFINITE, assert_matches, attended, nan_rows, run

B, H, N, D = 2, 3, 40, 8
DILATIONS = [1, 2, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with num_threads(1):
        yield


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail, rather than hang, when the body runs longer than ``seconds``."""

    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def qkv(b=B, h=H, n=N, d=D, dv=D):
    return torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, dv)


def masked_case(kind: str):
    """(kwargs, where: (B, H, N) bool, the keys to plant a value in), all of them masked for
    some queries; for the padding kinds, masked for every query."""
    pad = torch.zeros(B, N, dtype=torch.bool)
    where = torch.zeros(B, H, N, dtype=torch.bool)
    kwargs = dict(window=3, dilation=DILATIONS)
    if kind == "padded-trailing":
        pad[:, N - N // 3 :] = True
    elif kind == "padded-random":
        pad = torch.rand(B, N) < 0.3
    elif kind == "padded-row":  # batch row 1 has no key at all
        pad[1] = True
        pad[0, 10:14] = True
    elif kind == "padded-global":  # padded global tokens: global queries, never keys
        glob = torch.zeros(B, N, dtype=torch.bool)
        glob[:, [5, 30]] = True
        pad[:, [5, 30, 31]] = True
        kwargs["global_mask"] = glob
    elif kind == "outside-window":  # key 0: attended by queries 0 .. 3*dilation only
        where[:, :, 0] = True
    elif kind == "other-residue":  # key 20: seen by queries 20 +- dilation*m only
        where[:, :, 20] = True
    elif kind == "future":  # causal: key 35 is seen by queries 35 .. 35 + 3*dilation only
        where[:, :, 35] = True
        kwargs["causal"] = True
    if pad.any():
        kwargs["key_padding_mask"] = pad
        where = pad[:, None, :].expand(B, H, N)
    return kwargs, where


MASKED_KINDS = [
    "padded-trailing",
    "padded-random",
    "padded-row",
    "padded-global",
    "outside-window",
    "other-residue",
    "future",
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", MASKED_KINDS)
@pytest.mark.parametrize("target", ["k", "v", "kv"])
@pytest.mark.parametrize("value", NONFINITE, ids=str)
def test_masked_nonfinite_never_reaches_an_output(value, target, kind, backend):
    """Rows that do not attend the planted keys equal the clean run exactly; rows that do
    (only for the kinds that mask a key for some queries) are NaN; padded keys reach none."""
    q, k, v = qkv()
    kwargs, where = masked_case(kind)
    hk = k.masked_fill(where[..., None], value) if "k" in target else k
    hv = v.masked_fill(where[..., None], value) if "v" in target else v
    rows = nan_rows(q, hk, hv, attended(q, **kwargs))
    out, clean = run(backend, q, hk, hv, **kwargs), run(backend, q, k, v, **kwargs)
    if kind.startswith("padded"):
        assert not rows.any() and torch.isfinite(out).all()
    else:
        assert rows.any() and not rows.all()  # some queries see the key, some do not
    assert out[rows].isnan().all()
    torch.testing.assert_close(out[~rows], clean[~rows], rtol=0, atol=0)
    assert_matches(clean, q, k, v, backend, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", [kind for kind in MASKED_KINDS if kind.startswith("padded")])
@pytest.mark.parametrize("value", [1e35, -1e35, 3e38], ids=str)
def test_huge_finite_padded_keys_never_reach_an_output(value, kind, backend):
    """Finite but huge k and v in padded keys (the blocked backend's additive mask let a score
    of 1e35 through): the output is the clean run's, exactly."""
    q, k, v = qkv()
    kwargs, where = masked_case(kind)
    hk, hv = (x.masked_fill(where[..., None], value) for x in (k, v))
    out, clean = run(backend, q, hk, hv, **kwargs), run(backend, q, k, v, **kwargs)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", ["q", "k", "v"])
@pytest.mark.parametrize("value", NONFINITE, ids=str)
def test_nonfinite_attended_inputs_give_nan_rows(value, target, backend):
    """One entry of position 12 (of every head) is planted, with global tokens, padding and
    causality present: exactly the rows the documented rule names are NaN (a -inf key, which
    plain softmax would quietly weigh 0, included); a query with no key stays zeros."""
    q, k, v = qkv()
    glob = torch.zeros(B, N, dtype=torch.bool)
    glob[0, 3] = True
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1] = True  # row 1: nothing to attend, so its NaN query gives zeros
    kwargs = dict(window=3, dilation=DILATIONS, global_mask=glob, key_padding_mask=pad)
    kwargs["causal"] = True
    planted = {"q": q, "k": k, "v": v}
    planted[target] = planted[target].clone()
    planted[target][:, :, 12, 0] = value
    mask = attended(q, **kwargs)
    rows = nan_rows(*planted.values(), mask)
    out = run(backend, *planted.values(), **kwargs)
    assert rows[0].any() and not rows[1].any()
    assert out[rows].isnan().all() and (out[1] == 0).all()
    clean = run(backend, q, k, v, **kwargs)
    torch.testing.assert_close(out[~rows], clean[~rows], rtol=0, atol=0)


HUGE_SIZES = [
    # (window, dilation): each far past the length somewhere, or exactly at it
    (3, N),
    (3, N + 1),
    (3, 10**9),
    (3, 2**62),
    (3, 10**30),  # does not fit in an int64
    (10**9, 1),
    (10**30, 2),
    (2**62, 2**62),
    (2, [1, 10**9, 10**30]),
    (10**18, [N - 1, N, 7]),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window,dilation", HUGE_SIZES, ids=str)
def test_huge_window_and_dilation_return_promptly(window, dilation, backend):
    """Each call within a few seconds (the blocked backend looped over every residue class:
    dilation 10**9 on 40 tokens did not return), and the pattern is the one cut to N."""
    q, k, v = qkv()
    pad = torch.rand(B, N) < 0.2
    for causal in (False, True):
        kwargs = dict(window=window, dilation=dilation, key_padding_mask=pad, causal=causal)
        with deadline(30):
            out = run(backend, q, k, v, **kwargs)
        assert_matches(out, q, k, v, backend, **kwargs)
        cut = dict(kwargs, window=min(window, N))
        cut["dilation"] = [
            min(d, N) for d in (dilation if isinstance(dilation, list) else [dilation] * H)
        ]
        torch.testing.assert_close(out, run(backend, q, k, v, **cut), rtol=0, atol=0)
    # dilation >= N: a query sees itself only among its dilated neighbours
    if not isinstance(dilation, list) and dilation >= N:
        out = run(backend, q, k, v, window=window, dilation=dilation)
        torch.testing.assert_close(out, v, rtol=0, atol=1e-6)


def degenerate_cases():
    """(name, (q, k, v), kwargs): lengths 0, 1 and 2, no batch row, no head, no value
    channel, every token global, every key padded, both."""

    def every(b=B, n=N):
        return torch.ones(b, n, dtype=torch.bool)

    return [
        ("n0", qkv(n=0), dict(window=3)),
        ("n1", qkv(n=1), dict(window=3, dilation=[1, 5, 10**9])),
        ("n1-causal-padded", qkv(n=1), dict(window=1, causal=True, key_padding_mask=every(n=1))),
        ("n2-global", qkv(n=2), dict(window=1, global_mask=every(n=2))),
        ("b0", qkv(b=0), dict(window=3, key_padding_mask=every(b=0))),
        ("h0", qkv(h=0), dict(window=3, dilation=[])),
        ("dv0", qkv(dv=0), dict(window=3)),
        ("all-global", qkv(), dict(window=2, global_mask=every(), causal=True)),
        ("all-padded", qkv(), dict(window=2, key_padding_mask=every())),
        ("all-global-padded", qkv(), dict(window=2, global_mask=every(), key_padding_mask=every())),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "name,inputs,kwargs", degenerate_cases(), ids=lambda x: x if isinstance(x, str) else None
)
def test_degenerate_sizes(name, inputs, kwargs, backend):
    q, k, v = inputs
    out = run(backend, q, k, v, **kwargs)
    assert out.shape == v.shape and torch.isfinite(out).all()
    if "padded" in name:
        assert (out == 0).all()
    if out.numel():
        assert_matches(out, q, k, v, backend, **kwargs)
    # the output stays on the graph: gradients of the right shape, also when empty
    if backend != "flex":  # no backward pass on the CPU
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        grads = torch.autograd.grad(run(backend, *leaves, **kwargs).sum(), leaves)
        assert [g.shape for g in grads] == [x.shape for x in (q, k, v)]


def _args(**overrides):
    q, k, v = qkv(b=2, h=4, n=16)
    return {**dict(q=q, k=k, v=v, window=2), **overrides}


BAD_ARGUMENTS = [
    # (arguments, the error's message), each naming the argument, expected and received
    (_args(window=True), "window must be an int, got True"),
    (_args(window=-3), "window must be >= 1, got -3"),
    (_args(window="3"), "window must be an int, got '3'"),
    (_args(window=None), "window must be an int, got None"),
    (_args(window=float("inf")), "window must be an int, got inf"),
    (_args(dilation=-(10**30)), r"dilation must be >= 1, got -1000000000000000000000000000000"),
    (_args(dilation=[1, 2, 3.0, 1]), "dilation must be an int, got 3.0"),
    (_args(dilation=[1, 2, False, 1]), "dilation must be an int, got False"),
    (_args(dilation="1234"), "dilation must be an int, got '1234'"),
    (_args(dilation=torch.tensor([1, 2, 3, 4])), r"dilation must be an int, got tensor\("),
    (_args(dilation=[]), r"dilation must have one entry per head \(4\), got 0 entries"),
    (_args(scale=float("nan")), "scale must be finite, got nan"),
    (_args(scale=-float("inf")), "scale must be finite, got -inf"),
    (_args(scale="0.1"), "scale must be a number or None, got '0.1'"),
    (_args(scale=True), "scale must be a number or None, got True"),
    (_args(causal=1), "causal must be a bool, got 1"),
    (_args(causal="yes"), "causal must be a bool, got 'yes'"),
    (_args(backend=None), r"backend must be one of \('auto', .*\), got None"),
    (_args(backend="Blocked"), r"backend must be one of \('auto', .*\), got 'Blocked'"),
    (_args(q=[[1.0]]), r"q must be a 4-D tensor \(B, H, N, d\), got 'list'"),
    (_args(v=torch.randn(2, 4, 16)), r"v must be a 4-D tensor \(B, H, N, d\), got \(2, 4, 16\)"),
    (
        _args(q=torch.randn(2, 4, 16, 0), k=torch.randn(2, 4, 16, 0)),
        r"q and k must be of head dim d >= 1 \(the last axis\), got \(2, 4, 16, 0\)",
    ),
    (
        _args(global_mask=torch.zeros(2, 16, dtype=torch.bool), key_padding_mask=[False] * 16),
        "key_padding_mask must be a bool tensor, got list",
    ),
    (
        _args(key_padding_mask=torch.zeros(16, 2, dtype=torch.bool)),
        r"key_padding_mask must have shape \(B, N\) = \(2, 16\), got \(16, 2\)",
    ),
]


@pytest.mark.parametrize("args,msg", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_at_the_door(args, msg):
    with pytest.raises(ArchoptError, match=msg):
        local_attention(**args)


def test_integers_of_any_kind_and_size_are_accepted():
    """numpy integers and Python ints past int64: the same as the values cut to the length."""
    q, k, v = qkv(b=2, h=4, n=16)
    kwargs = dict(scale=0.5, backend="blocked")
    ref = local_attention(q, k, v, window=16, dilation=[1, 2, 1, 16], **kwargs)
    for window, dilation in [
        (np.int64(10**6), [np.int32(1), 2, np.int64(1), 10**40]),
        (10**40, (1, np.int16(2), 1, 17)),
    ]:
        out = local_attention(q, k, v, window=window, dilation=dilation, **kwargs)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out = local_attention(q, k, v, window=16, dilation=[1, 2, 1, 16], scale=np.float32(0.5))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
