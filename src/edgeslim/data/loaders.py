"""Readers for data sets the user downloads: IDX (MNIST, Fashion-MNIST), CIFAR-10 (binary or
python pickles) and numpy ``.npz`` arrays, plus the ``load_dataset`` dispatcher.

CIFAR-10 pickles are read with a restricted unpickler so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeslim.data.bundled import Split, load_digits, load_mnist_sample
from edgeslim.errors import DataError

DATASETS: tuple[str, ...] = ("mnist_sample", "digits", "mnist", "fashion_mnist", "cifar10")
_BUNDLED = ("mnist_sample", "digits")

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_RECORD = 1 + 3 * 32 * 32


# ----------------------------------------------------------------------------------------- IDX
def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into a native-endian array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the extension says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise DataError(
            f"{path}: IDX payload is {actual} bytes, expected {expected} for shape {dims} {dtype.name}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # copy: writable and native-endian


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing IDX file: {directory / stem} (or {stem}.gz)")


def _idx_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected 3-D images (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected 1-D labels (N,), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]  # (N, 1, H, W)
    return np.ascontiguousarray(x), labels.astype(np.int64)


def load_mnist_idx(directory: str | Path, name: str = "mnist") -> Split:
    """Load MNIST or Fashion-MNIST from the four standard IDX files in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    x_tr, y_tr = _idx_pair(directory, "train")
    x_te, y_te = _idx_pair(directory, "t10k")
    return Split(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, name=name)


# ------------------------------------------------------------------------------------ CIFAR-10
def _latin1_encode(obj: str, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 text")
    return codecs.encode(obj, "latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # protocol-5 arrays
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # CIFAR pickles come from Python 2
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: pickle references {module}.{name}; only numpy arrays are allowed"
            ) from None


def _load_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: report it as bad data, not a crash
        raise DataError(f"{path}: cannot read CIFAR-10 pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: missing 'data' or 'labels' entry")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
    if data.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def _load_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % _CIFAR_RECORD:
        raise DataError(
            f"{path}: size {raw.size} bytes is not a multiple of the {_CIFAR_RECORD}-byte CIFAR-10 record"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)  # (N, 1 label + 3*32*32 CHW pixels)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _batch_number(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else 0


def _cifar_files(directory: Path) -> tuple[list[Path], Path, bool] | None:
    """(train files, test file, is_binary) for the first complete set found, binary first."""
    for is_binary, sub in ((True, "cifar-10-batches-bin"), (False, "cifar-10-batches-py")):
        for d in (directory, directory / sub):
            if is_binary:
                train = [p for p in d.glob("data_batch_*.bin") if p.is_file()]
                test = d / "test_batch.bin"
            else:
                train = [p for p in d.glob("data_batch_*") if p.is_file() and not p.suffix]
                test = d / "test_batch"
            if train and test.is_file():
                return sorted(train, key=_batch_number), test, is_binary
    return None


def load_cifar10(directory: str | Path, normalize: bool = True) -> Split:
    """Load CIFAR-10 (binary or python version) as float32 (N, 3, 32, 32)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"data directory not found: {directory}")
    found = _cifar_files(directory)
    if found is None:
        raise DataError(
            f"no CIFAR-10 batches in {directory}: need data_batch_*.bin + test_batch.bin "
            "or data_batch_1..5 + test_batch (python version)"
        )
    train_files, test_file, is_binary = found
    reader = _load_cifar_bin if is_binary else _load_cifar_pickle

    def to_float(parts: list[tuple[np.ndarray, np.ndarray]], what: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
        y = np.concatenate([p[1] for p in parts])
        if x.shape[0] == 0:
            raise DataError(f"CIFAR-10 {what} set in {directory} is empty")
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"CIFAR-10 {what} labels in {directory} outside 0..9: {y.min()}..{y.max()}")
        if normalize:
            mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)

    x_tr, y_tr = to_float([reader(p) for p in train_files], "train")
    x_te, y_te = to_float([reader(test_file)], "test")
    return Split(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, name="cifar10")


# ------------------------------------------------------------------------------ numpy arrays
def check_arrays(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as model inputs (float64 becomes float32) and int64 labels: one sample per row of
    both, finite inputs; DataError naming ``where`` otherwise."""
    try:
        x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
        y = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{where}: x and y must be arrays ({exc})") from None
    if x.dtype == object or x.ndim < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{where}: x must be a numeric array (N, ...), got dtype {x.dtype}, shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must be {len(x)} integer labels (N,), got dtype {y.dtype}, shape {y.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError(f"{where}: x holds NaN/Inf values")
    if len(y) and y.min() < 0:
        raise DataError(f"{where}: y holds a negative label ({int(y.min())})")
    return (x.astype(np.float32) if x.dtype == np.float64 else x), y.astype(np.int64)


def load_arrays(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (model inputs, one sample per row) and ``y`` (integer labels) from a ``.npz`` file,
    read without pickle."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"arrays file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: no array named {missing[0]!r} (has {', '.join(npz.files) or 'none'}; "
                                "save with np.savez(path, x=inputs, y=labels))")
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except Exception as exc:  # not a zip, a truncated member, an object array (needs pickle)
        raise DataError(f"{path}: cannot read as .npz ({type(exc).__name__}: {exc})") from None
    return check_arrays(x, y, str(path))


# ---------------------------------------------------------------------------------- dispatcher
def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0) -> Split:
    """Load a data set by name; bundled sets need no directory, the others read ``data_dir``."""
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if key == "mnist_sample":
        return load_mnist_sample(seed=seed)
    if key == "digits":
        return load_digits(seed=seed)
    if data_dir is None:
        raise DataError(
            f"dataset {key!r} needs a data directory (data_dir); bundled sets: {', '.join(_BUNDLED)}"
        )
    if key == "cifar10":
        return load_cifar10(data_dir)
    return load_mnist_idx(data_dir, name=key)
