"""MobileViT checkpoints from timm (``mobilevit_*``) and Hugging Face (``MobileViT*``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from archopt.loading.keymap import rename_keys
from archopt.models.mobilevit import MobileViTConfig
from archopt.ops.conv import make_divisible

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_WB = r"(weight|bias)"
# Inverted residual slots: ours <- timm BottleneckBlock, HF MobileViTInvertedResidual.
_TIMM_IR = {"conv1_1x1": "expand", "conv2_kxk": "dw", "conv3_1x1": "project"}
_HF_IR = {"expand_1x1": "expand", "conv_3x3": "dw", "reduce_1x1": "project"}
_HF_CONV = {"convolution": "conv", "normalization": "bn"}
# HF transformer layer slots -> ours (timm's names).
_HF_TRANSFORMER = {
    "attention.attention.qkv": "attn.qkv",  # fused by _fuse_hf_qkv below
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
# HF MobileViTLayer slots -> ours.
_HF_BLOCK = {"conv_kxk": "conv_kxk", "conv_projection": "conv_proj", "fusion": "conv_fusion"}


def mobilevit_from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``mobilevit_xxs / xs / s`` keys -> archopt ``MobileViT`` keys (``strict=True``).

    Stages are laid out as in timm (``stages.{i}.{j}``), so only the inverted residual's slots
    and the head are renamed; the MobileViT block and transformer layers keep timm's names.
    """
    ir = "|".join(_TIMM_IR)
    rules = [
        (rf"(stem|final_conv)\.(conv\.weight|bn\.{_BN})", r"\1.\2"),
        (
            rf"stages\.(\d+\.\d+)\.({ir})\.(conv\.weight|bn\.{_BN})",
            lambda m: f"stages.{m[1]}.{_TIMM_IR[m[2]]}.{m[3]}",
        ),
        (
            rf"(stages\.\d+\.1)\.(conv_kxk|conv_proj|conv_fusion)\.(conv\.weight|bn\.{_BN})",
            r"\1.\2.\3",
        ),
        (r"(stages\.\d+\.1\.conv_1x1\.weight)", r"\1"),
        (
            rf"(stages\.\d+\.1\.transformer\.\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1"
            rf"|mlp\.fc2)\.{_WB}",
            r"\1.\2.\3",
        ),
        (rf"(stages\.\d+\.1\.norm)\.{_WB}", r"\1.\2"),
        (rf"head\.fc\.{_WB}", r"classifier.\1"),
    ]
    return rename_keys(state_dict, rules, source="timm MobileViT")


def _fuse_hf_qkv(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate HF's separate query/key/value projections into one ``qkv`` (rows q, k, v)."""
    pattern = re.compile(r"(.*\.attention\.attention)\.(query|key|value)\.(weight|bias)")
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = pattern.fullmatch(key)
        if m is None:
            out[key] = value
        else:
            parts.setdefault(f"{m[1]}.qkv.{m[3]}", {})[m[2]] = value
    for key, qkv in parts.items():
        missing = sorted({"query", "key", "value"} - set(qkv))
        if missing:
            raise KeyError(f"{key}: the Hugging Face MobileViT state dict lacks {missing}")
        out[key] = torch.cat([qkv["query"], qkv["key"], qkv["value"]], dim=0)
    return out


def mobilevit_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``MobileViTModel`` / ``MobileViTForImageClassification`` keys -> archopt keys.

    HF's ``encoder.layer.{0,1}`` hold the inverted residuals of stages 1-2; ``encoder.layer.i``
    for i >= 2 holds the strided inverted residual (``downsampling_layer``, our
    ``stages.i.0``) and the MobileViT block (our ``stages.i.1``). HF's separate query, key and
    value projections are concatenated into our fused ``qkv``.
    """
    pre = r"(?:mobilevit\.)?"
    enc = rf"{pre}encoder\.layer\.(\d+)"
    conv = r"(?P<kind>convolution|normalization)\.(?P<param>" + _BN[1:-1] + ")"
    ir = "|".join(_HF_IR)

    def conv_slot(m: re.Match, base: str) -> str:
        return f"{base}.{_HF_CONV[m['kind']]}.{m['param']}"

    rules = [
        (rf"{pre}conv_stem\.{conv}", lambda m: conv_slot(m, "stem")),
        (rf"{pre}conv_1x1_exp\.{conv}", lambda m: conv_slot(m, "final_conv")),
        (
            rf"{enc}\.layer\.(\d+)\.(?P<slot>{ir})\.{conv}",
            lambda m: conv_slot(m, f"stages.{m[1]}.{m[2]}.{_HF_IR[m['slot']]}"),
        ),
        (
            rf"{enc}\.downsampling_layer\.(?P<slot>{ir})\.{conv}",
            lambda m: conv_slot(m, f"stages.{m[1]}.0.{_HF_IR[m['slot']]}"),
        ),
        (
            rf"{enc}\.(?P<slot>{'|'.join(_HF_BLOCK)})\.{conv}",
            lambda m: conv_slot(m, f"stages.{m[1]}.1.{_HF_BLOCK[m['slot']]}"),
        ),
        (rf"{enc}\.conv_1x1\.convolution\.weight", r"stages.\1.1.conv_1x1.weight"),
        (
            rf"{enc}\.transformer\.layer\.(\d+)\.(?P<slot>{'|'.join(_HF_TRANSFORMER)})\.{_WB}",
            lambda m: f"stages.{m[1]}.1.transformer.{m[2]}.{_HF_TRANSFORMER[m['slot']]}.{m[4]}",
        ),
        (rf"{enc}\.layernorm\.{_WB}", r"stages.\1.1.norm.\2"),
        (rf"classifier\.{_WB}", r"classifier.\1"),
    ]
    return rename_keys(_fuse_hf_qkv(state_dict), rules, source="Hugging Face MobileViT")


def mobilevit_config_from_hf(hf_config: Any, *, with_classifier: bool) -> MobileViTConfig:
    """Our config for an HF ``MobileViTConfig``.

    ``with_classifier``: True for ``MobileViTForImageClassification`` (``num_labels``
    classes), False for ``MobileViTModel`` (pooled features, ``pooler_output``). HF fixes the
    stage depths (1, 3 inverted residuals; 2, 4, 3 transformer layers), as the paper does.
    """
    patch = hf_config.patch_size
    if isinstance(patch, (tuple, list)):
        if len(set(patch)) != 1:
            raise ValueError(f"only square patches are supported, got patch_size={patch}")
        patch = patch[0]
    if not hf_config.qkv_bias:
        raise ValueError("archopt's MobileViT has a qkv bias; got an HF config with qkv_bias=False")
    if hf_config.output_stride != 32:
        raise ValueError(
            f"only output_stride=32 (classification) is supported, got {hf_config.output_stride}"
        )
    act = {"swish": "silu"}.get(hf_config.hidden_act, hf_config.hidden_act)
    neck = tuple(hf_config.neck_hidden_sizes)
    if len(neck) != 7:
        raise ValueError(f"expected 7 neck_hidden_sizes, got {len(neck)}: {neck}")
    config = MobileViTConfig(
        channels=neck[1:6],
        dims=tuple(hf_config.hidden_sizes),
        stem_channels=neck[0],
        num_features=neck[6],
        expand_ratio=hf_config.expand_ratio,
        num_heads=hf_config.num_attention_heads,
        mlp_ratio=hf_config.mlp_ratio,
        patch_size=patch,
        kernel_size=hf_config.conv_kernel_size,
        act=act,
        num_classes=hf_config.num_labels if with_classifier else 0,
        in_chans=hf_config.num_channels,
        norm_eps=hf_config.layer_norm_eps,
    )
    # HF rounds an inverted residual's hidden width as make_divisible(round(c * t)); we
    # round c * t directly (timm). Check they agree for every block input width.
    for c in neck[:5]:
        ours = make_divisible(c * config.expand_ratio)
        theirs = make_divisible(round(c * config.expand_ratio))
        if ours != theirs:
            raise ValueError(
                f"expand_ratio {config.expand_ratio} gives {theirs} hidden channels in HF but "
                f"{ours} in archopt for a {c}-channel input"
            )
    return config
