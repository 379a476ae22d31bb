"""The pre-norm transformer encoder layer shared by ViT/DeiT and MobileViT.

Vaswani et al., 2017, "Attention Is All You Need" (arXiv:1706.03762), in the pre-norm
placement of ViT (Dosovitskiy et al., 2021, arXiv:2010.11929, Eq. 2-3):

    x = x + MHSA(LN(x))
    x = x + MLP(LN(x))          MLP = Linear(d, r*d) -> act -> Linear(r*d, d)

ViT and DeiT use GELU in the MLP; MobileViT (Mehta & Rastegari, 2022) uses SiLU ("swish").
The parameter layout follows timm's ``vision_transformer.Block`` (one fused ``qkv``
projection), so timm checkpoints load by renaming keys alone.

The attention matmuls run through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels where the backend has them); ``archopt.measure`` counts that call as
``QK^T`` plus ``AV`` MACs and gives it its own row in ``layer_table``, separate from the
``nn.Linear`` projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archopt.ops.conv import make_activation


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over (B, N, d) tokens: fused QKV projection, SDPA, output proj."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"dim must be divisible by num_heads (a positive int), got dim={dim}, "
                f"num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        # (B, N, 3*D) -> (B, N, 3, heads, head_dim) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        dropout_p = self.attn_dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, heads, N, hd)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, heads*head_dim)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Position-wise feed-forward network: Linear -> activation -> Linear."""

    def __init__(
        self, dim: int, hidden_dim: int, *, act: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """Pre-norm encoder layer on (B, N, d): ``x + MHSA(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        attn_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MultiHeadSelfAttention(
            dim, num_heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, dropout=dropout
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


__all__ = ["Mlp", "MultiHeadSelfAttention", "TransformerLayer"]
