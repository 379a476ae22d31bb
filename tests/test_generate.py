"""KV caches and generation: every path gives the tokens the uncached loop gives."""

from itertools import pairwise

import pytest
import torch

import archopt
from archopt.generate import generate, sample, stream
from archopt.ops.kv_cache import DenseCache, StaticCache, make_cache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = archopt.create_model("llama-tiny", max_position_embeddings=160).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: fewer near-ties
        for p in m.parameters():
            p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64: chunked and one-shot attention then agree to ~1e-15, so the
    comparison checks the cache logic rather than one CPU's fp32 summation order."""
    import copy

    return copy.deepcopy(model).double()


def assert_close(a, b):
    # Sums in a different order (chunked vs one-shot): relative to the logit scale.
    scale = 1e-12 if b.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a, b, rtol=0, atol=scale * b.abs().max().item())


def rand_ids(*shape, seed=0):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


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


@pytest.mark.parametrize("cache", ["dense", "static"])
def test_cache_tokens_equal_lecture_loop(model, cache):
    ids = rand_ids(1, 9)
    ref = generate(model, ids, 40, cache="none")
    assert torch.equal(generate(model, ids, 40, cache=cache), ref)


def test_left_padded_batch_equals_each_row_alone(model):
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 11, 1, 7)]
    for cache in ("none", "dense", "static"):
        batch = generate(model, prompts, 25, cache=cache)
        assert batch.shape == (4, 11 + 25)
        for i, p in enumerate(prompts):
            alone = generate(model, p, 25, cache=cache)
            assert torch.equal(batch[i, -25:], alone[0, -25:]), (cache, i)
            assert torch.equal(batch[i, 11 - len(p) : 11], torch.tensor(p))


def test_dense_cache_grows_without_changing_results(model):
    ids = rand_ids(1, 30)
    kv = DenseCache(num_layers=4, batch=1, kv_heads=2, head_dim=16, capacity=160, reserve=8)
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


def test_sampling(model):
    ids = rand_ids(1, 5)
    greedy = generate(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, temperature=0.7, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, ids, 12, temperature=1.0, top_p=1e-6, seed=3), greedy)
    a = generate(model, ids, 12, temperature=1.5, seed=7)
    assert torch.equal(generate(model, ids, 12, temperature=1.5, seed=7), a)
    assert not torch.equal(a, greedy)  # 12 draws at temperature 1.5 on a 512-token vocab


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, temperature=1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...
    got = sample(logits, temperature=1.0, top_p=0.8, generator=gen)
    assert set(got.tolist()) == {0, 1}  # 0.636 < 0.8 needs the second token, not the third
    share = (got == 0).float().mean().item()
    assert abs(share - probs[0] / (probs[0] + probs[1])) < 0.03


def test_stop_tokens_end_rows(model):
    ids = rand_ids(2, 6)
    ref = generate(model, ids, 20)
    stop = int(ref[0, 6 + 4])  # row 0's fifth new token
    steps = list(stream(model, ids, 20, stop=stop))
    row0 = torch.stack(steps)[:, 0]
    first = int((row0 == stop).nonzero()[0])
    assert model.config.pad_token_id is None  # so the pad id is 0
    assert (row0[first + 1 :] == 0).all()
    if stop not in ref[1, 6:].tolist():
        assert len(steps) == 20  # row 1 never stops, so the run goes on


def test_bad_input(model):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\), got 600"):
        model(torch.tensor([[1, 600]]))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="input_ids is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2, 3]]), 3, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="unknown cache spec 'radix': expected one of"):
        generate(model, [1, 2], 3, cache="radix")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [1, 2], 0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        generate(model, [1, 2], 3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="cache capacity must be >= 1"):
        make_cache("static", num_layers=1, batch=1, kv_heads=1, head_dim=8, capacity=0)


def test_text_generation_needs_a_tokenizer(model):
    from archopt.generate import stream_text

    with pytest.raises(ValueError, match="needs a tokenizer, and this model has none"):
        next(stream_text(model, "hello", 3))


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
    from archopt.ops.kv_cache import Int8Cache

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


# -- compiled decode step -----------------------------------------------------------------------


def test_compiled_decode_step_never_recompiles(model):
    from torch._dynamo.utils import counters

    ids = rand_ids(2, 7)
    ref = generate(model, ids, 30, cache="static")
    counters.clear()
    # The "eager" backend traces exactly what inductor would compile, without the C++ build.
    assert torch.equal(generate(model, ids, 30, cache="static", compile="eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1  # 29 one-token steps, one graph
    assert not counters["recompiles"]
    assert torch.equal(generate(model, ids, 30, cache="static", compile="eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1  # a new run reuses it too
    with pytest.raises(ValueError, match="compile='aot' needs cache='static'"):
        generate(model, ids, 3, cache="dense", compile=True)


# -- int8 weights ---------------------------------------------------------------------------


def test_int8_linear_equals_its_dequantized_weight():
    from archopt.ops.quant import Int8Linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 40, bias=False)
    q = Int8Linear(dense.weight)
    w = q.dequantized()
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() == 127
    assert (w - dense.weight).abs().max() <= q.scale.max() / 2 + 1e-7  # half a step at most
    for shape in [(1, 1, 96), (3, 5, 96), (96,)]:
        x = torch.randn(shape)
        ref = torch.nn.functional.linear(x, w)
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_int8_weights_model_is_close_and_compiles_once():
    import copy

    from torch._dynamo.utils import counters

    from archopt.ops.quant import Int8Linear, quantize_weights

    torch.manual_seed(0)
    model = archopt.create_model("llama-tiny").eval()  # its own init, not the sharpened fixture
    q = quantize_weights(copy.deepcopy(model), kernel=False)  # the exact modules
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert isinstance(q.lm_head, Int8Linear)  # the tied projection gets its own int8 copy
    ids = rand_ids(1, 40)
    ref, got = model(ids), q(ids)
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.05
    counters.clear()
    eager = generate(q, ids[:, :6], 20, cache="static")
    assert torch.equal(generate(q, ids[:, :6], 20, cache="static", compile="eager"), eager)
    assert counters["stats"]["unique_graphs"] == 1
    with pytest.raises(ValueError, match=r"kind must be one of \('int8', 'int4'\), got 'int3'"):
        quantize_weights(model, "int3")


@pytest.mark.parametrize("kind,group_size", [("int8", 32), ("int4", 32), ("int4", 16)])
def test_grouped_linears_equal_their_dequantized_weight(kind, group_size):
    from archopt.ops.quant import Int4Linear, Int8Linear

    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 40, bias=False)
    dense.weight.data[3, :32] = 0.7  # a constant block: every value exact
    q = (Int8Linear if kind == "int8" else Int4Linear)(dense.weight, group_size=group_size)
    w = q.dequantized()
    step = q.scale.max()
    assert (w - dense.weight).abs().max() <= step / 2 + 1e-6  # half a step at most
    assert torch.equal(w[3, :32], dense.weight[3, :32])
    for shape in [(1, 1, 96), (3, 5, 96), (96,)]:
        x = torch.randn(shape)
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


def test_quantized_linear_shape_errors():
    from archopt.ops.quant import Int4Linear, Int8Linear

    w = torch.randn(8, 40)
    with pytest.raises(ValueError, match=r"even divisor of in_features \(40\), got 32"):
        Int4Linear(w)
    with pytest.raises(ValueError, match=r"even divisor of in_features \(40\), got 3"):
        Int8Linear(w, group_size=3)
    with pytest.raises(ValueError, match=r"packed must be 2-D uint8, got torch\.int8"):
        Int4Linear.from_packed(torch.zeros(8, 20, dtype=torch.int8), torch.ones(8, 1), w[:, :1])


def test_int4_weights_with_a_finer_head():
    import copy

    from archopt.ops.quant import Int4Linear, Int8Linear, quantize_weights

    torch.manual_seed(0)
    model = archopt.create_model("llama-tiny").eval()
    ids = rand_ids(1, 40)
    ref = model(ids)
    q4 = quantize_weights(copy.deepcopy(model), "int4", group_size=8, kernel=False)
    mixed = quantize_weights(copy.deepcopy(model), "int4", group_size=8, kernel=False, head="int8")
    assert isinstance(mixed.lm_head, Int8Linear) and mixed.lm_head.groups == 1  # per channel
    body = [m for n, m in mixed.named_modules() if n.startswith("layers.")]
    assert any(isinstance(m, Int4Linear) for m in body)
    assert not any(isinstance(m, Int8Linear) for m in body)
    # the head's own error is gone: the logits move less than with an int4 head
    err4, err_mixed = ((q(ids) - ref).abs().max() for q in (q4, mixed))
    assert 0 < err_mixed < err4
    with pytest.raises(
        ValueError, match=r"head kind must be one of \('int8', 'int4'\), got 'int2'"
    ):
        quantize_weights(copy.deepcopy(model), "int4", head="int2")
    with pytest.raises(
        ValueError, match=r"head='int8' needs a model with an lm_head, got Sequential"
    ):
        quantize_weights(torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False)), head="int8")


def test_int4_weights_model_is_close_and_compiles_once():
    import copy

    from torch._dynamo.utils import counters

    from archopt.ops.quant import Int4Linear, quantize_weights

    torch.manual_seed(0)
    model = archopt.create_model("llama-tiny").eval()
    q = quantize_weights(copy.deepcopy(model), "int4", group_size=8)  # 344 = 8 * 43
    assert isinstance(q.lm_head, Int4Linear) and q.lm_head.in_features // q.lm_head.groups == 8
    ids = rand_ids(1, 40)
    ref, got = model(ids), q(ids)
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.2
    counters.clear()
    eager = generate(q, ids[:, :6], 20, cache="static")
    assert torch.equal(generate(q, ids[:, :6], 20, cache="static", compile="eager"), eager)
    assert counters["stats"]["unique_graphs"] == 1


# -- torch's CPU int4 kernel ------------------------------------------------------------------

needs_int4_kernel = pytest.mark.skipif(
    not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="this torch has no CPU int4 kernel"
)


@needs_int4_kernel
@pytest.mark.parametrize("out_features", [48, 64, 144])  # partial, whole and mixed 64-row blocks
def test_packed_values_read_back_exactly(out_features):
    from archopt.ops.quant import PackedInt4Linear

    torch.manual_seed(out_features)
    q = torch.randint(0, 16, (out_features, 96))
    ones = torch.ones(out_features, 3)
    packed = PackedInt4Linear._pack(q, ones, ones, 96)
    assert torch.equal(packed.values().long(), q)


def _bf16(t):
    return t.to(torch.bfloat16).float()


@needs_int4_kernel
@pytest.mark.parametrize(
    "kind,group_size", [("int4", 32), ("int4", 64), ("int8", None), ("int8", 32)]
)
def test_packed_linear_is_the_kernel_on_its_weights(kind, group_size):
    from archopt.ops.quant import Int4Linear, Int8Linear, PackedInt4Linear

    torch.manual_seed(0)
    w = torch.randn(80, 192)
    if kind == "int4":
        exact = Int4Linear(w, group_size=group_size)
        packed = PackedInt4Linear.from_int4(exact)
        n, g = exact.out_features, exact.groups
        p = exact.qweight.view(n, g, -1)
        q = torch.cat([p & 15, p >> 4], -1).view(n, g, -1).float()
        s, m = exact.scale[..., None], exact.minimum[..., None]
        ref_w = ((q - 8) * _bf16(s) + _bf16(m + 8 * s)).view(n, -1)  # w = s (q - 8) + zero
    else:
        exact = Int8Linear(w, group_size=group_size)
        packed = PackedInt4Linear.from_int8(exact)
        scale = exact.scale.repeat_interleave(192 // exact.groups, dim=1)
        ref_w = exact.qweight.float() * _bf16(scale)  # the two planes add up exactly
        assert packed.planes == 2
    assert torch.equal(packed.dequantized(), ref_w)
    # bf16 scales: each weight within 2^-8 of its own size (plus a rounding of the zero)
    assert (ref_w - exact.dequantized()).abs().max() <= 2**-8 * w.abs().max()
    for shape in [(1, 1, 192), (3, 5, 192), (192,)]:
        x = torch.randn(shape)
        ref = torch.nn.functional.linear(_bf16(x), ref_w)
        got = packed(x)
        assert got.dtype == x.dtype and got.shape == ref.shape
        assert (got - ref).abs().max() <= 2**-7 * ref.abs().max()  # bf16 outputs


@needs_int4_kernel
def test_pack_for_cpu_takes_what_the_kernel_takes():
    from archopt.ops.quant import (
        Int4Linear,
        Int8Linear,
        PackedInt4Linear,
        pack_for_cpu,
        quantize_weights,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Int4Linear(torch.randn(64, 96), group_size=32),
        Int8Linear(torch.randn(40, 64)),  # 40 rows: not a multiple of 16
        Int4Linear(torch.randn(32, 64), group_size=16),  # groups of 16: too small
        torch.nn.Linear(32, 32),
    )
    assert pack_for_cpu(model) == {"packed": 1, "kept": 2}
    assert isinstance(model[0], PackedInt4Linear) and isinstance(model[1], Int8Linear)
    with pytest.raises(ValueError, match=r"1: .*out_features must be a multiple of 16, got 40"):
        pack_for_cpu(model, strict=True)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\)"):
        PackedInt4Linear.from_int4(model[2])
    with pytest.raises(ValueError, match=r"expected a CPU input, got one on meta"):
        model[0](torch.empty(1, 96, device="meta"))
    elsewhere = torch.nn.Sequential(Int4Linear(torch.randn(64, 96), group_size=32).to("meta"))
    assert pack_for_cpu(elsewhere) == {"packed": 0, "kept": 1}  # auto: left as it is
    with pytest.raises(ValueError, match=r"weights must be on the CPU, got meta"):
        pack_for_cpu(elsewhere, strict=True)
    with pytest.raises(ValueError, match=r"kernel must be 'auto', True or False, got 'yes'"):
        quantize_weights(model, "int8", kernel="yes")


@needs_int4_kernel
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_packed_weights_model_is_close_and_compiles_once(kind):
    import copy

    from torch._dynamo.utils import counters

    from archopt.ops.quant import PackedInt4Linear, quantize_weights

    torch.manual_seed(0)
    model = archopt.create_model("llama-tiny", intermediate_size=320).eval()  # 320 = 32 * 10
    exact = quantize_weights(copy.deepcopy(model), kind, kernel=False)
    fast = quantize_weights(copy.deepcopy(model), kind, kernel=True)
    linears = [m for m in fast.modules() if isinstance(m, PackedInt4Linear)]
    assert len(linears) == 4 * 4 + 1  # every layer's four and the output projection
    ids = rand_ids(1, 40)
    with torch.no_grad():
        ref, got = exact(ids), fast(ids)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()  # bf16 activations and scales
    counters.clear()
    eager = generate(fast, ids[:, :6], 20, cache="static")
    assert torch.equal(generate(fast, ids[:, :6], 20, cache="static", compile="eager"), eager)
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_runs_of_different_lengths_share_a_graph(model):
    from torch._dynamo.utils import counters

    counters.clear()
    for n_prompt, n_new in [(5, 10), (9, 30), (3, 50)]:  # all within one 256-slot cache
        ids = rand_ids(1, n_prompt)
        ref = generate(model, ids, n_new, cache="static")
        assert torch.equal(generate(model, ids, n_new, cache="static", compile="eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1


@needs_int4_kernel
@pytest.mark.slow
@pytest.mark.parametrize("backend", [True, "inductor-cpp"])
def test_packed_weights_through_inductor_give_the_eager_tokens(backend):
    from archopt.ops.quant import quantize_weights

    torch.manual_seed(0)
    model = archopt.create_model("llama-tiny", intermediate_size=320).eval()
    fast = quantize_weights(model, "int4", kernel=True)
    ids = rand_ids(1, 6)
    eager = generate(fast, ids, 12, cache="static")
    assert torch.equal(generate(fast, ids, 12, cache="static", compile=backend), eager)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
        ({"top_p": float("nan")}, "top_p must be in"),
        ({"stop": "sometimes"}, "stop must be token ids, 'eos' or None"),
        ({"compile": 2.5}, "compile must be True, False, one of"),
    ],
)
def test_generate_checks_its_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, rand_ids(1, 3), 4, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        generate(model, rand_ids(1, 3), 4.0)


def test_perplexity_scores_one_sequence(model):
    from archopt.generate import perplexity

    ids = rand_ids(2, 20)
    with pytest.raises(ValueError, match=r"ids must be \(length,\) or \(1, length\), got shape"):
        perplexity(model, ids)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1, got 0"):
        perplexity(model, ids[0], chunk=0)
    assert perplexity(model, ids[0]) == perplexity(model, ids[:1])
