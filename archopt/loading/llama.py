"""LLaMA checkpoints in Hugging Face's layout: config.json, safetensors, the key map both ways.

Everything is read through safetensors or gguf, never unpickled. A checkpoint is fully read and
checked before any weight is copied into the model, so a bad file leaves nothing half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from archopt.errors import CheckpointError
from archopt.models.llama import Llama, LlamaConfig

WEIGHT_LIMIT = 2.0**64  # as the GGUF loader's: a weight's square must fit in fp32
_REQUIRED_HF = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


def llama_config_from_hf(hf: dict) -> LlamaConfig:
    """Our config from a Hugging Face ``config.json`` dict (old and new rope forms)."""
    if not isinstance(hf, dict):
        raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ValueError(f"config.json: {key} must be an object or null, got {hf[key]!r}")
    missing = [k for k in (*_REQUIRED_HF, "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"config.json is missing required field(s) {missing}")
    rope = hf.get("rope_parameters")  # transformers >= 5: theta and scaling in one dict
    if rope is not None:
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = None if rope.get("rope_type", "default") == "default" else dict(rope)
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


_HF_LAYER = (
    "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
    "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)  # fmt: skip


def check_hf_names(names, cfg: LlamaConfig) -> None:
    """Every tensor ``cfg``'s Llama needs is among ``names`` (HF ``LlamaForCausalLM``'s names,
    ``model.`` optional); ``CheckpointError`` naming the missing ones otherwise."""
    names = {k.removeprefix("model.") for k in names}
    layers = {k.split(".")[1] for k in names if k.startswith("layers.")}
    if cfg.num_layers > len(layers):  # before listing the names: the count may be absurd
        expected = f"at most the {len(layers)} layers the checkpoint holds tensors for"
        raise CheckpointError("num_hidden_layers", expected, cfg.num_layers)
    need = ["embed_tokens.weight", "norm.weight"]
    need += [f"layers.{i}.{m}.weight" for i in range(cfg.num_layers) for m in _HF_LAYER]
    missing = [k for k in need if k not in names]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks tensors that a {cfg.num_layers}-layer Llama needs: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )


def llama_state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict:
    """Rename HF ``LlamaForCausalLM`` keys to ours, fusing q/k/v and gate/up."""
    check_hf_names(sd, cfg)
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    out = {"embed.weight": sd.pop("embed_tokens.weight"), "norm.weight": sd.pop("norm.weight")}
    head = sd.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if head is None:
            raise CheckpointError(
                "checkpoint has no lm_head.weight but tie_word_embeddings is false"
            )
        out["lm_head.weight"] = head
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[p + "attn_norm.weight"] = sd.pop(p + "input_layernorm.weight")
        out[p + "mlp_norm.weight"] = sd.pop(p + "post_attention_layernorm.weight")
        out[p + "attn.qkv.weight"] = _cat([sd.pop(f"{attn}{n}_proj.weight") for n in "qkv"], cfg)
        out[p + "attn.out.weight"] = sd.pop(attn + "o_proj.weight")
        gate_up = [sd.pop(mlp + "gate_proj.weight"), sd.pop(mlp + "up_proj.weight")]
        out[p + "mlp.gate_up.weight"] = _cat(gate_up, cfg)
        out[p + "mlp.down.weight"] = sd.pop(mlp + "down_proj.weight")
    leftover = [k for k in sd if "rotary_emb" not in k]
    if leftover:
        raise CheckpointError(f"unexpected tensors in the checkpoint: {leftover[:5]}")
    return out


def _cat(parts: list[torch.Tensor], cfg: LlamaConfig) -> torch.Tensor:
    """Rows of projections that share an input; their columns must agree (the hidden size)."""
    cols = {tuple(t.shape[1:]) for t in parts}
    if len(cols) != 1 or any(t.dim() != 2 for t in parts):
        expected = f"2-D with {cfg.hidden_size} columns each (the hidden size)"
        raise CheckpointError("fused projections", expected, [list(t.shape) for t in parts])
    if all(t.is_meta for t in parts):  # placeholders: torch's meta cat imports torch._dynamo (2 s)
        rows = sum(t.shape[0] for t in parts)
        return torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, dim=0)


def llama_state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict:
    """Our state dict in HF ``LlamaForCausalLM`` names: the inverse of the map above."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, hf = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = sd[p + "attn.qkv.weight"].split([q, kv, kv])
        gate, up = sd[p + "mlp.gate_up.weight"].split(cfg.intermediate_size)
        out |= {
            hf + "input_layernorm.weight": sd[p + "attn_norm.weight"],
            hf + "post_attention_layernorm.weight": sd[p + "mlp_norm.weight"],
            hf + "self_attn.q_proj.weight": wq,
            hf + "self_attn.k_proj.weight": wk,
            hf + "self_attn.v_proj.weight": wv,
            hf + "self_attn.o_proj.weight": sd[p + "attn.out.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": sd[p + "mlp.down.weight"],
        }
    return out


def build_llama(cfg: LlamaConfig, state_dict: dict, dtype: torch.dtype | None = None) -> Llama:
    """A model with ``state_dict`` copied in, checked strictly (shapes and names)."""
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        shapes = [(k, expected[k], got[k]) for k in expected if k in got and expected[k] != got[k]]
        raise CheckpointError(
            f"checkpoint does not match the config: missing {missing}, unexpected {extra}, "
            f"shape mismatches (name, expected, got) {shapes[:5]}"
        )
    for name, t in state_dict.items():
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name}", "a floating-point dtype", str(t.dtype))
        if t.is_meta:  # a placeholder for a layer the loader replaces (kept GGUF blocks)
            continue
        # A NaN, an infinity or a weight past 2**64 (whose square overflows fp32) spreads to
        # every output; aminmax: one pass, no mask.
        low, high = torch.aminmax(t) if t.numel() else (0.0, 0.0)
        if not (low > -WEIGHT_LIMIT and high < WEIGHT_LIMIT):
            bad = int((~(t.abs() < WEIGHT_LIMIT)).sum())
            raise CheckpointError(
                f"tensor {name} holds {bad} values that are NaN, infinite or beyond +-2**64; "
                "expected finite weights whose products fit in fp32 (the checkpoint is corrupt)"
            )
    model.load_state_dict(state_dict, assign=True)
    model.rope = type(model.rope)(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _indexed_files(index: Path) -> list[str]:
    """The weight files ``index`` names, each a plain file name inside its folder: a name that
    leads elsewhere (an absolute path, ``..``, a link out) is refused, never read."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{index}: expected JSON with a 'weight_map' of tensor name -> file name, got an "
            f"unreadable index ({type(e).__name__}: {e})"
        ) from e
    folder = index.parent.resolve()
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{index}: weight file names must be strings, got {name!r}")
        target = (index.parent / name).resolve()
        if Path(name).is_absolute() or ".." in Path(name).parts or target.parent != folder:
            raise ValueError(
                f"{index}: weight files must be inside {folder}, got {name!r}, which leads to "
                f"{target}"
            )
    return names


def _read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    from archopt.loading.safetensors_file import read_safetensors

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _indexed_files(index)
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        tensors = read_safetensors(path / name)
        twice = sorted(set(tensors) & set(sd))
        if twice:
            raise CheckpointError(
                f"{path / name} holds tensors that another weight file also holds: {twice[:5]}"
            )
        sd.update(tensors)
    return sd


def load_hf_llama(path: str | Path, *, dtype: torch.dtype | None = None, tokenizer: bool = True):
    """A ``Llama`` from a Hugging Face folder (config.json + safetensors), with its tokenizer.

    Most callers want ``archopt.load_llm``, which takes this folder, a GGUF file or a name.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"expected a Hugging Face model directory: {path}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        cfg = llama_config_from_hf(json.loads(config_file.read_text()))
    except (ValueError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{config_file}: {e}") from e
    tensors = _read_safetensors_dir(path)  # its errors name the file
    try:
        model = build_llama(cfg, llama_state_dict_from_hf(tensors, cfg), dtype)
    except CheckpointError as e:  # name the folder
        raise CheckpointError(f"{path}: {e}") from e
    if tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(path)
    return model
