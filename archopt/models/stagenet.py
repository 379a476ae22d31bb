"""StageNet: an image classifier assembled stage by stage from archopt's blocks, for search.

MobileNet v1 (Howard et al., 2017, arXiv:1704.04861), MobileNetV2 (Sandler et al., 2018,
arXiv:1801.04381) and MobileViT (Mehta & Rastegari, 2022, arXiv:2110.02178) share one
skeleton: a strided 3x3 stem, a sequence of stages, and a head (an optional 1x1 conv, global
average pooling, a linear classifier). They differ in the block each stage repeats. StageNet
makes that block a per-stage choice, the factorized hierarchical space of MnasNet (Tan et al.,
2019, arXiv:1807.11626) and Once-for-All (Cai et al., 2020, arXiv:1908.09791), over the blocks
archopt already has:

- ``conv``: a full k x k convolution + BN + act (the paper's Table 4 "Conv MobileNet" block),
- ``ds``: the depthwise separable convolution (``ops.conv.DepthwiseSeparableConv2d``),
- ``ir``: MobileNetV2's inverted residual (``ops.inverted_residual.InvertedResidual``),
- ``mvit``: a MobileViT stage, a strided inverted residual then a MobileViT block whose
  transformer has ``depth`` layers of width ``dim`` (``models.mobilevit.MobileViTBlock``).

Each candidate of a search is a plain config of this one family (no weight-sharing
supernet), so it trains, counts and measures like any registered model. The preset
``stagenet`` is MobileNet v1 1.0 layer for layer, and ``LAYOUTS`` holds MobileViT XXS/XS/S:
the tests check that their parameter and MAC counts equal ``mobilenet_v1_100`` and
``mobilevit_*``, so the space really contains the hand-designed networks it is compared with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from archopt.models._registry import register_model, with_overrides
from archopt.models.image import check_classifier_config, check_image, random_images
from archopt.models.mobilevit import MobileViTBlock
from archopt.ops.conv import ConvNormAct, DepthwiseSeparableConv2d
from archopt.ops.inverted_residual import InvertedResidual

BLOCK_TYPES = ("conv", "ds", "ir", "mvit")


@dataclass(frozen=True)
class Stage:
    """One stage: ``depth`` blocks of one type; the first has ``stride``, the rest stride 1.

    For ``mvit`` the stage is one strided inverted residual (``expand_ratio``) followed by a
    MobileViT block with ``depth`` transformer layers of width ``dim``.
    """

    block: str
    channels: int
    depth: int = 1
    stride: int = 1
    kernel_size: int = 3
    expand_ratio: float = 4.0  # ir, and the inverted residual that opens an mvit stage
    dim: int = 0  # mvit only: transformer width d

    def __post_init__(self) -> None:
        if self.block not in BLOCK_TYPES:
            raise ValueError(f"stage block must be one of {BLOCK_TYPES}, got {self.block!r}")
        for name in ("channels", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"stage {name} must be a positive int, got {value!r}")
        if self.stride not in (1, 2):
            raise ValueError(f"stage stride must be 1 or 2, got {self.stride!r}")
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"stage kernel_size must be an odd positive int, got {k!r}")
        if not isinstance(self.expand_ratio, (int, float)) or not self.expand_ratio > 0:
            raise ValueError(f"stage expand_ratio must be > 0, got {self.expand_ratio!r}")
        if self.block == "mvit" and (not isinstance(self.dim, int) or self.dim < 1):
            raise ValueError(f"an mvit stage needs a transformer width dim >= 1, got {self.dim!r}")


def _stage(value) -> Stage:
    """A ``Stage`` from itself or from a dict of its fields (how JSON and ``--set`` give it)."""
    if isinstance(value, Stage):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"each stage must be a Stage or a dict of its fields, got {value!r}")
    names = [f.name for f in dataclasses.fields(Stage)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"unknown Stage field(s) {unknown}: expected any of {names}")
    return Stage(**value)


# MobileNet v1's 13 depthwise separable blocks (Table 1) grouped by output width.
MOBILENET_V1_STAGES = (
    Stage("ds", 64, 1, 1),
    Stage("ds", 128, 2, 2),
    Stage("ds", 256, 2, 2),
    Stage("ds", 512, 6, 2),
    Stage("ds", 1024, 2, 2),
)


def _mobilevit(channels, dims, num_features, expand_ratio=4.0) -> dict:
    ir = dict(expand_ratio=expand_ratio)
    stages = (
        Stage("ir", channels[0], 1, 1, **ir),
        Stage("ir", channels[1], 3, 2, **ir),
        *(
            Stage("mvit", c, depth, 2, dim=d, **ir)
            for c, d, depth in zip(channels[2:], dims, (2, 4, 3))
        ),
    )
    return dict(stages=stages, stem_channels=16, num_features=num_features, act="silu")


# Hand-designed networks written as StageNet configs (the MobileViT ones match the presets in
# models/mobilevit.py, Appendix A of the paper).
LAYOUTS: dict[str, dict] = {
    "mobilenet_v1": dict(stages=MOBILENET_V1_STAGES),
    "mobilevit_xxs": _mobilevit((16, 24, 48, 64, 80), (64, 80, 96), 320, expand_ratio=2.0),
    "mobilevit_xs": _mobilevit((32, 48, 64, 80, 96), (96, 120, 144), 384),
    "mobilevit_s": _mobilevit((32, 64, 96, 128, 160), (144, 192, 240), 640),
}


@dataclass
class StageNetConfig:
    stages: tuple[Stage, ...] = MOBILENET_V1_STAGES  # Stage objects or dicts of their fields
    stem_channels: int = 32
    num_features: int = 0  # 0: pool the last stage directly (MobileNet); else a 1x1 conv first
    act: str = "relu6"  # MobileNet's ReLU6; MobileViT uses "silu"
    num_heads: int = 4  # mvit stages
    mlp_ratio: float = 2.0
    patch_size: int = 2
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    in_chans: int = 3
    dropout: float = 0.0
    bn_eps: float = 1e-5
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.stages, (str, bytes)) or not hasattr(self.stages, "__iter__"):
            raise ValueError(f"stages must be a list of stages, got {self.stages!r}")
        self.stages = tuple(_stage(s) for s in self.stages)
        if not self.stages:
            raise ValueError("stages must list at least one stage, got none")
        if self.stem_channels < 1 or self.num_features < 0:
            raise ValueError(
                f"stem_channels must be >= 1 and num_features >= 0, got {self.stem_channels} "
                f"and {self.num_features}"
            )
        for i, s in enumerate(self.stages):
            if s.block == "mvit" and s.dim % self.num_heads:
                raise ValueError(
                    f"stage {i} transformer dim must be divisible by num_heads="
                    f"{self.num_heads}, got {s.dim}"
                )
        check_classifier_config(self.num_classes, self.in_chans, self.act)

    @property
    def total_stride(self) -> int:
        return 2 * math.prod(s.stride for s in self.stages)


def _make_stage(s: Stage, in_ch: int, c: StageNetConfig) -> nn.Sequential:
    conv = dict(act=c.act, bn_eps=c.bn_eps)
    ir = dict(expand_ratio=s.expand_ratio, kernel_size=s.kernel_size, **conv)
    if s.block == "mvit":
        block = MobileViTBlock(
            s.channels,
            s.dim,
            s.depth,
            num_heads=c.num_heads,
            mlp_ratio=c.mlp_ratio,
            patch_size=c.patch_size,
            kernel_size=s.kernel_size,
            norm_eps=c.norm_eps,
            **conv,
        )
        return nn.Sequential(InvertedResidual(in_ch, s.channels, s.stride, **ir), block)
    blocks = []
    for i in range(s.depth):
        stride = s.stride if i == 0 else 1
        if s.block == "conv":
            blocks.append(ConvNormAct(in_ch, s.channels, s.kernel_size, stride, **conv))
        elif s.block == "ds":
            blocks.append(
                DepthwiseSeparableConv2d(in_ch, s.channels, s.kernel_size, stride, **conv)
            )
        else:
            blocks.append(InvertedResidual(in_ch, s.channels, stride, **ir))
        in_ch = s.channels
    return nn.Sequential(*blocks)


class StageNet(nn.Module):
    default_resolution = 224

    def __init__(self, config: StageNetConfig) -> None:
        super().__init__()
        self.config = c = config
        self.stem = ConvNormAct(c.in_chans, c.stem_channels, 3, 2, act=c.act, bn_eps=c.bn_eps)
        in_ch, stages = c.stem_channels, []
        for s in c.stages:
            stages.append(_make_stage(s, in_ch, c))
            in_ch = s.channels
        self.stages = nn.Sequential(*stages)
        self.final_conv = (
            ConvNormAct(in_ch, c.num_features, 1, act=c.act, bn_eps=c.bn_eps)
            if c.num_features
            else nn.Identity()
        )
        self.num_features = c.num_features or in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = (
            nn.Linear(self.num_features, c.num_classes) if c.num_classes else nn.Identity()
        )

    def example_inputs(self, batch: int = 1, resolution: int | None = None) -> tuple[torch.Tensor]:
        return random_images(batch, self.config.in_chans, resolution or self.default_resolution)

    def check_input(self, x: torch.Tensor) -> None:
        check_image(x, self.config.in_chans, self.config.total_stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)  # (B, stem, H/2, W/2)
        x = self.stages(x)  # (B, C_last, H/s, W/s), s = the total stride
        return self.final_conv(x)  # (B, num_features, H/s, W/s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.pool(x).flatten(1)  # (B, num_features)
        return self.classifier(self.dropout(x))


@register_model
def stagenet(**overrides) -> StageNet:
    """Stage-wise searchable network; the preset is MobileNet v1 1.0 layer for layer."""
    return StageNet(with_overrides(StageNetConfig(), overrides))


__all__ = ["BLOCK_TYPES", "LAYOUTS", "MOBILENET_V1_STAGES", "Stage", "StageNet", "StageNetConfig"]
