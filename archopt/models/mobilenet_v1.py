"""MobileNet v1: depthwise separable convolutions with width and resolution multipliers.

Paper: Howard et al., 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications" (arXiv:1704.04861), Table 1 body, Sec. 3.3 multipliers.
Matches timm ``mobilenetv1_100`` (ReLU6, BN eps 1e-5, symmetric padding) and, with
``bn_eps=1e-3, tf_padding=True``, Hugging Face ``MobileNetV1Model`` (TF "SAME" padding).

One correction to the lecture's Table 1: the last depthwise layer (3x3x1024 dw on 7x7) has
stride 1, not 2; TF-slim, timm and Hugging Face all agree, and with stride 2 the final 7x7
average pool would see a 4x4 map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from archopt.models._registry import register_model, with_overrides
from archopt.models.image import check_classifier_config, check_image, random_images
from archopt.ops.conv import ConvNormAct, DepthwiseSeparableConv2d, make_divisible

STEM_CHANNELS = 32
# (out_channels, stride) of the 13 depthwise separable blocks at width 1.0 (Table 1).
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *[(512, 1)] * 5,
    (1024, 2),
    (1024, 1),
)
TOTAL_STRIDE = 32


@dataclass
class MobileNetV1Config:
    width_mult: float = 1.0  # alpha: scales every layer's channels (paper Sec. 3.3)
    num_classes: int = 1000  # 0: no classifier, forward returns pooled features
    in_chans: int = 3
    act: str = "relu6"  # "relu" is the paper's; every released reference uses ReLU6
    depthwise: bool = True  # False: the paper's Table 4 "Conv MobileNet" (full 3x3 convs)
    dropout: float = 0.0
    bn_eps: float = 1e-5
    tf_padding: bool = False
    channel_divisor: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.width_mult, (int, float)) or not self.width_mult > 0:
            raise ValueError(f"width_mult must be > 0, got {self.width_mult!r}")
        check_classifier_config(self.num_classes, self.in_chans, self.act)

    def channels(self, base: int) -> int:
        return make_divisible(base * self.width_mult, self.channel_divisor)


class MobileNetV1(nn.Module):
    default_resolution = 224

    def __init__(self, config: MobileNetV1Config) -> None:
        super().__init__()
        self.config = c = config
        common = dict(act=c.act, bn_eps=c.bn_eps, tf_padding=c.tf_padding)
        in_ch = c.channels(STEM_CHANNELS)
        self.stem = ConvNormAct(c.in_chans, in_ch, 3, 2, **common)
        blocks = []
        for base, stride in BLOCKS:
            out_ch = c.channels(base)
            if c.depthwise:
                blocks.append(DepthwiseSeparableConv2d(in_ch, out_ch, 3, stride, **common))
            else:
                blocks.append(ConvNormAct(in_ch, out_ch, 3, stride, **common))
            in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.num_features = in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(in_ch, c.num_classes) if c.num_classes else nn.Identity()

    def example_inputs(self, batch: int = 1, resolution: int | None = None) -> tuple[torch.Tensor]:
        return random_images(batch, self.config.in_chans, resolution or self.default_resolution)

    def check_input(self, x: torch.Tensor) -> None:
        check_image(x, self.config.in_chans, TOTAL_STRIDE)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.stem(x)  # (B, 32a, H/2, W/2)
        return self.blocks(x)  # (B, 1024a, H/32, W/32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.pool(x).flatten(1)  # (B, 1024a)
        return self.classifier(self.dropout(x))


def _build(preset: MobileNetV1Config, overrides: dict) -> MobileNetV1:
    return MobileNetV1(with_overrides(preset, overrides))


@register_model
def mobilenet_v1_100(**overrides) -> MobileNetV1:
    return _build(MobileNetV1Config(width_mult=1.0), overrides)


@register_model
def mobilenet_v1_075(**overrides) -> MobileNetV1:
    return _build(MobileNetV1Config(width_mult=0.75), overrides)


@register_model
def mobilenet_v1_050(**overrides) -> MobileNetV1:
    return _build(MobileNetV1Config(width_mult=0.5), overrides)


@register_model
def mobilenet_v1_025(**overrides) -> MobileNetV1:
    return _build(MobileNetV1Config(width_mult=0.25), overrides)


@register_model
def conv_mobilenet_v1_100(**overrides) -> MobileNetV1:
    """Table 4 baseline: the same body with each depthwise separable block a full 3x3 conv."""
    return _build(MobileNetV1Config(width_mult=1.0, depthwise=False), overrides)
