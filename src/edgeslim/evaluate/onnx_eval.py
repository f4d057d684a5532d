"""The task metric of a deployable graph, computed from ONNX Runtime's outputs.

This is the number every stage of a run reports: the graph that ships, not the PyTorch model it
came from, is what is measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx

from edgeslim.errors import DataError, NumericalError

if TYPE_CHECKING:  # edgeslim.task imports this package's metrics
    from edgeslim.task import Task

__all__ = ["evaluate_onnx", "metric_value", "onnx_outputs"]


def onnx_outputs(model: onnx.ModelProto | Path, task: Task, where: str = "model") -> tuple[np.ndarray, np.ndarray | None]:
    """ONNX Runtime's (first) outputs on the task's evaluation set, and the set's targets (None when
    it has none); NumericalError naming ``where`` if an output holds NaN/Inf."""
    from edgeslim.runtime import make_session, run

    session = make_session(model, threads=os.cpu_count() or 1)
    outs, targets = [], []
    for i, (x, y) in enumerate(task.evaluation_batches()):
        out = run(session, x)[0]
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            raise NumericalError(f"{where}: ONNX Runtime output holds NaN/Inf on evaluation batch {i + 1}")
        outs.append(out)
        targets.append(y)
    labelled = [t is not None for t in targets]
    return np.concatenate(outs), np.concatenate(targets) if all(labelled) else None


def metric_value(metric: Callable, name: str, outputs: np.ndarray, targets: np.ndarray | None,
                 where: str = "model") -> float:
    """``metric(outputs, targets)`` as a float; DataError when there are no targets to compare with,
    NumericalError naming ``where`` when the value is NaN/Inf."""
    import torch

    if targets is None:
        raise DataError(f"metric {name}: the evaluation set has no targets (labels) to compare with")
    value = float(metric(torch.from_numpy(outputs), torch.from_numpy(targets)))
    if not np.isfinite(value):
        raise NumericalError(f"{where}: the metric {name} is {value}")
    return value


def evaluate_onnx(model: onnx.ModelProto | Path, task: Task, where: str = "model") -> float:
    """The task metric of the deployable graph, computed from ONNX Runtime outputs; NumericalError
    naming ``where`` if an output holds NaN/Inf (a metric of such outputs means nothing)."""
    outputs, targets = onnx_outputs(model, task, where)
    return metric_value(task.metric, task.metric_name, outputs, targets, where)
