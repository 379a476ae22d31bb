"""MobileNetV2's inverted residual block, the conv block of MobileViT's stages.

Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(arXiv:1801.04381), Table 1: 1x1 expansion (t x channels) + act, 3x3 depthwise + act, 1x1
linear projection (no activation: the "linear bottleneck"), and an identity shortcut when the
block keeps both resolution and channel count. MobileViT uses SiLU where MobileNetV2 uses
ReLU6. Matches timm's ``BottleneckBlock(bottle_in=True, linear_out=True)`` as used by
``mobilevit_*`` and Hugging Face ``MobileViTInvertedResidual``.
"""

from __future__ import annotations

import torch
from torch import nn

from archopt.ops.conv import ConvNormAct, make_divisible


class InvertedResidual(nn.Module):
    """1x1 expand -> k x k depthwise (stride) -> 1x1 linear project, + x when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        expand_ratio: float = 4.0,
        kernel_size: int = 3,
        act: str = "silu",
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if not expand_ratio > 0:
            raise ValueError(f"expand_ratio must be > 0, got {expand_ratio}")
        hidden = make_divisible(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = ConvNormAct(in_channels, hidden, 1, act=act, bn_eps=bn_eps)
        self.dw = ConvNormAct(
            hidden, hidden, kernel_size, stride, groups=hidden, act=act, bn_eps=bn_eps
        )
        # Linear bottleneck: an activation here would destroy information in the narrow space.
        self.project = ConvNormAct(hidden, out_channels, 1, act="none", bn_eps=bn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.use_residual else out


__all__ = ["InvertedResidual"]
