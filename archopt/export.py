"""ONNX export (what many users deploy with, and an anchor our own speed is compared to)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from archopt.io import atomic_write


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (in eval mode) to ``path`` with input ``"input"`` and output ``"logits"``.

    The file is written beside the target and renamed into place, so an interrupted export
    never leaves a half-written model at ``path``.
    """
    if not isinstance(example_input, torch.Tensor):
        raise ValueError(f"example_input must be a tensor, got {type(example_input).__name__}")
    path = Path(path)
    was_training = model.training
    model.eval()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            torch.onnx.export(
                model,
                (example_input,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}
                if dynamic_batch
                else None,
                opset_version=opset,
                dynamo=False,
            )

    try:
        atomic_write(path, write)
    finally:
        model.train(was_training)
    return path
