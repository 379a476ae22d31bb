"""Longformer checkpoints from Hugging Face (a LongformerModel, or a task model's body)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from archopt.loading.keymap import rename_keys
from archopt.models.longformer import LongformerConfig

_LAYER = {
    **{
        rf"attention\.self\.{name}": f"attn.{name}"
        for name in ("query", "key", "value", "query_global", "key_global", "value_global")
    },
    r"attention\.output\.dense": "attn_out",
    r"attention\.output\.LayerNorm": "attn_norm",
    r"intermediate\.dense": "ffn_in",
    r"output\.dense": "ffn_out",
    r"output\.LayerNorm": "ffn_norm",
}


def longformer_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``LongformerModel`` keys -> archopt ``LongformerModel`` keys (load ``strict=True``)."""
    p = r"(?:longformer\.)?"
    rules = [
        (rf"{p}embeddings\.(word|position|token_type)_embeddings\.weight", r"\1_embeddings.weight"),
        (rf"{p}embeddings\.LayerNorm\.(weight|bias)", r"embed_norm.\1"),
        (rf"{p}pooler\.dense\.(weight|bias)", r"pooler.\1"),
        *[
            (rf"{p}encoder\.layer\.(\d+)\.{src}\.(weight|bias)", rf"layers.\1.{dst}.\2")
            for src, dst in _LAYER.items()
        ],
    ]
    return rename_keys(state_dict, rules, source="Hugging Face Longformer")


def longformer_config_from_hf(hf_config: Any, **overrides) -> LongformerConfig:
    """Our config for an HF ``LongformerConfig``; HF's full ``attention_window`` 2w becomes w."""
    windows = hf_config.attention_window
    if isinstance(windows, int):
        windows = [windows] * hf_config.num_hidden_layers
    for w in windows:
        if w % 2:
            raise ValueError(f"HF attention_window must be even (it is 2w), got {w}")
    if hf_config.hidden_act != "gelu":
        raise ValueError(f"only hidden_act='gelu' is supported, got {hf_config.hidden_act!r}")
    return LongformerConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        window=tuple(w // 2 for w in windows),
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        pad_token_id=hf_config.pad_token_id,
        layer_norm_eps=hf_config.layer_norm_eps,
        **overrides,
    )
