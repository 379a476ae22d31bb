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

The files themselves (CIFAR-10's pickles, folder trees) are read by ``archopt.train.files``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from archopt.errors import DataError
from archopt.train.files import (
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    check_tree,
    cifar10_folder,
    read_cifar_batches,
    read_pickle,
    scan_tree,
)

DATA_KINDS = ("digits", "cifar10", "folder")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# ImageNet statistics: a folder tree is read lazily, so its own statistics are not computed.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma, for turning colour images into the 1-channel input a model may ask for.
LUMA = (0.299, 0.587, 0.114)
# The validation split must not move when the training seed does.
SPLIT_SEED = 0


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
        return _load_digits(resolution or 32, channels or 1, val_fraction)
    if spec.kind == "cifar10":
        return _load_cifar10(spec.path, resolution or 32, channels or 3)
    return _load_folder(spec.path, resolution or 224, channels or 3, val_fraction)


# ---------------------------------------------------------------------------- in-memory helpers


def _resize_uint8(images: torch.Tensor, resolution: int, chunk: int = 2048) -> torch.Tensor:
    """Bilinear resize of uint8 (N, C, H, W) images, in chunks to bound the float copy."""
    if images.shape[-2:] == (resolution, resolution):
        return images.contiguous()
    out = torch.empty(*images.shape[:2], resolution, resolution, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        # antialias matters when shrinking (CIFAR to 16x16); a no-op when enlarging.
        y = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _set_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        w = torch.tensor(LUMA).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round_().clamp_(0, 255).byte()
    raise ValueError(f"cannot turn {have}-channel images into {channels} channels")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, over a whole uint8 split."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    mean, std = x.mean(1), x.std(1).clamp_min(1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _stratified_split(labels: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, ...]:
    """Index tensors (train, val), each class split in the same proportion, fixed seed."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = max(1, round(val_fraction * len(idx))) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


# ---------------------------------------------------------------------------------- the sources


def _load_digits(resolution: int, channels: int, val_fraction: float) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the embedded digits data needs scikit-learn: pip install 'archopt[train]'"
        ) from e
    digits = load_digits()
    # Pixel values are 0..16; scale to 0..1, resize, store as uint8 like every other source.
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = _stratified_split(labels, val_fraction)
    images = _set_channels(images, channels)
    mean, std = _channel_stats(images[train_idx])
    return ImageData(
        name="digits",
        train=TensorImages(images[train_idx], labels[train_idx]),
        val=TensorImages(images[val_idx], labels[val_idx]),
        classes=[str(i) for i in range(10)],
        in_chans=channels,
        resolution=resolution,
        mean=mean,
        std=std,
        # Small shifts only: a mirrored digit is a different symbol (or none).
        pad=max(1, resolution // 16),
        flip=False,
    )


def _load_cifar10(path: Path, resolution: int, channels: int) -> ImageData:
    folder = cifar10_folder(path)
    train_x, train_y = read_cifar_batches(folder, CIFAR10_TRAIN_FILES)
    val_x, val_y = read_cifar_batches(folder, (CIFAR10_TEST_FILE,))  # labels checked: 0..9
    classes = list(CIFAR10_CLASSES)
    meta = folder / "batches.meta"
    if meta.is_file():
        names = read_pickle(meta).get("label_names")
        if isinstance(names, list) and len(names) == len(classes):
            classes = [str(n) for n in names]
    train_x = _set_channels(_resize_uint8(train_x, resolution), channels)
    val_x = _set_channels(_resize_uint8(val_x, resolution), channels)
    mean, std = _channel_stats(train_x)
    return ImageData(
        name=f"cifar10:{path}",
        train=TensorImages(train_x, train_y),
        val=TensorImages(val_x, val_y),
        classes=classes,
        in_chans=channels,
        resolution=resolution,
        mean=mean,
        std=std,
        pad=max(1, resolution // 8),  # 4 pixels at 32x32: the standard CIFAR recipe
        flip=True,
    )


def _load_folder(path: Path, resolution: int, channels: int, val_fraction: float) -> ImageData:
    val_dir = next((path / n for n in ("val", "validation", "test") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and val_dir is not None:
        classes, files, labels = scan_tree(path / "train")
        check_tree(path / "train", classes, files)
        val_classes, val_files, val_labels = scan_tree(val_dir)
        if val_classes != classes:
            raise ValueError(
                f"the class folders of {path / 'train'} and {val_dir} must match, got "
                f"{classes} and {val_classes}"
            )
        train = FolderImages(files, labels, resolution, channels)
        val = FolderImages(val_files, val_labels, resolution, channels)
    else:
        classes, files, labels = scan_tree(path)
        check_tree(path, classes, files)
        train_idx, val_idx = _stratified_split(torch.tensor(labels), val_fraction)
        train = FolderImages(
            [files[i] for i in train_idx], [labels[i] for i in train_idx], resolution, channels
        )
        val = FolderImages(
            [files[i] for i in val_idx], [labels[i] for i in val_idx], resolution, channels
        )
    if len(val) == 0:
        raise ValueError(f"the validation split of {path} is empty: add images or folders")
    mean = IMAGENET_MEAN if channels == 3 else (sum(LUMA[i] * IMAGENET_MEAN[i] for i in range(3)),)
    std = IMAGENET_STD if channels == 3 else (sum(LUMA[i] * IMAGENET_STD[i] for i in range(3)),)
    return ImageData(
        name=f"folder:{path}",
        train=train,
        val=val,
        classes=classes,
        in_chans=channels,
        resolution=resolution,
        mean=tuple(mean),
        std=tuple(std),
        pad=max(1, resolution // 8),
        flip=True,
    )


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
