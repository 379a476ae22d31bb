"""Keeping a GGUF's blocks: Q4_0 / Q4_1 as ``Int4Linear``, Q8_0 as ``Int8Linear`` (blocks of 32),
bit for bit, instead of dequantizing them."""

from __future__ import annotations

from collections import Counter

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from archopt.errors import CheckpointError
from archopt.loading.gguf.dequant import QType, fp16_scales
from archopt.loading.gguf.llama import unpermute_qk
from archopt.loading.gguf.reader import GGUFFile
from archopt.models.llama import Llama


def _finite_scales(scales: torch.Tensor, where: str) -> torch.Tensor:
    """Block scales (fp16 in the file) that are numbers: a NaN or infinity reaches every output.
    (The weights kept as blocks are never dequantized, so this is their check.)"""
    if not bool(torch.isfinite(scales).all()):
        bad = int((~torch.isfinite(scales)).sum())
        raise CheckpointError(
            f"{where}: {bad} block scales are NaN or infinite; expected finite scales: the file "
            "is corrupt"
        )
    return scales


def _quantized_linear(
    data: torch.Tensor, qtype: GGMLQuantizationType, in_features: int, where: str = "tensor"
):
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
    d = _finite_scales(fp16_scales(blocks, 0).view(rows, groups), where)
    if qtype == QType.Q8_0:
        q = blocks[:, 2:].contiguous().view(torch.int8).view(rows, in_features)
        return Int8Linear.from_quantized(q, d)
    if qtype == QType.Q4_0:
        return Int4Linear.from_packed(blocks[:, 2:].reshape(rows, in_features // 2), d, -8 * d)
    m = _finite_scales(fp16_scales(blocks, 2).view(rows, groups), where)
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


def _kind(qtype) -> str | None:
    """The module a GGUF type's blocks are kept in (None: dequantized), as _quantized_linear."""
    return {QType.Q8_0: "int8", QType.Q4_0: "int4", QType.Q4_1: "int4"}.get(qtype)


def _linear_groups(gf: GGUFFile, num_layers: int) -> list[list[str]]:
    """The GGUF tensors of each linear layer of ours (fused q/k/v and gate/up as one)."""
    groups = []
    for i in range(num_layers):
        b = f"blk.{i}."
        groups += [
            [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
            [b + "attn_output.weight"],
            [b + "ffn_gate.weight", b + "ffn_up.weight"],
            [b + "ffn_down.weight"],
        ]
    if "output.weight" in gf.tensors:
        groups.append(["output.weight"])
    return groups


def kept_tensor_names(gf: GGUFFile, num_layers: int) -> set[str]:
    """The tensors ``keep_quantized_linears`` will hold as blocks, so need no dequantized copy:
    every part of a layer of one kept kind. (The token embedding is never among them: its
    lookup reads the dequantized table, even when a tied output projection keeps its blocks.)"""
    names = set()
    for group in _linear_groups(gf, num_layers):
        kinds = {_kind(gf.tensors[n].type) if n in gf.tensors else None for n in group}
        if len(kinds) == 1 and None not in kinds:
            names.update(group)
    return names


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
        where = f"{gf.path}: tensor {name!r}"
        return _quantized_linear(data, t.type, t.shape[1], where), t.type.name

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
