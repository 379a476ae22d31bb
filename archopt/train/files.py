"""Reading the local data sets' files: CIFAR-10's python batches, through an unpickler that
loads arrays and nothing else (a downloaded data set is not trusted code), and ImageFolder
trees (one sub-folder of images per class)."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from archopt.errors import DataError

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_NUM_CLASSES = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else.

    CIFAR-10's python format is a pickle, and unpickling runs whatever the file names; a
    downloaded data set is not trusted code, so only what the format needs is allowed.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str).
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                "strings and numpy arrays"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core -> numpy._core
            return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    try:
        # latin1: the published files were written by Python 2; it keeps array bytes intact.
        obj = ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, RecursionError, MemoryError) as e:  # fmt: skip
        raise DataError(f"{path} is not a CIFAR-10 python batch: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} is not a CIFAR-10 python batch: expected a dict, got a {type(obj).__name__}"
        )
    # Keys are str with latin1 decoding, bytes with encoding='bytes': accept both.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar10_folder(path: Path) -> Path:
    """The folder holding the CIFAR-10 batches: ``path`` itself or ``path/cifar-10-batches-py``."""
    path = Path(path)
    expected = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    for candidate in (path / CIFAR10_FOLDER, path):
        if candidate.is_dir() and any((candidate / f).is_file() for f in expected):
            missing = [f for f in expected if not (candidate / f).is_file()]
            if missing:
                raise DataError(
                    f"incomplete CIFAR-10 python data in {candidate}: expected "
                    f"{', '.join(expected)}, missing {', '.join(missing)}"
                )
            return candidate
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else []
    raise DataError(
        f"expected CIFAR-10 in its python format at {path}: a folder holding "
        f"{', '.join(expected)} (torchvision's '{CIFAR10_FOLDER}'), or its parent; "
        f"found {found or 'nothing'}"
    )


def read_cifar_batches(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    images, labels = [], []
    for name in names:
        d = read_pickle(folder / name)
        data, lab = d.get("data"), d.get("labels", d.get("fine_labels"))
        if data is None or lab is None:
            raise DataError(
                f"{folder / name} is not a CIFAR-10 python batch: expected keys 'data' and "
                f"'labels', got {sorted(d)}"
            )
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{folder / name}: expected 'data' as uint8 rows of 3072 values (3x32x32), got "
                f"{data.dtype} {data.shape}"
            )
        if len(lab) != data.shape[0]:
            raise DataError(f"{folder / name}: {data.shape[0]} images but {len(lab)} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(_labels(lab, folder / name))
    return torch.cat(images), torch.cat(labels)


def _labels(lab, path: Path) -> torch.Tensor:
    """Class indices 0..9 as int64: never a float truncated, a bool or a number out of range
    taken for a class."""
    try:
        arr = np.asarray(lab)
    except (ValueError, TypeError) as e:  # ragged nesting
        raise DataError(f"{path}: labels must be a list of class indices, got {e}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        example = arr.reshape(-1)[:3].tolist() if arr.size else []
        raise DataError(
            f"{path}: labels", "a flat list of integer class indices 0..9",
            f"{arr.dtype} values of shape {arr.shape} such as {example}",
        )  # fmt: skip
    if arr.size and (arr.min() < 0 or arr.max() >= CIFAR10_NUM_CLASSES):
        bad = int(arr[(arr < 0) | (arr >= CIFAR10_NUM_CLASSES)][0])
        raise DataError(f"{path}: labels", "class indices in 0..9", f"{bad} among them")
    return torch.as_tensor(arr, dtype=torch.long)


def scan_tree(root: Path) -> tuple[list[str], list[Path], list[int]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(c)
    return classes, files, labels


def check_tree(root: Path, classes: list[str], files: list[Path]) -> None:
    if len(classes) < 2 or not files:
        raise DataError(
            f"expected an ImageFolder tree at {root}: one sub-folder of images per class (at "
            f"least 2 classes), optionally under train/ and val/; found {len(classes)} class "
            f"folder(s) and {len(files)} image(s) ({', '.join(IMAGE_EXTENSIONS)})"
        )
