"""archopt: architectural optimizations for efficient deep learning, measured.

Depthwise separable convolutions and MobileNet v1 (this release), with local attention,
MobileViT and KV caching to follow; every claim measured as params, MACs, latency and memory.
"""

from archopt import measure, models, ops
from archopt.export import export_onnx
from archopt.optimize import optimize_for_inference
from archopt.registry import create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "export_onnx",
    "list_models",
    "measure",
    "models",
    "ops",
    "optimize_for_inference",
    "register_model",
]
