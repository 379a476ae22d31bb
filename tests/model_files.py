"""Small valid model files built field by field, for the loaders' bad-input tests and fuzzer.

``GGUFSpec`` is what a GGUF file holds (metadata with value types, tensor infos, the data region)
and ``to_bytes`` writes it as the format says (https://github.com/ggml-org/ggml/blob/master/
docs/gguf.md), so a test can set any field to any value, valid or not, and write again.
``tiny_gguf`` is a 2-layer Llama with a byte-level tokenizer and tensors in six storage types;
``tiny_hf_folder`` is a Hugging Face folder (config.json + model.safetensors) of the same size.
Nothing here imports transformers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR_FORMATS = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f"}
SCALAR_FORMATS |= {BOOL: "?", U64: "Q", I64: "q", F64: "d"}
ALIGNMENT = 32


@dataclass
class KV:
    key: str
    vtype: int
    value: Any  # an ARR value is (element type, [values]); a Raw value is written as it is


@dataclass(frozen=True)
class Raw:
    data: bytes


def nested_array(depth: int) -> Raw:
    """An array of one array of one array ... of one int32, ``depth`` arrays deep."""
    return Raw(struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQi", I32, 1, 7))


@dataclass
class TensorInfo:
    name: str
    dims: list[int]  # GGUF order: fastest-moving first
    type: int  # ggml type id
    offset: int  # from the start of the data region


@dataclass
class GGUFSpec:
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytes
    version: int = 3
    n_kv: int | None = None  # written instead of len(kvs) when set
    n_tensors: int | None = None

    def kv(self, key: str) -> KV:
        return next(kv for kv in self.kvs if kv.key == key)

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)

    def with_value(self, key: str, value: Any, vtype: int | None = None) -> GGUFSpec:
        """A copy with ``key`` set to ``value`` (added if absent)."""
        kvs = [replace(kv) for kv in self.kvs if kv.key != key]
        old = next((kv for kv in self.kvs if kv.key == key), None)
        kvs.append(KV(key, vtype if vtype is not None else old.vtype, value))
        return replace(self, kvs=kvs, tensors=[replace(t) for t in self.tensors])

    def without(self, key: str) -> GGUFSpec:
        return replace(self, kvs=[replace(kv) for kv in self.kvs if kv.key != key])

    def to_bytes(self) -> bytes:
        return self.layout()[0]

    def layout(self) -> tuple[bytes, list[tuple[int, str, str]]]:
        """The file, and where each number of its header lies: (offset, struct format, what)."""
        out, fields = bytearray(b"GGUF"), []

        def put(fmt: str, value: Any, what: str) -> None:
            fields.append((len(out), fmt, what))
            out.extend(struct.pack("<" + fmt, value))

        def put_value(vtype: int, value: Any, what: str) -> None:
            if isinstance(value, Raw):
                out.extend(value.data)
            elif vtype in SCALAR_FORMATS:
                put(SCALAR_FORMATS[vtype], value, what)
            elif vtype == STR:
                raw = value.encode() if isinstance(value, str) else value
                put("Q", len(raw), f"length of {what}")
                out.extend(raw)
            else:
                etype, items = value
                put("I", etype, f"element type of {what}")
                put("Q", len(items), f"length of {what}")
                for item in items:
                    put_value(etype, item, f"an element of {what}")

        put("I", self.version, "version")
        put("Q", len(self.tensors) if self.n_tensors is None else self.n_tensors, "tensor count")
        put("Q", len(self.kvs) if self.n_kv is None else self.n_kv, "metadata count")
        for kv in self.kvs:
            put_value(STR, kv.key, f"key {kv.key}")
            put("I", kv.vtype, f"type of {kv.key}")
            put_value(kv.vtype, kv.value, kv.key)
        for t in self.tensors:
            put_value(STR, t.name, f"name {t.name}")
            put("I", len(t.dims), f"rank of {t.name}")
            for d in t.dims:
                put("Q", d, f"a dimension of {t.name}")
            put("I", t.type, f"type of {t.name}")
            put("Q", t.offset, f"offset of {t.name}")
        out.extend(bytes(-len(out) % ALIGNMENT))
        return bytes(out) + self.data, fields


def write(path: Path, spec: GGUFSpec) -> Path:
    path.write_bytes(spec.to_bytes())
    return path


# ------------------------------------------------------------------------------ a tiny Llama


def tiny_config(**overrides):
    from archopt.models.llama import LlamaConfig

    preset = dict(
        vocab_size=len(tiny_vocabulary()),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=0,
        eos_token_id=2,
    )
    return LlamaConfig(**(preset | overrides))


def tiny_hf_state_dict(cfg=None) -> dict[str, torch.Tensor]:
    """Seeded random weights (norms around 1) under Hugging Face's names."""
    from archopt.loading.llama import llama_state_dict_to_hf
    from archopt.models.llama import Llama

    cfg = cfg or tiny_config()
    gen = torch.Generator().manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale + ("norm" in name))
    return {
        k: v.detach().clone() for k, v in llama_state_dict_to_hf(model.state_dict(), cfg).items()
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are
    shifted past 255, so every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table |= {b: chr(256 + i) for i, b in enumerate(shifted)}
    return dict(sorted(table.items()))


MERGES = ["Ġ t", "h e", "Ġt he", "l l", "ll o", "o r"]


def tiny_vocabulary() -> list[str]:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return special + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "ll", "llo", "or"]


# Storage types by tensor: every dequantization path of our own, and a kept-quantized linear.
_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q4_1"}
_TYPES |= {"attn_output": "Q5_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_0", "ffn_down": "Q5_1"}
_TYPES |= {"output": "F16"}


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders each Q/K head's rows from rotate-half to adjacent pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def tiny_gguf(cfg=None, *, tokenizer: bool = True, exact: bool = False) -> GGUFSpec:
    """A 2-layer Llama (untied head) as llama.cpp's converter would write it; ``exact``: every
    tensor in F32, so that the loaded weights equal ``tiny_hf_state_dict``."""
    import gguf

    cfg = cfg or tiny_config()
    sd = tiny_hf_state_dict(cfg)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    a = "llama."
    kvs = [
        KV("general.architecture", STR, "llama"),
        KV("general.name", STR, "tiny"),
        KV(a + "context_length", U32, cfg.max_position_embeddings),
        KV(a + "embedding_length", U32, cfg.hidden_size),
        KV(a + "block_count", U32, cfg.num_layers),
        KV(a + "feed_forward_length", U32, cfg.intermediate_size),
        KV(a + "attention.head_count", U32, cfg.num_heads),
        KV(a + "attention.head_count_kv", U32, cfg.num_kv_heads),
        KV(a + "rope.freq_base", F32, cfg.rope_theta),
        KV(a + "attention.layer_norm_rms_epsilon", F32, cfg.rms_norm_eps),
        KV(a + "rope.dimension_count", U32, cfg.head_dim),
        KV(a + "vocab_size", U32, cfg.vocab_size),
        KV("tokenizer.ggml.bos_token_id", U32, cfg.bos_token_id),
        KV("tokenizer.ggml.eos_token_id", U32, cfg.eos_token_id),
    ]
    if tokenizer:
        vocab = tiny_vocabulary()
        kvs += [
            KV("tokenizer.ggml.model", STR, "gpt2"),
            KV("tokenizer.ggml.pre", STR, "smollm"),
            KV("tokenizer.ggml.tokens", ARR, (STR, vocab)),
            KV("tokenizer.ggml.token_type", ARR, (I32, [3, 3, 3] + [1] * (len(vocab) - 3))),
            KV("tokenizer.ggml.merges", ARR, (STR, MERGES)),
            KV(
                "tokenizer.chat_template",
                STR,
                "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            ),
        ]
    tensors, data = [], bytearray()
    for hf_name, t in sd.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name.endswith("attn_q.weight"):
            t = _permute(t, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            t = _permute(t, cfg.num_kv_heads)
        kind = "F32" if t.dim() == 1 or exact else _TYPES[name.split(".")[-2]]
        qtype = gguf.GGMLQuantizationType[kind]
        values = t.float().numpy()
        raw = values.astype(np.float16) if kind == "F16" else values
        if kind not in ("F32", "F16"):
            raw = gguf.quants.quantize(values, qtype)
        data += bytes(-len(data) % ALIGNMENT)
        tensors.append(TensorInfo(name, list(reversed(t.shape)), int(qtype), len(data)))
        data += np.ascontiguousarray(raw).tobytes()
    return GGUFSpec(kvs, tensors, bytes(data))


def tiny_hf_folder(folder: Path, cfg=None) -> Path:
    """A Hugging Face folder: config.json and one model.safetensors."""
    from safetensors.torch import save_file

    cfg = cfg or tiny_config()
    folder.mkdir(parents=True, exist_ok=True)
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(hf))
    save_file(tiny_hf_state_dict(cfg), str(folder / "model.safetensors"))
    return folder


@dataclass
class SafetensorsSpec:
    """A safetensors file as its parts: the JSON header (as a dict, or raw text) and data."""

    header: dict = field(default_factory=dict)
    data: bytes = b""
    header_text: str | None = None  # written instead of json.dumps(header) when set
    header_length: int | None = None  # written instead of the real length when set

    @classmethod
    def parse(cls, raw: bytes) -> SafetensorsSpec:
        (n,) = struct.unpack_from("<Q", raw)
        return cls(json.loads(raw[8 : 8 + n]), raw[8 + n :])

    def to_bytes(self) -> bytes:
        text = (json.dumps(self.header) if self.header_text is None else self.header_text).encode()
        n = len(text) if self.header_length is None else self.header_length
        return struct.pack("<Q", n) + text + self.data
