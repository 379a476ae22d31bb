"""Model families; importing this package registers every model."""

from archopt.models import mobilenet_v1
from archopt.models.mobilenet_v1 import MobileNetV1, MobileNetV1Config

__all__ = ["MobileNetV1", "MobileNetV1Config", "mobilenet_v1"]
