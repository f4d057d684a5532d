"""Calibration: run the float ONNX graph on ONNX Runtime and observe chosen intermediate tensors."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from edgeslim.errors import DataError, NumericalError
from edgeslim.quantize.observers import make_observer
from edgeslim.runtime.ort import input_feed
from edgeslim.task import batch_len


def collect_ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    batches: Iterable[np.ndarray | tuple[np.ndarray, ...]],
    *,
    observer: str = "minmax",
    observer_options: dict | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict[str, tuple[float, float]]:
    """Observe ``tensors`` of ``model`` over calibration ``batches``; return ``{name: (lo, hi)}``.

    ``observer`` names the range estimator (minmax, moving_average, percentile, mse, kl);
    ``observer_options`` go to it (dtype, symmetric, percentile).

    Every observed tensor becomes an extra graph output of a copy of the model; graph
    optimizations are disabled so that the tensor names of the input graph still exist.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    wanted = {name: i for i, name in enumerate(out_names) if name in set(tensors)}
    observers = {name: make_observer(observer, **(observer_options or {})) for name in wanted}

    seen = 0
    with Progress(
        TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
        disable=not progress, transient=True,
    ) as bar:
        task = bar.add_task("calibrate", total=total)
        for x in batches:
            outs = session.run(None, input_feed(session, x))
            for name, i in wanted.items():
                observers[name].update(outs[i])
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
