"""Calibration: run the float ONNX graph on ONNX Runtime and observe chosen intermediate tensors."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from edgeslim.errors import DataError, NumericalError
from edgeslim.quantize.observers import ActivationObserver, MinMax, observer_spec
from edgeslim.runtime.ort import input_feed
from edgeslim.runtime.probe import probe_session
from edgeslim.task import batch_len


def collect_ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[np.ndarray | tuple[np.ndarray, ...]],
    *,
    observer: str | ActivationObserver = MinMax(),
    observer_options: dict | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Observe ``tensors`` of ``model`` over calibration ``batches``; return ``{name: (lo, hi)}``.

    ``observer`` is the range estimator, a value of :mod:`edgeslim.quantize.observers`
    (``MinMax()``, ``Percentile(99.9)``, ...) or its recipe name (minmax, moving_average,
    percentile, mse, kl; then ``observer_options`` may hold ``percentile``). The other
    ``observer_options`` (axis, dtype, symmetric) configure each tensor's observer.

    The tensors are read through a probe session (:func:`edgeslim.runtime.probe.probe_session`:
    graph optimizations off, so the tensor names of the input graph still exist).
    """
    options = dict(observer_options or {})
    if isinstance(observer, str):
        observer = observer_spec(observer, options.pop("percentile", 99.99))
    session, names = probe_session(model, tensors, threads=os.cpu_count() or 1)
    observers = {name: observer.build(**options) for name in names}

    seen = 0
    with Progress(
        TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("calibrate", total=total)
        for x in batches:
            for name, out in zip(names, session.run(names, input_feed(session, x))):
                observers[name].update(out)
            seen += batch_len(x)
            bar.update(task, advance=batch_len(x))
    if seen == 0:
        raise DataError("calibration set is empty: give at least one sample to calibrate on")
    ranges = {name: obs.range() for name, obs in observers.items()}
    for name, (lo, hi) in ranges.items():
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):  # per-tensor scalars or per-channel arrays
            raise NumericalError(f"calibration: tensor {name!r} has a NaN/Inf range: the model or the "
                                 "calibration data produce NaN/Inf there")
    return ranges
