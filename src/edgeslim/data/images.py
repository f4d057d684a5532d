"""Image folders as model inputs: the two usual layouts, the standard preprocessing, and a seeded
split into a calibration part and a disjoint evaluation part.

Layouts: ImageNet-style class folders (``root/<class>/*.jpg``; the sorted class names give the
label indices), or a labels file (a CSV with ``file`` and ``label`` columns, ``file`` relative to
the image folder; other columns are ignored). Preprocessing (:class:`Preprocess`): resize the
short side, center crop, scale to [0, 1], subtract ``mean`` and divide by ``std`` per channel,
RGB, as torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize`` does (with PIL, which
edgeslim needs anyway); or a user function from a PIL image to the model's input array.

Only the images a run uses are decoded (a split of a large folder reads no other file), JPEGs
with PIL's draft mode (the decoder's own 1/2, 1/4, 1/8 downscaling, never below the resize
target), in threads: PIL releases the GIL while decoding and resizing, and ``map`` keeps the
order, so the result is the same bytes for the same files and settings.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from edgeslim.config import Partial
from edgeslim.data.bundled import Split, split_indices
from edgeslim.data.csv_rows import csv_rows
from edgeslim.errors import ConfigError, DataError, first_line

__all__ = ["IMAGENET", "IMAGE_SUFFIXES", "LABEL_COLUMNS", "Preprocess", "class_folders", "image_split", "labels_file",
           "load_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
LABEL_COLUMNS = ("file", "label")


@dataclass(frozen=True)
class Preprocess(Partial):
    """How an image becomes a model input: short side resized to ``resize``, a ``crop`` x ``crop``
    center crop, pixels scaled to [0, 1], then ``(x - mean) / std`` per RGB channel. Fields left
    ``None`` take the model's own preprocessing (each bundled model knows it; factories get
    :data:`IMAGENET` at their ``input_shape``). ``factory`` ("module:function") replaces all of
    it: a function from an RGB PIL image to the model's input array (C, H, W)."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["bilinear", "bicubic"] | None = None
    factory: str | None = None

    def validate(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 8192:
                raise ConfigError(f"{name}: must be in [1, 8192] pixels, got {value}")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise ConfigError(f"crop: {self.crop} is larger than the resized short side {self.resize}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, 3):
                raise ConfigError(f"{name}: expected 3 values (R, G, B) or 1, got {len(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"std: must be > 0, got {list(self.std)}")
        if self.factory is not None:
            if ":" not in self.factory:
                raise ConfigError(f"factory: expected 'module:function', got {self.factory!r}")
            given = [f for f in ("resize", "crop", "mean", "std", "interpolation") if getattr(self, f) is not None]
            if given:
                raise ConfigError(f"factory: replaces the standard preprocessing; drop {given[0]}")

    def complete(self) -> bool:
        """Whether every field the standard preprocessing needs is set (or a factory replaces it)."""
        return self.factory is not None or None not in (self.resize, self.crop, self.mean, self.std, self.interpolation)


# torchvision's ImageNet preprocessing: 256 -> center 224 (crop fraction 0.875), bilinear.
IMAGENET = Preprocess(resize=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      interpolation="bilinear")


def _readable_dir(root: Path, what: str) -> None:
    if not root.is_dir():
        raise DataError(f"{what} not found: {root}" if not root.exists() else f"{what} is not a folder: {root}")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def class_folders(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files, labels and class names of an ImageNet-style folder: one subfolder per class, sorted
    by name (label 0 is the first); files in each sorted by name. Hidden entries and files that
    are not images (by suffix) are skipped; an empty class folder is an error (its label would
    silently shift every later class in a model trained with it)."""
    root = Path(root)
    _readable_dir(root, "image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>), and no labels file given")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.is_file() and _is_image(p))
        if not found:
            raise DataError(f"{root / name}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [index] * len(found)
    return files, np.asarray(labels, dtype=np.int64), classes


def labels_file(path: str | Path, images: str | Path) -> tuple[list[Path], np.ndarray]:
    """Files and labels from a CSV with ``file`` and ``label`` columns (any order, extra columns
    ignored); ``file`` is relative to the folder ``images``. Errors name the file and line."""
    path, images = Path(path), Path(images)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    _readable_dir(images, "image folder")
    files: list[Path] = []
    labels: list[int] = []
    for line, (name, raw) in csv_rows(path, LABEL_COLUMNS):
        if name is None or raw is None or not name.strip():
            raise DataError(f"{path}:{line}: row has no file or label")
        try:
            label = int(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: label {raw.strip()!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{path}:{line}: label {label} is negative")
        files.append(images / name.strip())
        labels.append(label)
    return files, np.asarray(labels, dtype=np.int64)


def _open(path: Path, size: int | None) -> Any:
    """The decoded RGB image; with ``size`` (the short side it will be resized to), JPEGs are
    decoded at the smallest 1/2^k scale whose short side is still at least ``size``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if size is not None and im.format == "JPEG":
                w, h = im.size
                scale = size / min(w, h)
                im.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({first_line(exc)})") from None


def _standard(image: Any, p: Preprocess) -> np.ndarray:
    """Resize (short side), center crop, [0, 1], normalise: (3, crop, crop) float32."""
    from PIL import Image

    w, h = image.size
    if min(w, h) != p.resize:  # the long side as torchvision computes it
        w, h = (p.resize, int(p.resize * h / w)) if w <= h else (int(p.resize * w / h), p.resize)
        image = image.resize((w, h), Image.Resampling.BICUBIC if p.interpolation == "bicubic" else Image.Resampling.BILINEAR)
    left, top = int(round((w - p.crop) / 2.0)), int(round((h - p.crop) / 2.0))  # crop <= resize: checked
    x = np.asarray(image.crop((left, top, left + p.crop, top + p.crop)), dtype=np.float32) / 255.0
    x = (x - np.asarray(p.mean, dtype=np.float32)) / np.asarray(p.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _one(path: Path, p: Preprocess, transform: Callable[[Any], Any] | None) -> np.ndarray:
    if transform is None:
        return _standard(_open(path, p.resize), p)
    try:
        out = np.ascontiguousarray(transform(_open(path, None)), dtype=np.float32)  # (C, H, W) in memory order
    except DataError:
        raise
    except Exception as exc:  # user code: name the image and the function's own message
        raise DataError(f"{path}: preprocess.factory {p.factory} failed: {first_line(exc)}") from None
    return out


def load_images(files: Sequence[Path], preprocess: Preprocess, transform: Callable[[Any], Any] | None = None,
                threads: int | None = None) -> np.ndarray:
    """``files`` decoded and preprocessed into one float32 ``(N, C, H, W)`` array, in order.

    ``transform`` (the resolved ``preprocess.factory``) maps an RGB PIL image to one input
    array; without it ``preprocess`` must be complete. Every image must give the same shape."""
    if transform is None and not preprocess.complete():
        raise ConfigError(f"preprocess: incomplete {preprocess} (give resize, crop, mean, std, interpolation)")
    if not files:
        raise DataError("no images to load")
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda f: _one(f, preprocess, transform), files))
    shape = arrays[0].shape
    odd = next((i for i, a in enumerate(arrays) if a.shape != shape), None)
    if odd is not None:
        raise DataError(f"{files[odd]}: preprocessed to shape {arrays[odd].shape}, the first image "
                        f"({files[0]}) to {shape}")
    return np.ascontiguousarray(np.stack(arrays))


def image_split(files: Sequence[Path], labels: np.ndarray, preprocess: Preprocess, *,
                calibration_samples: int, eval_samples: int | None, seed: int,
                transform: Callable[[Any], Any] | None = None, name: str = "images") -> Split:
    """A :class:`Split` whose train part is the calibration images and whose test part the disjoint
    evaluation images (:func:`split_indices`); only those images are decoded."""
    cal, ev = split_indices(len(files), calibration_samples, eval_samples, seed, name)
    x_cal = load_images([files[i] for i in cal], preprocess, transform)
    x_ev = load_images([files[i] for i in ev], preprocess, transform)
    if x_cal.shape[1:] != x_ev.shape[1:]:
        raise DataError(f"{name}: calibration images preprocess to {x_cal.shape[1:]}, evaluation images to "
                        f"{x_ev.shape[1:]}")
    return Split(x_train=x_cal, y_train=labels[cal], x_test=x_ev, y_test=labels[ev], name=name)
