"""Data sets as train/test ``Split``s of float32 NCHW images and int64 labels."""

from edgeslim.data.bundled import Split, load_digits, load_mnist_sample
from edgeslim.data.loaders import DATASETS, load_cifar10, load_dataset, load_mnist_idx, read_idx

__all__ = [
    "DATASETS",
    "Split",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist_idx",
    "load_mnist_sample",
    "read_idx",
]
