"""Building blocks with no model knowledge, each tested against a reference:

- ``conv``: ``ConvNormAct``, ``DepthwiseSeparableConv2d``, BN folding, ``make_divisible``;
  ``inverted_residual``: MobileNetV2's block (MobileViT's conv stages);
- ``transformer``, ``rope``, ``norms``: attention layers, rotary embeddings, RMSNorm;
- ``attention/``: local (Longformer) attention, one function over interchangeable backends;
- the KV caches of decoding: ``kv_cache`` (the protocol, dense, static), ``window_cache``
  (sliding, sinks), ``int8_cache``; ``paged_kv`` (a pool of blocks: ``paged_blocks`` keeps
  their books, ``paged_attention`` reads them); ``cache_spec.make_cache``, the door;
- ``quant``: int8 / int4 weight-only linears.

Imports: torch, and ``archopt.io`` / ``archopt.report`` at most; never models or above.
"""

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
