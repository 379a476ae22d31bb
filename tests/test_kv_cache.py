"""KV caches (archopt.ops.kv_cache): cached logits equal the full forward; bounded caches
(sliding window, attention sinks) equal dense attention under their window rule; the int8
cache's error is quantization only; bytes as counted."""

from itertools import pairwise

import pytest
import torch

import archopt
from archopt.generate import generate
from archopt.ops.kv_cache import DenseCache, StaticCache

from .tiny_llama import assert_close, rand_ids, sharp_tiny_llama


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llama()


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64: chunked and one-shot attention then agree to ~1e-15, so the
    comparison checks the cache logic rather than one CPU's fp32 summation order."""
    import copy

    return copy.deepcopy(model).double()


@pytest.mark.parametrize("cache", ["dense", "static"])
def test_cached_logits_equal_full_forward(model, cache):
    ids = rand_ids(2, 45)
    full = model(ids)
    kv = model.make_cache(cache, batch=2)
    # Prefill in uneven chunks, then one token at a time.
    parts = [model(ids[:, a:b], cache=kv) for a, b in [(0, 17), (17, 18), (18, 40)]]
    parts += [model(ids[:, i : i + 1], cache=kv) for i in range(40, 45)]
    assert_close(torch.cat(parts, dim=1), full)
    assert kv.length == 45


def test_dense_cache_grows_without_changing_results(model64):
    model = model64  # fp32's one-token and 30-token products sum in other orders on some CPUs
    ids = rand_ids(1, 30)
    kv = DenseCache(num_layers=4, batch=1, kv_heads=2, head_dim=16, capacity=160, reserve=8,
                    dtype=torch.float64)  # fmt: skip
    assert kv.slots == 8
    out = [model(ids[:, :5], cache=kv)] + [model(ids[:, i : i + 1], cache=kv) for i in range(5, 30)]
    assert kv.slots == 32  # 8 -> 16 -> 32: doubling, not one slot per token
    assert_close(torch.cat(out, dim=1), model(ids))


@pytest.mark.parametrize("cls", [DenseCache, StaticCache])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_formula(cls, dtype):
    layers, kv_heads, head_dim, tokens = 3, 2, 16, 40
    kwargs = dict(num_layers=layers, batch=1, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    cache = cls(capacity=tokens, **kwargs)
    size = 2 if dtype == torch.bfloat16 else 4
    assert cache.nbytes == 2 * layers * kv_heads * head_dim * tokens * size
    storage = sum(t.untyped_storage().nbytes() for t in (*cache.keys, *cache.values))
    assert cache.nbytes == storage


def test_crop_then_continue_equals_from_scratch(model):
    ids = rand_ids(1, 30)
    kv = model.make_cache("dense")
    model(ids[:, :25], cache=kv)
    kv.crop(12)  # rewind: forget tokens 12..24
    rewound = model(ids[:, 12:30], cache=kv)
    assert_close(rewound, model(ids)[:, 12:30])
    kv.reset()
    assert kv.length == 0
    assert_close(model(ids[:, :5], cache=kv), model(ids[:, :5]))
    with pytest.raises(ValueError, match=r"crop length must be in \[0, 5\], got 6"):
        kv.crop(6)


def test_capacity_error_names_bounded_caches(model):
    ids = rand_ids(1, 150)
    with pytest.raises(ValueError, match=r"'sliding:W'.*'sink:S:W'"):
        generate(model, ids, 20)  # 170 > 160 positions
    kv = model.make_cache("static", reserve=10)
    model(ids[:, :8], cache=kv)
    with pytest.raises(ValueError, match=r"holds at most 10 tokens.*sliding"):
        model(ids[:, 8:11], cache=kv)
    with pytest.raises(ValueError, match="exceeds the 10-token capacity"):
        generate(model, ids[:, :8], 5, cache=kv)


# -- bounded caches: exactly dense attention under the same window rule ------------------------

BOUNDED = {"sliding:8": (0, 8), "sink:3:8": (3, 8), "sink:4:4": (4, 4), "sliding:1": (0, 1)}


def oracle_cache(batch, sinks, window, dtype=torch.float32):
    """Keeps every token; only the mask applies the rule: recompute-from-scratch semantics."""
    return DenseCache(
        num_layers=4, batch=batch, kv_heads=2, head_dim=16, capacity=4096, window=window,
        sinks=sinks, dtype=dtype,
    )  # fmt: skip


@pytest.mark.parametrize("spec", list(BOUNDED))
def test_bounded_cache_equals_masked_dense_attention(model64, spec):
    model = model64
    ids = rand_ids(2, 100)
    kv = model.make_cache(spec, batch=2)
    oracle = oracle_cache(2, *BOUNDED[spec], dtype=torch.float64)
    # Chunks longer than the window, single tokens, and a chunk that straddles the sinks.
    cuts = [0, 2, 13, 14, 30, 31, *range(32, 60), 77, *range(78, 101)]
    got = torch.cat([model(ids[:, a:b], cache=kv) for a, b in pairwise(cuts)], dim=1)
    ref = torch.cat([model(ids[:, a:b], cache=oracle) for a, b in pairwise(cuts)], dim=1)
    assert_close(got, ref)
    chunked = model.make_cache(spec, batch=2)  # one-shot prefill = chunked prefill
    one_shot = model(ids[:, :77], cache=chunked)
    assert_close(one_shot, ref[:, :77])


def test_window_rule_sees_exactly_the_sinks_and_the_last_w():
    from archopt.ops.kv_cache import position_mask

    q = torch.tensor([[20]])
    k = torch.arange(21)[None]
    mask = position_mask(q, k, window=5, sinks=2)[0, 0, 0]
    assert mask.nonzero().flatten().tolist() == [0, 1, 16, 17, 18, 19, 20]


def test_bounded_caches_go_far_past_the_context_in_constant_memory(model):
    short = archopt.create_model("llama-tiny", max_position_embeddings=32).eval()
    short.load_state_dict(model.state_dict())
    ids = rand_ids(1, 5)
    for spec, rule in [("sliding:16", (0, 16)), ("sink:4:12", (4, 12))]:
        kv = short.make_cache(spec)
        size = kv.nbytes
        out = generate(short, ids, 320, cache=kv, stop=None)  # 10x the model's 32 positions
        assert out.shape == (1, 325) and kv.nbytes == size and kv.length == 324
        oracle = oracle_cache(1, *rule)
        assert torch.equal(out, generate(short, ids, 320, cache=oracle, stop=None))
    with pytest.raises(ValueError, match="exceeds the 32-token capacity"):
        generate(short, ids, 320, cache="dense")


def test_bounded_cache_memory_follows_the_tokens_held(model):
    ids = rand_ids(2, 7)
    huge = model.make_cache("sliding:1000000000", batch=2)  # a window of 1e9 tokens
    per_slot = 2 * 4 * 2 * 2 * 16 * 4  # K and V, 4 layers, batch 2, 2 heads, d 16, fp32
    assert huge.nbytes == 257 * per_slot  # 256 slots and the trash slot, not 1e9
    dense = generate(model, ids, 40, cache="dense", stop=None)
    assert torch.equal(generate(model, ids, 40, cache=huge, stop=None), dense)
    # growing from 8 slots by doubling, past the sinks, up to S + W, then wrapping
    rule = (4, 60)
    small = model.make_cache("sink:4:60", batch=2, reserve=8)
    assert small.nbytes == 9 * per_slot
    out = generate(model, ids, 100, cache=small, stop=None)
    assert torch.equal(out, generate(model, ids, 100, cache=oracle_cache(2, *rule), stop=None))
    assert small.nbytes == (4 + 60 + 1) * per_slot


def test_bounded_cache_left_padded_batch_equals_rows_alone(model):
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 13, 9)]
    for spec in ("sliding:6", "sink:2:5"):
        batch = generate(model, prompts, 20, cache=spec)
        for i, p in enumerate(prompts):
            assert torch.equal(batch[i, -20:], generate(model, p, 20, cache=spec)[0, -20:])


def test_bounded_cache_nbytes_and_errors(model):
    kv = model.make_cache("sink:4:12")
    # 4 sinks + 12 ring slots + 1 slot that absorbs padding and evicted writes.
    assert kv.nbytes == 2 * 4 * 2 * 16 * (4 + 12 + 1) * 4
    with pytest.raises(ValueError, match="cannot crop"):
        kv.crop(0)
    for spec, msg in [
        ("sliding:0", "window W must be >= 1, got 0"),
        ("sink:5:2", r"window W \(2\) must be at least the sink count S \(5\)"),
        ("sliding", "unknown cache spec 'sliding'"),
        ("sink:4", "unknown cache spec 'sink:4'"),
        ("sliding:abc", "W and S must be integers"),
        ("sink:-1:4", "sink count S must be >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model.make_cache(spec)


# -- int8 cache -------------------------------------------------------------------------------


def test_int8_cache_full_precision_window_is_exact(model):
    ids = rand_ids(2, 60)
    cuts = [0, 13, 14, *range(15, 61)]

    def run(spec):
        kv = model.make_cache(spec, batch=2, reserve=8)
        return torch.cat([model(ids[:, a:b], cache=kv) for a, b in pairwise(cuts)], dim=1)

    assert_close(run("int8:100"), run("dense"))  # every key within the fp window


@pytest.mark.parametrize("spec", ["int8:0", "int8:8", "int8"])
def test_int8_cache_error_is_quantization_only(model, spec):
    ids = rand_ids(2, 90)
    full = model(ids)
    kv = model.make_cache(spec, batch=2, reserve=8)
    cuts = [0, 13, 14, 30, *range(31, 91)]
    chunked = torch.cat([model(ids[:, a:b], cache=kv) for a, b in pairwise(cuts)], dim=1)
    err = (chunked - full).abs().max()
    assert 0 < err < 0.25 * full.abs().max()  # lossy, but bounded (sharp random weights)
    one_shot = model(ids[:, :77], cache=model.make_cache(spec, batch=2))
    # The fp window is per query, so chunking changes nothing but rounding ties: a far
    # smaller difference than the quantization error itself.
    assert (one_shot - chunked[:, :77]).abs().max() < 0.05 * err


def test_int8_cache_nbytes_counts_scales_and_window():
    from archopt.ops.int8_cache import Int8Cache

    layers, heads, d, tokens, recent = 3, 2, 64, 1000, 16
    kv = Int8Cache(
        num_layers=layers, batch=1, kv_heads=heads, head_dim=d, capacity=tokens,
        reserve=tokens, recent=recent,
    )  # fmt: skip
    per_layer = 2 * heads * (tokens * (d + 4) + recent * d * 4)  # int8 + fp32 scale; fp ring
    assert kv.nbytes == layers * per_layer
    dense = DenseCache(
        num_layers=layers, batch=1, kv_heads=heads, head_dim=d, capacity=tokens, reserve=tokens
    )
    assert dense.nbytes / kv.nbytes > 3
