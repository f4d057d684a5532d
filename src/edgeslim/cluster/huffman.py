"""Canonical Huffman coding of integer symbol streams (Huffman 1952; canonical codes as in DEFLATE,
RFC 1951 section 3.2.2), the last stage of Deep Compression (Han et al. 2016, section 4).

A stream is stored as its code lengths (one per symbol of the alphabet ``0 .. A-1``, 0 = unused)
and the packed code bits: canonical codes are fully determined by their lengths, so no tree is
stored. Encoding and decoding are vectorised with numpy except for one integer pointer chase in
the decoder (the start of symbol i+1 depends on the length of symbol i).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from edgeslim.errors import DataError

MAX_CODE_LENGTH = 57  # decoding windows are read into uint64; 57 + 7 spare bits for the byte shift


@dataclass(frozen=True)
class Encoded:
    """One Huffman-coded stream: ``lengths[s]`` is symbol s's code length (0 = absent), ``payload``
    the MSB-first packed codes, ``count`` the number of symbols and ``nbits`` the used bits."""

    lengths: np.ndarray  # (A,) uint8
    payload: bytes
    count: int
    nbits: int


def code_lengths(freqs: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol from its frequency (0 for absent symbols).

    Merges the two least frequent subtrees with a heap; ties break on the smallest symbol id so the
    result is deterministic. A lone symbol gets length 1 (a code needs at least one bit).
    """
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(len(freqs), dtype=np.int64)
    present = np.flatnonzero(freqs > 0)
    if len(present) == 1:
        lengths[present[0]] = 1
    if len(present) <= 1:
        return lengths.astype(np.uint8)
    # heap items: (weight, smallest symbol in subtree, list of symbols in subtree)
    heap = [(int(freqs[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:
        w1, t1, s1 = heapq.heappop(heap)
        w2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1  # every leaf of the merged subtree moves one level deeper
        heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
    if lengths.max() > MAX_CODE_LENGTH:
        raise DataError(f"Huffman code length {int(lengths.max())} exceeds {MAX_CODE_LENGTH} bits")
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code value per symbol: codes of equal length are consecutive in symbol order and
    shorter codes precede longer ones (RFC 1951, 3.2.2). Returns (A,) uint64; 0 where length is 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint64)
    order = np.lexsort((np.arange(len(lengths)), lengths))  # by length, then symbol
    order = order[lengths[order] > 0]
    code, prev_len = 0, 0
    for i, sym in enumerate(order):
        n = int(lengths[sym])
        if i:
            code += 1
        code <<= n - prev_len
        codes[sym] = code
        prev_len = n
    return codes


def encode(symbols: np.ndarray, alphabet: int | None = None) -> Encoded:
    """Huffman-code a 1-D stream of non-negative integers (alphabet ``0 .. alphabet-1``)."""
    symbols = np.asarray(symbols).reshape(-1)
    if len(symbols) and (not np.issubdtype(symbols.dtype, np.integer) or symbols.min() < 0):
        raise DataError("Huffman encode: symbols must be non-negative integers")
    symbols = symbols.astype(np.int64)
    size = int(symbols.max()) + 1 if len(symbols) else 0
    alphabet = size if alphabet is None else alphabet
    if size > alphabet:
        raise DataError(f"Huffman encode: symbol {size - 1} is outside the alphabet of {alphabet}")
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet) if alphabet else np.zeros(0, np.int64))
    codes = canonical_codes(lengths)
    sym_len = lengths[symbols].astype(np.int64)  # (N,)
    nbits = int(sym_len.sum())
    # bit j of symbol i (MSB first) = (code >> (len - 1 - j)) & 1, laid out as one flat (nbits,) array
    starts = np.cumsum(sym_len) - sym_len
    owner = np.repeat(np.arange(len(symbols)), sym_len)  # (nbits,) which symbol each bit belongs to
    j = np.arange(nbits) - starts[owner]
    shift = (sym_len[owner] - 1 - j).astype(np.uint64)
    bits = ((codes[symbols[owner]] >> shift) & np.uint64(1)).astype(np.uint8)
    return Encoded(lengths=lengths, payload=np.packbits(bits).tobytes(), count=len(symbols), nbits=nbits)


class _Table(NamedTuple):
    """Canonical decoding table for code lengths 1..L (index 0 unused)."""

    symbols: np.ndarray  # (S,) symbols in canonical order (by length, then symbol)
    first_index: np.ndarray  # (L+1,) position in `symbols` of the first code of each length
    first_code: np.ndarray  # (L+1,) value of that first code
    count: np.ndarray  # (L+1,) number of codes of each length
    limit: np.ndarray  # (L,) uint64: end of length l's codes, left-justified to L bits
    longest: int


def _table(lengths: np.ndarray) -> _Table:
    big = int(lengths.max())
    codes = canonical_codes(lengths)
    symbols = np.lexsort((np.arange(len(lengths)), lengths))
    symbols = symbols[lengths[symbols] > 0]
    count = np.bincount(lengths[symbols], minlength=big + 1)  # (L+1,)
    first_index = np.cumsum(count) - count
    first_code = np.zeros(big + 1, dtype=np.int64)
    limit = np.zeros(big, dtype=np.uint64)
    end = 0  # a window w starts a code of the shortest length l with w < limit[l] (ranges are ordered)
    for n in range(1, big + 1):
        if count[n]:
            first_code[n] = int(codes[symbols[first_index[n]]])
            end = (int(first_code[n]) + int(count[n])) << (big - n)
        limit[n - 1] = end
    return _Table(symbols, first_index, first_code, count, limit, big)


def _check_stream(lengths: np.ndarray, payload: bytes, count: int, nbits: int) -> None:
    if count and not lengths.any():
        raise DataError("Huffman decode: no code lengths for a non-empty stream")
    if len(payload) != (nbits + 7) // 8:
        raise DataError(f"Huffman decode: payload of {len(payload)} bytes does not hold {nbits} bits")
    if count and int(lengths.max()) > MAX_CODE_LENGTH:
        raise DataError(f"Huffman decode: code length {int(lengths.max())} exceeds {MAX_CODE_LENGTH}")


def _starts(step: list[int], count: int, nbits: int) -> np.ndarray:
    """Bit offsets of the ``count`` codes: each starts where the previous one's length ends."""
    starts = np.empty(count, dtype=np.int64)
    p = 0
    for i in range(count):
        if p >= nbits:
            raise DataError(f"Huffman decode: stream ends after {i} of {count} symbols")
        starts[i] = p
        p += step[p]
    if p != nbits:
        raise DataError(f"Huffman decode: {count} symbols use {p} bits, header says {nbits}")
    return starts


def decode(lengths: np.ndarray, payload: bytes, count: int, nbits: int) -> np.ndarray:
    """Exact inverse of :func:`encode`: the (count,) int64 symbol stream.

    Every bit position p gets the length of the code that would start at p, from the L-bit window
    at p (L = longest code) and the canonical code limits; the true code starts are then followed
    from 0. DataError when the bits do not form ``count`` codes within ``nbits``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_stream(lengths, payload, count, nbits)
    if count == 0:
        if nbits:
            raise DataError(f"Huffman decode: {nbits} bits for an empty stream")
        return np.zeros(0, dtype=np.int64)
    t = _table(lengths)
    big = t.longest
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:nbits]
    padded = np.concatenate([bits, np.zeros(big, dtype=np.uint8)]).astype(np.uint64)
    window = np.zeros(nbits, dtype=np.uint64)  # (nbits,) the L bits starting at each position
    for k in range(big):
        window = (window << np.uint64(1)) | padded[k : k + nbits]
    step = np.minimum(np.searchsorted(t.limit, window, side="right"), big - 1) + 1  # (nbits,) code length
    starts = _starts(step.tolist(), count, nbits)
    n = step[starts]  # (count,) lengths of the codes
    value = (window[starts] >> (big - n).astype(np.uint64)).astype(np.int64)  # the codes themselves
    rank = t.first_index[n] + value - t.first_code[n]  # position in canonical order
    if (t.count[n] == 0).any() or (value - t.first_code[n] >= t.count[n]).any() or (value < t.first_code[n]).any():
        raise DataError("Huffman decode: the bits contain an invalid code")
    return t.symbols[rank].astype(np.int64)
