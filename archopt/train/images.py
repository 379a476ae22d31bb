"""A loaded data set: its splits, held in memory (``TensorImages``: uint8 tensors) or read from
files on demand (``FolderImages``), and ``ImageData``, the train and validation splits with
what the training loop needs to augment and normalize them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from archopt.errors import DataError


class TensorImages:
    """A split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"expected one label per image ({images.shape[0]}), got {tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


class FolderImages(Dataset):
    """Image files read on demand (for a DataLoader), resized and centre-cropped to square."""

    def __init__(
        self, files: list[Path], labels: list[int], resolution: int, in_chans: int
    ) -> None:
        self.files, self.resolution, self.in_chans = files, resolution, in_chans
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # Read when the batch is drawn, as torchvision's ImageFolder does (opening a million
        # files up front would cost minutes); a file that fails is one error naming it, and
        # the last epoch's checkpoint is untouched (a run continues with --resume).
        try:
            return self._read(i)
        except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBomb)
            why = " ".join(str(e).split()) or type(e).__name__
            raise DataError(
                f"{self.files[i]}: cannot read this image ({type(e).__name__}: {why}); "
                "replace or remove it, then run again"
            ) from e

    def _read(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("L" if self.in_chans == 1 else "RGB")
            # Shorter side to the resolution, then the central square: no distortion.
            w, h = im.size
            scale = self.resolution / min(w, h)
            size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
            im = im.resize(size, Image.BILINEAR)
            left, top = (size[0] - self.resolution) // 2, (size[1] - self.resolution) // 2
            im = im.crop((left, top, left + self.resolution, top + self.resolution))
            arr = np.asarray(im, dtype=np.uint8)
        x = torch.from_numpy(arr.copy())
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
        return x, int(self.labels[i])


@dataclass
class ImageData:
    """Train and validation splits plus what the loop needs to augment and normalize them."""

    name: str
    train: TensorImages | FolderImages
    val: TensorImages | FolderImages
    classes: list[str]
    in_chans: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding for training (pixels each side); 0: no shifts
    flip: bool  # random horizontal flips for training

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "resolution": self.resolution,
        }


__all__ = ["FolderImages", "ImageData", "TensorImages"]
