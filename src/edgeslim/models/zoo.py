"""Reference models for the benchmarks, built only from standard layers so that they export
cleanly to ONNX and every pruning/quantization technique can walk them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgeslim.errors import ModelError


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


# --------------------------------------------------------------------------------------- LeNets
def _lenet300(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    """LeNet-300-100: two hidden fully connected layers (Han et al. 2015)."""
    return nn.Sequential(
        nn.Flatten(),  # (B, C*H*W)
        nn.Linear(in_channels * input_size * input_size, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


def _lenet5(in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    """LeNet-5, Caffe variant used by Han et al. (no activation between the convs)."""
    side = ((input_size - 4) // 2 - 4) // 2  # conv5 -> pool2 -> conv5 -> pool2
    if (input_size - 4) // 2 < 5 or side < 1:
        raise ModelError(f"lenet5 needs input_size >= 16, got {input_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.MaxPool2d(2),  # (B, 50, side, side)
        nn.Flatten(),
        nn.Linear(50 * side * side, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


# ------------------------------------------------------------------------------------ VGG-small
class VGGSmall(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU (64/128/256 channels), 2x2 max-pools, global average
    pool and one linear layer: about 116 M MACs at 28x28 (154 M at 32x32).

    The widths are chosen for latency, not accuracy: at (32, 64, 128) (29 M MACs) a batch-1 fp32
    run takes only ~0.35 ms on one AVX-512 core, too little for int8 gains to stand out from
    per-op overhead; at these widths it is ~1.4 ms fp32 vs ~0.4 ms int8.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width in widths:
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width)
            layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)  # (B, widths[-1], H/8, W/8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


# ------------------------------------------------------------------------------------- ResNet-20
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus identity, or a 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # option B: projection shortcut
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages x 3 blocks, 16/32/64 channels."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 3):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, 16))
        stages: list[nn.Module] = []
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, width, stride))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages  # (B, 64, H/4, W/4) after layer3
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.flatten(self.pool(x)))


# ------------------------------------------------------------------------------- MobileNetV2-small
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """A 7-block MobileNetV2 for 28x28/32x32 inputs (stride-1 stem, three downsamplings)."""

    # (expansion t, output channels c, repeats n, first stride s), as in Sandler et al. Table 2
    CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))

    def __init__(self, in_channels: int, num_classes: int, last_channels: int = 256):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(),
        ]
        cin = 16
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, last_channels, 1, bias=False), nn.BatchNorm2d(last_channels), nn.ReLU6()]
        self.features = nn.Sequential(*layers)  # (B, last_channels, H/8, W/8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


# ------------------------------------------------------------------------------------- registry
_MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet300": _lenet300,
    "lenet5": _lenet5,
    "vgg_small": lambda c, k, s: VGGSmall(c, k),
    "resnet20": lambda c, k, s: ResNet20(c, k),
    "mobilenetv2_small": lambda c, k, s: MobileNetV2Small(c, k),
}


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return list(_MODELS)


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> nn.Module:
    """Build a freshly initialised reference model by name."""
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(_MODELS)}")
    for field, value in (("in_channels", in_channels), ("num_classes", num_classes), ("input_size", input_size)):
        if not isinstance(value, int) or value < 1:
            raise ModelError(f"{name}: {field} must be a positive integer, got {value!r}")
    # the three pooling stages of the CNNs need at least 8 pixels per side
    if name in ("vgg_small", "resnet20", "mobilenetv2_small") and input_size < 8:
        raise ModelError(f"{name} needs input_size >= 8, got {input_size}")
    return _MODELS[name](in_channels, num_classes, input_size)
