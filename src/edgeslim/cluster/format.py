"""The Deep Compression file: pruned, weight-shared tensors as Huffman-coded relative indices and
codebook indices (Han et al. 2016, sections 2-4), everything else as raw bytes. numpy only, no pickle.

Byte format (integers little-endian)::

    offset 0   4 bytes   magic b"ESDC"
    offset 4   u8        format version (1)
    offset 5   u32       H: header length in bytes
    offset 9   H bytes   header: UTF-8 JSON {"tensors": [entry, ...]}
    9 + H      ...       data: every tensor's sections, in header order, with no gaps; the file
                         ends exactly after the last section

Every entry has "name", "shape" (list of ints), "dtype" (torch dtype name: float32, int64, ...),
"layout" and "nbytes" (the byte length of all its sections together).

``"layout": "raw"`` (biases, BatchNorm, any tensor that is not weight-shared): one section, the
tensor's bytes in row-major order.

``"layout": "shared"`` (a float32 tensor with at most 256 distinct nonzero values):

    "k"           codebook size; the codebook is the sorted distinct nonzero values
    "bits"        ceil(log2 k), the width the cluster indices would need without Huffman coding
    "order"       "C" or "F": the tensor is flattened row-major or column-major (numpy ravel
                  order; "F" on a (out, in) Linear weight walks input columns, Han et al.'s CSC)
    "index_bits"  b, width of a relative index (Han et al. fig. 2), or null when every element
                  is stored (no index stream: the denser layers). The writer takes b from the
                  caller, or with b unset tries 1 .. 12 and keeps the smallest file: after
                  Huffman coding a wider index costs little, while each filler costs two codes
    "entries"     number of stored entries N (nonzeros + fillers; numel when index_bits is null)
    "fillers"     how many stored entries are fillers (zeros that bridge a gap > 2^b)
    "index"       {"alphabet": A, "nbits": n} of the index stream, or null
    "values"      {"alphabet": A, "nbits": n} of the value stream

  sections, in this order:
    codebook        k float32 values
    index lengths   A_index uint8 Huffman code lengths (absent when "index" is null)
    index payload   ceil(n_index / 8) bytes: N canonical Huffman codes, MSB first, of the gaps
                    minus one: stored entry i sits at flat position p_i = p_{i-1} + 1 + symbol_i,
                    p_{-1} = -1 (symbols in 0 .. 2^b - 1; absent when "index" is null)
    values lengths  A_values uint8 code lengths
    values payload  ceil(n_values / 8) bytes: N codes of the entries' symbols: 0 .. k-1 is a
                    codebook index, k a zero (a filler, or a pruned weight when there is no index)

Canonical Huffman codes are rebuilt from the code lengths alone (:mod:`edgeslim.cluster.huffman`).
Decoding is exact: a weight comes back as the very float32 codebook value it was written from.
A zero of either sign is stored as a zero and decodes to +0.0 (clustered models hold only +0.0).
The encoder tries every layout ("C"/"F", with and without an index) and keeps the smallest.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeslim import io
from edgeslim.cluster import huffman
from edgeslim.errors import CheckpointError, ConfigError, DataError
from edgeslim.prune.sparse import RAW_DTYPES, decode_relative, encode_relative

MAGIC = b"ESDC"
VERSION = 1
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
MAX_CODEBOOK = 256

IndexBits = int | None | Mapping[str, int | None]  # None: the width giving the smallest file
AUTO_INDEX_BITS = range(1, 13)


# ------------------------------------------------------------------------------------- encoding
def _dtype_name(name: str, t: torch.Tensor) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in RAW_DTYPES:
        raise ConfigError(f"{name}: tensor dtype {dtype} cannot be stored (supported: {', '.join(RAW_DTYPES)})")
    return dtype


def _stream(symbols: np.ndarray) -> tuple[dict, bytes]:
    enc = huffman.encode(symbols)
    return {"alphabet": len(enc.lengths), "nbits": enc.nbits}, enc.lengths.tobytes() + enc.payload


def _shared_candidate(flat: np.ndarray, inverse: np.ndarray, k: int, index_bits: int | None) -> tuple[dict, bytes]:
    """Header fields and sections after the codebook for one flattening of a shared tensor."""
    if index_bits is None:
        symbols = np.full(flat.size, k, dtype=np.int64)  # k = zero
        symbols[flat != 0] = inverse
        head, data = _stream(symbols)
        return {"index_bits": None, "entries": int(flat.size), "fillers": 0, "index": None, "values": head}, data
    rel = encode_relative(flat != 0, index_bits)
    values = np.full(len(rel.positions), k, dtype=np.int64)  # fillers keep symbol k
    values[~rel.filler] = inverse
    i_head, i_data = _stream(rel.gaps - 1)
    v_head, v_data = _stream(values)
    return ({"index_bits": index_bits, "entries": len(rel.positions), "fillers": int(rel.filler.sum()),
             "index": i_head, "values": v_head}, i_data + v_data)


def _shared(name: str, t: torch.Tensor, index_bits: int | None) -> tuple[dict, bytes] | None:
    """The smallest shared encoding of ``t``, or None when it is not a codebook tensor."""
    if t.dtype != torch.float32 or t.ndim < 2:
        return None
    arr = t.detach().cpu().numpy()
    if not np.isfinite(arr).all():
        return None
    best = None
    for order in ("C", "F"):
        flat = arr.ravel(order=order)
        codebook, inverse = np.unique(flat[flat != 0], return_inverse=True)  # (k,) sorted, (nnz,)
        if len(codebook) > MAX_CODEBOOK:
            return None
        for bits in (*(AUTO_INDEX_BITS if index_bits is None else (index_bits,)), None):
            head, data = _shared_candidate(flat, inverse.reshape(-1), len(codebook), bits)
            if best is None or len(data) < len(best[1]):
                best = ({"order": order, **head}, data)
    k = len(codebook)
    head = {"name": name, "shape": list(t.shape), "dtype": "float32", "layout": "shared", "k": k,
            "bits": max(1, math.ceil(math.log2(max(k, 1)))), **best[0]}
    data = codebook.astype("<f4").tobytes() + best[1]
    return {**head, "nbytes": len(data)}, data


def _raw(name: str, t: torch.Tensor) -> tuple[dict, bytes]:
    dtype = _dtype_name(name, t)
    data = t.detach().cpu().contiguous().reshape(-1).view(RAW_DTYPES[dtype][1]).numpy().astype(
        np.dtype(str(RAW_DTYPES[dtype][1]).removeprefix("torch.")).newbyteorder("<")).tobytes()
    return {"name": name, "shape": list(t.shape), "dtype": dtype, "layout": "raw", "nbytes": len(data)}, data


def _state(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state


def _index_bits_for(index_bits: IndexBits, name: str) -> int | None:
    if isinstance(index_bits, Mapping):
        layer = name.removesuffix(".weight")
        bits = index_bits.get(name, index_bits.get(layer, index_bits.get("*", 5)))
    else:
        bits = index_bits
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16):
        raise ConfigError(f"index_bits: must be an integer in 1..16 (or None: smallest file) for {name!r}, got {bits!r}")
    return bits


def encode_state(model_or_state: nn.Module | Mapping[str, torch.Tensor], index_bits: IndexBits = 5) -> bytes:
    """The file's bytes for a model or state dict: weight-shared float32 tensors (>= 2-D, at most
    256 distinct nonzero values) in the "shared" layout, everything else raw.

    ``index_bits`` is one width for every tensor, or a mapping from tensor or layer name to width
    (key ``"*"`` for the rest; 5 when absent); None picks, per tensor, the width in 1..12 that
    gives the fewest bytes.
    """
    entries, chunks = [], []
    for name, t in _state(model_or_state).items():
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{name}: state entry is a {type(t).__name__}, not a tensor")
        shared = _shared(name, t, _index_bits_for(index_bits, name))
        head, data = shared if shared is not None else _raw(name, t)
        entries.append(head)
        chunks.append(data)
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(chunks)


def save_compressed(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                    index_bits: IndexBits = 5) -> int:
    """Write the compressed file atomically; returns its size in bytes."""
    data = encode_state(model_or_state, index_bits)
    io.write_bytes(path, data)
    return len(data)


# ------------------------------------------------------------------------------------- decoding
def _read_stream(data: bytes, at: int, head: dict, count: int) -> tuple[np.ndarray, int]:
    alphabet, nbits = int(head["alphabet"]), int(head["nbits"])
    if alphabet < 0 or nbits < 0:
        raise ValueError("negative stream size")
    lengths = np.frombuffer(data, dtype=np.uint8, count=alphabet, offset=at)
    end = at + alphabet + (nbits + 7) // 8
    if end > len(data):
        raise ValueError("stream runs past its section")
    return huffman.decode(lengths, data[at + alphabet : end], count, nbits), end


def _decode_shared(t: dict, data: bytes, shape: tuple[int, ...], numel: int) -> np.ndarray:
    k, count = int(t["k"]), int(t["entries"])
    codebook = np.frombuffer(data, dtype="<f4", count=k).astype(np.float32)
    at = 4 * k
    if t["index"] is not None:
        gaps, at = _read_stream(data, at, t["index"], count)
        positions = decode_relative(gaps + 1)
        if positions.size and positions[-1] >= numel:
            raise ValueError(f"index {int(positions[-1])} past the tensor's {numel} entries")
    else:
        if count != numel:
            raise ValueError(f"{count} entries for {numel} elements without an index")
        positions = np.arange(numel)
    symbols, at = _read_stream(data, at, t["values"], count)
    if at != len(data):
        raise ValueError(f"sections hold {at} of {len(data)} bytes")
    if symbols.size and symbols.max() > k:
        raise ValueError(f"value symbol {int(symbols.max())} outside the codebook of {k}")
    flat = np.zeros(numel, dtype=np.float32)
    real = symbols < k
    flat[positions[real]] = codebook[symbols[real]]
    if t["order"] not in ("C", "F"):
        raise ValueError(f"unknown order {t['order']!r}")
    return np.ascontiguousarray(flat.reshape(shape, order=t["order"]))


def _decode_tensor(t: dict, data: bytes) -> torch.Tensor:
    shape = tuple(int(d) for d in t["shape"])
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    numel = math.prod(shape)
    torch_dtype, int_dtype = RAW_DTYPES[t["dtype"]]
    if t["layout"] == "shared":
        if t["dtype"] != "float32":
            raise ValueError("a shared tensor must be float32")
        return torch.from_numpy(_decode_shared(t, data, shape, numel))
    if t["layout"] != "raw":
        raise ValueError(f"unknown layout {t['layout']!r}")
    np_int = np.dtype(str(int_dtype).removeprefix("torch.")).newbyteorder("<")
    if len(data) != numel * np_int.itemsize:
        raise ValueError(f"{len(data)} bytes for {numel} elements of {t['dtype']}")
    flat = np.frombuffer(data, dtype=np_int).astype(np_int.newbyteorder("="))
    return torch.from_numpy(flat.copy()).view(torch_dtype).reshape(shape)


def read_header(data: bytes, where: str = "compressed file") -> list[dict]:
    """The header's tensor entries (name, shape, layout, sizes of every section), checked against
    the file's length; CheckpointError naming ``where`` for a bad magic, version or truncation."""
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise CheckpointError(f"{where}: not an edgeslim Deep Compression file (bad magic {bytes(data[:4])!r})")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise CheckpointError(f"{where}: format version {version} is not supported (this reader: {VERSION})")
    start = _PREFIX.size + hlen
    if start > len(data):
        raise CheckpointError(f"{where}: truncated: header of {hlen} bytes, file has {len(data)} bytes")
    try:
        tensors = json.loads(data[_PREFIX.size : start].decode("utf-8"))["tensors"]
        sizes = [int(t["nbytes"]) for t in tensors]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{where}: unreadable header ({type(err).__name__}: {err})") from None
    if any(n < 0 for n in sizes):
        raise CheckpointError(f"{where}: unreadable header (a negative section length)")
    if start + sum(sizes) != len(data):
        state = "truncated" if start + sum(sizes) > len(data) else "has trailing bytes"
        raise CheckpointError(f"{where}: {state}: header promises {start + sum(sizes)} bytes, file has {len(data)}")
    return tensors


def decode_state(data: bytes, where: str = "compressed file") -> dict[str, torch.Tensor]:
    """The state dict back from :func:`encode_state`'s bytes; CheckpointError naming ``where`` and
    the tensor when the file is not one, is truncated or is corrupt."""
    tensors = read_header(data, where)
    state: dict[str, torch.Tensor] = {}
    at = _PREFIX.size + int.from_bytes(data[5:9], "little")
    for t in tensors:
        n = int(t["nbytes"])
        try:
            state[t["name"]] = _decode_tensor(t, data[at : at + n])
        except (ValueError, KeyError, TypeError, DataError) as err:
            raise CheckpointError(f"{where}: tensor {t.get('name')!r} is corrupt ({err})") from None
        at += n
    return state


def load_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_compressed` back into a state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"compressed file not found: {path}")
    return decode_state(path.read_bytes(), str(path))


def load_module(path: str | Path, model: nn.Module) -> nn.Module:
    """A copy of ``model`` (the architecture) holding the file's weights, in eval mode.

    CheckpointError naming the file and key when the file does not fit the architecture.
    """
    state = load_compressed(path)
    module = copy.deepcopy(model)
    expected = module.state_dict()
    for key in expected:
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r} for {type(model).__name__}")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{path}: shape mismatch for {key!r}: file {tuple(state[key].shape)}, "
                                  f"model {tuple(expected[key].shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(f"{path}: unexpected key {extra[0]!r} for {type(model).__name__}")
    module.load_state_dict(state, strict=True)
    return module.eval()


def load_onnx(path: str | Path, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> onnx.ModelProto:
    """The ONNX graph of the module rebuilt from the file (weights as dense float32 initializers)."""
    from edgeslim.runtime import export_onnx

    return export_onnx(load_module(path, model), example_inputs)
