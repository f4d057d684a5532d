"""Range observers: they watch tensors during calibration and keep only a summary.

Summaries are a running min/max or a fixed-size histogram (re-binned when the range grows),
never the tensors themselves, so calibration memory does not grow with the calibration set.
Each observer turns its summary into a range ``(lo, hi)``; ``activation_params`` in
``lower.py`` maps that range to a scale and zero point. Per-channel observers (``axis``) keep
one summary per channel and return arrays.

Which observer, with its parameters, is a small frozen value: ``MinMax()``, ``MovingAverage()``,
``Percentile(99.99)``, ``MSE()``, ``KL()``; ``spec.build(axis=..., dtype=..., symmetric=...)``
makes a fresh observer for one tensor. Recipes spell the choice as a name plus loose fields
(``observer: percentile``, ``percentile: 99.9``); :func:`observer_spec` turns that spelling into
the value (``PTQInt8Config.activation_observer`` does it for a config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import numpy as np

from edgeslim.errors import ConfigError

BINS = 2048


def _per_channel(x: np.ndarray, axis: int | None) -> np.ndarray:
    """``x`` as (channels, values) for per-channel statistics, or (1, values) per tensor."""
    if axis is None:
        return x.reshape(1, -1)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _row_range(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of each row of ``_per_channel``'s (channels, values) view, as float64."""
    return rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)


class MinMaxObserver:
    """Running minimum and maximum of everything seen."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        lo, hi = _row_range(_per_channel(np.asarray(x, dtype=np.float32), self.axis))
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def range(self) -> tuple:
        if self.lo is None:
            return 0.0, 0.0
        if self.axis is None:
            return float(self.lo[0]), float(self.hi[0])
        return self.lo.copy(), self.hi.copy()


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (less sensitive to one outlier batch)."""

    def __init__(self, axis: int | None = None, momentum: float = 0.9) -> None:
        super().__init__(axis)
        self.momentum = momentum

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        lo, hi = _row_range(_per_channel(np.asarray(x, dtype=np.float32), self.axis))
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi


class HistogramObserver:
    """A fixed-size histogram per channel over a range that grows as new extremes arrive.

    Subclasses choose the range from the histogram (percentile, MSE, KL). When a batch widens
    the range, old counts are re-binned by their bin centres into the wider edges.
    """

    def __init__(self, axis: int | None = None, bins: int = BINS, dtype: str = "int8", symmetric: bool = False) -> None:
        self.axis, self.bins, self.dtype, self.symmetric = axis, bins, dtype, symmetric
        self.hist: np.ndarray | None = None  # (channels, bins)
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if not x.size:
            return
        rows = _per_channel(np.asarray(x, dtype=np.float32), self.axis)
        lo, hi = _row_range(rows)
        if self.hist is None:
            self.lo, self.hi = lo, np.maximum(hi, lo + 1e-12)
            self.hist = np.zeros((len(rows), self.bins))
        elif np.any(lo < self.lo) or np.any(hi > self.hi):
            new_lo, new_hi = np.minimum(lo, self.lo), np.maximum(hi, self.hi)
            for c in range(len(rows)):
                centres = self.lo[c] + (np.arange(self.bins) + 0.5) * (self.hi[c] - self.lo[c]) / self.bins
                self.hist[c] = np.histogram(centres, self.bins, (new_lo[c], new_hi[c]), weights=self.hist[c])[0]
            self.lo, self.hi = new_lo, new_hi
        for c, row in enumerate(rows):
            self.hist[c] += np.histogram(row, self.bins, (self.lo[c], self.hi[c]))[0]

    def _centres(self, c: int) -> np.ndarray:
        return self.lo[c] + (np.arange(self.bins) + 0.5) * (self.hi[c] - self.lo[c]) / self.bins

    def _choose(self, c: int) -> tuple[float, float]:
        raise NotImplementedError

    def range(self) -> tuple:
        if self.hist is None:
            return 0.0, 0.0
        pairs = [self._choose(c) for c in range(len(self.hist))]
        if self.axis is None:
            return pairs[0]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


class PercentileObserver(HistogramObserver):
    """Clip to the ``percentile`` (upper) and ``100 - percentile`` (lower) quantiles of the histogram."""

    def __init__(self, axis: int | None = None, percentile: float = 99.99, **kw) -> None:
        super().__init__(axis, **kw)
        self.percentile = percentile

    def _choose(self, c: int) -> tuple[float, float]:
        cdf = np.cumsum(self.hist[c]) / max(self.hist[c].sum(), 1)
        width = (self.hi[c] - self.lo[c]) / self.bins
        lo_bin = int(np.searchsorted(cdf, (100 - self.percentile) / 100))
        hi_bin = int(np.searchsorted(cdf, self.percentile / 100))
        lo = self.lo[c] + lo_bin * width
        hi = self.lo[c] + (hi_bin + 1) * width
        # keep exact zeros of a non-negative tensor (ReLU outputs) at the bottom
        return (float(min(lo, 0.0) if self.lo[c] < 0 else self.lo[c]), float(min(hi, self.hi[c])))


def _qrange(dtype: str, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return (-127, 127) if dtype == "int8" else (0, 255)
    return (-128, 127) if dtype == "int8" else (0, 255)


def expected_mse(centres: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, dtype: str, symmetric: bool) -> np.ndarray:
    """Expected squared quantization error of a histogram for each candidate range (vectorised).

    Uses the same affine arithmetic as the lowering: scale = (hi - lo) / (qmax - qmin), values
    rounded to the grid and clipped to it; error is measured at bin centres, weighted by counts.
    """
    qmin, qmax = _qrange(dtype, symmetric)
    lo, hi = np.minimum(lo, 0.0)[:, None], np.maximum(hi, 0.0)[:, None]
    if symmetric:
        bound = np.maximum(-lo, hi)
        scale = np.maximum(bound / qmax, 1e-12)
        zp = np.zeros_like(scale)
    else:
        scale = np.maximum((hi - lo) / (qmax - qmin), 1e-12)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    q = np.clip(np.round(centres[None, :] / scale) + zp, qmin, qmax)
    err = (q - zp) * scale - centres[None, :]
    return (err**2 * counts[None, :]).sum(axis=1)


class MSEObserver(HistogramObserver):
    """Range minimising the expected quantization MSE over the histogram (grid search on clipping)."""

    def __init__(self, axis: int | None = None, steps: int = 100, **kw) -> None:
        super().__init__(axis, **kw)
        self.steps = steps

    def _choose(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.lo[c]), float(self.hi[c])
        alphas = np.linspace(1.0 / self.steps, 1.0, self.steps)
        cand_lo = np.minimum(lo, 0.0) * alphas
        cand_hi = np.maximum(hi, 0.0) * alphas
        mse = expected_mse(self._centres(c), self.hist[c], cand_lo, cand_hi, self.dtype, self.symmetric)
        best = int(np.argmin(mse))
        return float(cand_lo[best] if lo < 0 else lo), float(cand_hi[best])


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (the TensorRT method, Migacz 2017) on the magnitude histogram.

    For each candidate threshold t, P is the histogram of |x| clipped at t (outliers added to the
    last bin) and Q is P merged into as many bins as there are quantization levels and expanded
    back; the t minimising KL(P || Q) is chosen. Signed tensors get the symmetric range (-t, t),
    non-negative ones (0, t).
    """

    def _choose(self, c: int) -> tuple[float, float]:
        lo, hi = float(self.lo[c]), float(self.hi[c])
        bound = max(abs(lo), abs(hi), 1e-12)
        centres = self._centres(c)
        mag = np.histogram(np.abs(centres), self.bins, (0.0, bound), weights=self.hist[c])[0]
        # Zeros are exact under any threshold, so they must not steer the choice: a ReLU output or
        # an MNIST image is mostly zeros, and with them counted KL picks a uselessly small range.
        mag[0] = 0
        levels = 128 if lo < 0 else 256  # magnitude levels available for this sign pattern
        best_t, best_kl = bound, np.inf
        for i in range(levels, self.bins + 1, max(1, (self.bins - levels) // 256)):
            p = mag[:i].astype(np.float64).copy()
            p[-1] += mag[i:].sum()
            if p.sum() == 0:
                continue
            chunks = np.array_split(mag[:i].astype(np.float64), levels)
            q = np.concatenate([
                np.where(ch > 0, ch.sum() / max((ch > 0).sum(), 1), 0.0) for ch in chunks
            ])
            p, q = p / p.sum(), q / max(q.sum(), 1e-12)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_t = kl, (i / self.bins) * bound
        return (-best_t if lo < 0 else max(lo, 0.0), min(best_t, hi) if lo >= 0 else best_t)


# ----------------------------------------------------------------------------- observer values
@dataclass(frozen=True)
class MinMax:
    """Running min and max: the range covers every calibration value (the default)."""

    name: ClassVar[str] = "minmax"

    def build(self, axis: int | None = None, dtype: str = "int8", symmetric: bool = False) -> MinMaxObserver:
        """A fresh observer for one tensor (``dtype``/``symmetric`` do not change a min/max)."""
        return MinMaxObserver(axis)


@dataclass(frozen=True)
class MovingAverage:
    """Exponential moving average of each batch's min and max (momentum 0.9 on the past)."""

    name: ClassVar[str] = "moving_average"

    def build(self, axis: int | None = None, dtype: str = "int8", symmetric: bool = False) -> MovingAverageMinMaxObserver:
        """A fresh observer for one tensor (``dtype``/``symmetric`` do not change the averages)."""
        return MovingAverageMinMaxObserver(axis)


@dataclass(frozen=True)
class Percentile:
    """Clip to the ``percentile`` and ``100 - percentile`` quantiles of the values seen."""

    percentile: float = 99.99
    name: ClassVar[str] = "percentile"

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile: must be in (50, 100], got {self.percentile}")

    def build(self, axis: int | None = None, dtype: str = "int8", symmetric: bool = False) -> PercentileObserver:
        """A fresh observer for one tensor, its histogram sized for ``dtype``."""
        return PercentileObserver(axis, percentile=self.percentile, dtype=dtype, symmetric=symmetric)


@dataclass(frozen=True)
class MSE:
    """The clipping range of least expected quantization error on the target integer grid."""

    name: ClassVar[str] = "mse"

    def build(self, axis: int | None = None, dtype: str = "int8", symmetric: bool = False) -> MSEObserver:
        """A fresh observer for one tensor, scoring ranges on the ``dtype``/``symmetric`` grid."""
        return MSEObserver(axis, dtype=dtype, symmetric=symmetric)


@dataclass(frozen=True)
class KL:
    """The threshold of least KL divergence between the values and their quantized histogram (TensorRT)."""

    name: ClassVar[str] = "kl"

    def build(self, axis: int | None = None, dtype: str = "int8", symmetric: bool = False) -> EntropyObserver:
        """A fresh observer for one tensor."""
        return EntropyObserver(axis, dtype=dtype, symmetric=symmetric)


ActivationObserver = Union[MinMax, MovingAverage, Percentile, MSE, KL]
OBSERVER_VALUES = (MinMax, MovingAverage, Percentile, MSE, KL)
OBSERVER_NAMES: dict[str, type] = {spec.name: spec for spec in OBSERVER_VALUES}


def observer_spec(name: str, percentile: float = 99.99) -> ActivationObserver:
    """The observer value a recipe spells by name: ``"percentile"`` with ``percentile=99.9`` is
    ``Percentile(99.9)``; the other names take no parameter (``percentile`` is ignored for them)."""
    if name not in OBSERVER_NAMES:
        raise ConfigError(f"observer: {name!r} is not one of {', '.join(map(repr, OBSERVER_NAMES))}")
    return Percentile(percentile) if name == "percentile" else OBSERVER_NAMES[name]()


def make_observer(name: str, *, axis: int | None = None, dtype: str = "int8", symmetric: bool = False,
                  percentile: float = 99.99):
    """An observer by recipe name, configured for the target integer type (``observer_spec(...).build``)."""
    return observer_spec(name, percentile).build(axis=axis, dtype=dtype, symmetric=symmetric)
