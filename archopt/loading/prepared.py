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

from archopt.errors import CheckpointError
from archopt.io import atomic_write, atomic_write_text, writable_cache_dir
from archopt.models.llama import Llama, LlamaConfig
from archopt.ops.act8 import Int4Q8Linear, Int8Q8Linear
from archopt.ops.quant import Int4Linear, Int8Linear, PackedInt4Linear, cpu_kernel_problem

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
    # The kernel takes its arguments unchecked: check them here, as save_prepared wrote them.
    q, sz = t["qweight"], t["scales_zeros"]
    k, gs = args["in_features"], args["group_size"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (k, gs)):
        raise ValueError(f"in_features and group_size must be positive integers, got {args}")
    problem = cpu_kernel_problem(q.shape[0] if q.dim() else 0, k, gs)
    planes = q.shape[1] * 2 // k if q.dim() == 2 else 0
    want = (planes * k // gs, q.shape[0] if q.dim() else 0, 2)
    if problem is None and not (q.dtype == torch.uint8 and planes in (1, 2)):
        problem = f"qweight must be uint8 (out, planes * {k} / 2), got {q.dtype} {list(q.shape)}"
    if problem is None and (sz.dtype != torch.bfloat16 or tuple(sz.shape) != want):
        problem = f"scales_zeros must be bf16 {list(want)}, got {sz.dtype} {list(sz.shape)}"
    if problem is not None:
        raise ValueError(f"a PackedInt4Linear: {problem}")
    return PackedInt4Linear(q, sz, in_features=k, group_size=gs)


def _rebuild_int4(t: dict[str, torch.Tensor], args: dict) -> nn.Module:
    return Int4Linear.from_packed(t["qweight"], t["scale"], t["minimum"])


def _rebuild_int8(t: dict[str, torch.Tensor], args: dict) -> nn.Module:
    return Int8Linear.from_quantized(t["qweight"], t["scale"])


def _rebuild_act8(cls, vectors: int, per_block: int):
    """The rebuild of an int8-activation layer (archopt.ops.act8), its layout checked: the
    kernels check sizes too, but a clear error here sends a broken entry to be rebuilt."""

    def rebuild(t: dict[str, torch.Tensor], args: dict) -> nn.Module:
        p, sc = t["packed"], t["scales"]
        if p.dtype != torch.uint8 or p.dim() != 4 or tuple(p.shape[2:]) != (vectors, 64):
            got = f"{p.dtype} {list(p.shape)}"
            raise ValueError(
                f"a {cls.__name__}: packed must be uint8 (T, G, {vectors}, 64), got {got}"
            )
        want = (*p.shape[:2], per_block, 16) if per_block > 1 else (*p.shape[:2], 16)
        if sc.dtype != torch.float16 or tuple(sc.shape) != want:
            got = f"{sc.dtype} {list(sc.shape)}"
            raise ValueError(f"a {cls.__name__}: scales must be fp16 {list(want)}, got {got}")
        return cls(p, sc)

    return rebuild


_LAYERS = {
    "PackedInt4Linear": (
        PackedInt4Linear,
        _rebuild_packed,
        lambda m: {"in_features": m.in_features, "group_size": m.group_size},
    ),
    "Int4Linear": (Int4Linear, _rebuild_int4, lambda m: {}),
    "Int8Linear": (Int8Linear, _rebuild_int8, lambda m: {}),
    "Int4Q8Linear": (Int4Q8Linear, _rebuild_act8(Int4Q8Linear, 4, 2), lambda m: {}),
    "Int8Q8Linear": (Int8Q8Linear, _rebuild_act8(Int8Q8Linear, 8, 1), lambda m: {}),
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
    """The model saved in ``folder``; ``CheckpointError`` (a ValueError) when the entry is
    unreadable, incomplete or inconsistent: the caller discards it and rebuilds."""
    from archopt.loading.safetensors_file import read_safetensors

    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            got = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise CheckpointError(
                f"prepared model in {folder}: format {got!r}, expected {FORMAT!r}"
            )
        tensors = read_safetensors(folder / WEIGHTS_FILE)  # memory-mapped
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"prepared model in {folder} is unreadable: {e}") from e
    try:
        return _rebuild(folder, record, tensors)
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError, ValueError,
            OverflowError) as e:  # fmt: skip
        if isinstance(e, CheckpointError):
            raise
        # The record and tensors are archopt's own: any disagreement means a damaged entry.
        why = " ".join(str(e).split())  # torch's messages span lines; ours is one
        raise CheckpointError(
            f"prepared model in {folder} does not match its record ({type(e).__name__}: {why})"
        ) from e


def _rebuild(folder: Path, record: dict, tensors: dict[str, torch.Tensor]) -> Llama:
    cfg = LlamaConfig(**record["config"])
    with torch.device("meta"):
        model = Llama(cfg)
    for name, (kind, args) in record["quantized"].items():
        if kind not in _LAYERS:
            raise CheckpointError(f"prepared model in {folder}: unknown layer kind {kind!r}")
        prefix = name + "."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        built, planned = _LAYERS[kind][1](own, args), getattr(parent, attr)
        # A tied output projection is None in the skeleton: the embedding's shape.
        want = (cfg.vocab_size, cfg.hidden_size) if planned is None else planned.weight.shape
        got = (built.out_features, built.in_features)
        if got != tuple(want):
            raise CheckpointError(
                f"prepared model in {folder}: {name}",
                f"{want[0]} x {want[1]} (from its config)",
                f"{got[0]} x {got[1]}",
            )
        setattr(parent, attr, built)
    for name, target in record["aliases"].items():
        tensors[name] = tensors[target]
    expected, got = set(model.state_dict()), set(tensors)
    if got != expected:
        raise CheckpointError(
            f"prepared model in {folder} does not match its record: missing "
            f"{sorted(expected - got)[:3]}, unexpected {sorted(got - expected)[:3]}"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rope = type(model.rope)(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if record["tokenizer"] is not None:
        from tokenizers import Tokenizer as Core

        from archopt.loading.tokenizer import Tokenizer

        tok = record["tokenizer"]
        try:
            core = Core.from_str(tok["core"])
        except Exception as e:  # tokenizers raises a bare Exception for a malformed table
            raise CheckpointError(f"prepared model in {folder}: its tokenizer: {e}") from e
        top = max(core.get_vocab(with_added_tokens=True).values(), default=-1)
        if top >= cfg.vocab_size:  # an id past the embedding would fail mid-generation
            raise CheckpointError(
                f"prepared model in {folder}: its tokenizer's ids",
                f"below {cfg.vocab_size} (the embedding's rows)",
                top,
            )
        model.tokenizer = Tokenizer(core, **tok["special"])
    return model.eval()


def prepared_folder(key: str) -> Path | None:
    """Where the entry ``key`` lives; None when the cache folder cannot be written."""
    root = writable_cache_dir(SUBDIR)
    return None if root is None else root / key


def discard(folder: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)
