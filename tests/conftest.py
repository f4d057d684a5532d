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


def tiny_bert(seed: int = 0, init: float = 0.2):
    """A random 2-layer BERT (4 heads of size 8, hidden 32, FFN 64) in the SentenceEncoder wrapper,
    built from a BertConfig so nothing is downloaded; ``init`` large enough that heads matter."""
    from transformers import BertConfig, BertModel

    from edgeslim.models.minilm import SentenceEncoder

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=init,
                     attn_implementation="eager")
    return SentenceEncoder(BertModel(cfg, add_pooling_layer=False)).eval()


def tokens(n: int = 24, seq: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with per-row padding (mask 0 after a random length in [4, seq])."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(n, seq)).astype(np.int64)
    lengths = rng.integers(4, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


def encoder_task(model, n: int = 24):
    """A cosine-fidelity task for a sentence encoder: targets are the model's own embeddings."""
    from edgeslim.task import Task

    ids, mask = tokens(n)
    with torch.no_grad():
        targets = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return Task(model, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])), calibration=((ids, mask), None),
                evaluation=((ids, mask), targets), metric_name="cosine", dynamic_dims=({1: "seq"}, {1: "seq"}))
