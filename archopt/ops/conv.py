"""Convolution building blocks: ``ConvNormAct``, ``DepthwiseSeparableConv2d``, BN folding,
and ``make_divisible`` (how width multipliers round channel counts).

The depthwise separable convolution (Howard et al., 2017, "MobileNets", Sec. 3.1) factors a
K x K convolution C_in -> C_out into a depthwise K x K convolution (one filter per input
channel, ``groups = C_in``) and a pointwise 1 x 1 convolution C_in -> C_out. Weights drop from
C_in*C_out*K*K to C_in*K*K + C_in*C_out; each half is followed by BatchNorm and an activation.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("relu6", "relu", "silu", "gelu", "none")


def make_activation(name: str) -> nn.Module:
    """``"relu6"`` (every MobileNet reference), ``"relu"`` (the paper), silu, gelu or none."""
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "silu":
        return nn.SiLU(inplace=True)
    if name == "gelu":
        return nn.GELU()
    if name == "none":
        return nn.Identity()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def tf_same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial dim: the extra pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never below 90% (timm's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d -> activation; ``tf_padding`` reproduces TF "SAME" padding.

    After :func:`fold_batchnorm` the ``bn`` slot holds ``nn.Identity`` and the conv has a bias.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        groups: int = 1,
        dilation: int = 1,
        act: str = "relu6",
        norm: bool = True,
        bias: bool | None = None,
        bn_eps: float = 1e-5,
        tf_padding: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
            ("stride", stride),
            ("groups", groups),
            ("dilation", dilation),
        ):
            _check_positive(name, v)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        self.tf_padding = tf_padding
        padding = 0 if tf_padding else (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation=dilation,
            groups=groups,
            bias=(not norm) if bias is None else bias,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps) if norm else nn.Identity()
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_padding:
            (kh, kw), (sh, sw), (dh, dw) = (
                self.conv.kernel_size,
                self.conv.stride,
                self.conv.dilation,
            )
            top, bottom = tf_same_pad(x.shape[-2], kh, sh, dh)
            left, right = tf_same_pad(x.shape[-1], kw, sw, dw)
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparableConv2d(nn.Module):
    """Depthwise K x K conv + BN + act, then pointwise 1 x 1 conv + BN + act (the lecture's block).

    Weights: ``in_channels*K*K + in_channels*out_channels`` (plus 2 BN affine values per channel).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        dilation: int = 1,
        act: str = "relu6",
        norm: bool = True,
        bn_eps: float = 1e-5,
        tf_padding: bool = False,
    ) -> None:
        super().__init__()
        common = dict(act=act, norm=norm, bn_eps=bn_eps, tf_padding=tf_padding)
        self.dw = ConvNormAct(
            in_channels,
            in_channels,
            kernel_size,
            stride,
            groups=in_channels,
            dilation=dilation,
            **common,
        )
        self.pw = ConvNormAct(in_channels, out_channels, 1, 1, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv equal to ``bn(conv(x))`` in eval mode: W' = W*g/s, b' = (b - mean)*g/s + beta."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
        raise ValueError(f"expected a BatchNorm2d with running stats, got {type(bn).__name__}")
    if conv.out_channels != bn.num_features:
        raise ValueError(
            f"conv has {conv.out_channels} output channels but BN has {bn.num_features} features"
        )
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv_std)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    w = conv.weight.double() * scale.reshape(-1, 1, 1, 1)
    fused.weight.copy_(w.to(conv.weight.dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * scale + beta).to(conv.weight.dtype))
    return fused


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into it, in place.

    Handles :class:`ConvNormAct` (``conv``/``bn`` slots) and consecutive Conv2d, BatchNorm2d
    pairs inside ``nn.Sequential``. Returns ``model``. Folding uses running statistics, so the
    model must be in eval mode.
    """
    if model.training:
        raise ValueError(
            "fold_batchnorm needs a model in eval mode (call model.eval()), got training"
        )
    for module in list(model.modules()):
        if isinstance(module, ConvNormAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, nn.Sequential):
            children = list(module._modules.items())
            for (name_a, a), (name_b, b) in itertools.pairwise(children):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    module._modules[name_a] = fuse_conv_bn(a, b)
                    module._modules[name_b] = nn.Identity()
    return model
