"""Range observers: they watch activations during calibration and keep only a summary.

Only summaries are kept (a running min and max here), never the activations themselves,
so calibration memory does not grow with the calibration set.
"""

from __future__ import annotations

import numpy as np


class MinMaxObserver:
    """Running minimum and maximum of everything seen (per tensor)."""

    def __init__(self) -> None:
        self.lo = np.inf
        self.hi = -np.inf

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def range(self) -> tuple[float, float]:
        if not np.isfinite(self.lo):
            return 0.0, 0.0
        return self.lo, self.hi


OBSERVERS = {"minmax": MinMaxObserver}
