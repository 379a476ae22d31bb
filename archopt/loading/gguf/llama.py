"""LLaMA from GGUF: the config from the ``llama.*`` metadata, tensor names to Hugging Face's,
and the Q/K row permutation llama.cpp's converter applies, undone.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from archopt.errors import CheckpointError
from archopt.loading.gguf.dequant import check_supported
from archopt.loading.gguf.reader import GGUFFile
from archopt.models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)
# No trained weight comes near: fp32 tops out at 2**128, so a weight past 2**64 overflows as
# soon as it is squared (RMSNorm squares its input) or multiplied by a like value.
WEIGHT_LIMIT = 2.0**64


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


def _fail(path: Path, key: str, expected: str, got: Any) -> CheckpointError:
    return CheckpointError(f"{path}: {key}", expected, got)


def _integer(value: Any, key: str, path: Path, low: int = 1, high: int = 2**31 - 1) -> int:
    """An integer in [low, high]; a per-layer list (written for models whose layers differ)
    must be one value repeated."""
    if isinstance(value, list) and value and all(v == value[0] for v in value):
        value = value[0]
    if isinstance(value, list):
        expected = "one integer for every layer (layers of different shapes are not supported)"
        raise _fail(path, key, expected, value[:8])
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(path, key, f"an integer >= {low}", value)
    if value > high:  # as LlamaConfig bounds it: every weight's size fits torch's int64
        raise _fail(path, key, f"at most {high}", value)
    return value


def _positive(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(path, key, "a finite number > 0", value)
    if not math.isfinite(value) or value <= 0:
        raise _fail(path, key, "a finite number > 0", value)
    return float(value)


def _token_id(meta: dict, key: str, vocab: int, path: Path) -> int | None:
    i = meta.get(key)
    if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab):
        raise _fail(path, key, f"a token id in [0, {vocab}) (the vocabulary size)", i)
    return i


def llama_config_from_gguf(gf: GGUFFile) -> LlamaConfig:
    """Our config from a GGUF's ``llama.*`` and ``tokenizer.ggml.*`` metadata.

    Every field is checked for type and sense (``CheckpointError`` naming the key, what was
    expected and what the file holds); ``check_llama_tensors`` then checks the tensors
    against the config.
    """
    meta, path = gf.metadata, gf.path
    arch = gf.architecture
    if arch is None:
        raise CheckpointError(
            f"{path} has no general.architecture in its metadata; expected one of "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a {arch!r} model; only {list(SUPPORTED_ARCHITECTURES)} "
            "GGUF files are supported (llama.cpp writes Llama, Mistral and SmolLM "
            "as 'llama')"
        )
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise CheckpointError(f"{path} is missing required metadata {missing}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def integer(key: str, default: Any = None, low: int = 1, high: int = 2**31 - 1) -> int:
        return _integer(get(key, default), f"{arch}.{key}", path, low, high)

    n_head = integer("attention.head_count")
    n_kv = integer("attention.head_count_kv", n_head)
    a = f"{arch}."
    if n_head % n_kv:
        raise _fail(path, a + "attention.head_count_kv", f"a divisor of the {n_head} heads", n_kv)
    hidden = integer("embedding_length")
    if get("attention.key_length") is None and hidden % n_head:
        raise _fail(path, a + "attention.head_count", f"a divisor of {hidden} (the width)", n_head)
    head_dim = integer("attention.key_length", hidden // n_head, low=2)
    if head_dim % 2:
        raise _fail(path, a + "attention.key_length", "even (rotary pairs)", head_dim)
    value_length = integer("attention.value_length", head_dim)
    if value_length != head_dim:
        raise _fail(path, a + "attention.value_length", f"the key length {head_dim}", value_length)
    if integer("rope.dimension_count", head_dim) != head_dim:
        raise _fail(
            path,
            a + "rope.dimension_count",
            f"the head size {head_dim} (partial rotary embeddings are not supported)",
            get("rope.dimension_count"),
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise _fail(path, "tokenizer.ggml.tokens", "an array of strings", tokens)
    vocab = get("vocab_size")
    if vocab is None:
        embd = gf.tensors.get("token_embd.weight")
        vocab = len(tokens) if tokens else embd.shape[0] if embd is not None else None
    if vocab is None:
        raise CheckpointError(
            f"{path} gives no vocabulary size: expected {arch}.vocab_size, "
            "tokenizer.ggml.tokens or a token_embd.weight tensor"
        )
    vocab = _integer(vocab, f"{arch}.vocab_size", path)
    if tokens and len(tokens) > vocab:  # a token id past the embedding would fail mid-generation
        expected = f"at most {vocab} tokens (the embedding's rows)"
        raise _fail(path, "tokenizer.ggml.tokens", expected, len(tokens))
    # llama.cpp stops on every end-of-generation token; chat models often mark end-of-turn apart.
    stops = [
        _token_id(meta, f"tokenizer.ggml.{k}_token_id", vocab, path) for k in ("eos", "eot", "eom")
    ]
    stops = list(dict.fromkeys(i for i in stops if i is not None))
    eps_key = a + "attention.layer_norm_rms_epsilon"
    extra = {
        "gguf_path": str(path),
        "tensor_types": dict(Counter(t.type.name for t in gf.tensors.values())),
    }
    for key, name in (("general.name", "name"), ("tokenizer.chat_template", "chat_template")):
        if key in meta:
            extra[name] = meta[key]
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=integer("feed_forward_length"),
        num_layers=integer("block_count"),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=integer("context_length", high=2**40),
        rms_norm_eps=_positive(get(eps_key.removeprefix(a)), eps_key, path),
        rope_theta=_positive(get("rope.freq_base", 10000.0), a + "rope.freq_base", path),
        rope_scaling=_rope_scaling(meta, arch, path),
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=_token_id(meta, "tokenizer.ggml.bos_token_id", vocab, path),
        eos_token_id=None if not stops else stops[0] if len(stops) == 1 else stops,
        pad_token_id=_token_id(meta, "tokenizer.ggml.padding_token_id", vocab, path),
        extra=extra,
    )
    try:
        return LlamaConfig(**fields)
    except ValueError as e:  # LlamaConfig's own checks: name the file
        raise CheckpointError(f"{path}: {e}") from e


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    # Llama 3.1's "llama3" scaling is not in the metadata: convert_hf_to_gguf bakes it into a
    # rope_freqs tensor of per-frequency divisors, which load_gguf_llama applies (see there).
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor_key = f"{arch}.rope.scaling.factor"
    if factor_key not in meta:
        factor_key = f"{arch}.rope.scale_linear"  # the key older converters wrote
    factor = meta.get(factor_key)
    if factor is not None:
        factor = _positive(factor, factor_key, path)
    if not isinstance(kind, str):
        raise _fail(path, f"{arch}.rope.scaling.type", "'none' or 'linear'", kind)
    if kind == "none" and factor not in (None, 1.0) and f"{arch}.rope.scale_linear" in meta:
        kind = "linear"
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise CheckpointError(
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


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape (torch order) in a GGUF Llama of ``cfg``."""
    h, f, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (vocab, h)
    layer = {
        "attn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_k.weight": (kv, h),
        "attn_v.weight": (kv, h), "attn_output.weight": (h, q), "ffn_norm.weight": (h,),
        "ffn_gate.weight": (f, h), "ffn_up.weight": (f, h), "ffn_down.weight": (h, f),
    }  # fmt: skip
    for i in range(cfg.num_layers):
        shapes |= {f"blk.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def check_llama_tensors(gf: GGUFFile, cfg: LlamaConfig) -> None:
    """The tensors are those of ``cfg``'s Llama, no more and no fewer, each of the shape the
    metadata implies and of a type that can be dequantized; ``CheckpointError`` naming the
    tensor otherwise. Reads no tensor data."""
    layers = {name.split(".")[1] for name in gf.tensors if name.startswith("blk.")}
    if cfg.num_layers > len(layers):  # before listing the names: the count may be absurd
        raise CheckpointError(
            f"{gf.path}: {gf.architecture}.block_count",
            f"at most the {len(layers)} layers the file holds tensors for",
            cfg.num_layers,
        )
    expected = _expected_shapes(cfg)
    if ROPE_FREQS in gf.tensors:
        expected[ROPE_FREQS] = (cfg.head_dim // 2,)
    missing = [name for name in expected if name not in gf.tensors]
    if missing:
        raise CheckpointError(
            f"{gf.path} lacks tensors that a {cfg.num_layers}-layer Llama needs: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    for name, t in gf.tensors.items():
        if name not in expected:
            raise CheckpointError(
                f"{gf.path}: tensor {name!r} is not part of a {cfg.num_layers}-layer "
                "Llama (biases, mixture-of-experts and extra layers are not supported)"
            )
        if t.shape != expected[name]:
            raise CheckpointError(
                f"{gf.path}: tensor {name!r} has shape {list(t.shape)}, expected "
                f"{list(expected[name])} from the metadata (hidden {cfg.hidden_size}, "
                f"{cfg.num_heads} heads and {cfg.num_kv_heads} key/value heads of "
                f"{cfg.head_dim}, feed-forward {cfg.intermediate_size}, vocabulary "
                f"{cfg.vocab_size})"
            )
        check_supported(t.type, f"{gf.path}: tensor {name!r}")


def check_finite(w: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """Weights of magnitude below ``WEIGHT_LIMIT``: a NaN or infinity (a corrupt block scale), or
    a value whose square overflows fp32 (bytes read as the wrong type), reach every output."""
    if w.numel() == 0:
        return w
    low, high = torch.aminmax(w)  # one pass, no mask; NaN propagates into both
    if not (low > -WEIGHT_LIMIT and high < WEIGHT_LIMIT):
        bad = ~(w.abs() < WEIGHT_LIMIT)
        first = int(bad.flatten().nonzero()[0])
        raise CheckpointError(
            f"{path}: tensor {name!r} holds {int(bad.sum())} values that are NaN, infinite or "
            f"beyond +-2**64 (the first, at flat index {first}, is {w.flatten()[first].item()}); "
            "expected finite weights whose products fit in fp32: the file is corrupt"
        )
    return w


def gguf_llama_hf_state_dict(
    gf: GGUFFile, cfg: LlamaConfig, placeholders: set[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """fp32 tensors under Hugging Face ``LlamaForCausalLM`` names, Q/K rows un-permuted.

    Every name, shape and type is checked before anything is dequantized; every value after.
    The tensors named in ``placeholders`` are not read: they stand as meta tensors of their
    shape, for a loader that puts other modules in their place (``keep_quantized_linears``,
    which checks their blocks' scales).
    """
    check_llama_tensors(gf, cfg)
    names = {name: _hf_name(name, cfg.num_layers) for name in gf.tensors if name != ROPE_FREQS}
    out = {}
    with one_thread():
        for name, hf in names.items():
            if name in placeholders:
                out[hf] = torch.empty(gf.tensors[name].shape, device="meta")
                continue
            w = check_finite(gf.tensors[name].dequantize(), name, gf.path)
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
        raise CheckpointError(
            f"{gf.path}: {ROPE_FREQS} has shape {list(t.shape)}, expected "
            f"[{cfg.head_dim // 2}] (head_dim / 2)"
        )
    check_supported(t.type, f"{gf.path}: tensor {ROPE_FREQS!r}")
    factors = check_finite(t.dequantize(), ROPE_FREQS, gf.path)
    if (factors <= 0).any():
        expected = "positive divisors of the rotary frequencies"
        raise CheckpointError(f"{gf.path}: {ROPE_FREQS}", expected, factors.tolist()[:8])
    return factors
