"""Prepared language models: a loaded model kept in archopt's cache folder, ready to map.

Loading SmolLM2 from its GGUF file parses the header, builds the tokenizer, reads and
re-encodes 121 quantized layers for torch's CPU int4 kernel: seconds of work that give the
same tensors every time. ``load_llm`` keeps the result once, as one safetensors file (read by
memory map, so a second process starts in milliseconds) with a JSON record of the config,
the tokenizer and which layers are quantized how.

An entry is keyed by what its tensors depend on: the checkpoint file (resolved path, size,
modification time), the weight format and kernel choice, torch's version and the CPU's vector
capability (the int4 kernel's byte layout follows the vector width), and ``FORMAT``. A stale
entry is never found (its key differs); a corrupt one (truncated, edited, from an older
format) fails its checks, is deleted and rebuilt. Nothing here is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from archopt.io import atomic_write, atomic_write_text, writable_cache_dir
from archopt.models.llama import Llama, LlamaConfig
from archopt.ops.quant import Int4Linear, Int8Linear, PackedInt4Linear

FORMAT = "archopt.prepared/1"
SUBDIR = "llm"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "model.json"


def entry_key(source: Path, weights: str, kernel: bool | str) -> str:
    """The name of the entry for ``source`` in ``weights`` (see the module docstring)."""
    files = [source] if source.is_file() else sorted(f for f in source.iterdir() if f.is_file())
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    parts = [
        FORMAT,
        str(source.resolve()),
        json.dumps(stamps),
        weights,
        str(kernel),
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
    ]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    return f"{source.stem[:40]}-{weights}-{digest}"


# The modules a prepared model may hold besides torch's own: how to rebuild each from its
# tensors. One place, so a new quantized layer is one row here.
def _rebuild_packed(t: dict[str, torch.Tensor], args: dict) -> nn.Module:
    return PackedInt4Linear(t["qweight"], t["scales_zeros"], **args)


def _rebuild_int4(t: dict[str, torch.Tensor], args: dict) -> nn.Module:
    return Int4Linear.from_packed(t["qweight"], t["scale"], t["minimum"])


def _rebuild_int8(t: dict[str, torch.Tensor], args: dict) -> nn.Module:
    return Int8Linear.from_quantized(t["qweight"], t["scale"])


_LAYERS = {
    "PackedInt4Linear": (
        PackedInt4Linear,
        _rebuild_packed,
        lambda m: {"in_features": m.in_features, "group_size": m.group_size},
    ),
    "Int4Linear": (Int4Linear, _rebuild_int4, lambda m: {}),
    "Int8Linear": (Int8Linear, _rebuild_int8, lambda m: {}),
}


def _quantized_layers(model: nn.Module) -> dict[str, list]:
    out = {}
    for name, module in model.named_modules():
        for kind, (cls, _, args) in _LAYERS.items():
            if type(module) is cls:
                out[name] = [kind, args(module)]
    return out


def _tokenizer_record(tok) -> dict | None:
    """The archopt Tokenizer as JSON; None for others (they are loaded from the source)."""
    from archopt.loading.tokenizer import Tokenizer

    if not isinstance(tok, Tokenizer):
        return None
    return {
        "core": tok.core.to_str(),
        "special": {
            k: getattr(tok, k)
            for k in (
                "bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token",
                "add_eos_token", "chat_template",
            )
        },
    }  # fmt: skip


def save_prepared(model: Llama, folder: Path) -> None:
    """Write ``model`` (on the CPU) into ``folder``: tensors first, then the record that makes
    the entry valid, both atomically, so an interrupted write leaves no entry."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        if t.device.type != "cpu":
            raise ValueError(f"save_prepared: expected CPU tensors, got {name} on {t.device}")
        # safetensors refuses two names on one storage (a tied head): keep one, note the alias.
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.contiguous() if ptr not in seen else None
        seen.setdefault(ptr, name)
    aliases = {n: seen[t.untyped_storage().data_ptr()] for n, t in model.state_dict().items()}
    aliases = {n: a for n, a in aliases.items() if tensors[n] is None}
    tensors = {n: t for n, t in tensors.items() if t is not None}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    extra = model.config.extra
    record = {
        "format": FORMAT,
        "summary": f"{extra.get('source', '?')} ({extra.get('weights', '?')} weights)",
        "config": dataclasses.asdict(model.config),
        "quantized": _quantized_layers(model),
        "aliases": aliases,
        "tokenizer": _tokenizer_record(model.tokenizer),
    }
    atomic_write_text(folder / RECORD_FILE, json.dumps(record))


def load_prepared(folder: Path) -> Llama:
    """The model saved in ``folder``; ValueError when the entry is incomplete or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(str(folder / WEIGHTS_FILE))  # memory-mapped
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise ValueError(f"prepared model in {folder} is unreadable: {e}") from e
    cfg = LlamaConfig(**record["config"])
    with torch.device("meta"):
        model = Llama(cfg)
    for name, (kind, args) in record["quantized"].items():
        if kind not in _LAYERS:
            raise ValueError(f"prepared model in {folder}: unknown layer kind {kind!r}")
        prefix = name + "."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, _LAYERS[kind][1](own, args))
    for name, target in record["aliases"].items():
        tensors[name] = tensors[target]
    expected, got = set(model.state_dict()), set(tensors)
    if got != expected:
        raise ValueError(
            f"prepared model in {folder} does not match its record: missing "
            f"{sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]}"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rope = type(model.rope)(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if record["tokenizer"] is not None:
        from tokenizers import Tokenizer as Core

        from archopt.loading.tokenizer import Tokenizer

        tok = record["tokenizer"]
        model.tokenizer = Tokenizer(Core.from_str(tok["core"]), **tok["special"])
    return model.eval()


def prepared_folder(key: str) -> Path | None:
    """Where the entry ``key`` lives; None when the cache folder cannot be written."""
    root = writable_cache_dir(SUBDIR)
    return None if root is None else root / key


def discard(folder: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)
