"""Data sets as train/test ``Split``s of float32 NCHW images and int64 labels: bundled sets, the
readers of downloaded ones, numpy arrays, and image folders with their preprocessing."""

from edgeslim.data.bundled import Split, arrays_split, load_digits, load_mnist_sample, split_indices
from edgeslim.data.images import IMAGENET, Preprocess, class_folders, image_split, labels_file, load_images
from edgeslim.data.loaders import (DATASETS, check_arrays, load_arrays, load_cifar10, load_dataset, load_mnist_idx,
                                   read_idx)

__all__ = [
    "DATASETS",
    "IMAGENET",
    "Preprocess",
    "Split",
    "arrays_split",
    "check_arrays",
    "class_folders",
    "image_split",
    "labels_file",
    "load_arrays",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_images",
    "load_mnist_idx",
    "load_mnist_sample",
    "read_idx",
    "split_indices",
]
