"""Moved: MobileNetV2's inverted residual block is a building block, ``archopt.ops.
inverted_residual``. This name stays for code written against it; new code imports from ops."""

from archopt.ops.inverted_residual import InvertedResidual

__all__ = ["InvertedResidual"]
