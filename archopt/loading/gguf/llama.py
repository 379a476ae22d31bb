"""LLaMA from GGUF: the config from the ``llama.*`` metadata, tensor names to Hugging Face's,
and the Q/K row permutation llama.cpp's converter applies, undone.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from archopt.loading.gguf.dequant import check_supported
from archopt.loading.gguf.reader import GGUFFile
from archopt.models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's permutation of attn_q (n_head) / attn_k (n_head_kv) rows.

    llama.cpp's RoPE rotates adjacent pairs (2i, 2i+1); Hugging Face's rotates (i, i + d/2). The
    converter reorders each head's rows from the second layout to the first:
    ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; this is its inverse. It moves whole rows,
    so it applies to raw quantized blocks (``GGUFTensor.data``) as well as to dequantized values.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(
            f"a Q/K weight with {rows} rows cannot be split into {n_head} heads of even size"
        )
    # (n_head, d/2, 2, ...) -> (n_head, 2, d/2, ...): pair members back to the two halves.
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_REQUIRED = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"


def _uniform(value: Any, key: str, path: Path) -> int:
    """A per-layer list (written for models whose layers differ) must be one repeated value."""
    if isinstance(value, list) and len(set(value)) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise ValueError(
            f"{path}: {key} must be one integer for every layer, got {value!r}; layers of "
            "different shapes are not supported"
        )
    return value


def llama_config_from_gguf(gf: GGUFFile) -> LlamaConfig:
    """Our config from a GGUF's ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
    meta, path = gf.metadata, gf.path
    arch = gf.architecture
    if arch is None:
        raise ValueError(
            f"{path} has no general.architecture in its metadata; expected one of "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {arch!r} model; only {list(SUPPORTED_ARCHITECTURES)} "
            "GGUF files are supported (llama.cpp writes Llama, Mistral and SmolLM "
            "as 'llama')"
        )
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise ValueError(f"{path} is missing required metadata {missing}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_head = _uniform(get("attention.head_count"), f"{arch}.attention.head_count", path)
    n_kv = _uniform(get("attention.head_count_kv", n_head), f"{arch}.head_count_kv", path)
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(
            f"{path}: attention.value_length {get('attention.value_length')} must "
            f"equal the key length {head_dim}"
        )
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{path}: partial rotary embeddings are not supported: "
            f"rope.dimension_count is {get('rope.dimension_count')}, expected the "
            f"head size {head_dim}"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size")
    if vocab is None:
        embd = gf.tensors.get("token_embd.weight")
        vocab = len(tokens) if tokens else embd.shape[0] if embd is not None else None
    if vocab is None:
        raise ValueError(
            f"{path} gives no vocabulary size: expected {arch}.vocab_size, "
            "tokenizer.ggml.tokens or a token_embd.weight tensor"
        )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    # llama.cpp stops on every end-of-generation token; chat models often mark end-of-turn apart.
    stops = [
        i
        for i in (
            eos,
            meta.get("tokenizer.ggml.eot_token_id"),
            meta.get("tokenizer.ggml.eom_token_id"),
        )
        if i is not None
    ]
    stops = list(dict.fromkeys(stops))
    extra = {
        "gguf_path": str(path),
        "tensor_types": dict(Counter(t.type.name for t in gf.tensors.values())),
    }
    for key, name in (("general.name", "name"), ("tokenizer.chat_template", "chat_template")):
        if key in meta:
            extra[name] = meta[key]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_uniform(get("feed_forward_length"), f"{arch}.feed_forward_length", path),
        num_layers=get("block_count"),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, path),
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=None if not stops else stops[0] if len(stops) == 1 else stops,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        extra=extra,
    )


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    # Llama 3.1's "llama3" scaling is not in the metadata: convert_hf_to_gguf bakes it into a
    # rope_freqs tensor of per-frequency divisors, which load_gguf_llama applies (see there).
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor not in (None, 1.0) and f"{arch}.rope.scale_linear" in meta:
        kind = "linear"  # the key older converters wrote
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(
        f"{path}: rope scaling {kind!r} is not supported, expected 'none' or "
        "'linear' (llama3 scaling comes as a rope_freqs tensor, also supported)"
    )


def _hf_name(name: str, num_layers: int) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and int(layer) < num_layers and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    return None


def gguf_llama_hf_state_dict(
    gf: GGUFFile, cfg: LlamaConfig, placeholders: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """fp32 tensors under Hugging Face ``LlamaForCausalLM`` names, Q/K rows un-permuted.

    Every name and type is checked before anything is dequantized. The tensors named in
    ``placeholders`` are not read: they stand as meta tensors of their shape, for a loader that
    puts other modules in their place (``keep_quantized_linears``).
    """
    names = {}
    for name, t in gf.tensors.items():
        if name == ROPE_FREQS:
            continue
        hf = _hf_name(name, cfg.num_layers)
        if hf is None:
            raise ValueError(
                f"{gf.path}: tensor {name!r} is not part of a {cfg.num_layers}-layer "
                "Llama (biases, mixture-of-experts and extra layers are not supported)"
            )
        check_supported(t.type, f"{gf.path}: tensor {name!r}")
        names[name] = hf
    out = {}
    with one_thread():
        for name, hf in names.items():
            if name in placeholders:
                out[hf] = torch.empty(gf.tensors[name].shape, device="meta")
                continue
            w = gf.tensors[name].dequantize()
            if ".attn_q." in name:
                w = unpermute_qk(w, cfg.num_heads)
            elif ".attn_k." in name:
                w = unpermute_qk(w, cfg.num_kv_heads)
            out[hf] = w
    return out


@contextmanager
def one_thread():
    """Run torch ops on one intra-op thread, restoring the count after.

    Dequantizing is a few cheap elementwise ops per tensor, on tensors of about a million values:
    there the wake-up of OpenMP's other threads costs more than the work. Measured on SmolLM2
    on the 2-core machine: 0.56 s on one thread, 1.8-5.6 s on two (when the other core is busy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rope_freqs(gf: GGUFFile, cfg: LlamaConfig) -> torch.Tensor | None:
    t = gf.tensors.get(ROPE_FREQS)
    if t is None:
        return None
    if t.shape != (cfg.head_dim // 2,):
        raise ValueError(
            f"{gf.path}: {ROPE_FREQS} has shape {list(t.shape)}, expected "
            f"[{cfg.head_dim // 2}] (head_dim / 2)"
        )
    check_supported(t.type, f"{gf.path}: tensor {ROPE_FREQS!r}")
    return t.dequantize()
