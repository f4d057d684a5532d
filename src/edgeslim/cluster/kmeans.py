"""Weight sharing by per-layer k-means (Deep Compression, Han et al. 2016, section 3).

Each layer's nonzero weights are clustered into k = 2^bits shared values (its codebook); pruned
zeros stay zero and are not clustered. Centroids start LINEARLY spaced between the layer's min and
max weight: Han et al. (section 3.2, Fig. 4) found it beats random and density-based initialisation
because it keeps a few large weights, which matter most, as centroids of their own.

Fine-tuning keeps the sharing: the layer's weight becomes ``W = where(mask, codebook[index], 0)``
through a :mod:`torch.nn.utils.parametrize` parametrization whose trainable tensor is the (k,)
codebook, so autograd sums the gradients of all weights of a cluster into its centroid (Han et al.
eq. 3). :func:`finalize` removes the parametrizations: the weights are then exactly codebook values
in a plain Linear/Conv module that exports to ONNX like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from edgeslim.errors import ConfigError, ModelError

MIN_BITS, MAX_BITS = 1, 8
CLUSTERABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_bits(bits: object, where: str = "bits") -> int:
    """``bits`` as an int in 1..8 (codebooks of 2 to 256 entries); ConfigError naming ``where``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{where}: must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def kmeans_1d(values: np.ndarray, k: int, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars with linear initialisation; returns (centroids (k,) float64 sorted,
    labels (n,) int64).

    In 1-D the clusters of sorted centroids are intervals split at the midpoints, so assignment is
    one ``searchsorted``; the centroids stay sorted (an empty cluster keeps its value, which lies
    between its neighbours' new means). Deterministic: no randomness anywhere.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if k < 1:
        raise ConfigError(f"k: must be >= 1, got {k}")
    if len(v) == 0:
        return np.zeros(k), np.zeros(0, dtype=np.int64)
    centroids = np.linspace(v.min(), v.max(), k)  # linear init (Han et al. 2016, 3.2)
    labels = None
    for _ in range(max_iter):
        new = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, v, side="right")  # (n,) nearest
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=v, minlength=k)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    return centroids, labels.astype(np.int64)


@dataclass(frozen=True)
class Clustered:
    """One layer's shared weights: ``W = where(mask, codebook[index], 0)``."""

    codebook: torch.Tensor  # (k,) float32
    index: torch.Tensor  # weight's shape, int64 in [0, k)
    mask: torch.Tensor  # weight's shape, bool: True where the weight is kept (nonzero)

    def weight(self) -> torch.Tensor:
        return torch.where(self.mask, self.codebook[self.index], torch.zeros((), dtype=self.codebook.dtype))


def cluster_tensor(weight: torch.Tensor, bits: int, name: str = "weight") -> Clustered:
    """k-means (k = 2^bits, linear init) over the nonzero entries of ``weight``; zeros stay zero."""
    bits = check_bits(bits)
    if weight.dtype != torch.float32:
        raise ModelError(f"{name}: clustering needs float32 weights, got {weight.dtype}")
    w = weight.detach().cpu()
    if not torch.isfinite(w).all():
        raise ModelError(f"{name}: weight holds NaN or infinite values")
    mask = w != 0
    centroids, labels = kmeans_1d(w[mask].numpy(), 2**bits)
    index = torch.zeros(w.shape, dtype=torch.int64)
    index[mask] = torch.from_numpy(labels)
    return Clustered(torch.from_numpy(centroids.astype(np.float32)), index, mask)


class SharedWeight(nn.Module):
    """Parametrization ``codebook (k,) -> W = where(mask, codebook[index], 0)`` (weight's shape).

    The backward of the gather adds the gradients of all weights sharing a centroid (Han et al.
    2016, eq. 3: dL/dC_k = sum_{i,j} dL/dW_ij 1(I_ij = k)); pruned entries get no gradient.
    """

    def __init__(self, clustered: Clustered) -> None:
        super().__init__()
        self.register_buffer("index", clustered.index.clone())
        self.register_buffer("mask", clustered.mask.clone())
        self._start = clustered.codebook.clone()

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, codebook[self.index], torch.zeros((), dtype=codebook.dtype))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - the codebook is k-means'
        return self._start.clone()


def clusterable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv modules of ``model`` by qualified name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CLUSTERABLE)}


def share_weights(model: nn.Module, bits: dict[str, int]) -> dict[str, Clustered]:
    """Cluster each named layer's weight in place (k = 2^bits[name]) and attach the shared-weight
    parametrization; the layer's only trainable weight tensor is then its codebook."""
    layers = clusterable_layers(model)
    result = {}
    for name, b in bits.items():
        if name not in layers:
            raise ConfigError(f"layers: {name!r} is not a Linear/Conv module of {type(model).__name__}")
        module = layers[name]
        if parametrize.is_parametrized(module, "weight"):
            raise ModelError(f"{name}: weight is already parametrized")
        clustered = cluster_tensor(module.weight, b, name=f"{name}.weight")
        parametrize.register_parametrization(module, "weight", SharedWeight(clustered))
        result[name] = clustered
    return result


def codebook(model: nn.Module, name: str) -> torch.Tensor:
    """The trainable (k,) codebook of a layer clustered by :func:`share_weights`."""
    return dict(model.named_modules())[name].parametrizations.weight.original


def finalize(model: nn.Module) -> nn.Module:
    """Replace every shared-weight parametrization by the plain weight it computes (exactly the
    codebook values and zeros); returns ``model``, now made of standard modules only."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, SharedWeight) for p in module.parametrizations.weight
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            # the removal reuses the codebook's Parameter object for the weight: drop its (k,)
            # gradient, which no longer fits the weight's shape (torch.export refuses it)
            module.weight.grad = None
    return model
