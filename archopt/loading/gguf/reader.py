"""Reading a GGUF file: the header and metadata parsed with ``struct`` over a memory map, every
tensor as its raw bytes (``GGUFTensor``), lazily.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. Parsed here instead of by
``gguf.GGUFReader``, which builds numpy views for every string of a 49k-token vocabulary and its
49k merges (2.5 s on SmolLM2; this walk: about 0.1 s). The tests check it against the reader.
"""

from __future__ import annotations

import itertools
import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from archopt.errors import CheckpointError
from archopt.loading.gguf.dequant import QType, dequantize

_VERSIONS = (2, 3)  # v1 counted with 32-bit integers; llama.cpp has not written it since 2023
_DEFAULT_ALIGNMENT = 32
# The fewest bytes a metadata entry (key length, type, a one-byte value) and a tensor info (name
# length, rank, type, offset) take: counts are checked against the file before any loop runs.
_MIN_KV_BYTES, _MIN_TENSOR_BYTES = 8 + 4 + 1, 8 + 4 + 4 + 8
_MAX_DIMS = 8
_MAX_ARRAY_DEPTH = 8  # llama.cpp writes flat arrays; nesting deeper than this is corruption
_INT64_MAX = 2**63 - 1

# GGUF metadata value types (gguf.GGUFValueType) 0-7 and 10-12 are fixed-width scalars, here as
# struct format characters (numpy reads the same characters); 8 is a string, 9 an array.
_SCALAR = {**dict(enumerate("BbHhIif?")), 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: the raw bytes, not yet dequantized.

    ``shape`` is in torch order, (out_features, in_features) for a linear weight (GGUF lists its
    dimensions fastest-moving first). ``data`` is uint8 of shape (rows, bytes per row): each row
    is ``in_features / block_size`` blocks of ``type_size`` bytes, so a row permutation (such as
    undoing the Q/K permutation) can be applied to the quantized blocks directly.
    """

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: torch.Tensor
    offset: int = 0  # of the first byte, from the start of the file

    def dequantize(self) -> torch.Tensor:
        """fp32 values of ``shape``."""
        return dequantize(self.data, self.type, self.shape)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(repr=False)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


_U64 = struct.Struct("<Q")


class _Parser:
    """Bounds-checked little-endian reads over the memory-mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid GGUF file: {what}")

    def take(self, n: int, what: str) -> int:
        """Claim n bytes; their start offset."""
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"it ends at byte {self.size} while reading {what} (needs bytes up to "
                f"{self.pos + n}); the file is truncated or corrupt"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        fmt = "<" + fmt
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e})") from None

    def check_count(self, count: int, min_bytes: int, what: str) -> None:
        """``count`` items of at least ``min_bytes`` each must fit in the rest of the file."""
        left = self.size - self.pos
        if count * min_bytes > left:
            raise self.fail(
                f"{what} is {count}, which needs at least {count * min_bytes} bytes, but only "
                f"{left} bytes follow; the file is corrupt"
            )

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype == 6:  # the shortest decimal naming the stored float32: 1e-05, not 9.99...e-06
            return float(str(np.float32(self.scalar("f", f"the value of {key!r}"))))
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], f"the value of {key!r}")
        if vtype == 8:
            return self.string(f"the value of {key!r}")
        if vtype != 9:
            raise self.fail(f"metadata {key!r} has value type {vtype}, expected 0-12")
        if depth >= _MAX_ARRAY_DEPTH:
            raise self.fail(
                f"metadata {key!r} nests arrays more than {_MAX_ARRAY_DEPTH} deep; expected flat "
                "arrays, as llama.cpp writes them"
            )
        etype, count = self.scalar("I", f"{key!r}"), self.scalar("Q", f"{key!r}")
        if etype not in _SCALAR and etype not in (8, 9):
            raise self.fail(f"metadata {key!r} is an array of value type {etype}, expected 0-12")
        if etype in _SCALAR:  # token types, scores: one numpy read instead of a Python loop
            dtype = np.dtype("<" + _SCALAR[etype])
            start = self.take(count * dtype.itemsize, f"the array {key!r}")
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        # Strings take at least their 8-byte length, arrays their 12-byte header.
        self.check_count(count, 8 if etype == 8 else 12, f"the length of the array {key!r}")
        if etype == 8:
            return self.strings(count, key)
        return [self.value(etype, key, depth + 1) for _ in range(count)]

    def strings(self, count: int, key: str) -> list[str]:
        """``count`` strings in a row (a vocabulary: ~100k), read in one tight loop; at the
        first one that does not fit or decode, ``string`` reads it again to say why."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        length = _U64.unpack_from
        for _ in range(count):
            end = pos + 8 + length(buf, pos)[0] if pos + 8 <= size else size + 1
            if end > size:
                break
            try:
                out.append(buf[pos + 8 : end].decode("utf-8"))
            except UnicodeDecodeError:
                break
            pos = end
        else:
            self.pos = pos
            return out
        self.pos = pos
        self.string(f"the value of {key!r}")  # raises, naming the fault
        raise AssertionError("unreachable: the string above fits and decodes")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file: all metadata, and every tensor as raw bytes (memory-mapped, lazy).

    Raises ``CheckpointError`` (a ValueError) naming the file and the field if it is not GGUF,
    is truncated or is inconsistent: counts larger than the file can hold, repeated keys or tensor
    names, tensors outside the file, overlapping or misaligned. Nothing is allocated in
    proportion to a number the file states before that number is checked against its size.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise CheckpointError(
                f"{path} is not a valid GGUF file: it has {size} bytes, fewer than "
                "the 24-byte header"
            )
        # Copy-on-write: torch tensors over the map stay writable without touching the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    p = _Parser(buf, path)
    magic = buf[:4]
    if magic != b"GGUF":
        raise p.fail(f"it starts with {magic!r}, expected the magic bytes b'GGUF'")
    p.pos = 4
    version = p.scalar("I", "the version")
    if version not in _VERSIONS:
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise p.fail(f"GGUF version {version}{hint} is not supported, expected one of {_VERSIONS}")
    n_tensors, n_kv = p.scalar("Q", "the tensor count"), p.scalar("Q", "the metadata count")
    p.check_count(n_kv, _MIN_KV_BYTES, "the metadata count")
    p.check_count(n_tensors, _MIN_TENSOR_BYTES, "the tensor count")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = p.string(f"metadata key {i}")
        if key in metadata:
            raise p.fail(f"metadata key {key!r} appears again as entry {i}; expected unique keys")
        metadata[key] = p.value(p.scalar("I", f"the type of {key!r}"), key)
    p.check_count(n_tensors, _MIN_TENSOR_BYTES, "the tensor count")
    infos: dict[str, tuple[list[int], int, int]] = {}
    for i in range(n_tensors):
        name = p.string(f"tensor name {i}")
        if name in infos:
            raise p.fail(f"tensor name {name!r} appears again as tensor {i}; expected unique names")
        n_dims = p.scalar("I", f"the rank of {name!r}")
        if n_dims > _MAX_DIMS:
            raise p.fail(f"tensor {name!r} has {n_dims} dimensions, expected at most {_MAX_DIMS}")
        dims = [p.scalar("Q", f"the shape of {name!r}") for _ in range(n_dims)]
        type_id, offset = p.scalar("I", f"the type of {name!r}"), p.scalar("Q", f"{name!r}")
        infos[name] = (dims, type_id, offset)
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        raise p.fail(f"general.alignment must be a positive power of two, got {alignment!r}")
    if alignment & (alignment - 1):
        raise p.fail(f"general.alignment must be a positive power of two, got {alignment!r}")
    data_start = -(-p.pos // alignment) * alignment
    tensors = {}
    for name, (dims, type_id, offset) in infos.items():
        if offset % alignment:  # as llama.cpp checks; typed views need aligned data too
            raise p.fail(
                f"tensor {name!r} starts at offset {offset}, not a multiple of the "
                f"alignment {alignment}"
            )
        tensors[name] = _tensor(p, name, dims, type_id, data_start + offset)
    _check_disjoint(p, tensors, data_start)
    return GGUFFile(path, version, metadata, tensors)


def _check_disjoint(p: _Parser, tensors: dict[str, GGUFTensor], data_start: int) -> None:
    """Two tensors sharing bytes would load as one another's weights: refuse them."""
    spans = sorted(
        (t.offset, t.offset + t.data.numel(), name) for name, t in tensors.items() if t.data.numel()
    )
    for (start, end, name), (next_start, next_end, next_name) in itertools.pairwise(spans):
        if next_start < end:
            raise p.fail(
                f"tensors {name!r} (data bytes {start - data_start}..{end - data_start}) and "
                f"{next_name!r} ({next_start - data_start}..{next_end - data_start}) overlap; "
                "expected each tensor in bytes of its own"
            )


def _tensor(p: _Parser, name: str, dims: list[int], type_id: int, start: int) -> GGUFTensor:
    try:
        qtype = QType(type_id)
    except ValueError:
        raise p.fail(
            f"tensor {name!r} has ggml type id {type_id}, which gguf does not know "
            "(a newer llama.cpp type? upgrade the gguf package)"
        ) from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(reversed(dims))  # torch order
    # As ggml checks: every dimension and the element count fit in an int64 (a zero dimension
    # does not excuse the others: the rows would still be counted).
    if math.prod(max(d, 1) for d in dims) > _INT64_MAX:
        raise p.fail(
            f"tensor {name!r} has shape {list(shape)}, whose size overflows a 64-bit count; "
            "the file is corrupt"
        )
    row = dims[0] if dims else 1
    if row % block:
        raise p.fail(
            f"tensor {name!r} has rows of {row} values, not a multiple of the "
            f"{qtype.name} block size {block}"
        )
    rows = math.prod(dims[1:])  # Python ints: a corrupt shape cannot overflow past the checks
    row_bytes = row // block * type_size
    nbytes = rows * row_bytes
    if start + nbytes > p.size:
        raise p.fail(
            f"tensor {name!r} ({qtype.name}, shape {list(shape)}) needs bytes "
            f"{start}..{start + nbytes} but the file has {p.size}; it is truncated"
        )
    if nbytes == 0:  # torch.frombuffer refuses a count of 0
        data = torch.empty(0, dtype=torch.uint8)
    else:
        data = torch.frombuffer(p.buf, dtype=torch.uint8, count=nbytes, offset=start)
    return GGUFTensor(name, qtype, shape, data.view(rows, row_bytes), start)
