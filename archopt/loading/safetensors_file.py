"""Reading a safetensors file with its header checked first, every fault named.

The ``safetensors`` library refuses malformed files, but says only "invalid shape, data type,
or offset for tensor", and keeps the last of two entries with one name. Here the header (at
most the file's size, and safetensors' own 100 MB limit) is parsed and checked before the
library maps the file: repeated names, unknown dtypes, byte ranges that disagree with the shape
and dtype, lie outside the data or overlap, each raise ``CheckpointError`` naming the file,
the tensor, what was expected and what the header says. Nothing is ever unpickled.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from pathlib import Path

import torch

from archopt.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# Bits per element of every dtype the format names (sub-byte floats are packed).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64,
}  # fmt: skip


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(
                f"the name {key!r} appears twice in the header; expected unique names"
            )
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The checked header of ``path`` (tensor entries only) and the data's start offset."""
    path = Path(path)

    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {what}")

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 8:
            raise fail(f"it has {size} bytes, fewer than the 8-byte header length")
        f.seek(0)
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise fail(
                f"its header length is {n} bytes, expected at most "
                f"{min(size - 8, MAX_HEADER_BYTES)} (the file has {size} bytes)"
            )
        text = f.read(n)
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys)
    except CheckpointError as e:
        raise fail(str(e)) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise fail(f"its header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise fail(f"its header must be a JSON object, got {type(header).__name__}")
    meta = header.pop("__metadata__", None)
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise fail("__metadata__ must map names to strings")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        spans.append((*_span(fail, name, entry, data_size), name))
    spans.sort()
    for (start, end, name), (next_start, next_end, next_name) in itertools.pairwise(spans):
        if next_start < end:
            raise fail(
                f"tensors {name!r} (bytes {start}..{end}) and {next_name!r} "
                f"({next_start}..{next_end}) overlap; expected each in bytes of its own"
            )
    return header, 8 + n


def _span(fail, name: str, entry: object, data_size: int) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise fail(
            f"tensor {name!r} must have exactly dtype, shape and data_offsets, got {entry!r}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise fail(f"tensor {name!r} has dtype {dtype!r}, expected one of {sorted(DTYPE_BITS)}")

    def natural(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(natural(d) for d in shape):
        raise fail(f"tensor {name!r} has shape {shape!r}, expected a list of sizes >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(natural, offsets)):
        raise fail(f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_BITS[dtype]
    if nbytes % 8 or end - begin != nbytes // 8:
        raise fail(
            f"tensor {name!r} ({dtype}, shape {shape}) needs {nbytes / 8:g} bytes, but its "
            f"data_offsets {offsets} span {end - begin}"
        )
    if end > data_size:
        raise fail(
            f"tensor {name!r} ends at data byte {end}, past the {data_size} data bytes the "
            "file holds; it is truncated"
        )
    return begin, end


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (memory-mapped), after ``read_header``'s checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
