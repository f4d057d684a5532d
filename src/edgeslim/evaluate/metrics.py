"""Task metrics: top-1 ``accuracy`` and ``top5`` for classifiers, ``agreement`` (top-1 agreement with
the baseline model, which needs no labels), and fidelity and ranking metrics for models
whose output is a vector, not a class.

:data:`METRICS` names the ``(outputs, targets) -> float`` metrics a recipe can ask for (higher is
better, as ``Task.metric`` wants). ``cosine`` compares a compressed encoder's embeddings with the fp32 model's (higher is better,
so it fits ``Task.metric``); ``sqnr_db`` measures the same drift in decibels; ``spearman`` with
``pair_scores`` scores an encoder against human similarity judgements (STS-style CSVs).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from edgeslim.errors import DataError

__all__ = ["METRICS", "VS_BASELINE", "accuracy", "agreement", "cosine", "cosine_min", "metric_resolution", "pair_scores",
           "row_cosines", "spearman", "sqnr_db", "top5"]

_EPS = 1e-12


def _array(a: Any, name: str) -> np.ndarray:
    """float64 numpy view of a torch tensor, array or nested list."""
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        t = a.detach().cpu()
        try:
            a = t.numpy()
        except TypeError:  # bfloat16 has no numpy dtype
            a = t.float().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        raise DataError(f"{name} is empty")
    return arr


def _rows(outputs: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _array(outputs, "outputs"), _array(targets, "targets")
    if x.shape != y.shape:
        raise DataError(f"outputs of shape {x.shape} and targets of shape {y.shape} differ")
    # One vector per row: a 1-D input is a single vector, higher ranks are flattened per sample.
    if x.ndim == 1:
        return x[None, :], y[None, :]
    return x.reshape(len(x), -1), y.reshape(len(y), -1)


def row_cosines(outputs: Any, targets: Any) -> np.ndarray:
    """Cosine similarity of each row of ``outputs`` with the same row of ``targets``.

    A zero row has cosine 0 with anything (there is no direction to compare).
    """
    x, y = _rows(outputs, targets)
    dots = np.einsum("ij,ij->i", x, y)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return dots / np.maximum(norms, _EPS)


def cosine(outputs: Any, targets: Any) -> float:
    """Mean row-wise cosine similarity in [-1, 1] (accepts torch tensors or numpy arrays)."""
    return float(row_cosines(outputs, targets).mean())


def cosine_min(outputs: Any, targets: Any) -> float:
    """Worst row-wise cosine similarity: catches a few badly-encoded inputs that a mean hides."""
    return float(row_cosines(outputs, targets).min())


def accuracy(outputs: Any, targets: Any) -> float:
    """Top-1 accuracy as a fraction in [0, 1]: ``outputs`` (N, classes) scores, ``targets`` (N,) labels."""
    import torch  # the Task hands torch tensors; kept out of this module's imports

    outputs, targets = torch.as_tensor(outputs), torch.as_tensor(targets)
    if len(targets) == 0:
        raise DataError("evaluation set is empty")
    return float((outputs.argmax(dim=-1) == targets).double().mean())


def top5(outputs: Any, targets: Any) -> float:
    """Top-5 accuracy: the fraction of samples whose label is among the 5 highest scores (among all
    of them when there are fewer than 5 classes)."""
    import torch

    outputs, targets = torch.as_tensor(outputs), torch.as_tensor(targets)
    if len(targets) == 0:
        raise DataError("evaluation set is empty")
    if outputs.ndim != 2 or targets.ndim != 1 or len(outputs) != len(targets):
        raise DataError(f"top5 needs (N, classes) scores and (N,) labels, got {tuple(outputs.shape)} and "
                        f"{tuple(targets.shape)}")
    best = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
    return float((best == targets[:, None]).any(dim=1).double().mean())


def agreement(outputs: Any, reference: Any) -> float:
    """Top-1 agreement with a reference model: the fraction of samples whose highest-scoring class
    is the reference's. ``reference`` is that model's ``(N, classes)`` scores or its ``(N,)``
    predicted classes. Needs no labels: it measures fidelity to the original model, not accuracy."""
    import torch

    outputs, reference = torch.as_tensor(outputs), torch.as_tensor(reference)
    if len(outputs) == 0:
        raise DataError("evaluation set is empty")
    ref = reference.argmax(dim=-1) if reference.shape == outputs.shape else reference
    if outputs.ndim != 2 or ref.shape != outputs.shape[:1]:
        raise DataError(f"agreement needs (N, classes) scores and a reference of the same shape or (N,) "
                        f"classes, got {tuple(outputs.shape)} and {tuple(reference.shape)}")
    return float((outputs.argmax(dim=-1) == ref).double().mean())


# Metrics by recipe name. "cosine": mean cosine similarity of output vectors to the targets (for an
# embedding model, targets are the fp32 model's own embeddings: fidelity of the compressed model).
METRICS: dict[str, Callable[[Any, Any], float]] = {"accuracy": accuracy, "top5": top5, "cosine": cosine,
                                                   "agreement": agreement}
# Metrics whose reference is the baseline model's outputs on the same samples, not the data's
# targets: the pipeline hands every stage's outputs to them with the baseline stage's outputs.
VS_BASELINE: frozenset[str] = frozenset({"agreement"})


# Metrics whose value is the fraction of samples that pass (one sample moves them by 1/n).
COUNTING_METRICS: tuple[Callable[[Any, Any], float], ...] = (accuracy,)


def metric_resolution(metric: Callable[[Any, Any], float], samples: int) -> float | None:
    """The smallest change of ``metric`` that one of ``samples`` samples can make: ``1 / samples``
    for a metric that counts samples (:data:`COUNTING_METRICS`), None for a continuous one (cosine).
    A budget below it cannot be told apart from no drop at all on that many samples."""
    return 1.0 / samples if metric in COUNTING_METRICS and samples > 0 else None


def sqnr_db(reference: Any, actual: Any) -> float:
    """Signal-to-quantization-noise ratio ``20*log10(||x|| / ||x - y||)`` in dB; ``inf`` when equal."""
    x, y = _array(reference, "reference"), _array(actual, "actual")
    if x.shape != y.shape:
        raise DataError(f"reference of shape {x.shape} and actual of shape {y.shape} differ")
    noise = float(np.linalg.norm(x - y))
    if noise == 0.0:
        return math.inf
    signal = float(np.linalg.norm(x))
    return -math.inf if signal == 0.0 else 20.0 * math.log10(signal / noise)


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start index of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks (ties handled).

    NaN when either input is constant (its ranks have no variance), as in scipy.
    """
    x, y = _array(a, "a").ravel(), _array(b, "b").ravel()
    if len(x) != len(y):
        raise DataError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise DataError(f"spearman needs at least 2 pairs, got {len(x)}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise DataError("spearman inputs contain NaN")
    try:
        from scipy.stats import rankdata
    except ImportError:  # scipy is optional; the numpy ranking gives the same result
        rankdata = _average_ranks
    rx, ry = np.asarray(rankdata(x), dtype=np.float64), np.asarray(rankdata(y), dtype=np.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return math.nan if denom == 0.0 else float(rx @ ry) / denom


def pair_scores(encode_fn: Callable[[list[str]], Any], s1: Sequence[str], s2: Sequence[str]) -> np.ndarray:
    """Cosine similarity of ``encode_fn(s1)[i]`` and ``encode_fn(s2)[i]`` for every pair ``i``.

    ``encode_fn`` maps a list of sentences to an ``(N, D)`` array or tensor of embeddings; use
    ``spearman(pair_scores(...), gold)`` to score an encoder on a scored-pairs CSV.
    """
    s1, s2 = list(s1), list(s2)
    if len(s1) != len(s2):
        raise DataError(f"pair_scores needs as many first as second sentences, got {len(s1)} and {len(s2)}")
    if not s1:
        raise DataError("pair_scores got no sentence pairs")
    e1, e2 = encode_fn(s1), encode_fn(s2)
    a, b = _array(e1, "embeddings of sentence1"), _array(e2, "embeddings of sentence2")
    if len(a) != len(s1) or len(b) != len(s2):
        raise DataError(f"encode_fn returned {len(a)} and {len(b)} embeddings for {len(s1)} pairs")
    return row_cosines(a, b)
