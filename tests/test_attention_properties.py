"""Property tests (hypothesis) of local attention: every CPU backend against the reference on
random shapes, windows, dilations (one per head, up to far past the length), global tokens,
key padding (fully padded rows included), causality, scales and dtypes; and the rule for NaN
and Inf, with non-finite values planted in masked keys (outputs must equal the clean run's)
and anywhere (exactly the rows that attend one are NaN).

The default run tries ``EXAMPLES`` cases per test (derandomized: the same ones every run; an
eighth of that for FlexAttention, half for gradients), about 20-25 s on one core; ``--runslow``
adds the same tests with ``SLOW_EXAMPLES`` random cases, and the environment variable
ARCHOPT_FUZZ_EXAMPLES sets the count of the default run.
"""

from __future__ import annotations

import os

import pytest
import torch

from archopt.measure import num_threads

from .attention_cases import NONFINITE, assert_matches, attended, nan_rows, run

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("ARCHOPT_FUZZ_EXAMPLES", "80"))
SLOW_EXAMPLES = 1000
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
HUGE = (10**9, 2**62, 10**30)  # far past any length; 10**30 does not fit in an int64


def bounded(n: int, slow: bool = False):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=not slow,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with num_threads(1):
        yield


@st.composite
def cases(draw, padded=False):
    """(q, k, v, kwargs): the arguments of one ``local_attention`` call (``padded``: with a
    key padding mask)."""
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    n = draw(st.one_of(st.integers(1, 8), st.integers(9, 90), st.integers(9, 90)))  # 0: elsewhere
    d, dv = draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 5, 8]))
    # windows and dilations: mostly well inside the length, some past it, some far past it
    inside = st.integers(1, max(1, n // 3))
    size = st.one_of(inside, inside, st.integers(1, 100), st.sampled_from(HUGE))
    dilation = draw(st.one_of(size, st.lists(size, min_size=h, max_size=h)))
    kwargs = dict(window=draw(size), dilation=dilation, causal=draw(st.booleans()))
    kwargs["scale"] = draw(st.one_of(st.none(), st.floats(0.01, 3.0)))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q, k = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=gen).to(dtype)
    p_glob = draw(st.sampled_from([None, 0.0, 0.05, 0.3, 1.0]))
    if p_glob is not None:
        kwargs["global_mask"] = torch.rand(b, n, generator=gen) < p_glob
    p_pad = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0] if padded else [None, 0.1, 0.5, 0.9, 1.0]))
    if p_pad is not None:
        pad = torch.rand(b, n, generator=gen) < p_pad
        if draw(st.booleans()):
            pad[draw(st.integers(0, b - 1))] = True  # one batch row with nothing to attend
        kwargs["key_padding_mask"] = pad
    return q, k, v, kwargs


def check_backends(case, names):
    q, k, v, kwargs = case
    empty = ~attended(q, **kwargs).any(-1)  # (B, H, N): rows with no key
    for name in names:
        out = run(name, q, k, v, **kwargs)
        assert torch.isfinite(out).all(), name
        assert (out[empty] == 0).all(), name
        assert_matches(out, q, k, v, name, **kwargs)


@st.composite
def hostile_cases(draw, padded=False):
    """A case, its inputs with a non-finite value planted, and whether only masked keys got
    one: with ``padded``, always k and v entries of padded keys; else anywhere in q, k or v
    (sparsely, at least one entry) or, half the time when there is padding, padded keys."""
    q, k, v, kwargs = draw(cases(padded=padded))
    value = draw(st.sampled_from(NONFINITE))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pad = kwargs.get("key_padding_mask")
    only_padded = padded or (pad is not None and draw(st.booleans()))
    forced = draw(st.sampled_from("qkv"))
    planted = []
    for name, x in zip("qkv", (q, k, v)):
        if only_padded:  # k and v of padded keys: about half of their entries
            hit = name != "q"
            where = hit & pad[:, None, :, None] & (torch.rand(x.shape, generator=gen) < 0.5)
        else:  # anywhere, sparsely
            where = torch.rand(x.shape, generator=gen) < draw(st.sampled_from([0.0, 0.01, 0.1]))
            if name == forced and x.numel():
                where.view(-1)[torch.randint(x.numel(), (1,), generator=gen)] = True
        planted.append(x.masked_fill(where, value))
    return (q, k, v), planted, kwargs, only_padded


def check_hostile(case, names):
    (q, k, v), (hq, hk, hv), kwargs, only_padded = case
    rows = nan_rows(hq, hk, hv, attended(q, **kwargs))
    if only_padded:
        assert not rows.any()  # no attended entry changed
    for name in names:
        out = run(name, hq, hk, hv, **kwargs)
        assert out[rows].isnan().all(), name
        assert torch.isfinite(out[~rows]).all(), name
        # the other rows are the clean run's (which the tests above hold to the reference)
        clean = run(name, q, k, v, **kwargs)
        torch.testing.assert_close(out[~rows], clean[~rows], rtol=0, atol=0, msg=name)


def check_grads(case, names):
    """NaN and Inf in padded keys: the gradients are the clean run's (zero on those keys)."""
    (q, k, v), planted, kwargs, only_padded = case
    assert only_padded
    for name in names:
        grads = []
        for inputs in ((q, k, v), planted):
            leaves = [x.detach().requires_grad_() for x in inputs]
            out = run(name, *leaves, **kwargs)
            weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
            grads.append(torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True))
        for g_clean, g in zip(*grads):
            assert g is not None and torch.isfinite(g).all(), name
            torch.testing.assert_close(g, g_clean, rtol=0, atol=0, msg=name)


def property_test(check, strategy, names, examples, slow=False):
    """A hypothesis test running ``check(case, names)`` on ``examples`` cases; marked slow
    (and random rather than derandomized) when ``slow``."""

    @bounded(examples, slow)
    @given(strategy)
    def test(case):
        check(case, names)

    return pytest.mark.slow(test) if slow else test


OURS = ("blocked", "blocked-band", "auto")  # the dispatcher's CPU paths
# FlexAttention's eager path costs about 0.3 s a call on a new shape (ours: a few ms): it
# gets an eighth of the cases
FLEX_SHARE = 8

test_backends_match_reference = property_test(check_backends, cases(), OURS, EXAMPLES)
test_flex_matches_reference = property_test(
    check_backends, cases(), ("flex",), max(1, EXAMPLES // FLEX_SHARE)
)
test_nonfinite_reaches_exactly_the_rows_that_attend_it = property_test(
    check_hostile, hostile_cases(), ("reference", *OURS), EXAMPLES
)
test_flex_nonfinite_reaches_exactly_the_rows_that_attend_it = property_test(
    check_hostile, hostile_cases(), ("flex",), max(1, EXAMPLES // FLEX_SHARE)
)
# (FlexAttention has no backward pass on the CPU)
test_nonfinite_in_padded_keys_leaves_gradients_alone = property_test(
    check_grads, hostile_cases(padded=True), ("reference", *OURS), max(1, EXAMPLES // 2)
)

test_backends_match_reference_many = property_test(
    check_backends, cases(), OURS, SLOW_EXAMPLES, slow=True
)
test_flex_matches_reference_many = property_test(
    check_backends, cases(), ("flex",), SLOW_EXAMPLES // FLEX_SHARE, slow=True
)
test_nonfinite_reaches_exactly_the_rows_that_attend_it_many = property_test(
    check_hostile, hostile_cases(), ("reference", *OURS), SLOW_EXAMPLES, slow=True
)
test_flex_nonfinite_reaches_exactly_the_rows_that_attend_it_many = property_test(
    check_hostile, hostile_cases(), ("flex",), SLOW_EXAMPLES // FLEX_SHARE, slow=True
)
test_nonfinite_in_padded_keys_leaves_gradients_alone_many = property_test(
    check_grads,
    hostile_cases(padded=True),
    ("reference", *OURS),
    SLOW_EXAMPLES // 2,
    slow=True,
)
