"""Model families; importing this package registers every model."""

from archopt.models import longformer, mobilenet_v1
from archopt.models.longformer import LongformerConfig, LongformerModel, LongformerSelfAttention
from archopt.models.mobilenet_v1 import MobileNetV1, MobileNetV1Config

__all__ = [
    "LongformerConfig",
    "LongformerModel",
    "LongformerSelfAttention",
    "MobileNetV1",
    "MobileNetV1Config",
    "longformer",
    "mobilenet_v1",
]
