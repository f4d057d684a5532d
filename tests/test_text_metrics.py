"""Bundled sentences, tokenization, the scored-pairs CSV loader and the embedding metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim.data.text import load_scored_pairs, load_sentences, tokenize
from edgeslim.errors import ConfigError, DataError
from edgeslim.evaluate import cosine, cosine_min, pair_scores, spearman, sqnr_db
from edgeslim.evaluate.metrics import _average_ranks


# ------------------------------------------------------------------------------ sentences
def test_bundled_sentences_are_many_unique_and_varied() -> None:
    sentences = load_sentences()
    assert len(sentences) >= 300
    assert len(set(sentences)) == len(sentences)
    assert all(s and s == s.strip() for s in sentences)
    assert sum(s.endswith("?") for s in sentences) >= 30  # questions
    assert sum(len(s.split()) >= 45 for s in sentences) >= 5  # long enough to pass 60 tokens
    assert sum(len(s.split()) <= 4 for s in sentences) >= 5  # very short ones too


class _FakeTokenizer:
    """Word-level stand-in for a HF tokenizer: ids are word lengths, int32 like some tokenizers."""

    def __call__(self, sentences, *, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "np"
        ids = np.zeros((len(sentences), max_length), dtype=np.int32)
        for row, s in enumerate(sentences):
            words = [len(w) for w in s.split()][:max_length]
            ids[row, : len(words)] = words
        return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}


def test_tokenize_returns_int64_fixed_length() -> None:
    ids, mask = tokenize(_FakeTokenizer(), ["a bb ccc", "dddd"], seq_len=5)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, 5)
    assert ids[0].tolist() == [1, 2, 3, 0, 0] and mask[1].tolist() == [1, 0, 0, 0, 0]


@pytest.mark.parametrize("seq_len", [1, 0, 2.5, True])
def test_tokenize_rejects_bad_seq_len(seq_len) -> None:
    with pytest.raises(ConfigError, match="seq_len"):
        tokenize(_FakeTokenizer(), ["hello"], seq_len=seq_len)


def test_tokenize_rejects_empty_and_non_strings() -> None:
    with pytest.raises(DataError, match="no sentences"):
        tokenize(_FakeTokenizer(), [], seq_len=8)
    with pytest.raises(DataError, match="sentence 1 is a int"):
        tokenize(_FakeTokenizer(), ["ok", 3], seq_len=8)


# ----------------------------------------------------------------------------- CSV loader
def test_scored_pairs_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    # columns in another order, an extra column, a quoted comma and a BOM as spreadsheets write it
    path.write_text(
        "\ufeffid,score,sentence2,sentence1\n"
        '1,4.5,Someone plays the guitar.,A man is playing a guitar.\n'
        '2,0.25,"Prices fell, again.",A cat sleeps.\n',
        encoding="utf-8",
    )
    s1, s2, scores = load_scored_pairs(path)
    assert s1 == ["A man is playing a guitar.", "A cat sleeps."]
    assert s2 == ["Someone plays the guitar.", "Prices fell, again."]
    assert scores.dtype == np.float64 and scores.tolist() == [4.5, 0.25]


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("sentence1,sentence2\na,b\n", r"bad\.csv:1: missing column\(s\) score"),
        ("sentence1,sentence2,score\na,b,1\nc,d,high\n", r"bad\.csv:3: score 'high' is not a number"),
        ("sentence1,sentence2,score\na,b,nan\n", r"bad\.csv:2: score 'nan' is not finite"),
        ("sentence1,sentence2,score\na,b\n", r"bad\.csv:2: row has fewer cells"),
        ("sentence1,sentence2,score\n,b,1\n", r"bad\.csv:2: empty sentence"),
        ("sentence1,sentence2,score\n", r"bad\.csv: no data rows"),
        ("", r"bad\.csv:1: missing column\(s\) sentence1, sentence2, score .*header is empty"),
    ],
)
def test_scored_pairs_bad_files(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        load_scored_pairs(path)
    assert "\n" not in str(info.value)


def test_scored_pairs_missing_and_binary_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found: .*nope\.csv"):
        load_scored_pairs(tmp_path / "nope.csv")
    binary = tmp_path / "latin1.csv"
    binary.write_bytes("sentence1,sentence2,score\ncaf\xe9,b,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: not UTF-8"):
        load_scored_pairs(binary)


# -------------------------------------------------------------------------------- metrics
def test_cosine_identical_orthogonal_opposite() -> None:
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], dtype=np.float32)
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cosine(np.eye(2), np.eye(2)[::-1]) == pytest.approx(0.0, abs=1e-12)
    assert cosine(x, -x) == pytest.approx(-1.0, abs=1e-12)
    # scale does not matter, torch tensors are accepted, a zero row counts as 0
    assert cosine(torch.tensor(x), torch.tensor(3 * x)) == pytest.approx(1.0, abs=1e-6)
    assert cosine(np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)


def test_cosine_min_finds_worst_row() -> None:
    out = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ref = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert cosine_min(out, ref) == pytest.approx(0.0, abs=1e-12)
    assert cosine(out, ref) == pytest.approx((1.0 + math.sqrt(0.5) + 0.0) / 3)


def test_metrics_reject_shape_mismatch() -> None:
    with pytest.raises(DataError, match=r"\(2, 3\).*\(2, 4\)"):
        cosine(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(DataError, match="reference of shape"):
        sqnr_db(np.ones(3), np.ones(4))


def test_sqnr_db() -> None:
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, np.array([3.0, 4.5])) == pytest.approx(20.0)  # ||x|| = 5, ||noise|| = 0.5
    assert sqnr_db(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0, abs=1e-4)


def test_spearman_hand_value_and_scipy() -> None:
    a, b = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]
    # ranks of b with ties averaged: [1, 2, 3.5, 5, 3.5] -> rho = 8 / sqrt(10 * 9.5)
    assert spearman(a, b) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman(a, a[::-1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 40), rng.normal(size=40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.array_equal(_average_ranks(x.astype(float)), stats.rankdata(x))


def test_spearman_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="equal lengths, got 3 and 2"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="at least 2"):
        spearman([1], [1])


def test_pair_scores_and_spearman_on_a_csv(tmp_path: Path) -> None:
    vectors = {"up": [0.0, 1.0], "right": [1.0, 0.0], "diag": [1.0, 1.0], "down": [0.0, -1.0]}

    def encode_fn(sentences: list[str]) -> torch.Tensor:
        return torch.tensor([vectors[s] for s in sentences])

    path = tmp_path / "gold.csv"
    path.write_text("sentence1,sentence2,score\nup,up,5\nup,diag,3\nup,right,1\nup,down,0\n", encoding="utf-8")
    s1, s2, gold = load_scored_pairs(path)
    scores = pair_scores(encode_fn, s1, s2)
    assert scores == pytest.approx([1.0, math.sqrt(0.5), 0.0, -1.0])
    assert spearman(scores, gold) == pytest.approx(1.0)
    with pytest.raises(DataError, match="got 2 and 1"):
        pair_scores(encode_fn, ["up", "up"], ["up"])
