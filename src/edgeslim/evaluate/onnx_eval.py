"""The task metric of a deployable graph, computed from ONNX Runtime's outputs.

This is the number every stage of a run reports: the graph that ships, not the PyTorch model it
came from, is what is measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from edgeslim.errors import NumericalError

if TYPE_CHECKING:  # edgeslim.task imports this package's metrics
    from edgeslim.task import Task

__all__ = ["evaluate_onnx"]


def evaluate_onnx(model: onnx.ModelProto | Path, task: Task, where: str = "model") -> float:
    """The task metric of the deployable graph, computed from ONNX Runtime outputs; NumericalError
    naming ``where`` if an output holds NaN/Inf (a metric of such outputs means nothing)."""
    import torch

    from edgeslim.runtime import make_session, run

    session = make_session(model, threads=os.cpu_count() or 1)
    outs, targets = [], []
    for i, (x, y) in enumerate(task.evaluation_batches()):
        out = run(session, x)[0]
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            raise NumericalError(f"{where}: ONNX Runtime output holds NaN/Inf on evaluation batch {i + 1}")
        outs.append(out)
        targets.append(y)
    value = float(task.metric(torch.from_numpy(np.concatenate(outs)), torch.from_numpy(np.concatenate(targets))))
    if not np.isfinite(value):
        raise NumericalError(f"{where}: the metric {task.metric_name} is {value}")
    return value
