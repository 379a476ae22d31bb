"""Longformer: a RoBERTa encoder whose self-attention is local (sliding window) plus global.

Paper: Beltagy, Peters and Cohan, 2020, "Longformer: The Long-Document Transformer"
(arXiv:2004.05150). Matches Hugging Face ``LongformerModel`` (hidden states and pooler output,
with and without global attention and padding); keys map with
``archopt.loading.longformer_from_hf``.

Windows here are one-sided: a token sees ``window`` tokens on each side (2w+1 in all). Hugging
Face's ``attention_window`` is the full window 2w. Unlike HF, no padding of the sequence to a
multiple of the window is needed: the attention op handles any length exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from archopt.models._registry import register_model, with_overrides
from archopt.ops.attention import local_attention


@dataclass
class LongformerConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    window: int | Sequence[int] = 256  # one-sided, per layer if a sequence
    dilation: int | Sequence[int] = 1  # per layer if a sequence
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    backend: str = "auto"  # local attention backend

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        for name in ("window", "dilation"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != self.num_layers:
                raise ValueError(
                    f"{name} must be an int or one value per layer ({self.num_layers}), "
                    f"got {len(value)} values"
                )

    def layer_value(self, name: str, layer: int) -> int:
        value = getattr(self, name)
        return value if isinstance(value, int) else value[layer]


class LongformerSelfAttention(nn.Module):
    """Local + global self-attention with Longformer's separate global projections.

    Every token attends its window and the global tokens (local projections ``query``/``key``/
    ``value``); a global token attends every token through ``query_global``/``key_global``/
    ``value_global``. Padded tokens are never attended and their outputs are zero.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        window: int,
        dilation: int | Sequence[int] = 1,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.window = window
        self.dilation = dilation
        self.backend = backend
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(self, name, nn.Linear(hidden_size, hidden_size))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, dh)

    def forward(
        self,
        hidden: torch.Tensor,
        global_mask: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` (B, N, C); masks (B, N) bool (``padding_mask`` True = padding)."""
        b, n, c = hidden.shape
        if padding_mask is not None and global_mask is not None:
            global_mask = global_mask & ~padding_mask  # padding wins, as in HF's mask merge
        q, k, v = (self._heads(proj(hidden)) for proj in (self.query, self.key, self.value))
        out = local_attention(
            q,
            k,
            v,
            window=self.window,
            dilation=self.dilation,
            global_mask=global_mask,
            key_padding_mask=padding_mask,
            scale=self.head_dim**-0.5,
            backend=self.backend,
        )  # (B, H, N, dh)
        if global_mask is not None and bool(global_mask.any()):
            out = self._global_rows(hidden, out, global_mask, padding_mask)
        if padding_mask is not None:
            out = out.masked_fill(padding_mask[:, None, :, None], 0.0)
        return out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)

    def _global_rows(self, hidden, out, global_mask, padding_mask) -> torch.Tensor:
        """Recompute the global tokens' rows: full attention with the global projections."""
        g = int(global_mask.sum(1).max())
        # Global positions first in each row (stable), then cut to the largest count.
        order = torch.argsort((~global_mask).to(torch.int8), dim=1, stable=True)[:, :g]  # (B, G)
        valid = global_mask.gather(1, order)  # (B, G): False where a row has fewer globals
        picked = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, G, C)
        q = self._heads(self.query_global(picked))  # (B, H, G, dh)
        k = self._heads(self.key_global(hidden))  # (B, H, N, dh)
        v = self._heads(self.value_global(hidden))
        keep = None
        if padding_mask is not None:
            keep = ~padding_mask[:, None, None, :]  # (B, 1, 1, N)
            # Masks win over values (as in local_attention): a padded key or value that is not
            # finite must not reach a global row through 0 * NaN, so padding reads as zeros.
            pad = padding_mask[:, None, :, None]
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
        rows = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, G, dh)
        index = order[:, None, :, None].expand(-1, out.shape[1], -1, out.shape[-1])
        rows = torch.where(valid[:, None, :, None], rows, out.gather(2, index))
        return out.scatter(2, index, rows)


class LongformerLayer(nn.Module):
    def __init__(self, c: LongformerConfig, layer: int) -> None:
        super().__init__()
        self.attn = LongformerSelfAttention(
            c.hidden_size,
            c.num_heads,
            c.layer_value("window", layer),
            c.layer_value("dilation", layer),
            backend=c.backend,
        )
        self.attn_out = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(c.hidden_size, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, c.hidden_size)
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h, global_mask, padding_mask):
        h = self.attn_norm(h + self.attn_out(self.attn(h, global_mask, padding_mask)))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class LongformerOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, N, C)
    pooler_output: torch.Tensor  # (B, C): tanh(dense(first token))


class LongformerModel(nn.Module):
    def __init__(self, config: LongformerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(
            c.max_position_embeddings, c.hidden_size, padding_idx=c.pad_token_id
        )
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(LongformerLayer(c, i) for i in range(c.num_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)

    def example_inputs(self, batch: int = 1, length: int = 1024) -> tuple[torch.Tensor, ...]:
        return (torch.randint(3, self.config.vocab_size, (batch, length)),)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        global_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> LongformerOutput:
        """HF conventions: ``attention_mask`` 1 = token, 0 = padding; ``global_attention_mask``
        1 = global. Both (B, N), any integer or bool dtype."""
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(
                f"expected input_ids of shape (batch, length), got {tuple(input_ids.shape)}"
            )
        _b, n = input_ids.shape
        # RoBERTa positions: padding_idx + running count of non-pad tokens; pads get padding_idx.
        max_pos = n + c.pad_token_id + 1
        if max_pos > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {n} needs {max_pos} position embeddings, the model has "
                f"{c.max_position_embeddings}"
            )
        for name, mask in (
            ("attention_mask", attention_mask),
            ("global_attention_mask", global_attention_mask),
        ):
            if mask is not None and mask.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have shape {tuple(input_ids.shape)}, got {tuple(mask.shape)}"
                )
        not_pad = input_ids.ne(c.pad_token_id).long()
        positions = torch.cumsum(not_pad, dim=1) * not_pad + c.pad_token_id
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        h = self.embed_norm(h)  # (B, N, C)
        padding_mask = None if attention_mask is None else attention_mask == 0
        global_mask = None if global_attention_mask is None else global_attention_mask != 0
        for layer in self.layers:
            h = layer(h, global_mask, padding_mask)
        return LongformerOutput(h, torch.tanh(self.pooler(h[:, 0])))


def _build(preset: LongformerConfig, overrides: dict) -> LongformerModel:
    return LongformerModel(with_overrides(preset, overrides))


@register_model(task="encoder", default_input=(4096,))
def longformer_base_4096(**overrides) -> LongformerModel:
    """The shapes of allenai/longformer-base-4096 (148.7M parameters), random init."""
    return _build(LongformerConfig(), overrides)
