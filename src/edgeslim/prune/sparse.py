"""A compact file for unstructured-sparse weights: relative indices + nonzero values (Han et al. 2016).

Relative indexing ("Deep Compression", section 3, fig. 2): the flat (row-major) positions
``p_0 < p_1 < ...`` of the stored entries are kept as gaps ``g_i = p_i - p_{i-1}`` (with
``p_{-1} = -1``, so ``g_i >= 1``), each written as ``g_i - 1`` in ``index_bits`` bits. A gap larger
than ``2**index_bits`` cannot be written; a *filler* entry (value zero) is stored at
``p_{i-1} + 2**index_bits`` instead and the count starts again from there.

Byte format (all integers little-endian)::

    offset 0   8 bytes   magic b"ESSPARSE"
    offset 8   u32       format version (1)
    offset 12  u32       H: header length in bytes
    offset 16  H bytes   header: UTF-8 JSON (below)
    16 + H     ...       data sections; every offset in the header counts from here

    header = {"index_bits": b, "value_dtype": "float32" | "float16",
              "tensors": [{"name", "dtype", "shape", "layout": "dense" | "sparse", ...}]}
    dense  tensor: "offset", "nbytes"      raw row-major bytes in the tensor's own dtype
    sparse tensor: "entries"               stored entries (nonzeros + fillers)
                   "fillers"               how many of them are fillers
                   "index_offset", "index_nbytes"   entries x b bits, LSB-first, the gaps - 1
                   "value_offset", "value_nbytes"   entries values (value_dtype for float32
                                                    tensors, else the tensor's own dtype)

A tensor is stored sparse when it has >= 2 dimensions and its sparse form is smaller than its
dense bytes; vectors (biases, BatchNorm) and dense-enough weights are stored as is. "Nonzero"
means a nonzero bit pattern, so ``-0.0`` and NaN are kept and decoding is bit-exact with the
default ``value_dtype="float32"`` (``"float16"`` halves the values' bytes, lossy). numpy only:
no pickle anywhere.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from edgeslim import io
from edgeslim.errors import CheckpointError, ConfigError

MAGIC = b"ESSPARSE"
VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length

# torch dtype name -> (torch dtype, unsigned integer view of the same width for raw bits)
RAW_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.int32), "float16": (torch.float16, torch.int16),
    "bfloat16": (torch.bfloat16, torch.int16), "float64": (torch.float64, torch.int64),
    "int64": (torch.int64, torch.int64), "int32": (torch.int32, torch.int32),
    "int16": (torch.int16, torch.int16), "int8": (torch.int8, torch.int8),
    "uint8": (torch.uint8, torch.uint8), "bool": (torch.bool, torch.uint8),
}

__all__ = ["RelativeIndex", "decode_relative", "decode_sparse", "encode_relative", "encode_sparse",
           "load_sparse", "pack_bits", "save_sparse", "unpack_bits"]


class RelativeIndex(NamedTuple):
    """Han et al.'s relative index of one tensor's stored entries (nonzeros plus filler zeros).

    ``gaps[i] = positions[i] - positions[i - 1]`` (``positions[-1] = -1``), each in
    ``[1, 2**index_bits]`` and stored as ``gaps - 1``; ``positions`` are flat row-major indices;
    ``filler[i]`` is True for an entry that exists only to bridge a long run of zeros (its value
    is zero). Values to store: ``flat_weights[positions]``.
    """

    gaps: np.ndarray  # (entries,) int64
    positions: np.ndarray  # (entries,) int64
    filler: np.ndarray  # (entries,) bool


def _check_bits(index_bits: int) -> None:
    if isinstance(index_bits, bool) or not isinstance(index_bits, int) or not 1 <= index_bits <= 16:
        raise ConfigError(f"index_bits: must be an integer in [1, 16], got {index_bits!r}")


def encode_relative(mask_or_indices: np.ndarray | torch.Tensor, index_bits: int) -> RelativeIndex:
    """Relative index of the kept entries: a bool mask (any shape, flattened row-major) or sorted
    flat indices. Gaps longer than ``2**index_bits`` get filler entries, as in Han et al. 2016."""
    _check_bits(index_bits)
    a = mask_or_indices.detach().cpu().numpy() if isinstance(mask_or_indices, torch.Tensor) else np.asarray(mask_or_indices)
    idx = np.flatnonzero(a.reshape(-1)) if a.dtype == np.bool_ else a.reshape(-1).astype(np.int64)
    if idx.size and (idx[0] < 0 or np.any(np.diff(idx) <= 0)):
        raise ConfigError("indices: flat indices must be non-negative and strictly increasing")
    span = 1 << index_bits  # the largest gap one code can hold
    raw = np.diff(idx, prepend=-1)  # (nnz,) gaps >= 1
    extra = (raw - 1) // span  # fillers needed before each kept entry
    count = raw.size + int(extra.sum())
    positions = np.empty(count, dtype=np.int64)
    # The kept entry i sits after all kept entries < i, their fillers and its own fillers.
    slot = np.arange(raw.size) + np.cumsum(extra)  # (nnz,) output slot of each kept entry
    positions[slot] = idx
    filler = np.ones(count, dtype=bool)
    filler[slot] = False
    if count > raw.size:
        # A filler sits exactly `span` after the previous entry: walk each run of fillers.
        owner = np.repeat(np.arange(raw.size), extra)  # (fillers,) kept entry each filler precedes
        start = np.where(owner > 0, idx[np.maximum(owner - 1, 0)], -1)  # previous kept position
        rank = np.arange(owner.size) - np.repeat(np.cumsum(extra) - extra, extra)  # 0.. within its run
        positions[filler] = start + span * (rank + 1)
    gaps = np.diff(positions, prepend=-1)
    return RelativeIndex(gaps, positions, filler)


def decode_relative(gaps: np.ndarray) -> np.ndarray:
    """Flat positions back from the gaps (``positions = cumsum(gaps) - 1``)."""
    return np.cumsum(np.asarray(gaps, dtype=np.int64)) - 1


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ``codes`` (each < 2**bits) into ``ceil(len * bits / 8)`` bytes, LSB first."""
    codes = np.asarray(codes, dtype=np.uint32)
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, bits)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits as int64."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw[:count].astype(np.int64)
    planes = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


def _raw(t: torch.Tensor) -> tuple[str, np.ndarray]:
    """The tensor's dtype name and its bits as a flat numpy integer array."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in RAW_DTYPES:
        raise ConfigError(f"tensor dtype {name} cannot be stored (supported: {', '.join(RAW_DTYPES)})")
    return name, t.detach().cpu().contiguous().reshape(-1).view(RAW_DTYPES[name][1]).numpy()


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state


def encode_sparse(model_or_state: nn.Module | Mapping[str, torch.Tensor], *, index_bits: int = 5,
                  value_dtype: str = "float32") -> bytes:
    """The file's bytes for a model or state dict (see the module docstring for the format)."""
    _check_bits(index_bits)
    if value_dtype not in ("float32", "float16"):
        raise ConfigError(f"value_dtype: must be 'float32' or 'float16', got {value_dtype!r}")
    entries, chunks, size = [], [], 0

    def add(data: bytes) -> tuple[int, int]:
        nonlocal size
        chunks.append(data)
        size += len(data)
        return size - len(data), len(data)

    for name, tensor in _state(model_or_state).items():
        dtype, bits = _raw(tensor)
        head = {"name": name, "dtype": dtype, "shape": list(tensor.shape)}
        rel = encode_relative(bits != 0, index_bits) if tensor.ndim >= 2 else None
        values = bits[rel.positions] if rel is not None else None
        if rel is not None and dtype == "float32" and value_dtype == "float16":
            values = values.view(np.float32).astype(np.float16)
        dense_bytes = bits.nbytes
        if rel is None or len(rel.gaps) * (values.itemsize + index_bits / 8) >= dense_bytes:
            off, n = add(bits.tobytes())
            entries.append({**head, "layout": "dense", "offset": off, "nbytes": n})
            continue
        i_off, i_n = add(pack_bits(rel.gaps - 1, index_bits))
        v_off, v_n = add(values.tobytes())
        entries.append({**head, "layout": "sparse", "entries": len(rel.gaps), "fillers": int(rel.filler.sum()),
                        "index_offset": i_off, "index_nbytes": i_n, "value_offset": v_off, "value_nbytes": v_n})
    header = json.dumps({"index_bits": index_bits, "value_dtype": value_dtype, "tensors": entries},
                        separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(chunks)


def save_sparse(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path, *,
                index_bits: int = 5, value_dtype: str = "float32") -> int:
    """Write the sparse file atomically; returns its size in bytes."""
    data = encode_sparse(model_or_state, index_bits=index_bits, value_dtype=value_dtype)
    io.write_bytes(path, data)
    return len(data)


def _section(data: memoryview, start: int, off: int, n: int, where: str) -> bytes:
    if off < 0 or n < 0 or start + off + n > len(data):
        raise CheckpointError(f"{where}: section [{off}, {off + n}) runs past the end of the file")
    return bytes(data[start + off : start + off + n])


def decode_sparse(data: bytes, where: str = "sparse file") -> dict[str, torch.Tensor]:
    """The state dict back from :func:`encode_sparse`'s bytes (bit-exact for float32 values)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise CheckpointError(f"{where}: too short to be an edgeslim sparse file ({len(view)} bytes)")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise CheckpointError(f"{where}: not an edgeslim sparse file (magic {magic!r}, version {version})")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + hlen]))
        bits, value_dtype = int(header["index_bits"]), header["value_dtype"]
        tensors = header["tensors"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: unreadable header ({err})") from None
    start = _PREFIX.size + hlen
    state: dict[str, torch.Tensor] = {}
    for t in tensors:
        try:
            state[t["name"]] = _decode_tensor(view, start, t, bits, value_dtype, where)
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{where}: tensor {t.get('name')!r} is malformed ({err})") from None
    return state


def _decode_tensor(view: memoryview, start: int, t: dict, bits: int, value_dtype: str, where: str) -> torch.Tensor:
    torch_dtype, int_dtype = RAW_DTYPES[t["dtype"]]
    np_int = torch.empty(0, dtype=int_dtype).numpy().dtype
    shape, numel = tuple(t["shape"]), int(np.prod(t["shape"], dtype=np.int64))
    if t["layout"] == "dense":
        flat = np.frombuffer(_section(view, start, t["offset"], t["nbytes"], where), dtype=np_int)
    else:
        count = int(t["entries"])
        positions = decode_relative(unpack_bits(_section(view, start, t["index_offset"], t["index_nbytes"], where),
                                                bits, count) + 1)
        raw = _section(view, start, t["value_offset"], t["value_nbytes"], where)
        if t["dtype"] == "float32" and value_dtype == "float16":
            values = np.frombuffer(raw, dtype=np.float16).astype(np.float32).view(np.int32)
        else:
            values = np.frombuffer(raw, dtype=np_int)
        if positions.size and positions[-1] >= numel:
            raise CheckpointError(f"{where}: tensor {t['name']!r} has an index past its {numel} entries")
        flat = np.zeros(numel, dtype=np_int)
        flat[positions] = values
    if flat.size != numel:
        raise CheckpointError(f"{where}: tensor {t['name']!r} holds {flat.size} entries, shape {shape} needs {numel}")
    return torch.from_numpy(flat.copy()).view(torch_dtype).reshape(shape)


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse` back into a state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"sparse file not found: {path}")
    return decode_sparse(path.read_bytes(), str(path))
