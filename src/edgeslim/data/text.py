"""Text data for sentence encoders: the bundled sentences, tokenization and scored-pair CSVs.

The bundled ``sentences.txt`` (one English sentence per line: news, technical, everyday,
questions; a few longer than 60 tokens) gives calibration/evaluation inputs that need no
download. ``load_scored_pairs`` reads a user's STS-style CSV so that an encoder can be scored
by Spearman correlation against human similarity judgements.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeslim.data.csv_rows import csv_rows
from edgeslim.errors import ConfigError, DataError

__all__ = ["PAIR_COLUMNS", "load_scored_pairs", "load_sentences", "tokenize"]

PAIR_COLUMNS: tuple[str, str, str] = ("sentence1", "sentence2", "score")
_SENTENCES = "sentences.txt"


def load_sentences() -> list[str]:
    """The bundled sentences, in file order, without blank lines or surrounding whitespace."""
    try:
        text = resources.files("edgeslim.data").joinpath(_SENTENCES).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"bundled {_SENTENCES} is missing from the edgeslim package ({exc}); reinstall edgeslim") from None
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise DataError(f"bundled {_SENTENCES} contains no sentences; reinstall edgeslim")
    return sentences


def tokenize(tokenizer: Any, sentences: Sequence[str], seq_len: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both ``(N, seq_len)`` int64, padded/truncated to ``seq_len``.

    A fixed length keeps every batch the same shape, which calibration and latency numbers
    rely on; the mask marks the real tokens so that padding does not change the embeddings.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2 (room for [CLS] and [SEP]), got {seq_len!r}")
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise DataError("no sentences to tokenize")
    bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
    if bad is not None:
        raise DataError(f"sentence {bad} is a {type(sentences[bad]).__name__}, expected str")
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    return ids, mask


def load_scored_pairs(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Read a CSV with header ``sentence1,sentence2,score`` into two sentence lists and float64 scores.

    Columns are found by header name (any order; extra columns are ignored). A missing file or
    column, an empty cell, a non-numeric score or a file without rows raises DataError naming
    the file and, where it applies, the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"scored-pairs CSV not found: {path}")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    for line, (a, b, raw) in csv_rows(path, PAIR_COLUMNS):
        if a is None or b is None or raw is None:
            raise DataError(f"{path}:{line}: row has fewer cells than the header")
        try:
            score = float(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: score {raw.strip()!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{path}:{line}: score {raw.strip()!r} is not finite")
        if not a.strip() or not b.strip():
            raise DataError(f"{path}:{line}: empty sentence")
        s1.append(a.strip())
        s2.append(b.strip())
        scores.append(score)
    return s1, s2, np.asarray(scores, dtype=np.float64)
