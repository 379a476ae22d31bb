"""GGUF blocks times int8 activations (archopt.ops.act8): the C++ kernels against their torch
references, the packing against the weights it came from, and the GGUF format that uses them."""

import pytest
import torch

from archopt.ops import cpu_kernels
from archopt.ops.act8 import (
    Int4Q8Linear,
    Int8Q8Linear,
    quantize_activations,
    use_int8_activations,
)
from archopt.ops.quant import Int4Linear, Int8Linear

if not cpu_kernels.load(build=True):
    pytest.skip(f"archopt's CPU kernels: {cpu_kernels.why_unavailable()}", allow_module_level=True)


def q4(out_f: int, in_f: int, seed: int = 0) -> Int4Linear:
    """An Int4Linear with GGUF-like fp16 scales, a constant block and a zero row among them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[0, :32] = 0.25  # a constant block: scale 0
    w[-1] = 0.0  # a zero row
    m = Int4Linear(w)
    m.scale, m.minimum = m.scale.half().float(), m.minimum.half().float()
    return m


def q8(out_f: int, in_f: int, seed: int = 0) -> Int8Linear:
    """An Int8Linear in Q8_0's blocks of 32 with fp16 scales, a zero row among them."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    w[-1] = 0.0
    m = Int8Linear(w, group_size=32)
    m.scale = m.scale.half().float()
    return m


def act8(kind: str, out_f: int, in_f: int):
    if kind == "q4":
        return Int4Q8Linear.from_int4(q4(out_f, in_f))
    return Int8Q8Linear.from_int8(q8(out_f, in_f))


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("out_f,in_f", [(16, 32), (48, 96), (80, 160), (32, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 9])
def test_kernel_matches_its_reference(kind, out_f, in_f, rows):
    m = act8(kind, out_f, in_f)
    x = torch.randn(rows, in_f)
    x[0, 32:64] = 0.0  # an all-zero block: scale 0, no division by it
    x[-1, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])  # scale 1: ties, rounded to even
    ref = m.reference(x)
    out = m(x)
    assert out.shape == (rows, out_f) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6 * ref.abs().max().item() + 1e-6)
    # and the reference is the dequantized weight times the dequantized activations
    qx, sx, _ = quantize_activations(x)
    xd = (qx.float().view(rows, -1, 32) * sx[..., None]).view(rows, in_f)
    exact = xd.double() @ m.dequantized().double().T
    torch.testing.assert_close(ref.double(), exact, rtol=0, atol=1e-5 * exact.abs().max().item())


def test_packing_keeps_every_weight():
    src = q4(96, 160)
    m = Int4Q8Linear.from_int4(src)
    assert torch.equal(m.dequantized(), src.dequantized())
    q, d, lo = m.values()
    p = src.qweight.view(96, 5, 16)
    assert torch.equal(q, torch.cat([p & 15, p >> 4], -1).view(96, 160))  # Q4_1's order undone
    assert torch.equal(d, src.scale) and torch.equal(lo, src.minimum)
    src8 = q8(48, 96)
    src8.qweight[0, :4] = torch.tensor([-127, 127, 0, -1], dtype=torch.int8)  # the extremes
    m8 = Int8Q8Linear.from_int8(src8)
    q8_values, d8 = m8.values()
    assert torch.equal(q8_values, src8.qweight) and torch.equal(d8, src8.scale)
    assert torch.equal(m8.dequantized(), src8.dequantized())


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_a_row_is_the_same_alone_and_in_any_batch(kind):
    m = act8(kind, 64, 192)
    x = torch.randn(7, 192)
    batched = m(x)
    for i in range(7):
        assert torch.equal(m(x[i : i + 1]), batched[i : i + 1])
    for lo, hi in ((2, 6), (1, 3), (0, 3), (0, 6), (1, 7)):  # by fours, twos and ones
        assert torch.equal(m(x[lo:hi]), batched[lo:hi])
    assert torch.equal(m(x.view(7, 1, 192)).view(7, 64), batched)  # any leading shape
    three = m(x[4:7].view(1, 3, 192))  # 3 rows: a four-row pass with a padding row dropped
    assert three.shape == (1, 3, 64) and three.is_contiguous()
    assert torch.equal(three[0], batched[4:7])


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_strided_inputs_and_long_prompts_give_each_rows_result(kind):
    """A contiguous float x is read in place, any other converted first; a batch whose
    scratch passes the kernel's kept buffer (1 MiB: ~500 rows of 1536) takes one of its own.
    The rows' results are the same every way."""
    m = act8(kind, 16, 1536)
    x = torch.randn(600, 1536)
    whole = m(x)  # its own scratch; 100 rows at a time, the kept one
    assert torch.equal(whole, torch.cat([m(piece) for piece in x.split(100)]))
    strided = torch.randn(1536, 9).T  # (9, 1536), not contiguous
    assert torch.equal(m(strided), m(strided.contiguous()))
    assert torch.equal(m(strided[:3]), m(strided[:3].contiguous()))  # converted, then padded
    assert torch.equal(m(x[:6].view(2, 3, 1536)), whole[:6].view(2, 3, 16))


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_other_dtypes_and_nonfinite_rows(kind):
    m = act8(kind, 32, 64)
    xb = torch.randn(3, 64, dtype=torch.bfloat16)
    out = m(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, m.reference(xb), rtol=0, atol=1e-2 * out.abs().max().item())
    x = torch.randn(4, 64)
    bad = x.clone()
    bad[1, 3], bad[2, 40] = float("nan"), float("inf")
    y, y_bad = m(x), m(bad)
    assert y_bad[1].isnan().all() and y_bad[2].isnan().all()  # NaN out, never a finite guess
    assert torch.equal(y_bad[[0, 3]], y[[0, 3]])  # the other rows untouched


def test_bad_weights_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16, got 40"):
        Int4Q8Linear.from_int4(q4(40, 64))
    with pytest.raises(ValueError, match="blocks must be of 32 inputs"):
        Int4Q8Linear.from_int4(Int4Linear(torch.randn(16, 128), group_size=64))
    with pytest.raises(ValueError, match="exact in fp16"):
        Int4Q8Linear.from_int4(Int4Linear(torch.randn(16, 64)))  # fp32 scales
    with pytest.raises(ValueError, match="exact in fp16"):
        Int8Q8Linear.from_int8(Int8Linear(torch.randn(16, 64), group_size=32))
    with pytest.raises(ValueError, match=r"blocks must be of 32 inputs \(GGUF.s\), got 64"):
        Int8Q8Linear.from_int8(Int8Linear(torch.randn(16, 64)))  # one scale per channel
    m = Int4Q8Linear.from_int4(q4(16, 64))
    with pytest.raises(ValueError, match="expected 64 input features, got 32"):
        m(torch.randn(2, 32))
    with pytest.raises(RuntimeError, match="packed must be uint8"):  # the kernel checks too
        torch.ops.archopt.int4_q8_linear(torch.randn(1, 64), m.packed.view(-1), m.scales, 16)


def test_model_swap_counts_and_leaves_other_layers():
    model = torch.nn.Sequential(q4(32, 64), q4(24, 64), q8(16, 64), torch.nn.Linear(4, 4))
    assert use_int8_activations(model) == {"replaced": 2, "kept": 1}
    assert isinstance(model[0], Int4Q8Linear) and isinstance(model[1], Int4Linear)
    assert isinstance(model[2], Int8Q8Linear) and isinstance(model[3], torch.nn.Linear)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_gguf_act8_loads_caches_and_tracks_the_gguf_format(tmp_path, monkeypatch, qtype):
    pytest.importorskip("gguf")
    pytest.importorskip("safetensors")
    from archopt.loading.llm import load_llm
    from tests.test_gguf import Q, _hf_llama, _tiny_tokenizer, _write_hf_llama

    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    hf = _hf_llama(True)
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]))
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    path = _write_hf_llama(tmp_path / "m.gguf", hf, getattr(Q, qtype), tokenizer=_tiny_tokenizer())
    first = load_llm(path, weights="gguf-act8")
    layer = Int4Q8Linear if qtype == "Q4_1" else Int8Q8Linear
    assert sum(isinstance(m, layer) for m in first.modules()) >= 7  # every projection
    second = load_llm(path, weights="gguf-act8")
    assert second.config.extra["loaded_from"] == "cache"
    plain = load_llm(path, weights="gguf", kernel=False)  # the same blocks, fp32 products
    ids = torch.randint(0, first.config.vocab_size, (2, 9))
    with torch.no_grad():
        a, b, c = first(ids), second(ids), plain(ids)
    assert torch.equal(a, b)
    # int8 activations: close to the exact products on the same weights, not equal
    torch.testing.assert_close(a, c, rtol=0, atol=0.05 * c.abs().max().item())
    # the CPU kernels' format is never chosen for, nor put on, another device
    from archopt.loading.llm import default_weights

    assert default_weights(path, cpu=False) == "gguf"
    with pytest.raises(ValueError, match="runs archopt's CPU kernels, got device='cuda'"):
        load_llm(path, weights="gguf-act8", device="cuda")


def test_a_damaged_prepared_layer_is_refused():
    from archopt.loading.prepared import _LAYERS

    for kind, m in (("Int4Q8Linear", act8("q4", 16, 64)), ("Int8Q8Linear", act8("q8", 16, 64))):
        rebuild = _LAYERS[kind][1]
        assert torch.equal(rebuild({"packed": m.packed, "scales": m.scales}, {}).packed, m.packed)
        with pytest.raises(ValueError, match="packed must be uint8"):
            rebuild({"packed": m.packed.view(-1), "scales": m.scales}, {})
        with pytest.raises(ValueError, match="scales must be fp16"):
            rebuild({"packed": m.packed, "scales": m.scales.float()}, {})
