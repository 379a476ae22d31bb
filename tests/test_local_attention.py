import itertools
import math

import pytest
import torch

import archopt.ops.attention as attention
from archopt.measure import measure_peak_memory, num_threads
from archopt.ops.attention import band_mask, blocked, flex, local_attention
from archopt.ops.attention import reference as reference_module

SHAPES_N = [1, 7, 37, 130, 257]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes gain nothing from a second thread, and with one the file keeps its ~10 s
    when another process holds the other core (2 threads then spin-wait on each other)."""
    with num_threads(1):
        yield


DILATIONS = [1, 2, 3, [1, 2, 3, 1]]


def make_qkv(b=2, h=4, n=37, d=8, dv=None, dtype=torch.float32, requires_grad=False):
    dv = d if dv is None else dv
    q, k = torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h, n, d, dtype=dtype)
    v = torch.randn(b, h, n, dv, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def globals_mask(b, n, counts):
    """Row i gets counts[i] global tokens at random positions (0, 1 or several per row)."""
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, count in enumerate(counts):
        mask[i, torch.randperm(n)[: min(count, n)]] = True
    return mask


def padding_mask(b, n, kind):
    mask = torch.zeros(b, n, dtype=torch.bool)
    if kind == "trailing":
        mask[0, n - n // 3 :] = True
    elif kind == "leading":
        mask[-1, : n // 4 + 1] = True
    elif kind == "internal":
        mask[:, n // 3 : n // 3 + max(1, n // 5)] = True
        mask[0, -1:] = True
    elif kind == "random":
        mask = torch.rand(b, n) < 0.3
    return mask


@pytest.fixture(params=["default", "tiny", "band", "band-tiny", "no-spare"])
def chunk_bytes(request, monkeypatch):
    """Tiny chunks (one block, or one (batch, head) pair, each) make every chunk boundary fall
    inside a sequence, so the key bias, padded edge chunks and head-crossing runs are exercised
    block by block. "band": sequences shorter than a span take the band path too (by default
    they run as dense attention per residue class), so it sees these small shapes. "no-spare":
    a spare buffer of one block, so chunks take their scores from the unwritten rows of the
    output wherever those hold more, and are cut to what fits there."""
    if "tiny" in request.param:
        monkeypatch.setattr(blocked, "CHUNK_BYTES", 1)
        monkeypatch.setattr(blocked, "BACKWARD_CHUNK_BYTES", 1)
    if "no-spare" in request.param:
        monkeypatch.setattr(blocked, "SPARE_BYTES", 1)
    if "band" in request.param:
        monkeypatch.setattr(blocked, "SHORT_SEQUENCES", False)
    return request.param


def check(q, k, v, atol=1e-5, **kwargs):
    ref = local_attention(q, k, v, backend="reference", **kwargs)
    out = local_attention(q, k, v, backend="blocked", **kwargs)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    return out


# --- the oracle itself ---------------------------------------------------------------------


def test_band_mask_is_longformer_definition():
    m = band_mask(10, 2, 3)
    assert m[5].nonzero().flatten().tolist() == [2, 5, 8]  # 5 + 3*m, m in [-2, 2], in range
    assert band_mask(40, 4)[20].sum() == 2 * 4 + 1  # one-sided window: 2w + 1 keys
    assert band_mask(40, 4, 2, causal=True)[20].nonzero().flatten().tolist() == [12, 14, 16, 18, 20]


def test_reference_matches_per_query_loop():
    """The dense oracle against an explicit list of keys per query, written from the rules."""
    b, h, n, w, dils = 2, 2, 13, 2, [1, 3]
    q, k, v = make_qkv(b, h, n, 4, dtype=torch.float64)
    glob = globals_mask(b, n, [2, 0])
    pad = padding_mask(b, n, "internal")
    for causal in (False, True):
        out = local_attention(
            q, k, v, window=w, dilation=dils, global_mask=glob, key_padding_mask=pad,
            causal=causal, backend="reference",
        )  # fmt: skip
        for bi, hi, i in itertools.product(range(b), range(h), range(n)):
            d = dils[hi]
            keys = [
                j
                for j in range(n)
                if ((abs(i - j) <= w * d and (i - j) % d == 0) or glob[bi, i] or glob[bi, j])
                and not pad[bi, j]
                and (j <= i or not causal)
            ]
            if not keys:
                assert out[bi, hi, i].abs().max() == 0
                continue
            s = torch.stack([q[bi, hi, i] @ k[bi, hi, j] for j in keys]) / math.sqrt(4)
            expected = torch.softmax(s, 0) @ v[bi, hi, keys]
            torch.testing.assert_close(out[bi, hi, i], expected)


# --- blocked against the reference ---------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", DILATIONS, ids=str)
@pytest.mark.parametrize("window", [1, 3, 32])
@pytest.mark.parametrize("n", SHAPES_N)
def test_blocked_matches_reference(n, window, dilation, causal, chunk_bytes):
    q, k, v = make_qkv(2, 4, n, 8, dv=6)
    check(q, k, v, window=window, dilation=dilation, causal=causal)


@pytest.mark.parametrize(
    "n,window,dilation,counts,pad,causal",
    [
        (37, 3, 1, [0, 1, 5], "none", False),
        (130, 3, 2, [3, 0, 1], "trailing", False),
        (130, 32, [1, 2, 3, 1], [1, 4, 0], "internal", True),
        (257, 1, 3, [7, 2, 0], "leading", False),
        (257, 32, [1, 2, 3, 1], [0, 1, 12], "random", False),
        (257, 3, 1, [2, 9, 1], "internal", True),
        (7, 32, 2, [1, 7, 0], "trailing", False),
        (1, 1, 1, [1, 0, 1], "none", True),
        # N a multiple of dilation x block: (batch row, head) pairs run as one sequence
        (256, 3, 2, [3, 0, 5], "none", False),
        (256, 32, 1, [1, 4, 2], "trailing", True),
    ],
)
def test_globals_and_padding_match_reference(n, window, dilation, counts, pad, causal, chunk_bytes):
    q, k, v = make_qkv(3, 4, n, 8)
    glob = globals_mask(3, n, counts)
    check(
        q, k, v, window=window, dilation=dilation, global_mask=glob,
        key_padding_mask=padding_mask(3, n, pad), causal=causal,
    )  # fmt: skip


def test_global_key_inside_window_counted_once(chunk_bytes):
    # key 20 is global and inside the windows of queries 15..25: for them (except 20 itself,
    # a global query) the result must equal plain band attention, where key 20 counts once
    q, k, v = make_qkv(1, 2, 40, 4)
    glob = torch.zeros(1, 40, dtype=torch.bool)
    glob[0, 20] = True
    out = check(q, k, v, window=5, global_mask=glob)
    plain = local_attention(q, k, v, window=5, backend="reference")
    near = [i for i in range(15, 26) if i != 20]
    torch.testing.assert_close(out[:, :, near], plain[:, :, near], rtol=0, atol=1e-5)
    assert (out[:, :, :15] - plain[:, :, :15]).abs().max() > 1e-3  # the others do see key 20


@pytest.mark.parametrize("dilation", [1, [1, 2]], ids=str)
def test_window_256_on_longer_sequence(dilation):
    q, k, v = make_qkv(1, 2, 1100, 16)
    glob = globals_mask(1, 1100, [3])
    check(q, k, v, window=256, dilation=dilation)
    check(q, k, v, window=256, dilation=dilation, global_mask=glob, causal=True)


@pytest.mark.parametrize("block", [1, 3, 16, 50])
def test_any_block_size_is_exact(block):
    q, k, v = make_qkv(2, 2, 61, 4)
    glob, pad = globals_mask(2, 61, [2, 0]), padding_mask(2, 61, "internal")
    for causal, dil in itertools.product([False, True], [(1, 1), (2, 3)]):
        kwargs = dict(window=5, global_mask=glob, key_padding_mask=pad, causal=causal)
        out = blocked.local_attention_blocked(
            q, k, v, dilations=dil, scale=0.5, block=block, **kwargs
        )
        ref = local_attention(q, k, v, dilation=list(dil), scale=0.5, backend="reference", **kwargs)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dilations", [(1, 1, 1, 1), (2, 2, 2, 2), (3, 3, 3, 3), (1, 1, 2, 2)])
@pytest.mark.parametrize("pad", ["none", "random", "leading"])
def test_runs_across_heads_are_exact(dilations, pad, chunk_bytes):
    """N a multiple of dil * block: the residue classes of consecutive heads are processed as
    one strided sequence, so chunks cross from one head (and batch row) into the next."""
    q, k, v = make_qkv(3, 4, 48, 4)
    for causal, window in itertools.product([False, True], [1, 5, 30]):
        pad_mask = padding_mask(3, 48, pad)
        kwargs = dict(window=window, key_padding_mask=pad_mask, global_mask=None, causal=causal)
        out = blocked.local_attention_blocked(
            q, k, v, dilations=dilations, scale=0.5, block=8, **kwargs
        )
        ref = local_attention(
            q, k, v, dilation=list(dilations), scale=0.5, backend="reference", **kwargs
        )
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_non_contiguous_inputs_and_empty_sequence():
    # (B, N, H, d) projections seen as (B, H, N, d): what a model passes in
    q, k, v = (torch.randn(2, 50, 4, 8).transpose(1, 2) for _ in range(3))
    check(q, k, v, window=5, dilation=[1, 2, 1, 2], global_mask=globals_mask(2, 50, [1, 3]))
    q, k, v = make_qkv(2, 4, 0, 8)
    assert local_attention(q, k, v, window=3).shape == (2, 4, 0, 8)


# --- empty rows ----------------------------------------------------------------------------


def test_fully_padded_row_gives_zeros_and_zero_grads(chunk_bytes):
    q, k, v = make_qkv(2, 2, 40, 8, requires_grad=True)
    pad = padding_mask(2, 40, "none")
    pad[1] = True  # batch row 1: nothing to attend
    pad[0, 10:20] = True  # row 0: queries 13..16 have no valid key in a window of 3
    glob = globals_mask(2, 40, [0, 2])
    for causal in (False, True):
        out = local_attention(
            q, k, v, window=3, key_padding_mask=pad, global_mask=glob, causal=causal,
            backend="blocked",
        )  # fmt: skip
        ref = local_attention(
            q, k, v, window=3, key_padding_mask=pad, global_mask=glob, causal=causal,
            backend="reference",
        )  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        assert out[1].abs().max() == 0 and out[0, :, 13:17].abs().max() == 0
        (out * torch.randn_like(out)).sum().backward()
        for x in (q, k, v):
            assert torch.isfinite(x.grad).all()
            assert x.grad[1].abs().max() == 0
            x.grad = None


# --- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)]
)
def test_dtypes(dtype, atol):
    q, k, v = make_qkv(2, 4, 130, 16, dtype=dtype)
    glob, pad = globals_mask(2, 130, [2, 0]), padding_mask(2, 130, "random")
    kwargs = dict(window=32, dilation=[1, 2, 3, 1], global_mask=glob, key_padding_mask=pad)
    out = local_attention(q, k, v, backend="blocked", **kwargs)
    assert out.dtype == dtype
    ref = local_attention(q.float(), k.float(), v.float(), backend="reference", **kwargs)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=atol)


# --- autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window=2),
        dict(window=1, dilation=[1, 2], causal=True),
        dict(window=2, dilation=2, glob=True, pad=True),
        dict(window=1, causal=True, glob=True, pad=True),
    ],
    ids=["band", "dilated-causal", "global-pad", "global-pad-causal"],
)
def test_gradcheck_float64(kwargs, chunk_bytes):
    kwargs = dict(kwargs)
    q, k, v = make_qkv(2, 2, 9, 3, dv=2, dtype=torch.float64, requires_grad=True)
    if kwargs.pop("glob", False):
        kwargs["global_mask"] = globals_mask(2, 9, [2, 1])
    if kwargs.pop("pad", False):
        pad = padding_mask(2, 9, "internal")
        pad[1] = True
        kwargs["key_padding_mask"] = pad

    def fn(q, k, v):
        return local_attention(q, k, v, backend="blocked", **kwargs)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("masks", [True, False], ids=["masks", "no-masks"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "n,window,dilation", [(257, 32, [1, 2, 3, 1]), (130, 3, 2), (256, 3, 2), (256, 32, 1)]
)
def test_grads_match_reference(n, window, dilation, causal, masks, chunk_bytes):
    """Also where sequences of several heads run as one (N a multiple of dilation x block)."""
    kwargs = dict(window=window, dilation=dilation)
    if masks:
        kwargs.update(
            global_mask=globals_mask(2, n, [3, 0]), key_padding_mask=padding_mask(2, n, "internal")
        )
    grads = {}
    for backend in ("reference", "blocked"):
        torch.manual_seed(1)
        q, k, v = make_qkv(2, 4, n, 8, requires_grad=True)
        out = local_attention(q, k, v, causal=causal, backend=backend, **kwargs)
        (out * torch.randn_like(out)).sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for g_ref, g in zip(grads["reference"], grads["blocked"]):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)


# --- flex ----------------------------------------------------------------------------------

needs_flex = pytest.mark.skipif(not flex.available(), reason="FlexAttention does not work here")


@needs_flex
@pytest.mark.parametrize(
    "n,window,dilation,counts,pad,causal",
    [
        (37, 3, [1, 2, 3, 1], [0, 2], "none", False),
        (130, 32, 2, [1, 0], "internal", True),
        (64, 1, 1, [0, 0], "trailing", False),
    ],
)
def test_flex_eager_matches_reference(n, window, dilation, counts, pad, causal):
    q, k, v = make_qkv(2, 4, n, 8)
    glob, pad = globals_mask(2, n, counts), padding_mask(2, n, pad)
    kwargs = dict(window=window, global_mask=glob, key_padding_mask=pad, causal=causal)
    dils = dilation if isinstance(dilation, list) else [dilation] * 4
    out = flex.local_attention_flex(
        q, k, v, dilations=dils, scale=8**-0.5, compiled=False, **kwargs
    )
    ref = local_attention(q, k, v, dilation=dilation, backend="reference", **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
@needs_flex
@pytest.mark.skipif(not flex.can_compile(), reason="no C++ compiler for torch.compile")
def test_flex_compiled_matches_reference():
    q, k, v = make_qkv(1, 4, 512, 16)
    glob = globals_mask(1, 512, [3])
    kwargs = dict(window=64, dilation=[1, 2, 1, 2], global_mask=glob)
    out = local_attention(q, k, v, backend="flex", **kwargs)
    ref = local_attention(q, k, v, backend="reference", **kwargs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


# --- dispatch ------------------------------------------------------------------------------


def test_env_var_overrides_auto(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return reference_module.local_attention_reference(*args, **kwargs)

    monkeypatch.setattr(attention, "local_attention_reference", spy)
    q, k, v = make_qkv(1, 2, 16, 4)
    monkeypatch.setenv("ARCHOPT_ATTENTION_BACKEND", "reference")
    local_attention(q, k, v, window=2)
    assert calls == [1]
    local_attention(q, k, v, window=2, backend="blocked")  # an explicit choice wins
    assert calls == [1]
    monkeypatch.setenv("ARCHOPT_ATTENTION_BACKEND", "blocked")
    local_attention(q, k, v, window=2)
    assert calls == [1]
    monkeypatch.setenv("ARCHOPT_ATTENTION_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="ARCHOPT_ATTENTION_BACKEND must be one of"):
        local_attention(q, k, v, window=2)


def test_flex_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(flex, "available", lambda: False)
    q, k, v = make_qkv(1, 2, 16, 4)
    with pytest.raises(
        ValueError, match=r"backend 'flex' needs torch\.nn\.attention\.flex_attention"
    ):
        local_attention(q, k, v, window=2, backend="flex")


def _bad(**overrides):
    q, k, v = make_qkv(2, 4, 16, 8)
    args = dict(q=q, k=k, v=v, window=2)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "args,msg",
    [
        (_bad(window=0), "window must be >= 1, got 0"),
        (_bad(window=2.5), "window must be an int, got 2.5"),
        (_bad(dilation=0), "dilation must be >= 1, got 0"),
        (_bad(dilation=[1, 2, 0, 1]), "dilation must be >= 1, got 0"),
        (_bad(dilation=[1, 2, 3]), r"one entry per head \(4\), got 3 entries"),
        (_bad(q=torch.randn(4, 16, 8)), r"q must be a 4-D tensor \(B, H, N, d\), got \(4, 16, 8\)"),
        (_bad(k=torch.randn(2, 4, 15, 8)), r"k must have the same shape as q \(2, 4, 16, 8\)"),
        (_bad(v=torch.randn(2, 4, 15, 8)), r"v must have shape \(B, H, N, dv\) with"),
        (_bad(v=torch.randn(2, 4, 16, 8).half()), "same dtype, got torch.float32"),
        (_bad(q=torch.ones(2, 4, 16, 8, dtype=torch.long)), "same dtype, got torch.int64"),
        (
            _bad(**dict(zip("qkv", (torch.ones(2, 4, 16, 8, dtype=torch.long),) * 3))),
            "q, k and v must be floating point, got torch.int64",
        ),
        (_bad(global_mask=torch.zeros(2, 16)), "global_mask must be a bool tensor, got"),
        (
            _bad(key_padding_mask=torch.zeros(2, 16, dtype=torch.uint8)),
            "key_padding_mask must be a bool tensor, got torch.uint8",
        ),
        (
            _bad(key_padding_mask=torch.zeros(2, 15, dtype=torch.bool)),
            r"key_padding_mask must have shape \(B, N\) = \(2, 16\), got \(2, 15\)",
        ),
        (
            _bad(global_mask=torch.zeros(2, 4, 16, dtype=torch.bool)),
            r"global_mask must have shape \(B, N\) = \(2, 16\), got \(2, 4, 16\)",
        ),
        (_bad(backend="triton-someday"), "backend must be one of"),
    ],
)
def test_bad_inputs(args, msg):
    with pytest.raises(ValueError, match=msg):
        local_attention(**args)


# --- memory --------------------------------------------------------------------------------


def test_blocked_memory_grows_linearly():
    peaks = {}
    h, d, w = 4, 32, 64
    for n in (2048, 4096):
        q, k, v = make_qkv(1, h, n, d)
        with torch.no_grad():
            peaks[n] = measure_peak_memory(
                lambda q=q, k=k, v=v: local_attention(q, k, v, window=w, backend="blocked"),
                method="tensors",
            ).bytes
    assert peaks[2048] > 0 and peaks[4096] / peaks[2048] < 2.3
    # the fp32 N x N scores of every head, which the dense path holds (256 MiB here); ours:
    # output + chunk buffers, about 26 MiB
    scores_n2 = h * 4096 * 4096 * 4
    assert peaks[4096] < scores_n2 / 5


@pytest.mark.parametrize(
    "n,dilation,causal,n_global",
    [
        (4096, 1, False, 0),
        (4096, 1, True, 0),
        (4001, 3, False, 0),
        (4096, [1, 2, 1, 4], False, 0),
        (4096, 1, False, 7),
        (4001, 3, True, 7),
    ],
)
def test_blocked_memory_is_the_output_plus_the_spare_buffer(
    n, dilation, causal, n_global, monkeypatch
):
    """Chunks keep their scores in the rows of the result not written yet: the memory above
    the output is ``SPARE_BYTES`` (what the last chunks use) plus the zero-padded copies of
    the rows the edge chunks read (under 150 KiB here), not a chunk of scores. Global rows
    add their (G, N) scores, a few heads at a time (at most ``SPARE_BYTES``)."""
    monkeypatch.setattr(blocked, "SPARE_BYTES", 256 * 2**10)
    monkeypatch.setattr(blocked, "CHUNK_BYTES", 256 * 2**10)
    h, d, w = 4, 32, 64
    q, k, v = make_qkv(1, h, n, d)
    glob = torch.zeros(1, n, dtype=torch.bool)
    glob[0, torch.randperm(n)[:n_global]] = True
    with torch.no_grad():
        peak = measure_peak_memory(
            lambda: local_attention(
                q, k, v, window=w, dilation=dilation, causal=causal, global_mask=glob,
                backend="blocked",
            ),
            method="tensors",
        ).bytes  # fmt: skip
    output = q.numel() * q.element_size()
    bound = output + blocked.SPARE_BYTES + 256 * 2**10
    if n_global:  # and small (B, N) and (B, H, N) masks and counts
        bound += blocked.SPARE_BYTES + 256 * 2**10
    assert output <= peak <= bound, (peak - output) / 2**10


def test_blocked_backward_memory_does_not_grow_with_the_band(monkeypatch):
    """Forward + backward holds the gradients of q, k, v and the output's (four tensors the
    size of q) plus one backward chunk's graph, the same at every N: no scores are saved."""
    monkeypatch.setattr(blocked, "SPARE_BYTES", 256 * 2**10)
    monkeypatch.setattr(blocked, "BACKWARD_CHUNK_BYTES", 256 * 2**10)
    extra = {}
    for n in (2048, 8192):
        q, k, v = make_qkv(1, 4, n, 32, requires_grad=True)
        peak = measure_peak_memory(
            lambda q=q, k=k, v=v: local_attention(q, k, v, window=64, dilation=2).sum().backward(),
            method="tensors",
        ).bytes
        extra[n] = peak - 4 * q.numel() * q.element_size()
    # scores of the whole band at N=8192: 4 x 8192 x 192 x 4 bytes = 24 MiB
    bound = blocked.SPARE_BYTES + 6 * blocked.BACKWARD_CHUNK_BYTES + 2**20
    assert abs(extra[8192] - extra[2048]) < 2**20 and extra[8192] < bound, extra
