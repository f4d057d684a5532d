"""Model zoo: every model builds for grey 28x28 and RGB 32x32 input; vgg_small cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.errors import ModelError
from edgeslim.models import build_model, list_models


def count_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one image, via forward hooks."""
    total = 0

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out[0].numel() * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


def test_list_models() -> None:
    assert list_models() == ["lenet300", "lenet5", "vgg_small", "resnet20", "mobilenetv2_small"]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_builds_and_runs(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=10, input_size=size)
    out = model.eval()(torch.randn(3, channels, size, size))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_vgg_small_macs() -> None:
    # widened from ~29 M so that batch-1 fp32 takes 1-2 ms on one AVX-512 core (see VGGSmall)
    macs = count_macs(build_model("vgg_small"), (1, 28, 28))
    assert 100e6 <= macs <= 130e6, macs


def test_resnet20_structure() -> None:
    model = build_model("resnet20", in_channels=3, input_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(convs) + 1 == 20 and len(shortcuts) == 2  # 19 convs + fc; option-B projections


def test_unknown_and_bad_args() -> None:
    with pytest.raises(ModelError, match="alexnet.*known: lenet300"):
        build_model("alexnet")
    with pytest.raises(ModelError, match="lenet5.*input_size"):
        build_model("lenet5", input_size=8)
