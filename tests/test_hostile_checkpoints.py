"""Hostile checkpoints, one fault each: every one is a CheckpointError naming the file, the field
or tensor, what was expected and what the file holds, raised before any weight is built.

The seeds are ``tests/model_files``' tiny Llama as a GGUF file (with a byte-level tokenizer) and
as a Hugging Face folder (config.json + model.safetensors), each case one field changed. The
mutation fuzzer (tests/test_fuzz_files.py) tries random faults; these are the ones issue 17
named, with their messages pinned.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tracemalloc

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from archopt.errors import CheckpointError
from archopt.loading.gguf import load_gguf_llama, read_gguf

from . import model_files as mf

A = "llama."


@pytest.fixture(scope="module")
def seed() -> mf.GGUFSpec:
    return mf.tiny_gguf()


def _dup_tensor(s):
    s.tensors.append(copy.deepcopy(s.tensor("blk.1.ffn_up.weight")))


def _dup_key(s):
    s.kvs.append(mf.KV(A + "block_count", mf.U32, 2))


def _overlap(s):
    s.tensor("blk.0.ffn_norm.weight").offset = s.tensor("blk.0.attn_norm.weight").offset


def _misaligned(s):
    s.tensor("output_norm.weight").offset += 4


def _past_the_end(s):
    s.tensor("output.weight").offset = len(s.data) + 64


def _set(key, value, vtype=None):
    def mutate(s):
        for kv in s.kvs:
            if kv.key == key:
                kv.value, kv.vtype = value, kv.vtype if vtype is None else vtype
                return
        s.kvs.append(mf.KV(key, vtype, value))

    return mutate


def _tensor(name, **fields):
    def mutate(s):
        for field, value in fields.items():
            setattr(s.tensor(name), field, value)

    return mutate


def _nan_weight(s):
    t = s.tensor("output_norm.weight")  # F32: its first value becomes NaN
    data = bytearray(s.data)
    data[t.offset : t.offset + 4] = np.float32(np.nan).tobytes()
    s.data = bytes(data)


def _huge_weight(s):
    t = s.tensor("blk.1.attn_norm.weight")
    data = bytearray(s.data)
    data[t.offset + 8 : t.offset + 12] = np.float32(3e38).tobytes()
    s.data = bytes(data)


CASES = {
    "duplicate tensor name": (
        _dup_tensor,
        r"tensor name 'blk\.1\.ffn_up\.weight' appears again as tensor 21; expected unique names",
    ),
    "duplicate metadata key": (
        _dup_key,
        r"metadata key 'llama\.block_count' appears again as entry \d+; expected unique keys",
    ),
    "overlapping tensors": (
        _overlap,
        r"tensors 'blk\.0\.attn_norm\.weight' \(data bytes \d+\.\.\d+\) and "
        r"'blk\.0\.ffn_norm\.weight' \(\d+\.\.\d+\) overlap",
    ),
    "misaligned offset": (
        _misaligned,
        r"'output_norm\.weight' starts at offset \d+, not a multiple",
    ),
    "offset past the end": (_past_the_end, r"'output\.weight' \(F16, shape \[265, 32\]\) needs "),
    "tensor count 2**63": (
        lambda s: setattr(s, "n_tensors", 2**63),
        r"the tensor count is 9223372036854775808, which needs at least \d+ bytes, but only",
    ),
    "metadata count 2**64-1": (
        lambda s: setattr(s, "n_kv", 2**64 - 1),
        r"the metadata count is 18446744073709551615, which needs",
    ),
    "block count 1000": (
        _set(A + "block_count", 1000),
        r"llama\.block_count must be at most the 2 layers the file holds tensors for, got 1000",
    ),
    "block count 2**40": (
        _set(A + "block_count", 2**40, mf.U64),
        r"llama\.block_count must be at most 2147483647, got 1099511627776",
    ),
    "arrays nested 10000 deep": (
        _set("fuzz.nested", mf.nested_array(10_000), mf.ARR),
        r"metadata 'fuzz\.nested' nests arrays more than 8 deep",
    ),
    "zero heads": (
        _set(A + "attention.head_count", 0),
        r"llama\.attention\.head_count must be an integer >= 1, got 0",
    ),
    "key/value heads not dividing the heads": (
        _set(A + "attention.head_count_kv", 3),
        r"llama\.attention\.head_count_kv must be a divisor of the 4 heads, got 3",
    ),
    "width not divisible by the heads": (
        _set(A + "embedding_length", 34),
        r"llama\.attention\.head_count must be a divisor of 34 \(the width\), got 4",
    ),
    "per-layer head counts that differ": (
        _set(A + "attention.head_count", (mf.U32, [4, 2]), mf.ARR),
        r"head_count must be one integer for every layer .*got \[4, 2\]",
    ),
    "a string where a count belongs": (
        _set(A + "feed_forward_length", "64", mf.STR),
        r"llama\.feed_forward_length must be an integer >= 1, got '64'",
    ),
    "shape that disagrees with the config": (
        _set(A + "feed_forward_length", 48),
        r"tensor 'blk\.0\.ffn_gate\.weight' has shape \[64, 32\], expected \[48, 32\] from the "
        r"metadata",
    ),
    "vocabulary larger than the embedding": (
        _set(A + "vocab_size", 300),
        r"tensor 'token_embd\.weight' has shape \[265, 32\], expected \[300, 32\]",
    ),
    "unknown ggml type": (
        _tensor("blk.0.attn_v.weight", type=1234),
        r"tensor 'blk\.0\.attn_v\.weight' has ggml type id 1234, which gguf does not know",
    ),
    "a type that cannot be dequantized": (
        _tensor("output_norm.weight", type=24),  # I8: stored, never dequantized
        r"tensor 'output_norm\.weight' has type I8, which cannot be dequantized",
    ),
    "dimensions whose product overflows": (
        _tensor("output_norm.weight", dims=[0, 2**62, 2**62]),
        r"'output_norm\.weight' has shape \[4611686018427387904, 4611686018427387904, 0\], whose "
        r"size overflows a 64-bit count",
    ),
    "a missing layer tensor": (
        lambda s: s.tensors.remove(s.tensor("blk.1.attn_k.weight")),
        r"lacks tensors that a 2-layer Llama needs: \['blk\.1\.attn_k\.weight'\]",
    ),
    "a NaN weight": (
        _nan_weight,
        r"tensor 'output_norm\.weight' holds 1 values that are NaN, infinite or beyond \+-2\*\*64 "
        r"\(the first, at flat index 0, is nan\)",
    ),
    "a weight whose square overflows fp32": (
        _huge_weight,
        r"'blk\.1\.attn_norm\.weight' holds 1 values .* \(the first, at flat index 2, is 3\.0",
    ),
    "an end-of-sequence id outside the vocabulary": (
        _set("tokenizer.ggml.eos_token_id", 265),
        r"tokenizer\.ggml\.eos_token_id must be a token id in \[0, 265\) \(the vocabulary size\), "
        r"got 265",
    ),
    "more tokens than embedding rows": (
        _set("tokenizer.ggml.tokens", (mf.STR, [*mf.tiny_vocabulary(), "extra"]), mf.ARR),
        r"tokenizer\.ggml\.tokens must be at most 265 tokens \(the embedding's rows\), got 266",
    ),
    "a merge of tokens not in the vocabulary": (
        _set("tokenizer.ggml.merges", (mf.STR, ["zz qq"]), mf.ARR),
        r"cannot build its byte-level BPE tokenizer .*Token `zz` out of vocabulary",
    ),
    "rope scaling factor NaN": (
        lambda s: (
            _set(A + "rope.scaling.type", "linear", mf.STR)(s),
            _set(A + "rope.scaling.factor", math.nan, mf.F32)(s),
        ),
        r"llama\.rope\.scaling\.factor must be a finite number > 0, got nan",
    ),
}
for value in (math.nan, math.inf, -1.0, 0.0):
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base"):
        CASES[f"{key} {value}"] = (
            _set(A + key, value),
            rf"llama\.{key} must be a finite number > 0, got {value}",
        )


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_gguf_is_one_clear_error(tmp_path, seed, case, monkeypatch):
    mutate, message = CASES[case]
    spec = copy.deepcopy(seed)
    mutate(spec)
    path = mf.write(tmp_path / "bad.gguf", spec)
    built = []
    monkeypatch.setattr("archopt.loading.gguf.load.build_llama", lambda *a: built.append(a))
    with pytest.raises(CheckpointError, match=message) as e:
        load_gguf_llama(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert built == []  # nothing was built


def test_a_nan_block_scale_in_a_kept_layer_is_one_clear_error(tmp_path, seed):
    """Layers that keep their blocks are never dequantized: their scales are checked instead."""
    spec = copy.deepcopy(seed)
    t = spec.tensor("blk.0.attn_q.weight")  # Q4_0, kept: its first block's fp16 scale -> NaN
    data = bytearray(spec.data)
    data[t.offset : t.offset + 2] = np.float16(np.nan).tobytes()
    spec.data = bytes(data)
    path = mf.write(tmp_path / "bad.gguf", spec)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_q\.weight'.*1 block scales"):
        load_gguf_llama(path, keep_quantized=True)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_q\.weight' holds"):
        load_gguf_llama(path)  # dequantized: the weights' own check


def test_the_seed_loads_and_matches_its_weights(tmp_path, seed):
    """The seed is a valid file: the checks above fail for the one fault, not the writer."""
    gguf = pytest.importorskip("gguf")
    exact = mf.write(tmp_path / "exact.gguf", mf.tiny_gguf(exact=True))
    model = load_gguf_llama(exact)
    from archopt.loading.llama import build_llama, llama_state_dict_from_hf

    cfg = mf.tiny_config()
    ref = build_llama(cfg, llama_state_dict_from_hf(mf.tiny_hf_state_dict(cfg), cfg))
    ids = torch.tensor([[5, 100, 7, 264]])
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    path = mf.write(tmp_path / "seed.gguf", seed)
    reader = gguf.GGUFReader(str(path))  # the reference reader agrees with the writer
    assert sorted(t.name for t in reader.tensors) == sorted(read_gguf(path).tensors)
    assert model.tokenizer.decode(model.tokenizer.encode("hello the world")) == "hello the world"


def test_hostile_counts_allocate_nothing_in_proportion(tmp_path, seed):
    """A count of 2**63 or a 100,000-deep array is refused after a few KiB of work."""
    for mutate in (
        lambda s: setattr(s, "n_tensors", 2**63),
        lambda s: setattr(s, "n_kv", 2**63),
        _set("fuzz.nested", mf.nested_array(100_000), mf.ARR),
        _set("fuzz.strings", mf.Raw(b"\x08\x00\x00\x00" + (2**62).to_bytes(8, "little")), mf.ARR),
    ):
        spec = copy.deepcopy(seed)
        mutate(spec)
        path = mf.write(tmp_path / "bad.gguf", spec)
        tracemalloc.start()
        try:
            with pytest.raises(CheckpointError):
                read_gguf(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, f"{peak} bytes traced"
    assert sys.getrecursionlimit() > 8  # the nesting limit stays far below Python's


# ------------------------------------------------------------------ Hugging Face safetensors


def _entry(name: str, **fields):
    def mutate(spec):
        spec.header[name].update(fields)

    return mutate


def _duplicate_name(spec):
    text = json.dumps(spec.header)
    head = "model.norm.weight"
    spec.header_text = text[:-1] + ", " + json.dumps({head: spec.header[head]})[1:]


def _overlap_st(spec):
    begin = spec.header["lm_head.weight"]["data_offsets"][0]
    spec.header["model.norm.weight"]["data_offsets"] = [begin, begin + 128]


def _nan_st(spec):
    begin = spec.header["model.norm.weight"]["data_offsets"][0]
    data = bytearray(spec.data)
    data[begin + 4 : begin + 8] = np.float32(np.inf).tobytes()
    spec.data = bytes(data)


ST_CASES = {
    "header length past the end": (
        lambda s: setattr(s, "header_length", 2**63),
        r"its header length is 9223372036854775808 bytes, expected at most \d+",
    ),
    "a name twice": (
        _duplicate_name,
        r"the name 'model\.norm\.weight' appears twice in the header; expected unique names",
    ),
    "overlapping tensors": (
        _overlap_st,
        r"tensors 'model\.norm\.weight' \(bytes 0\.\.128\) and 'lm_head\.weight' "
        r"\(0\.\.33920\) overlap",
    ),
    "dtype and byte range disagree": (
        _entry("model.norm.weight", dtype="F64"),
        r"tensor 'model\.norm\.weight' \(F64, shape \[32\]\) needs 256 bytes, but its "
        r"data_offsets \[\d+, \d+\] span 128",
    ),
    "shape and byte range disagree": (
        _entry("model.norm.weight", shape=[33]),
        r"'model\.norm\.weight' \(F32, shape \[33\]\) needs 132 bytes",
    ),
    "an unknown dtype": (
        _entry("model.norm.weight", dtype="F7"),
        r"tensor 'model\.norm\.weight' has dtype 'F7', expected one of",
    ),
    "an integer weight": (
        _entry("model.norm.weight", dtype="I32"),
        r"tensor norm\.weight must be a floating-point dtype, got 'torch\.int32'",
    ),
    "an infinite weight": (
        _nan_st,
        r"tensor norm\.weight holds 1 values that are NaN, infinite or beyond \+-2\*\*64",
    ),
}
CONFIG_CASES = {
    "a layer count far past the tensors": (
        {"num_hidden_layers": 1000},
        r"num_hidden_layers must be at most the 2 layers the checkpoint holds tensors for, "
        r"got 1000",
    ),
    "a layer count past torch's sizes": (
        {"num_hidden_layers": 2**40},
        r"LlamaConfig\.num_layers must be at most 2147483647, got 1099511627776",
    ),
    "tie_word_embeddings as a string": (
        {"tie_word_embeddings": "yes"},
        r"LlamaConfig\.tie_word_embeddings must be true or false, got 'yes'",
    ),
}


@pytest.fixture(scope="module")
def hf_seed(tmp_path_factory):
    folder = mf.tiny_hf_folder(tmp_path_factory.mktemp("hf") / "seed")
    return folder, (folder / "model.safetensors").read_bytes()


def _folder(tmp_path, hf_seed, weights: bytes, config: dict | None = None):
    seed_folder, _ = hf_seed
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights)
    cfg = json.loads((seed_folder / "config.json").read_text()) | (config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("case", list(ST_CASES))
def test_a_hostile_safetensors_file_is_one_clear_error(tmp_path, hf_seed, case):
    from archopt.loading.llama import load_hf_llama

    mutate, message = ST_CASES[case]
    spec = mf.SafetensorsSpec.parse(hf_seed[1])
    mutate(spec)
    folder = _folder(tmp_path, hf_seed, spec.to_bytes())
    with pytest.raises(CheckpointError, match=message) as e:
        load_hf_llama(folder, tokenizer=False)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_a_config_that_disagrees_with_its_tensors_is_one_clear_error(tmp_path, hf_seed, case):
    from archopt.loading.llama import load_hf_llama

    change, message = CONFIG_CASES[case]
    folder = _folder(tmp_path, hf_seed, hf_seed[1], change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_hf_llama(folder, tokenizer=False)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)
