"""Model families, one file each, readable like its paper (``llama``, ``longformer``,
``mobilenet_v1``, ``mobilevit``, ``vit``; ``image``: what the image classifiers share).
Importing this package registers every model in ``_registry`` (the table; lookups are
``archopt.registry``). Models are built from ``archopt.ops``; they never import loading or
anything above it.
"""

from archopt.models import (
    llama,
    longformer,
    mobilenet_v1,
    mobilevit,
    pixel_longformer,
    stagenet,
    vit,
)
from archopt.models.llama import Llama, LlamaConfig
from archopt.models.longformer import LongformerConfig, LongformerModel, LongformerSelfAttention
from archopt.models.mobilenet_v1 import MobileNetV1, MobileNetV1Config
from archopt.models.mobilevit import MobileViT, MobileViTBlock, MobileViTConfig
from archopt.models.pixel_longformer import PixelLongformer, PixelLongformerConfig
from archopt.models.stagenet import Stage, StageNet, StageNetConfig
from archopt.models.vit import VisionTransformer, ViTConfig

__all__ = [
    "Llama",
    "LlamaConfig",
    "LongformerConfig",
    "LongformerModel",
    "LongformerSelfAttention",
    "MobileNetV1",
    "MobileNetV1Config",
    "MobileViT",
    "MobileViTBlock",
    "MobileViTConfig",
    "PixelLongformer",
    "PixelLongformerConfig",
    "Stage",
    "StageNet",
    "StageNetConfig",
    "ViTConfig",
    "VisionTransformer",
    "llama",
    "longformer",
    "mobilenet_v1",
    "mobilevit",
    "pixel_longformer",
    "stagenet",
    "vit",
]
