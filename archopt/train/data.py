"""Image classification data: the embedded digits, CIFAR-10 and ImageFolder trees, all local.

Nothing here downloads. Three sources, named by one spec string (``parse_data_spec``):

- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10
  classes), resized bilinearly to the requested resolution, with a fixed stratified
  train/validation split that does not depend on the training seed, so every run of every
  model is judged on the same images.
- ``cifar10:PATH``: CIFAR-10 in its python pickle format (what torchvision reads):
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, in ``PATH`` itself or in
  ``PATH/cifar-10-batches-py``. The test batch is the validation split.
- ``folder:PATH``: an ImageFolder tree (one sub-folder per class). If ``PATH`` holds ``train/``
  and ``val/`` (or ``test/``, ``validation/``) those are the splits; otherwise a fixed
  stratified split of the one tree.

Images are kept as uint8 (B, C, H, W) at the training resolution; ``augment`` and
``normalize`` run on whole batches in the training loop, drawing from an explicit generator,
so that data order and augmentation depend only on (seed, epoch) and a resumed run sees the
same batches as an uninterrupted one.

Here: the spec, ``load_data`` and the batch transforms. The three sources are read in
``archopt.train.sources``, into the splits of ``archopt.train.images`` (``TensorImages``,
``FolderImages``, ``ImageData``, importable from here too); the files themselves (CIFAR-10's
pickles, folder trees) are read by ``archopt.train.files``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from archopt.train.files import CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES
from archopt.train.images import FolderImages, ImageData, TensorImages
from archopt.train.sources import cifar10_data, digits_data, folder_data

DATA_KINDS = ("digits", "cifar10", "folder")


@dataclass(frozen=True)
class DataSpec:
    kind: str  # one of DATA_KINDS
    path: Path | None = None  # None for the embedded digits

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """``digits``, ``cifar10:PATH`` or ``folder:PATH`` as a ``DataSpec``; paths must exist."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data must be 'digits', 'cifar10:PATH' or 'folder:PATH', got {spec!r}")
    kind, sep, path = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in DATA_KINDS:
        raise ValueError(
            f"data must be 'digits', 'cifar10:PATH' or 'folder:PATH', got {spec!r} "
            f"(unknown kind {kind!r})"
        )
    if kind == "digits":
        if sep:
            raise ValueError(f"data 'digits' is embedded and takes no path, got {spec!r}")
        return DataSpec("digits")
    if not path:
        raise ValueError(f"data '{kind}' needs a local path, as in '{kind}:PATH', got {spec!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data path {str(p)!r} (from {spec!r}) does not exist")
    if not p.is_dir():
        raise ValueError(f"data path {str(p)!r} (from {spec!r}) must be a folder, got a file")
    return DataSpec(kind, p)


def load_data(
    spec: str | DataSpec = "digits",
    *,
    resolution: int | None = None,
    channels: int | None = None,
    val_fraction: float = 0.2,
) -> ImageData:
    """Load a data spec (see ``parse_data_spec``) at ``resolution`` with ``channels`` (1 or 3).

    Defaults: resolution 32 for digits and CIFAR-10, 224 for folders; channels as stored
    (1 for digits, 3 otherwise). ``val_fraction`` applies where the data has no split of its
    own (digits, a folder tree without train/val sub-folders).
    """
    spec = parse_data_spec(spec)
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if spec.kind == "digits":
        return digits_data(resolution or 32, channels or 1, val_fraction)
    if spec.kind == "cifar10":
        return cifar10_data(spec.path, resolution or 32, channels or 3)
    return folder_data(spec.path, resolution or 224, channels or 3, val_fraction)


# ------------------------------------------------------------------------- batch transforms


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (a shift of up to ``pad`` pixels) and optional h-flip.

    Works on a whole (B, C, H, W) batch with one generator, so a batch's augmentation is a
    function of the generator's seed alone.
    """
    b, _, h, w = images.shape
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p), zeros = black
        dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
        rows = (torch.arange(h) + dy)[:, None, :, None]  # (B, 1, H, 1)
        cols = (torch.arange(w) + dx)[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b)[:, None, None, None]
        ci = torch.arange(images.shape[1])[None, :, None, None]
        out = padded[bi, ci, rows, cols]  # (B, C, H, W)
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (B, C, H, W) to float32, standardized per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


__all__ = [
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "DATA_KINDS",
    "DataSpec",
    "FolderImages",
    "ImageData",
    "TensorImages",
    "augment",
    "load_data",
    "normalize",
    "parse_data_spec",
]
