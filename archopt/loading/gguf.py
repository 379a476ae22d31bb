"""GGUF files (llama.cpp's format): header, tensors, dequantization, and LLaMA models from them.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md. The weights match what
``transformers`` loads from the same file (``from_pretrained(dir, gguf_file=name)``) exactly;
the tests check it on SmolLM2-135M-Instruct and on random models.

Three choices, each for a measured reason:

- The header is parsed here with ``struct`` over a memory map instead of ``gguf.GGUFReader``:
  the reader builds numpy views for every string of a 49k-token vocabulary and its 49k merges,
  which takes 2.5 s on SmolLM2; this walk takes about 0.1 s. The ``gguf`` package still supplies
  the type tables, and the reference dequantizer for the block types we do not decode ourselves;
  the tests check this parser against ``GGUFReader``.
- F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are dequantized with vectorized torch ops
  (bit-identical to ``gguf.quants.dequantize``: each value is one fp32 multiply, plus one fp32 add
  for the ``_1`` types, in the same order); every other type ``gguf.quants`` can dequantize (the
  K-quants, IQ and TQ types, MXFP4, ...) goes through it, at numpy speed.
- The tokenizer for byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) is built
  directly with ``tokenizers`` from the metadata already read: going through
  ``AutoTokenizer.from_pretrained(gguf_file=...)`` re-reads the file with ``GGUFReader`` and
  takes about 4 s, and it ignores the per-digit split that llama.cpp (and the original Hugging
  Face tokenizer) apply for SmolLM's ``smollm`` pre-tokenizer. Other vocabularies (sentencepiece
  ``llama``, the regex-split BPE families) go through transformers.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from archopt.loading.llama import build_llama, llama_state_dict_from_hf
from archopt.models.llama import Llama, LlamaConfig

QType = GGMLQuantizationType

SUPPORTED_ARCHITECTURES = ("llama",)
_VERSIONS = (2, 3)  # v1 counted with 32-bit integers; llama.cpp has not written it since 2023
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types (gguf.GGUFValueType) 0-7 and 10-12 are fixed-width scalars, here as
# struct format characters (numpy reads the same characters); 8 is a string, 9 an array.
_SCALAR = {**dict(enumerate("BbHhIif?")), 10: "Q", 11: "q", 12: "d"}


# ---------------------------------------------------------------------------------------------
# Reading the file


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


class _Parser:
    """Bounds-checked little-endian reads over the memory-mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid GGUF file: {what}")

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

    def value(self, vtype: int, key: str) -> Any:
        if vtype == 6:  # the shortest decimal naming the stored float32: 1e-05, not 9.99...e-06
            return float(str(np.float32(self.scalar("f", f"the value of {key!r}"))))
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], f"the value of {key!r}")
        if vtype == 8:
            return self.string(f"the value of {key!r}")
        if vtype != 9:
            raise self.fail(f"metadata {key!r} has value type {vtype}, expected 0-12")
        etype, count = self.scalar("I", f"{key!r}"), self.scalar("Q", f"{key!r}")
        if etype in _SCALAR:  # token types, scores: one numpy read instead of a Python loop
            dtype = np.dtype("<" + _SCALAR[etype])
            start = self.take(count * dtype.itemsize, f"the array {key!r}")
            return np.frombuffer(self.buf, dtype, count, start).tolist()
        return [self.value(etype, key) for _ in range(count)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file: all metadata, and every tensor as raw bytes (memory-mapped, lazy).

    Raises ValueError naming the file if it is not GGUF, is truncated or is inconsistent.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise ValueError(
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
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = p.string(f"metadata key {i}")
        metadata[key] = p.value(p.scalar("I", f"the type of {key!r}"), key)
    infos = []
    for i in range(n_tensors):
        name = p.string(f"tensor name {i}")
        n_dims = p.scalar("I", f"the rank of {name!r}")
        if n_dims > 8:
            raise p.fail(f"tensor {name!r} has {n_dims} dimensions, expected at most 8")
        dims = [p.scalar("Q", f"the shape of {name!r}") for _ in range(n_dims)]
        type_id, offset = p.scalar("I", f"the type of {name!r}"), p.scalar("Q", f"{name!r}")
        infos.append((name, dims, type_id, offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise p.fail(f"general.alignment must be a positive power of two, got {alignment!r}")
    data_start = -(-p.pos // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in infos:
        if offset % alignment:  # as llama.cpp checks; typed views need aligned data too
            raise p.fail(
                f"tensor {name!r} starts at offset {offset}, not a multiple of the "
                f"alignment {alignment}"
            )
        tensors[name] = _tensor(p, name, dims, type_id, data_start + offset)
    return GGUFFile(path, version, metadata, tensors)


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
    data = torch.frombuffer(p.buf, dtype=torch.uint8, count=nbytes, offset=start)
    return GGUFTensor(name, qtype, shape, data.view(rows, row_bytes))


# ---------------------------------------------------------------------------------------------
# Dequantization

_OWN_TYPES = {QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1}
_OWN_TYPES |= {QType.Q5_0, QType.Q5_1}


@cache
def _gguf_can_dequantize(qtype: GGMLQuantizationType) -> bool:
    # gguf.quants has no public list of what it can decode: ask it on one zero block.
    from gguf.quants import dequantize as reference

    try:
        reference(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def supported_types() -> list[GGMLQuantizationType]:
    """Tensor types this module can dequantize (ours, then gguf.quants' numpy ones)."""
    return [t for t in QType if t in _OWN_TYPES or _gguf_can_dequantize(t)]


def _check_supported(qtype: GGMLQuantizationType, what: str) -> None:
    if qtype not in _OWN_TYPES and not _gguf_can_dequantize(qtype):
        names = ", ".join(t.name for t in supported_types())
        raise ValueError(
            f"{what} has type {qtype.name}, which cannot be dequantized; supported types: {names}"
        )


def _half(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 scale at byte ``at`` of each block, as fp32 (n_blocks, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) values: low nibbles are elements 0-15, high ones 16-31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _high_bits(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """Q5's fifth bits: a little-endian uint32 at byte ``at``, bit j for element j, as (n, 32)."""
    qh = blocks[:, at : at + 4].to(torch.int64)
    qh = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
    shifts = torch.arange(32, device=blocks.device)
    return ((qh[:, None] >> shifts) & 1).to(torch.uint8) << 4


def _dequant_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """(n_blocks, type_size) uint8 -> (n_blocks, block_size) fp32, as ggml's reference does."""
    if qtype == QType.Q8_0:
        return blocks[:, 2:].contiguous().view(torch.int8).float() * _half(blocks, 0)
    if qtype == QType.Q4_0:
        return (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float() * _half(blocks, 0)
    if qtype == QType.Q4_1:
        return _half(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _half(blocks, 2)
    if qtype == QType.Q5_0:
        q = _nibbles(blocks[:, 6:]) | _high_bits(blocks, 2)
        return (q.to(torch.int8) - 16).float() * _half(blocks, 0)
    if qtype == QType.Q5_1:
        q = _nibbles(blocks[:, 8:]) | _high_bits(blocks, 4)
        return _half(blocks, 0) * q.float() + _half(blocks, 2)
    raise AssertionError(qtype)


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]):
    """fp32 tensor of ``shape`` from raw GGUF bytes ``data`` (uint8) of type ``qtype``.

    Bit-identical to ``gguf.quants.dequantize`` (but for NaN payloads: torch quiets signaling
    NaNs, numpy keeps them). The result never shares memory with ``data``.
    """
    qtype = QType(qtype)
    _check_supported(qtype, "the data to dequantize")
    raw = data.contiguous().view(-1)
    if qtype == QType.F32:
        out = raw.view(torch.float32).clone()
    elif qtype == QType.F16:
        out = raw.view(torch.float16).float()
    elif qtype == QType.BF16:
        # bf16 is the top half of an fp32: shift the bits up (exact, NaN payloads included).
        out = (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    elif qtype in _OWN_TYPES:
        out = _dequant_blocks(raw.view(-1, GGML_QUANT_SIZES[qtype][1]), qtype)
    else:
        from gguf.quants import dequantize as reference

        out = torch.from_numpy(reference(raw.numpy().reshape(1, -1), qtype).copy())
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# LLaMA: config, tensor names, Q/K permutation


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf's permutation of attn_q (n_head) / attn_k (n_head_kv) rows.

    llama.cpp's RoPE rotates adjacent pairs (2i, 2i+1); Hugging Face's rotates (i, i + d/2). The
    converter reorders each head's rows from the second layout to the first:
    ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; this is its inverse. It moves whole rows,
    so it applies to raw quantized blocks (``GGUFTensor.data``) as well as to dequantized values.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(
            f"a Q/K weight with {rows} rows cannot be split into {n_head} heads of even size"
        )
    # (n_head, d/2, 2, ...) -> (n_head, 2, d/2, ...): pair members back to the two halves.
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_REQUIRED = (
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.layer_norm_rms_epsilon",
)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"


def _uniform(value: Any, key: str, path: Path) -> int:
    """A per-layer list (written for models whose layers differ) must be one repeated value."""
    if isinstance(value, list) and len(set(value)) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise ValueError(
            f"{path}: {key} must be one integer for every layer, got {value!r}; layers of "
            "different shapes are not supported"
        )
    return value


def llama_config_from_gguf(gf: GGUFFile) -> LlamaConfig:
    """Our config from a GGUF's ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
    meta, path = gf.metadata, gf.path
    arch = gf.architecture
    if arch is None:
        raise ValueError(
            f"{path} has no general.architecture in its metadata; expected one of "
            f"{list(SUPPORTED_ARCHITECTURES)}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path} holds a {arch!r} model; only {list(SUPPORTED_ARCHITECTURES)} "
            "GGUF files are supported (llama.cpp writes Llama, Mistral and SmolLM "
            "as 'llama')"
        )
    missing = [f"{arch}.{k}" for k in _REQUIRED if f"{arch}.{k}" not in meta]
    if missing:
        raise ValueError(f"{path} is missing required metadata {missing}")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_head = _uniform(get("attention.head_count"), f"{arch}.attention.head_count", path)
    n_kv = _uniform(get("attention.head_count_kv", n_head), f"{arch}.head_count_kv", path)
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(
            f"{path}: attention.value_length {get('attention.value_length')} must "
            f"equal the key length {head_dim}"
        )
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{path}: partial rotary embeddings are not supported: "
            f"rope.dimension_count is {get('rope.dimension_count')}, expected the "
            f"head size {head_dim}"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size")
    if vocab is None:
        embd = gf.tensors.get("token_embd.weight")
        vocab = len(tokens) if tokens else embd.shape[0] if embd is not None else None
    if vocab is None:
        raise ValueError(
            f"{path} gives no vocabulary size: expected {arch}.vocab_size, "
            "tokenizer.ggml.tokens or a token_embd.weight tensor"
        )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    # llama.cpp stops on every end-of-generation token; chat models often mark end-of-turn apart.
    stops = [
        i
        for i in (
            eos,
            meta.get("tokenizer.ggml.eot_token_id"),
            meta.get("tokenizer.ggml.eom_token_id"),
        )
        if i is not None
    ]
    stops = list(dict.fromkeys(stops))
    extra = {
        "gguf_path": str(path),
        "tensor_types": dict(Counter(t.type.name for t in gf.tensors.values())),
    }
    for key, name in (("general.name", "name"), ("tokenizer.chat_template", "chat_template")):
        if key in meta:
            extra[name] = meta[key]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_uniform(get("feed_forward_length"), f"{arch}.feed_forward_length", path),
        num_layers=get("block_count"),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch, path),
        tie_word_embeddings="output.weight" not in gf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=None if not stops else stops[0] if len(stops) == 1 else stops,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        extra=extra,
    )


def _rope_scaling(meta: dict, arch: str, path: Path) -> dict | None:
    # Llama 3.1's "llama3" scaling is not in the metadata: convert_hf_to_gguf bakes it into a
    # rope_freqs tensor of per-frequency divisors, which load_gguf_llama applies (see there).
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor not in (None, 1.0) and f"{arch}.rope.scale_linear" in meta:
        kind = "linear"  # the key older converters wrote
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(
        f"{path}: rope scaling {kind!r} is not supported, expected 'none' or "
        "'linear' (llama3 scaling comes as a rope_freqs tensor, also supported)"
    )


def _hf_name(name: str, num_layers: int) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and int(layer) < num_layers and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    return None


def gguf_llama_hf_state_dict(gf: GGUFFile, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """fp32 tensors under Hugging Face ``LlamaForCausalLM`` names, Q/K rows un-permuted.

    Every name and type is checked before anything is dequantized.
    """
    names = {}
    for name, t in gf.tensors.items():
        if name == ROPE_FREQS:
            continue
        hf = _hf_name(name, cfg.num_layers)
        if hf is None:
            raise ValueError(
                f"{gf.path}: tensor {name!r} is not part of a {cfg.num_layers}-layer "
                "Llama (biases, mixture-of-experts and extra layers are not supported)"
            )
        _check_supported(t.type, f"{gf.path}: tensor {name!r}")
        names[name] = hf
    out = {}
    with _one_thread():
        for name, hf in names.items():
            w = gf.tensors[name].dequantize()
            if ".attn_q." in name:
                w = unpermute_qk(w, cfg.num_heads)
            elif ".attn_k." in name:
                w = unpermute_qk(w, cfg.num_kv_heads)
            out[hf] = w
    return out


@contextmanager
def _one_thread():
    """Run torch ops on one intra-op thread, restoring the count after.

    Dequantizing is a few cheap elementwise ops per tensor, on tensors of about a million values:
    there the wake-up of OpenMP's other threads costs more than the work. Measured on SmolLM2
    on the 2-core machine: 0.56 s on one thread, 1.8-5.6 s on two (when the other core is busy).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _rope_freqs(gf: GGUFFile, cfg: LlamaConfig) -> torch.Tensor | None:
    t = gf.tensors.get(ROPE_FREQS)
    if t is None:
        return None
    if t.shape != (cfg.head_dim // 2,):
        raise ValueError(
            f"{gf.path}: {ROPE_FREQS} has shape {list(t.shape)}, expected "
            f"[{cfg.head_dim // 2}] (head_dim / 2)"
        )
    _check_supported(t.type, f"{gf.path}: tensor {ROPE_FREQS!r}")
    return t.dequantize()


def load_gguf_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
    keep_quantized: bool = False,
    kernel: bool | str = "auto",
) -> Llama:
    """A ``Llama`` from a GGUF file (dequantized to fp32, or ``dtype``), with its tokenizer.

    ``keep_quantized=True``: the linear layers stored as Q4_0, Q4_1 or Q8_0 keep their blocks
    (see ``keep_quantized_linears``) instead of being dequantized. ``kernel`` (with
    ``keep_quantized``): ``"auto"`` re-encodes them for torch's CPU int4 kernel where it takes
    the shape (``archopt.ops.quant.pack_for_cpu``: the same 4- and 8-bit values, scales rounded
    to bf16, bf16 activations), ``True`` requires it for every layer, ``False`` keeps the
    blocks bit for bit with exact fp32 products.

    A ``rope_freqs`` tensor (how convert_hf_to_gguf stores Llama 3.1's llama3 rope scaling)
    divides the rotary inverse frequencies, as llama.cpp does: it becomes the config's
    ``rope_scaling = {"rope_type": "freq_factors", "factors": [...]}``.

    Without transformers the model loads with ``tokenizer = None`` and the reason in
    ``config.extra["tokenizer_missing"]``, for whoever needs a tokenizer to report.
    """
    from archopt.ops.quant import check_kernel_arg, pack_for_cpu

    check_kernel_arg(kernel)
    gf = read_gguf(path)
    cfg = llama_config_from_gguf(gf)
    freqs = _rope_freqs(gf, cfg)
    if freqs is not None:
        if cfg.rope_scaling is not None:
            raise ValueError(
                f"{gf.path}: has both {ROPE_FREQS} and rope scaling metadata "
                f"({cfg.rope_scaling['rope_type']}); expected at most one"
            )
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": freqs.tolist()}
    tok = None
    if tokenizer:  # before the weights: a bad vocabulary fails early and cheaply
        try:
            tok = gguf_tokenizer(gf)
        except ImportError as e:
            cfg.extra["tokenizer_missing"] = f"the tokenizer needs a library that is missing ({e})"
    with _one_thread():  # the q/k/v and gate/up concatenations too
        sd = llama_state_dict_from_hf(gguf_llama_hf_state_dict(gf, cfg), cfg)
    model = build_llama(cfg, sd, dtype)
    if keep_quantized:
        keep_quantized_linears(model, gf)
        if kernel:
            cfg.extra["cpu_kernel"] = pack_for_cpu(model, strict=kernel is True)
    model.tokenizer = tok
    return model


# ---------------------------------------------------------------------------------------------
# Keeping the blocks: Q4_0 / Q4_1 as Int4Linear, Q8_0 as Int8Linear (blocks of 32)


def _quantized_linear(data: torch.Tensor, qtype: GGMLQuantizationType, in_features: int):
    """The module that holds ``data`` (rows, bytes) as it is, or None for types kept as fp32.

    Its ``dequantized()`` equals ggml's dequantization bit for bit: Q8_0 is d * q; Q4_1 is
    d * q + m; Q4_0 is d * (q - 8), held as d * q + (-8 d), which is exact (both products fit
    in fp32's mantissa, and so does their sum).
    """
    from archopt.ops.quant import Int4Linear, Int8Linear

    if qtype not in (QType.Q8_0, QType.Q4_0, QType.Q4_1):
        return None
    rows, groups = data.shape[0], in_features // 32
    blocks = data.reshape(rows * groups, GGML_QUANT_SIZES[qtype][1])
    d = _half(blocks, 0).view(rows, groups)
    if qtype == QType.Q8_0:
        q = blocks[:, 2:].contiguous().view(torch.int8).view(rows, in_features)
        return Int8Linear.from_quantized(q, d)
    if qtype == QType.Q4_0:
        return Int4Linear.from_packed(blocks[:, 2:].reshape(rows, in_features // 2), d, -8 * d)
    m = _half(blocks, 2).view(rows, groups)
    return Int4Linear.from_packed(blocks[:, 4:].reshape(rows, in_features // 2), d, m)


def _concat(modules: list):
    """One module for the row-wise concatenation (fused q/k/v, gate/up), when they agree."""
    first = modules[0]
    if any(m is None or type(m) is not type(first) or m.groups != first.groups for m in modules):
        return None
    if len(modules) == 1:
        return first
    names = [name for name, _ in first.named_buffers()]
    cat = {name: torch.cat([m.get_buffer(name) for m in modules]) for name in names}
    if "minimum" in cat:
        return type(first).from_packed(cat["qweight"], cat["scale"], cat["minimum"])
    return type(first).from_quantized(cat["qweight"], cat["scale"])


def keep_quantized_linears(model: Llama, gf: GGUFFile) -> dict[str, int]:
    """Replace, in place, ``model``'s linear layers with ones holding ``gf``'s blocks.

    Layers whose tensors are of another type (F32, F16, Q5_x, ...), or whose fused parts cannot
    share one module (int8 with int4 blocks), stay as they are. A tied output projection gets
    the token embedding's blocks (the embedding lookup itself stays dequantized: it reads one
    row per token). Returns how many
    layers were kept per type and how many stayed dequantized; ``model.config.extra
    ["gguf_weights"]`` records the same.
    """
    cfg = model.config
    counts: Counter = Counter()

    def piece(name: str, heads: int | None = None):
        t = gf.tensors[name]
        data = t.data if heads is None else unpermute_qk(t.data, heads)
        return _quantized_linear(data, t.type, t.shape[1]), t.type.name

    def replace(owner, attr: str, parts: list[tuple[str, int | None]]) -> None:
        made = [piece(name, heads) for name, heads in parts]
        module = _concat([m for m, _ in made])
        if module is None:
            counts["dequantized"] += 1
            return
        setattr(owner, attr, module)
        counts["+".join(sorted({kind for _, kind in made}))] += 1  # Q4_0 and Q4_1 fuse exactly

    for i, layer in enumerate(model.layers):
        b = f"blk.{i}."
        replace(layer.attn, "qkv", [
            (b + "attn_q.weight", cfg.num_heads), (b + "attn_k.weight", cfg.num_kv_heads),
            (b + "attn_v.weight", None),
        ])  # fmt: skip
        replace(layer.attn, "out", [(b + "attn_output.weight", None)])
        replace(layer.mlp, "gate_up", [(b + "ffn_gate.weight", None), (b + "ffn_up.weight", None)])
        replace(layer.mlp, "down", [(b + "ffn_down.weight", None)])
    head = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"
    replace(model, "lm_head", [(head, None)])
    cfg.extra["gguf_weights"] = dict(counts)
    return dict(counts)


# ---------------------------------------------------------------------------------------------
# Tokenizer

# llama.cpp's pre-tokenizers that are GPT-2's byte-level regex, alone or after splitting every
# digit apart (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*). Others need transformers' tables.
_GPT2_PRE = {"default", "gpt2", "mpt", "olmo", "jais"}
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"}


def gguf_tokenizer(gf: GGUFFile):
    """A tokenizer for the vocabulary in ``gf``, with its chat template.

    Byte-level BPE vocabularies get ``archopt.loading.tokenizer.Tokenizer`` (``tokenizers``
    alone, no transformers); others go through transformers. None when the file carries no
    vocabulary; ImportError when the library it needs is missing; ValueError for vocabularies
    it cannot build.
    """
    meta = gf.metadata
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        return None
    template = meta.get("tokenizer.chat_template")
    if kind == "gpt2" and (pre in _GPT2_PRE or pre in _DIGIT_PRE):
        from archopt.loading.tokenizer import Tokenizer

        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return Tokenizer(
            _byte_level_bpe(meta, digits=pre in _DIGIT_PRE),
            bos_token=token("bos"),
            eos_token=token("eos"),
            unk_token=token("unknown"),
            pad_token=token("padding"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template,
        )
    # ImportError without transformers: load_gguf_llama records it and loads without one.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gf.path.parent), gguf_file=gf.path.name)
    except Exception as e:  # transformers raises many kinds; the caller needs one
        raise ValueError(
            f"{gf.path}: cannot build its {kind!r} tokenizer (pre-tokenizer "
            f"{pre!r}) through transformers: {e}; load with tokenizer=False "
            "to skip it"
        ) from e
    if template is not None:
        tok.chat_template = template
    return tok


def _byte_level_bpe(meta: dict, digits: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    # Token types (llama.cpp): 3 control (special, e.g. <|im_start|>), 4 user-defined; both are
    # matched whole in the text instead of being split by BPE.
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )
    return tok
