"""Reference models (LeNets, a small VGG, ResNet-20, a small MobileNetV2)."""

from edgeslim.models.zoo import build_model, list_models

__all__ = ["build_model", "list_models"]
