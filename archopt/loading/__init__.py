"""Checkpoint formats and key maps from reference implementations (timm, Hugging Face)."""

from archopt.loading.keymap import rename_keys
from archopt.loading.longformer import longformer_config_from_hf, longformer_from_hf
from archopt.loading.mobilenet_v1 import (
    mobilenet_v1_config_from_hf,
    mobilenet_v1_from_hf,
    mobilenet_v1_from_timm,
)
from archopt.loading.mobilevit import (
    mobilevit_config_from_hf,
    mobilevit_from_hf,
    mobilevit_from_timm,
)
from archopt.loading.vit import vit_from_timm

__all__ = [
    "longformer_config_from_hf",
    "longformer_from_hf",
    "mobilenet_v1_config_from_hf",
    "mobilenet_v1_from_hf",
    "mobilenet_v1_from_timm",
    "mobilevit_config_from_hf",
    "mobilevit_from_hf",
    "mobilevit_from_timm",
    "rename_keys",
    "vit_from_timm",
]
