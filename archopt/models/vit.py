"""Vision Transformer (ViT) and DeiT shapes: the pure-attention baseline for MobileViT.

Paper: Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale" (arXiv:2010.11929), Eq. 1-4: linear patch embedding (a 16x16 stride-16
conv), a learned class token and learned position embeddings, L pre-norm encoder layers, a
final LayerNorm, and a linear head on the class token. DeiT-Tiny (Touvron et al., 2021,
arXiv:2012.12877, Table 1) is the same network at d=192 with 3 heads. Matches timm
``vit_tiny_patch16_224`` / ``deit_tiny_patch16_224`` / ``vit_base_patch16_224``
(``VisionTransformer``, class-token pooling, LayerNorm eps 1e-6, exact GELU).

The encoder layer is :class:`archopt.ops.transformer.TransformerLayer`, the same code MobileViT
runs over its unfolded patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archopt.models._registry import register_model, with_overrides
from archopt.models.image import check_classifier_config, check_image, random_images
from archopt.ops.transformer import TransformerLayer


@dataclass
class ViTConfig:
    img_size: int = 224  # position embeddings are learned for (img_size / patch_size)^2 patches
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    num_classes: int = 1000  # 0: no classifier, forward returns the class token's features
    in_chans: int = 3
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.img_size % self.patch_size:
            raise ValueError(
                f"img_size must be a multiple of patch_size, got img_size={self.img_size}, "
                f"patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got {self.embed_dim} and "
                f"{self.num_heads}"
            )
        check_classifier_config(self.num_classes, self.in_chans, self.act)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.default_resolution = c.img_size
        d = c.embed_dim
        # Eq. 1: flattening each patch and multiplying by E is a conv with kernel = stride = p.
        self.patch_embed = nn.Conv2d(c.in_chans, d, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_patches + 1, d) * 0.02)
        self.pos_drop = nn.Dropout(c.dropout)
        self.blocks = nn.Sequential(
            *[
                TransformerLayer(
                    d,
                    c.num_heads,
                    mlp_ratio=c.mlp_ratio,
                    act=c.act,
                    qkv_bias=c.qkv_bias,
                    norm_eps=c.norm_eps,
                    dropout=c.dropout,
                )
                for _ in range(c.depth)
            ]
        )
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.num_features = d
        self.head_drop = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(d, c.num_classes) if c.num_classes else nn.Identity()
        nn.init.normal_(self.cls_token, std=1e-6)

    def example_inputs(self, batch: int = 1, resolution: int | None = None) -> tuple[torch.Tensor]:
        return random_images(batch, self.config.in_chans, resolution or self.default_resolution)

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        check_image(x, c.in_chans)
        if tuple(x.shape[-2:]) != (c.img_size, c.img_size):
            grid = c.img_size // c.patch_size
            raise ValueError(
                f"expected a {c.img_size}x{c.img_size} input (position embeddings are learned "
                f"for a {grid}x{grid} grid of {c.patch_size}x{c.patch_size} patches), "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.patch_embed(x)  # (B, d, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, d), patches in row-major order
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, d)
        x = torch.cat((cls, x), dim=1) + self.pos_embed  # (B, 1+N, d)
        x = self.blocks(self.pos_drop(x))  # (B, 1+N, d)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)[:, 0]  # (B, d): the class token (Eq. 4)
        return self.classifier(self.head_drop(x))


def _build(preset: ViTConfig, overrides: dict) -> VisionTransformer:
    return VisionTransformer(with_overrides(preset, overrides))


@register_model
def vit_tiny_patch16_224(**overrides) -> VisionTransformer:
    """ViT-Ti/16 = DeiT-Tiny: d=192, 12 layers, 3 heads, 5.72M parameters."""
    return _build(ViTConfig(embed_dim=192, depth=12, num_heads=3), overrides)


@register_model
def vit_base_patch16_224(**overrides) -> VisionTransformer:
    """ViT-B/16: d=768, 12 layers, 12 heads, 86.57M parameters (the paper's "86M")."""
    return _build(ViTConfig(embed_dim=768, depth=12, num_heads=12), overrides)
