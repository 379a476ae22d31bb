"""Weight quantization (archopt.ops.quant): int8 / int4 linears equal their dequantized
weights, quantized models stay close and compile to one graph, and the packed modules are torch's
CPU int4 kernel on the same values."""

import pytest
import torch

import archopt
from archopt.generate import generate

from .tiny_llama import rand_ids

# -- int8 and int4 weights -------------------------------------------------------------------


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


@needs_int4_kernel
@pytest.mark.parametrize("rows", [64, 128, 1024])
def test_packing_in_chunks_of_rows_is_packing_whole(monkeypatch, rows):
    from archopt.ops import quant

    torch.manual_seed(rows)
    q = torch.randint(0, 16, (64 * 5 + 16, 96), dtype=torch.uint8)  # a tail of 16 rows
    whole = torch._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    monkeypatch.setattr(quant, "PACK_ROWS", rows)
    assert torch.equal(quant._int4pack(q), whole)
    ones = torch.ones(q.shape[0], 3)
    assert torch.equal(quant.PackedInt4Linear._pack(q, ones, ones, 96).values(), q)


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
