"""The three sources of image data, each read into an ``ImageData`` at a resolution and a
channel count: scikit-learn's embedded digits, CIFAR-10 in its python pickle format, and an
ImageFolder tree (with its own train/val sub-folders, or split here). The fixed stratified
split, resizing and channel conversion of in-memory images are here too; reading the files
themselves is ``archopt.train.files``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from archopt.train.files import (
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    check_tree,
    cifar10_folder,
    read_cifar_batches,
    read_pickle,
    scan_tree,
)
from archopt.train.images import FolderImages, ImageData, TensorImages

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


def digits_data(resolution: int, channels: int, val_fraction: float) -> ImageData:
    """scikit-learn's digits resized to ``resolution``, split (fixed, stratified) here."""
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


def cifar10_data(path: Path, resolution: int, channels: int) -> ImageData:
    """CIFAR-10's python batches in ``path``; the test batch is the validation split."""
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


def folder_data(path: Path, resolution: int, channels: int, val_fraction: float) -> ImageData:
    """An ImageFolder tree, read lazily: its train/ and val/ sub-folders, or split here."""
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


__all__ = [
    "CIFAR10_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA",
    "SPLIT_SEED",
    "cifar10_data",
    "digits_data",
    "folder_data",
]
