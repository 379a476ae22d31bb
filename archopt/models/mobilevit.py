"""MobileViT: convolutions for local features, transformers over patches for global ones.

Paper: Mehta & Rastegari, 2022, "MobileViT: Light-weight, General-purpose, and Mobile-friendly
Vision Transformer" (arXiv:2110.02178), Sec. 3.1 (the MobileViT block, Fig. 1b) and the
architecture table in Appendix A (XXS / XS / S). Matches timm ``mobilevit_xxs / xs / s``
(ByobNet with ``MobileVitBlock``, itself adapted from apple/ml-cvnets) and Hugging Face
``MobileViTForImageClassification``: same layers, same unfold/fold order, same bilinear resize
for maps whose side is not a multiple of the patch size.

Network (input 256x256, channels for S; XS and XXS are narrower):

    stem     3x3 conv s2                           16      128x128
    stage 1  inverted residual (MV2)               32      128x128
    stage 2  3 x MV2, the first s2                 64       64x64
    stage 3  MV2 s2 + MobileViT block (d=144, L=2)  96       32x32
    stage 4  MV2 s2 + MobileViT block (d=192, L=4) 128       16x16
    stage 5  MV2 s2 + MobileViT block (d=240, L=3) 160        8x8
    head     1x1 conv to 640, global average pool, linear classifier
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from archopt.models._registry import register_model, with_overrides
from archopt.models.image import check_classifier_config, check_image, random_images
from archopt.ops.conv import ConvNormAct
from archopt.ops.inverted_residual import InvertedResidual
from archopt.ops.transformer import TransformerLayer

TOTAL_STRIDE = 32


class MobileViTBlock(nn.Module):
    """Local (n x n conv, 1x1 conv to d) -> global (unfold, L transformer layers, fold) -> fuse.

    Unfolding cuts the map into p_h x p_w patches and gathers, for each of the P = p_h*p_w
    pixel positions inside a patch, the N = (H/p_h)*(W/p_w) pixels at that position across all
    patches: B*P sequences of N tokens of width d. Attention then relates each pixel to the
    same-position pixels of every other patch, and, since the n x n conv already mixed each
    patch's neighbourhood, every pixel sees the whole image (paper Sec. 3.1).
    """

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        *,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int = 2,
        kernel_size: int = 3,
        act: str = "silu",
        bn_eps: float = 1e-5,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        conv = dict(act=act, bn_eps=bn_eps)
        self.conv_kxk = ConvNormAct(channels, channels, kernel_size, **conv)
        self.conv_1x1 = nn.Conv2d(channels, dim, 1, bias=False)  # no norm/act: into the LNs
        self.transformer = nn.Sequential(
            *[
                TransformerLayer(
                    dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    act=act,
                    norm_eps=norm_eps,
                    dropout=dropout,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.conv_proj = ConvNormAct(dim, channels, 1, **conv)
        self.conv_fusion = ConvNormAct(2 * channels, channels, kernel_size, **conv)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, H, W) with H, W multiples of p -> (B*P, N, d)."""
        B, D, H, W = x.shape
        p = self.patch_size
        nh, nw = H // p, W // p
        x = x.reshape(B, D, nh, p, nw, p)  # (B, d, n_h, p_h, n_w, p_w)
        x = x.permute(0, 3, 5, 2, 4, 1)  # (B, p_h, p_w, n_h, n_w, d)
        return x.reshape(B * p * p, nh * nw, D)  # (B*P, N, d)

    def fold(self, x: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
        """(B*P, N, d) -> (B, d, H, W): the exact inverse of :meth:`unfold`."""
        p = self.patch_size
        nh, nw = height // p, width // p
        D = x.shape[-1]
        x = x.reshape(batch, p, p, nh, nw, D)  # (B, p_h, p_w, n_h, n_w, d)
        x = x.permute(0, 5, 3, 1, 4, 2)  # (B, d, n_h, p_h, n_w, p_w)
        return x.reshape(batch, D, height, width)  # (B, d, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # (B, C, H, W)
        # Local representation.
        x = self.conv_1x1(self.conv_kxk(x))  # (B, d, H, W)

        # A side that is not a multiple of p is resized bilinearly up to the next multiple and
        # back after folding (timm, HF and ml-cvnets do this rather than pad, so attention needs
        # no mask); align_corners=False in both directions, as they have it.
        B, _, H, W = x.shape
        p = self.patch_size
        new_h, new_w = math.ceil(H / p) * p, math.ceil(W / p) * p
        resize = (new_h, new_w) != (H, W)
        if resize:
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)

        # Global representation.
        x = self.unfold(x)  # (B*P, N, d)
        x = self.norm(self.transformer(x))  # (B*P, N, d)
        x = self.fold(x, B, new_h, new_w)  # (B, d, new_h, new_w)
        if resize:
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)

        # Fusion: project back to C, concatenate with the block input, n x n conv.
        x = self.conv_proj(x)  # (B, C, H, W)
        return self.conv_fusion(torch.cat((shortcut, x), dim=1))  # (B, 2C, H, W) -> (B, C, H, W)


@dataclass
class MobileViTConfig:
    # Output channels of the five stages (the paper's architecture table, Appendix A).
    channels: tuple[int, ...] = (32, 64, 96, 128, 160)
    # Transformer width d and depth L of the MobileViT blocks in stages 3, 4 and 5.
    dims: tuple[int, ...] = (144, 192, 240)
    depths: tuple[int, ...] = (2, 4, 3)
    stem_channels: int = 16
    num_features: int = 640  # the 1x1 conv before pooling
    conv_depths: tuple[int, ...] = (1, 3)  # inverted residuals in stages 1 and 2
    expand_ratio: float = 4.0  # MV2 expansion (2 for XXS)
    num_heads: int = 4
    mlp_ratio: float = 2.0
    patch_size: int = 2
    kernel_size: int = 3
    act: str = "silu"
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    in_chans: int = 3
    dropout: float = 0.0  # before the classifier (ml-cvnets trains with 0.1)
    bn_eps: float = 1e-5
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.channels, self.dims = tuple(self.channels), tuple(self.dims)
        self.depths, self.conv_depths = tuple(self.depths), tuple(self.conv_depths)
        if len(self.channels) != 5:
            raise ValueError(f"channels must list 5 stages, got {len(self.channels)}")
        if len(self.conv_depths) != 2:
            raise ValueError(f"conv_depths must list 2 stages, got {len(self.conv_depths)}")
        if len(self.dims) != 3 or len(self.depths) != 3:
            raise ValueError(
                f"dims and depths must list 3 MobileViT stages each, got {len(self.dims)} dims "
                f"and {len(self.depths)} depths"
            )
        for d in self.dims:
            if d % self.num_heads:
                raise ValueError(
                    f"every transformer dim must be divisible by num_heads={self.num_heads}, "
                    f"got {d}"
                )
        check_classifier_config(self.num_classes, self.in_chans, self.act)


class MobileViT(nn.Module):
    default_resolution = 256

    def __init__(self, config: MobileViTConfig) -> None:
        super().__init__()
        self.config = c = config
        conv = dict(act=c.act, bn_eps=c.bn_eps)
        ir = dict(expand_ratio=c.expand_ratio, kernel_size=c.kernel_size, **conv)
        self.stem = ConvNormAct(c.in_chans, c.stem_channels, 3, 2, **conv)
        in_ch = c.stem_channels
        stages = []
        # Stages 1-2: inverted residuals only (stride 1, then 2).
        for out_ch, depth, stride in zip(c.channels[:2], c.conv_depths, (1, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, **ir))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        # Stages 3-5: a strided inverted residual, then a MobileViT block.
        for out_ch, dim, depth in zip(c.channels[2:], c.dims, c.depths):
            block = MobileViTBlock(
                out_ch,
                dim,
                depth,
                num_heads=c.num_heads,
                mlp_ratio=c.mlp_ratio,
                patch_size=c.patch_size,
                kernel_size=c.kernel_size,
                norm_eps=c.norm_eps,
                **conv,
            )
            stages.append(nn.Sequential(InvertedResidual(in_ch, out_ch, 2, **ir), block))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.final_conv = ConvNormAct(in_ch, c.num_features, 1, **conv)
        self.num_features = c.num_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = (
            nn.Linear(c.num_features, c.num_classes) if c.num_classes else nn.Identity()
        )

    def example_inputs(self, batch: int = 1, resolution: int | None = None) -> tuple[torch.Tensor]:
        return random_images(batch, self.config.in_chans, resolution or self.default_resolution)

    def check_input(self, x: torch.Tensor) -> None:
        check_image(x, self.config.in_chans, TOTAL_STRIDE)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)  # (B, 16, H/2, W/2)
        x = self.stages(x)  # (B, C5, H/32, W/32)
        return self.final_conv(x)  # (B, num_features, H/32, W/32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.pool(x).flatten(1)  # (B, num_features)
        return self.classifier(self.dropout(x))


def _build(preset: MobileViTConfig, overrides: dict) -> MobileViT:
    return MobileViT(with_overrides(preset, overrides))


@register_model(default_input=(3, 256, 256))
def mobilevit_xxs(**overrides) -> MobileViT:
    """1.27M parameters (paper: 1.3M), MV2 expansion 2."""
    preset = MobileViTConfig(
        channels=(16, 24, 48, 64, 80),
        dims=(64, 80, 96),
        num_features=320,
        expand_ratio=2.0,
    )
    return _build(preset, overrides)


@register_model(default_input=(3, 256, 256))
def mobilevit_xs(**overrides) -> MobileViT:
    """2.32M parameters (paper: 2.3M)."""
    preset = MobileViTConfig(channels=(32, 48, 64, 80, 96), dims=(96, 120, 144), num_features=384)
    return _build(preset, overrides)


@register_model(default_input=(3, 256, 256))
def mobilevit_s(**overrides) -> MobileViT:
    """5.58M parameters (paper: 5.6M)."""
    return _build(MobileViTConfig(), overrides)
