"""load_llm keeps a loaded model in the cache folder and maps it from there the next time."""

import os
import time

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("safetensors")

from archopt.loading.llm import load_llm
from archopt.loading.prepared import RECORD_FILE, WEIGHTS_FILE
from tests.test_gguf import Q, _hf_llama, _tiny_tokenizer, _write_hf_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ARCHOPT_CACHE", str(folder))
    return folder


@pytest.fixture
def q4_gguf(tmp_path):
    hf = _hf_llama(True)
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]))
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    return _write_hf_llama(tmp_path / "q4.gguf", hf, Q.Q4_1, tokenizer=_tiny_tokenizer())


def _same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    ids = torch.randint(0, a.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_second_load_maps_the_same_model_from_the_cache(cache, q4_gguf):
    first = load_llm(q4_gguf, weights="gguf")
    assert first.config.extra["loaded_from"] == "checkpoint"
    second = load_llm(q4_gguf, weights="gguf")
    assert second.config.extra["loaded_from"] == "cache"
    _same_model(first, second)
    text = "hello world, hello 123"
    assert second.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert second.tokenizer.eos_token_id == first.tokenizer.eos_token_id
    a, b = dict(vars(first.config)), dict(vars(second.config))
    a["extra"] = {k: v for k, v in a["extra"].items() if k != "loaded_from"}
    b["extra"] = {k: v for k, v in b["extra"].items() if k != "loaded_from"}
    assert a == b
    # other formats are other entries
    fp32 = load_llm(q4_gguf, weights="fp32")
    assert fp32.config.extra["loaded_from"] == "checkpoint"
    assert len(list((cache / "llm").iterdir())) == 2
    assert load_llm(q4_gguf, weights="fp32", tokenizer=False).tokenizer is None


def test_an_hf_folder_in_int8_round_trips(cache, tmp_path):
    hf = _hf_llama(False)
    hf.save_pretrained(tmp_path / "hf")
    first = load_llm(tmp_path / "hf", weights="int8", tokenizer=False)
    second = load_llm(tmp_path / "hf", weights="int8", tokenizer=False)
    assert second.config.extra["loaded_from"] == "cache"
    _same_model(first, second)


@pytest.mark.parametrize("damage", ["truncate", "record", "format", "missing tensors"])
def test_a_broken_entry_is_never_trusted_and_is_rebuilt(cache, q4_gguf, damage, caplog):
    good = load_llm(q4_gguf, weights="gguf")
    (entry,) = (cache / "llm").iterdir()
    weights, record = entry / WEIGHTS_FILE, entry / RECORD_FILE
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3])
    elif damage == "record":
        record.write_text("{not json")
    elif damage == "format":
        record.write_text(record.read_text().replace("archopt.prepared/1", "archopt.prepared/0"))
    else:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, str(weights))
    again = load_llm(q4_gguf, weights="gguf")
    assert again.config.extra["loaded_from"] == "checkpoint"
    assert "rebuilding a broken cache entry" in caplog.text
    _same_model(good, again)
    assert load_llm(q4_gguf, weights="gguf").config.extra["loaded_from"] == "cache"


def test_a_changed_checkpoint_is_a_new_entry(cache, q4_gguf):
    load_llm(q4_gguf, weights="gguf")
    later = time.time() + 5
    os.utime(q4_gguf, (later, later))
    assert load_llm(q4_gguf, weights="gguf").config.extra["loaded_from"] == "checkpoint"


def test_an_unwritable_cache_folder_loads_uncached(tmp_path, monkeypatch, q4_gguf):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ARCHOPT_CACHE", str(blocker / "cache"))
    for _ in range(2):
        model = load_llm(q4_gguf, weights="gguf")
        assert model.config.extra["loaded_from"] == "checkpoint"


def test_unknown_weights_fail_before_anything_is_read(cache):
    with pytest.raises(ValueError, match=r"weights must be one of auto, fp32, bf16, .*got 'int3'"):
        load_llm("/no/such/file.gguf", weights="int3")
    assert not cache.exists()
