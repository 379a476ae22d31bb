"""What every image classifier here shares: config checks, input checks, example inputs."""

from __future__ import annotations

import torch

from archopt.ops.conv import ACTIVATIONS


def check_classifier_config(num_classes: int, in_chans: int, act: str) -> None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def check_image(x: torch.Tensor, in_chans: int, min_size: int | None = None) -> None:
    """A (B, C, H, W) batch with ``in_chans`` channels and both sides >= ``min_size``."""
    if x.ndim != 4:
        raise ValueError(
            f"expected a 4-D input (batch, channels, height, width), got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    if min_size is not None and min(x.shape[-2:]) < min_size:
        raise ValueError(
            f"input resolution must be at least {min_size}x{min_size} (the network's total "
            f"stride), got {x.shape[-2]}x{x.shape[-1]}"
        )


def random_images(batch: int, in_chans: int, resolution: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, in_chans, resolution, resolution),)
