"""Building blocks with no model knowledge."""

from archopt.ops.attention import local_attention
from archopt.ops.conv import (
    ConvNormAct,
    DepthwiseSeparableConv2d,
    fold_batchnorm,
    fuse_conv_bn,
    make_activation,
    make_divisible,
    tf_same_pad,
)
from archopt.ops.inverted_residual import InvertedResidual

__all__ = [
    "ConvNormAct",
    "DepthwiseSeparableConv2d",
    "InvertedResidual",
    "fold_batchnorm",
    "fuse_conv_bn",
    "local_attention",
    "make_activation",
    "make_divisible",
    "tf_same_pad",
]
