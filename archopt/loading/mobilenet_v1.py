"""MobileNet v1 checkpoints from timm (``mobilenetv1_100``) and Hugging Face (``MobileNetV1*``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from archopt.loading.keymap import rename_keys
from archopt.models.mobilenet_v1 import BLOCKS, MobileNetV1Config

# timm groups the 13 blocks into stages of (1, 2, 2, 6, 2): blocks.{stage}.{index}.
_TIMM_STAGES = (1, 2, 2, 6, 2)
_TIMM_FLAT = {
    f"{s}.{j}": str(sum(_TIMM_STAGES[:s]) + j) for s, n in enumerate(_TIMM_STAGES) for j in range(n)
}
assert len(_TIMM_FLAT) == len(BLOCKS)

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def mobilenet_v1_from_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``mobilenetv1_*`` keys -> archopt ``MobileNetV1`` keys (load with ``strict=True``)."""

    def block(m, slot: str) -> str:
        return f"blocks.{_TIMM_FLAT[m[1]]}.{slot}.{m[2]}"

    rules = [
        (r"conv_stem\.weight", "stem.conv.weight"),
        (rf"bn1\.{_BN}", r"stem.bn.\1"),
        (r"blocks\.(\d+\.\d+)\.conv_dw\.(weight)", lambda m: block(m, "dw.conv")),
        (rf"blocks\.(\d+\.\d+)\.bn1\.{_BN}", lambda m: block(m, "dw.bn")),
        (r"blocks\.(\d+\.\d+)\.conv_pw\.(weight)", lambda m: block(m, "pw.conv")),
        (rf"blocks\.(\d+\.\d+)\.bn2\.{_BN}", lambda m: block(m, "pw.bn")),
        (r"classifier\.(weight|bias)", r"classifier.\1"),
    ]
    return rename_keys(state_dict, rules, source="timm MobileNet v1")


def mobilenet_v1_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``MobileNetV1Model`` / ``MobileNetV1ForImageClassification`` keys -> archopt keys.

    HF numbers the 26 body convs flat (``layer.0`` dw, ``layer.1`` pw, ...); block i is layers
    2i and 2i+1.
    """

    def layer(m) -> str:
        i = int(m[1])
        slot = "dw" if i % 2 == 0 else "pw"
        part = "conv" if m[2] == "convolution" else "bn"
        return f"blocks.{i // 2}.{slot}.{part}.{m[3]}"

    prefix = r"(?:mobilenet_v1\.)?"
    rules = [
        (rf"{prefix}conv_stem\.convolution\.(weight)", r"stem.conv.\1"),
        (rf"{prefix}conv_stem\.normalization\.{_BN}", r"stem.bn.\1"),
        (rf"{prefix}layer\.(\d+)\.(convolution|normalization)\.(\w+)", layer),
        (r"classifier\.(weight|bias)", r"classifier.\1"),
    ]
    return rename_keys(state_dict, rules, source="Hugging Face MobileNet v1")


def mobilenet_v1_config_from_hf(hf_config: Any, *, with_classifier: bool) -> MobileNetV1Config:
    """Our config for an HF ``MobileNetV1Config``: BN eps 1e-3 and TF "SAME" padding by default.

    ``with_classifier``: True for ``MobileNetV1ForImageClassification`` (``num_labels``
    classes), False for ``MobileNetV1Model`` (pooled features).

    HF rounds channels as ``max(int(c * depth_multiplier), min_depth)``; for the released
    multipliers (1.0, 0.75, 0.5, 0.25) that equals our divisor-8 rounding, checked here.
    """
    config = MobileNetV1Config(
        width_mult=hf_config.depth_multiplier,
        num_classes=hf_config.num_labels if with_classifier else 0,
        in_chans=hf_config.num_channels,
        act=hf_config.hidden_act,
        bn_eps=hf_config.layer_norm_eps,
        tf_padding=hf_config.tf_padding,
    )
    for base in (32, *(c for c, _ in BLOCKS)):
        hf_ch = max(int(base * hf_config.depth_multiplier), hf_config.min_depth)
        if hf_ch != config.channels(base):
            raise ValueError(
                f"depth_multiplier {hf_config.depth_multiplier} gives {hf_ch} channels in HF but "
                f"{config.channels(base)} in archopt for a {base}-channel layer"
            )
    return config
