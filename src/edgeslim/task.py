"""What a compression run needs, as one small object: model, inputs, data and a metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import numpy as np
import onnx
import torch
from torch import nn

from edgeslim.errors import DataError, ModelError

# A data set is a torch DataLoader yielding (x, y) batches, or an (X, y) pair of arrays/tensors.
Data = Union[torch.utils.data.DataLoader, tuple[Any, Any]]
Metric = Callable[[torch.Tensor, torch.Tensor], float]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1]."""
    outputs, targets = torch.as_tensor(outputs), torch.as_tensor(targets)
    if len(targets) == 0:
        raise DataError("evaluation set is empty")
    return float((outputs.argmax(dim=-1) == targets).double().mean())


METRICS: dict[str, Metric] = {"accuracy": accuracy}


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def iter_batches(data: Data, batch_size: int = 256, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(x, y)`` numpy batches from a DataLoader or an ``(X, y)`` pair, at most ``limit`` samples."""
    seen = 0
    if isinstance(data, torch.utils.data.DataLoader):
        for batch in data:
            x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
            x = _to_numpy(x).astype(np.float32, copy=False)
            y = None if y is None else _to_numpy(y)
            if limit is not None and seen + len(x) > limit:
                x, y = x[: limit - seen], None if y is None else y[: limit - seen]
            if len(x):
                yield x, y
            seen += len(x)
            if limit is not None and seen >= limit:
                return
        return
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"data must be a DataLoader or an (X, y) pair, got {type(data).__name__}")
    xs, ys = _to_numpy(data[0]).astype(np.float32, copy=False), data[1]
    ys = None if ys is None else _to_numpy(ys)
    n = len(xs) if limit is None else min(limit, len(xs))
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        yield xs[i:j], None if ys is None else ys[i:j]


def count_samples(data: Data) -> int:
    """Number of samples in a data set (0 when empty)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else sum(len(x) for x, _ in iter_batches(data))
    return len(data[0]) if isinstance(data, (tuple, list)) and len(data) == 2 else 0


@dataclass
class Task:
    """Everything a run needs: a model, example inputs, calibration/evaluation data and a metric.

    ``metric`` is any ``(outputs, targets) -> float`` where higher is better (accuracy by default).
    ``train`` is optional data for techniques that fine-tune.
    """

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    calibration: Data
    evaluation: Data
    metric: Metric = accuracy
    metric_name: str = "accuracy"
    train: Data | None = None
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.example_inputs, torch.Tensor):
            self.example_inputs = (self.example_inputs,)
        self.example_inputs = tuple(torch.as_tensor(x) for x in self.example_inputs)
        if count_samples(self.calibration) == 0:
            raise DataError("calibration set is empty: give at least one sample to calibrate on")
        if count_samples(self.evaluation) == 0:
            raise DataError("evaluation set is empty")
        check_forward(self.model, self.example_inputs)

    def calibration_batches(self, batch_size: int = 32, limit: int | None = None):
        return iter_batches(self.calibration, batch_size, limit)

    def evaluation_batches(self):
        return iter_batches(self.evaluation, self.eval_batch_size)


def check_forward(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Run the model once on the example inputs; ModelError naming the shapes if it fails."""
    shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as err:  # any failure inside user code is a model error
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"model forward failed on example input of shape {shapes}: {first}") from None
    finally:
        model.train(was_training)


@dataclass
class ModelArtifact:
    """A model between steps: the PyTorch module and, once lowered, the ONNX graph that deploys it.

    A technique that only changes weights returns a new ``torch`` module and ``onnx=None`` (the
    pipeline exports it); a lowering technique (int8 PTQ) sets ``onnx`` to the graph it built.
    """

    torch: nn.Module
    onnx: onnx.ModelProto | None = None
    notes: dict[str, Any] = field(default_factory=dict)
