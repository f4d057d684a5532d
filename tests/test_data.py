"""Data loaders: IDX parsing, MNIST/CIFAR-10 directory layouts, safe pickles, bundled splits."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from edgeslim.data import (
    DATASETS,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist_idx,
    load_mnist_sample,
    read_idx,
)
from edgeslim.errors import DataError


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, compress: bool = False) -> Path:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_uint8(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(5,), dtype=np.uint8)
    # no .gz extension on purpose: gzip is detected by magic bytes
    img = read_idx(write_idx(tmp_path / "img", images, compress=compress))
    lbl = read_idx(write_idx(tmp_path / "lbl", labels, compress=compress))
    assert img.dtype == np.uint8 and img.shape == (5, 4, 3)
    np.testing.assert_array_equal(img, images)
    np.testing.assert_array_equal(lbl, labels)


def test_idx_big_endian_float_and_int(tmp_path: Path) -> None:
    f = (np.arange(6).reshape(2, 3) / 7).astype(">f4")
    i = np.array([-3, 70000, 5], dtype=">i4")
    out_f = read_idx(write_idx(tmp_path / "f", f, code=0x0D))
    out_i = read_idx(write_idx(tmp_path / "i", i, code=0x0C))
    np.testing.assert_array_equal(out_f, f.astype(np.float32))
    np.testing.assert_array_equal(out_i, [-3, 70000, 5])
    assert out_f.dtype.isnative and out_i.dtype.isnative


def test_idx_truncated_names_file_and_byte_counts(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "short.idx", np.zeros((4, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"short\.idx.*17 bytes, expected 20"):
        read_idx(path)


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="bad.idx"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")  # unknown dtype code
    with pytest.raises(DataError, match="dtype code 0x07"):
        read_idx(path)


def _fake_mnist_dir(d: Path, n_train: int = 20, n_test: int = 10, gz_train: bool = True) -> Path:
    rng = np.random.default_rng(1)
    for prefix, n, gz in (("train", n_train, gz_train), ("t10k", n_test, False)):
        suffix = ".gz" if gz else ""
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress=gz)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), compress=gz)
    return d


def test_load_mnist_idx_counts_and_shapes(tmp_path: Path) -> None:
    split = load_mnist_idx(_fake_mnist_dir(tmp_path), name="fashion_mnist")
    assert split.x_train.shape == (20, 1, 28, 28) and split.x_test.shape == (10, 1, 28, 28)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert split.y_test.tolist() == list(range(10))
    assert split.name == "fashion_mnist" and split.num_classes == 10 and split.input_shape == (1, 28, 28)
    same = load_dataset("mnist", tmp_path)
    np.testing.assert_array_equal(same.x_train, split.x_train)


def test_load_mnist_idx_missing_and_mismatch(tmp_path: Path) -> None:
    d = _fake_mnist_dir(tmp_path)
    os.remove(d / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_mnist_idx(d)
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images but .* 9 labels"):
        load_mnist_idx(d)


def _cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), (np.arange(n) * 3 % 10).astype(np.uint8)


def _write_cifar_bin(path: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    path.write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())


def test_cifar_binary_layout(tmp_path: Path) -> None:
    px1, lb1 = _cifar_arrays(7, 0)
    px2, lb2 = _cifar_arrays(3, 1)
    px1[2, 1 * 1024 + 5 * 32 + 9] = 200  # image 2, channel G, row 5, col 9
    _write_cifar_bin(tmp_path / "data_batch_1.bin", px1, lb1)
    _write_cifar_bin(tmp_path / "test_batch.bin", px2, lb2)
    raw = load_cifar10(tmp_path, normalize=False)
    assert raw.x_train.shape == (7, 3, 32, 32) and raw.x_test.shape == (3, 3, 32, 32)
    assert raw.y_train.tolist() == [0, 3, 6, 9, 2, 5, 8]
    assert raw.x_train[2, 1, 5, 9] == pytest.approx(200 / 255)
    norm = load_cifar10(tmp_path, normalize=True)
    assert norm.x_train[2, 1, 5, 9] == pytest.approx((200 / 255 - 0.4822) / 0.2435, rel=1e-5)
    assert load_dataset("cifar10", tmp_path).x_train.dtype == np.float32


def test_cifar_binary_bad_size(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x00" * 3074)
    _write_cifar_bin(tmp_path / "test_batch.bin", *_cifar_arrays(1, 0))
    with pytest.raises(DataError, match=r"data_batch_1\.bin.*3074"):
        load_cifar10(tmp_path)


def test_cifar_python_pickles(tmp_path: Path) -> None:
    for i in (1, 2):
        px, lb = _cifar_arrays(4, i)
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": px, b"labels": lb.tolist(), b"batch_label": b"x"}, f)
    px, lb = _cifar_arrays(5, 9)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": px, b"labels": lb.tolist()}, f, protocol=2)
    split = load_cifar10(tmp_path, normalize=False)
    assert split.x_train.shape == (8, 3, 32, 32) and split.x_test.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(split.x_test.reshape(5, -1), px / 255.0, rtol=1e-6)


class _Evil:
    def __reduce__(self):  # pickle would call os.system("...") on load
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_malicious_pickle_refused(tmp_path: Path) -> None:
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"data_batch_1.*(posix|os)\.system"):
        load_cifar10(tmp_path)


def test_mnist_sample_split() -> None:
    split = load_mnist_sample(seed=0)
    assert split.x_train.shape == (4000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    assert np.bincount(split.y_train).tolist() == [400] * 10
    assert np.bincount(split.y_test).tolist() == [100] * 10
    assert split.x_train.dtype == np.float32 and split.x_train.max() == pytest.approx(1.0)


def test_digits_and_seeds() -> None:
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.x_train.shape[1:] == (1, 8, 8) and a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert a.x_train.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.y_train, c.y_train)


def test_load_dataset_errors() -> None:
    assert set(DATASETS) == {"mnist_sample", "digits", "mnist", "fashion_mnist", "cifar10"}
    with pytest.raises(DataError, match="imagenet.*known: mnist_sample"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="cifar10.*data_dir"):
        load_dataset("cifar10")
