"""Llama against Hugging Face LlamaForCausalLM: logits, greedy tokens, checkpoint formats."""

import json
import re

import pytest
import torch

from archopt.generate import generate
from archopt.loading.llama import llama_config_from_hf
from archopt.loading.llm import load_llm
from archopt.models.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
CONFIGS = {
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-llama3": dict(num_key_value_heads=1, rope_scaling=LLAMA3_SCALING),
    "gqa-headdim": dict(num_key_value_heads=2, head_dim=24, rope_theta=500.0),
}


def hf_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    # Random norm weights so that a swapped or missing norm cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_llama(**CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_llm(path)


def test_logits_equal_hf(pair):
    hf, ours = pair
    ids = torch.randint(0, 320, (2, 77))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(ours(ids), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", ["none", "dense", "static"])
def test_greedy_tokens_equal_hf(pair, cache):
    hf, ours = pair
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        # An explicit mask: HF would otherwise mask every prompt token equal to pad_token_id.
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert torch.equal(generate(ours, ids, 64, cache=cache), ref)


def test_sharded_checkpoint_and_rope_forms(tmp_path):
    hf = hf_llama(num_key_value_heads=2, rope_scaling=LLAMA3_SCALING)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(load_llm(tmp_path)(ids), ref, rtol=0, atol=1e-5)
    # The same scaling in the older top-level form and the newer rope_parameters form.
    old = dict(rope_theta=5000.0, rope_scaling=LLAMA3_SCALING)
    new = dict(rope_parameters={"rope_theta": 5000.0, **LLAMA3_SCALING})
    base = dict(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=1) | dict(
        num_attention_heads=2
    )
    assert llama_config_from_hf(base | old) == llama_config_from_hf(base | new)


def test_config_errors():
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['hidden_size'\]"):
        llama_config_from_hf(
            dict(vocab_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type must be one of"):
        Llama(LlamaConfig(hidden_size=16, num_heads=2, rope_scaling={"rope_type": "yarn"}))


def test_bad_checkpoints_raise_and_load_nothing(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"model\.safetensors is not a valid safetensors .*truncated"
    ):
        load_llm(tmp_path)
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 100}))
    with pytest.raises(ValueError, match="shape mismatches"):
        load_llm(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"a Hugging Face model folder or a \.gguf file"):
        load_llm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_llm(tmp_path / "empty")
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FileNotFoundError, match=r"a Hugging Face model folder or a \.gguf file"):
        load_llm(tmp_path / "x.pt")


def test_rope_stays_fp32_when_model_is_cast(pair):
    _, ours = pair
    model = Llama(ours.config)
    model.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 320, (1, 200))
    ref = model(ids)
    model.to(torch.bfloat16)
    assert model.rope.inv_freq.dtype == torch.float32
    model.rope(torch.arange(200)[None], torch.bfloat16)
    assert model.rope.cos_table.dtype == torch.float32
    assert model.embed.weight.dtype == torch.bfloat16
    # bf16 weights and activations: close to fp32 in the large, not bit-equal.
    err = (model(ids).float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1


def test_fast_rope_and_norm_equal_their_reference_forms():
    from archopt.ops.norms import RMSNorm
    from archopt.ops.rope import RotaryEmbedding, apply_rope, rotate_half

    rope = RotaryEmbedding(64, 10000.0)
    positions = torch.randint(0, 3000, (2, 37))
    cos, signed_sin = rope(positions, torch.float32)
    freqs = positions[..., None].float() * rope.inv_freq  # (B, T, 32)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
    x = torch.randn(2, 37, 5, 64)
    reference = x * emb.cos() + rotate_half(x) * emb.sin()  # Hugging Face's form
    assert torch.equal(apply_rope(x, cos, signed_sin), reference)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 11, 64) * 3
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), reference)


def test_state_dict_maps_to_hf_and_back(pair):
    from archopt.loading.llama import llama_state_dict_from_hf, llama_state_dict_to_hf

    hf, ours = pair
    to_hf = llama_state_dict_to_hf(ours.state_dict(), ours.config)
    reference = hf.state_dict()
    for k, v in to_hf.items():
        assert torch.equal(v, reference[k]), k
    back = llama_state_dict_from_hf(to_hf, ours.config)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def _saved(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "name",
    ["/etc/hostname", "../outside.safetensors", "sub/../../outside.safetensors", "link"],
)
def test_an_index_naming_files_outside_the_folder_is_refused(tmp_path, name):
    folder = _saved(tmp_path / "model")
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)  # real weights, but outside the folder
    (folder / "link").symlink_to(outside)
    index = {"weight_map": {"model.embed_tokens.weight": name}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="weight files must be inside"):
        load_llm(folder)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"num_attention_heads": 0}, "num_heads must be an integer >= 1, got 0"),
        ({"hidden_size": "64"}, "hidden_size must be an integer >= 1, got '64'"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0"),
        ({"rope_scaling": [1, 2]}, "rope_scaling must be an object or null"),
        ({"eos_token_id": [2, -1]}, "eos_token_id must be token id"),
        ({"num_hidden_layers": None}, "num_layers must be an integer >= 1, got None"),
    ],
)
def test_bad_config_fields_are_named(tmp_path, change, message):
    folder = _saved(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_llm(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: Expecting property name"):
        load_llm(folder)
