"""Building blocks with no model knowledge."""

from archopt.ops.conv import (
    ConvNormAct,
    DepthwiseSeparableConv2d,
    fold_batchnorm,
    fuse_conv_bn,
    make_activation,
    tf_same_pad,
)

__all__ = [
    "ConvNormAct",
    "DepthwiseSeparableConv2d",
    "fold_batchnorm",
    "fuse_conv_bn",
    "make_activation",
    "tf_same_pad",
]
