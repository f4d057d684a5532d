"""Training accuracy and determinism; checkpoint round trips and refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from edgeslim.data import load_digits
from edgeslim.errors import CheckpointError, DataError
from edgeslim.models import build_model
from edgeslim.train import evaluate_accuracy, load_checkpoint, random_shift, save_checkpoint, train


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def _lenet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet300", input_size=8)


def test_train_lenet300_on_digits(digits) -> None:
    model = train(_lenet(), digits.x_train, digits.y_train, epochs=5, lr=3e-3, progress=False)
    assert not model.training
    assert evaluate_accuracy(model, digits.x_test, digits.y_test) > 0.90


def test_train_accepts_dataloader_and_shift(digits) -> None:
    ds = TensorDataset(torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train))
    loader = DataLoader(ds, batch_size=64, shuffle=True)
    model = train(_lenet(), loader, epochs=2, lr=3e-3, progress=False, augment_shift=1)
    test = TensorDataset(torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test))
    assert evaluate_accuracy(model, DataLoader(test, batch_size=100)) > 0.6


def test_random_shift_is_a_translation() -> None:
    x = torch.zeros(16, 2, 6, 6)
    x[:, :, 2:4, 2:4] = torch.arange(1, 5.0).reshape(2, 2)  # content away from the border
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    shifts = {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    seen = set()
    for i in range(16):
        match = [s for s in shifts if torch.equal(out[i], torch.roll(x[i], s, dims=(1, 2)))]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 3  # per-image shifts, not one shift for the whole batch


def test_shift_needs_image_batches() -> None:
    x, y = np.zeros((8, 64), np.float32), np.zeros(8, np.int64)
    with pytest.raises(DataError, match=r"^augment_shift: .*\(8, 64\)"):
        train(torch.nn.Linear(64, 10), x, y, epochs=1, augment_shift=1, batch_size=8, progress=False)


def test_training_is_deterministic(digits) -> None:
    base = _lenet()
    kw = dict(epochs=1, seed=3, progress=False, augment_shift=1)
    a = train(copy.deepcopy(base), digits.x_train, digits.y_train, **kw).state_dict()
    b = train(copy.deepcopy(base), digits.x_train, digits.y_train, **kw).state_dict()
    c = train(copy.deepcopy(base), digits.x_train, digits.y_train, **{**kw, "seed": 4}).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    src = build_model("resnet20")  # has BatchNorm buffers, incl. int64 num_batches_tracked
    src.stem[1].running_mean.fill_(0.5)  # a non-default buffer must survive too
    path = tmp_path / f"model{suffix}"
    save_checkpoint(src, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    dst = load_checkpoint(_resnet_other_init(), path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def _resnet_other_init() -> torch.nn.Module:
    torch.manual_seed(123)
    return build_model("resnet20")


def test_load_plain_torch_state_dict_wrapped(tmp_path: Path) -> None:
    src = _lenet(1)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, path)
    dst = load_checkpoint(_lenet(2), path)
    assert torch.equal(dst[1].weight, src[1].weight)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_checkpoint(_lenet(), tmp_path / "nope.safetensors")


def test_pickled_whole_model_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(_lenet(), path)
    with pytest.raises(CheckpointError, match=r"whole\.pt is not a plain state dict"):
        load_checkpoint(_lenet(), path)


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    path = tmp_path / "lenet28.safetensors"
    save_checkpoint(build_model("lenet300", input_size=28), path)
    with pytest.raises(CheckpointError, match=r"lenet28.*'1\.weight'.*\(300, 784\).*\(300, 64\)"):
        load_checkpoint(_lenet(), path)


def test_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    state = _lenet().state_dict()
    del state["5.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"partial\.pt.*missing key '5\.bias'.*\(10,\)"):
        load_checkpoint(_lenet(), path)


def test_evaluate_restores_mode(digits) -> None:
    model = _lenet().train()
    acc = evaluate_accuracy(model, digits.x_test, np.asarray(digits.y_test))
    assert model.training and 0.0 <= acc <= 1.0
