import logging

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Trained checkpoints go to a per-session temp cache, never the user's."""
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    for name in ("torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def small_cnn(with_bn: bool = True) -> nn.Module:
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear on 1x8x8 inputs."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, padding=1)]
    if with_bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10)]
    model = nn.Sequential(*layers)
    if with_bn:  # non-trivial BN statistics so that folding matters
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture
def cnn() -> nn.Module:
    return small_cnn()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
