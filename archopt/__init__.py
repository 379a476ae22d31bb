"""archopt: architectural optimizations for efficient deep learning, measured.

Depthwise separable convolutions and MobileNet v1, local attention and Longformer, MobileViT
and ViT, LLaMA with KV caches; every claim measured as params, MACs, latency, memory,
accuracy and tokens/s, and judged on a Pareto front.

The package is built in floors, imports going down only (README, "Layout"):
ops -> models -> loading -> generate/measure -> pareto/train -> bench/tour -> cli.
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
