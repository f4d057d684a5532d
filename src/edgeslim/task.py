"""What a compression run needs, as one small object: model, inputs, data and a metric."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import onnx
import torch
from torch import nn

from edgeslim.errors import ConfigError, DataError, ModelError, first_line
from edgeslim.evaluate.metrics import METRICS, accuracy  # noqa: F401  (their home; imported from here too)
from edgeslim.sparsity import Sparsity

# A data set is a torch DataLoader yielding (x, y) batches, or an (X, y) pair of arrays/tensors.
Data = Union[torch.utils.data.DataLoader, tuple[Any, Any]]
Metric = Callable[[torch.Tensor, torch.Tensor], float]


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _inputs(x: Any) -> np.ndarray | tuple[np.ndarray, ...]:
    """A model's input batch as numpy: one array, or a tuple of arrays for multi-input models."""
    if isinstance(x, (tuple, list)):
        return tuple(_as_input(v) for v in x)
    return _as_input(x)


def _as_input(v: Any) -> np.ndarray:
    a = _to_numpy(v)
    return a.astype(np.float32, copy=False) if a.dtype == np.float64 else a


def batch_len(x: np.ndarray | tuple[np.ndarray, ...]) -> int:
    """Number of samples in an input batch (single or multi-input)."""
    return len(x[0]) if isinstance(x, tuple) else len(x)


def _take(x: Any, i: int, j: int) -> Any:
    return tuple(v[i:j] for v in x) if isinstance(x, tuple) else x[i:j]


def iter_batches(data: Data, batch_size: int = 256, limit: int | None = None) -> Iterator[tuple[Any, np.ndarray | None]]:
    """Yield ``(x, y)`` numpy batches from a DataLoader or an ``(X, y)`` pair, at most ``limit`` samples.

    ``x`` is an array, or a tuple of arrays when the model takes several inputs (``X`` given as a
    tuple, e.g. token ids and attention mask).
    """
    seen = 0
    if isinstance(data, torch.utils.data.DataLoader):
        for batch in data:
            x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) and len(batch) > 1 else (batch, None)
            x, y = _inputs(x), None if y is None else _to_numpy(y)
            n = batch_len(x)
            if limit is not None and seen + n > limit:
                x, y = _take(x, 0, limit - seen), None if y is None else y[: limit - seen]
            if batch_len(x):
                yield x, y
            seen += batch_len(x)
            if limit is not None and seen >= limit:
                return
        return
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"data must be a DataLoader or an (X, y) pair, got {type(data).__name__}")
    xs, ys = _inputs(data[0]), data[1]
    ys = None if ys is None else _to_numpy(ys)
    total = batch_len(xs)
    n = total if limit is None else min(limit, total)
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        yield _take(xs, i, j), None if ys is None else ys[i:j]


def count_samples(data: Data) -> int:
    """Number of samples in a data set (0 when empty)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return len(data.dataset) if hasattr(data.dataset, "__len__") else sum(len(x) for x, _ in iter_batches(data))
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return batch_len(_inputs(data[0]))
    return 0


@dataclass
class Task:
    """Everything a run needs: a model, example inputs, calibration/evaluation data and a metric.

    ``model`` is a PyTorch module, or a float ONNX graph (an ``onnx.ModelProto`` or the path of a
    ``.onnx`` file): then only the techniques that work on graphs apply
    (:mod:`edgeslim.runtime.onnx_source`).
    ``metric`` is any ``(outputs, targets) -> float`` where higher is better (accuracy by default).
    ``extra_metrics`` names further :data:`METRICS` every stage reports beside it (``("top5",
    "agreement")``); those in ``VS_BASELINE`` (``agreement``) compare with the baseline stage's
    outputs on the same samples, the others with the targets. ``train`` is optional data for
    techniques that fine-tune.
    """

    model: nn.Module | onnx.ModelProto
    example_inputs: tuple[torch.Tensor, ...]
    calibration: Data
    evaluation: Data
    metric: Metric = accuracy
    metric_name: str = "accuracy"
    train: Data | None = None
    eval_batch_size: int = 256
    dynamic_dims: tuple[dict[int, str], ...] | None = None  # extra dynamic axes per input, e.g. ({1: "seq"},)
    input_names: tuple[str, ...] | None = None  # the ONNX inputs' names, e.g. ("input_ids", "attention_mask")
    extra_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The same checks whether the Task comes from a recipe or from Python: all before any work.
        if isinstance(self.model, (str, Path)) and str(self.model).endswith(".onnx"):
            from edgeslim.runtime.onnx_source import load_onnx_model

            self.model = load_onnx_model(self.model)
        elif isinstance(self.model, onnx.ModelProto):
            from edgeslim.runtime.onnx_source import dynamic_batch

            self.model = dynamic_batch(self.model)
        if not isinstance(self.model, (nn.Module, onnx.ModelProto)):
            raise ModelError(f"model: expected a torch.nn.Module, an onnx.ModelProto or a .onnx file path, "
                             f"got {type(self.model).__name__}")
        if isinstance(self.example_inputs, (torch.Tensor, np.ndarray)):
            self.example_inputs = (self.example_inputs,)
        if not isinstance(self.example_inputs, (tuple, list)) or not self.example_inputs:
            raise DataError(f"example_inputs: expected a tensor or a tuple of tensors, got {self.example_inputs!r:.60}")
        try:
            # contiguous: the exporter cannot keep the batch axis dynamic for a channels-last view
            self.example_inputs = tuple(torch.as_tensor(x).contiguous() for x in self.example_inputs)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"example_inputs: not tensors: {first_line(err)}") from None
        if self.input_names is not None and (
                not all(isinstance(n, str) and n for n in self.input_names)
                or len(set(self.input_names)) != len(self.input_names)
                or len(self.input_names) != len(self.example_inputs)):
            raise ConfigError(f"input_names: expected {len(self.example_inputs)} distinct names (one per example "
                              f"input), got {self.input_names!r}")
        if not callable(self.metric):
            raise ConfigError(f"metric: expected a function (outputs, targets) -> float, got {type(self.metric).__name__}")
        if not isinstance(self.extra_metrics, (list, tuple)):
            raise ConfigError(f"extra_metrics: expected a tuple of metric names, got {self.extra_metrics!r:.60}")
        self.extra_metrics = tuple(self.extra_metrics)
        bad = [m for m in self.extra_metrics if m not in METRICS or m == self.metric_name]
        if bad or len(set(self.extra_metrics)) != len(self.extra_metrics):
            raise ConfigError(f"extra_metrics: expected distinct names of {', '.join(METRICS)} other than the metric "
                              f"{self.metric_name!r}, got {bad[0] if bad else list(self.extra_metrics)!r}")
        if isinstance(self.eval_batch_size, bool) or not isinstance(self.eval_batch_size, int) \
                or not 1 <= self.eval_batch_size <= 65_536:
            raise ConfigError(f"eval_batch_size: must be an integer in [1, 65536], got {self.eval_batch_size!r}")
        for name in ("calibration", "evaluation", "train"):
            data = getattr(self, name)
            if data is not None or name != "train":
                _check_data(data, name)
        if count_samples(self.calibration) == 0:
            raise DataError("calibration set is empty: give at least one sample to calibrate on")
        if count_samples(self.evaluation) == 0:
            raise DataError("evaluation set is empty")
        if isinstance(self.model, onnx.ModelProto):
            from edgeslim.runtime.onnx_source import check_onnx_model

            check_onnx_model(self.model, [_as_input(x) for x in self.example_inputs], self.input_names)
        else:
            check_finite(self.model, "model")
            check_forward(self.model, self.example_inputs)

    @property
    def is_graph(self) -> bool:
        """True when the model was given as an ONNX graph (no PyTorch module to train or rewrite)."""
        return isinstance(self.model, onnx.ModelProto)

    def export(self, model: nn.Module) -> onnx.ModelProto:
        """Export ``model`` with this task's example inputs and dynamic axes (validated against PyTorch)."""
        from edgeslim.runtime import export_onnx

        names = list(self.input_names) if self.input_names else None
        return export_onnx(model, self.example_inputs, dynamic_dims=self.dynamic_dims, input_names=names)

    def with_targets(self, targets: np.ndarray) -> "Task":
        """This task with ``targets`` as its evaluation targets, one per evaluation sample (the
        baseline's outputs, when the metric compares with the baseline: see ``VS_BASELINE``)."""
        from dataclasses import replace

        batches = list(iter_batches(self.evaluation, self.eval_batch_size))
        xs = tuple(np.concatenate(part) for part in zip(*(x if isinstance(x, tuple) else (x,) for x, _ in batches)))
        if len(targets) != len(xs[0]):
            raise DataError(f"evaluation: {len(xs[0])} samples but {len(targets)} targets")
        return replace(self, evaluation=(xs if isinstance(batches[0][0], tuple) else xs[0], targets))

    def calibration_batches(self, batch_size: int = 32, limit: int | None = None):
        return iter_batches(self.calibration, batch_size, limit)

    def evaluation_batches(self):
        return iter_batches(self.evaluation, self.eval_batch_size)


def _check_data(data: Any, name: str) -> None:
    """A DataLoader, or an ``(X, y)`` pair of equal length with finite inputs (``y`` may be None)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"{name}: expected a DataLoader or an (X, y) pair, got {type(data).__name__}")
    try:
        xs = _inputs(data[0])
        ys = None if data[1] is None else _to_numpy(data[1])
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"{name}: X and y must be arrays or tensors: {first_line(err)}") from None
    parts = xs if isinstance(xs, tuple) else (xs,)
    for i, part in enumerate(parts):
        what = f"{name} X" + (f"[{i}]" if isinstance(xs, tuple) else "")
        if part.ndim == 0 or part.dtype == object:
            raise DataError(f"{what}: expected a numeric array with a sample axis, got dtype {part.dtype}, "
                            f"shape {part.shape}")
        if len(part) != len(parts[0]):
            raise DataError(f"{what}: has {len(part)} samples, the first input {len(parts[0])}")
        if np.issubdtype(part.dtype, np.floating) and not np.isfinite(part).all():
            raise DataError(f"{what}: holds NaN/Inf values")
    if ys is not None and (ys.ndim == 0 or len(ys) != len(parts[0])):
        raise DataError(f"{name}: X has {len(parts[0])} samples but y has {ys.size if ys.ndim == 0 else len(ys)}")


def check_finite(model: nn.Module, where: str) -> None:
    """NumericalError naming the first parameter or buffer of ``model`` holding NaN/Inf."""
    from edgeslim.errors import NumericalError

    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NumericalError(f"{where}: weight {name!r} holds NaN/Inf "
                                 f"({int((~torch.isfinite(t)).sum())} of {t.numel()} values)")


def check_forward(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Run the model once on the example inputs; ModelError naming the shapes if it fails."""
    shapes = ", ".join(str(tuple(x.shape)) for x in example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as err:  # any failure inside user code is a model error
        first = first_line(err)
        raise ModelError(f"model forward failed on example input of shape {shapes}: {first}") from None
    finally:
        model.train(was_training)


@dataclass
class ModelArtifact:
    """A model between steps: the PyTorch module and, once lowered, the ONNX graph that deploys it.

    A technique that only changes weights returns a new ``torch`` module and ``onnx=None`` (the
    pipeline exports it); a lowering technique (int8 PTQ) sets ``onnx`` to the graph it built.

    What later steps must respect travels in typed fields, never in ``notes``: ``sparsity``
    (:class:`~edgeslim.sparsity.Sparsity`, set by ``prune_magnitude``) holds the masks of the
    pruned weights, which every step that trains keeps and every other step passes on (or drops,
    saying so, when it changes the weights' shapes). For a model that carries sparsity the
    pipeline writes the stage's sparse file and reports it as ``size_bytes``, unless the step
    lowered the model or named its own compact file. ``notes`` are facts for people
    (``metrics.json``); no step reads them.
    """

    torch: nn.Module | None
    onnx: onnx.ModelProto | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str | bytes] = field(default_factory=dict)  # extra files for the stage folder
    # Name of an entry of ``files`` that is the stage's deployable compact form (a Huffman-coded
    # weight file): the pipeline reports its bytes as ``size_bytes``.
    size_file: str | None = None
    sparsity: Sparsity | None = None  # pruned weights later steps must keep at zero
    # The float model as a graph when there is no module (the model came as an ONNX file).
    graph: onnx.ModelProto | None = None

    @classmethod
    def of(cls, model: nn.Module | onnx.ModelProto) -> "ModelArtifact":
        """The artifact a run starts from: a module, or a float graph given as ONNX."""
        return cls(torch=None, graph=model) if isinstance(model, onnx.ModelProto) else cls(torch=model)

    def deployable(self, task: "Task") -> onnx.ModelProto:
        """The graph that ships: the lowered one, else the module's export, else the float graph."""
        if self.onnx is not None:
            return self.onnx
        if self.torch is not None:
            return task.export(self.torch)
        return self.graph

    def float_graph(self, technique: str, task: "Task") -> onnx.ModelProto:
        """The float model as an ONNX graph, for a technique that lowers graphs (it also runs on a
        model given as an ONNX file); ConfigError if a previous step already lowered it."""
        if self.torch is not None or self.onnx is not None:
            return task.export(self.float_copy(technique))
        out = onnx.ModelProto()
        out.CopyFrom(self.graph)
        return out

    def float_copy(self, technique: str) -> nn.Module:
        """An eval-mode copy of the float model for a technique that lowers it; ConfigError if a
        previous step already lowered it (lowering must be the last step)."""
        if self.onnx is not None:
            raise ConfigError(f"{technique}: the model is already lowered to a quantized graph; put {technique} last")
        if self.torch is None:
            raise ConfigError(f"{technique}: needs the PyTorch module; the model was given as an ONNX graph")
        import copy

        return copy.deepcopy(self.torch).eval()
