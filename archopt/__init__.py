"""archopt: architectural optimizations for efficient deep learning, measured.

Depthwise separable convolutions and MobileNet v1, local attention and Longformer, MobileViT
and ViT, LLaMA with KV caches; every claim measured as params, MACs, latency, memory,
accuracy and tokens/s, and judged on a Pareto front.

The package is built in floors, imports going down only (README, "Layout"):
ops -> models -> loading -> generate/measure -> pareto/train -> bench/tour -> cli.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """The public API, imported on first use: ``import archopt`` alone loads nothing heavy
    (the command line answers ``--help`` and a mistyped flag before torch loads)."""
    if name in ("create_model", "list_models", "register_model"):
        from archopt import registry

        return getattr(registry, name)
    if name == "export_onnx":
        from archopt.export import export_onnx

        return export_onnx
    if name == "optimize_for_inference":
        from archopt.optimize import optimize_for_inference

        return optimize_for_inference
    if name in ("measure", "models", "ops"):  # (a from-import here would come back here)
        import importlib

        return importlib.import_module(f"archopt.{name}")
    raise AttributeError(f"module 'archopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


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
