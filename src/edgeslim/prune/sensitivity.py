"""Per-layer pruning sensitivity (Han et al. 2015, fig. 6): prune one layer at a time, measure.

For every layer and ratio, a copy of the model has only that layer pruned (one-shot, no
fine-tune) and the task metric is taken. The curves say which layers tolerate pruning, and
:func:`select_ratios` turns them into per-layer ratios under a metric-drop budget. The prune
step is pluggable, ``prune_fn(model, layer_name, ratio) -> pruned copy``, so structured (channel)
pruning can reuse the scan; the default is unstructured magnitude pruning of the layer's weight.

The metric is computed by :func:`task_evaluator`: in PyTorch (``backend="torch"``, the default:
fast, and for weight-only pruning the same numbers as the exported graph up to float rounding)
or on ONNX Runtime through :func:`edgeslim.evaluate.evaluate_onnx` (``backend="onnx"``, the
deployable graph itself). The table and plot name the backend used. The scan itself is
:func:`edgeslim.evaluate.sensitivity.scan`, shared with mixed-precision quantization.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from edgeslim import io
from edgeslim.errors import ConfigError
from edgeslim.evaluate.sensitivity import scan, sensitivity_markdown
from edgeslim.prune.unstructured import (
    apply_masks,
    magnitude_masks,
    prunable_weights,
    resolve_names,
)
from edgeslim.task import Task

PruneFn = Callable[[nn.Module, str, float], nn.Module]

__all__ = ["Evaluator", "Sensitivity", "analyze", "magnitude_prune_layer", "plot_sensitivity", "select_ratios",
           "task_evaluator", "to_markdown", "write_table"]


def magnitude_prune_layer(model: nn.Module, layer: str, ratio: float) -> nn.Module:
    """A copy of ``model`` with only ``layer``'s weight magnitude-pruned to ``ratio`` sparsity."""
    pruned = copy.deepcopy(model)
    return apply_masks(pruned, magnitude_masks(pruned, ratio, layers=[layer]))


@dataclass(frozen=True)
class Evaluator:
    """``evaluator(model) -> metric`` on a task's evaluation set; ``backend`` says where it runs."""

    task: Task
    backend: str = "torch"

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        if self.backend == "onnx":
            from edgeslim.evaluate.onnx_eval import evaluate_onnx

            return evaluate_onnx(self.task.export(model.eval()), self.task)
        was_training = model.training
        model.eval()
        outs, targets = [], []
        try:
            for x, y in self.task.evaluation_batches():
                xs = x if isinstance(x, tuple) else (x,)
                outs.append(model(*(torch.from_numpy(np.asarray(v)) for v in xs)))
                targets.append(torch.from_numpy(np.asarray(y)))
        finally:
            model.train(was_training)
        return float(self.task.metric(torch.cat(outs), torch.cat(targets)))


def task_evaluator(task: Task, backend: str = "torch") -> Evaluator:
    """The task's metric on its evaluation set, in PyTorch (``"torch"``) or on ORT (``"onnx"``)."""
    if backend not in ("torch", "onnx"):
        raise ConfigError(f"backend: must be 'torch' or 'onnx', got {backend!r}")
    return Evaluator(task, backend)


@dataclass
class Sensitivity:
    """The scan's result: ``curves[layer][i]`` is the metric with only ``layer`` pruned to ``ratios[i]``."""

    metric_name: str
    baseline: float
    ratios: list[float]
    curves: dict[str, list[float]] = field(default_factory=dict)
    backend: str = "torch"
    higher_is_better: bool = True

    def drop(self, layer: str) -> list[float]:
        """Metric lost at each ratio (positive = worse), relative to the unpruned model."""
        sign = 1.0 if self.higher_is_better else -1.0
        return [sign * (self.baseline - v) for v in self.curves[layer]]


def _check_ratios(ratios: Sequence[float]) -> list[float]:
    out = [float(r) for r in ratios]
    if not out or any(not 0.0 <= r < 1.0 for r in out) or out != sorted(set(out)):
        raise ConfigError(f"ratios: need increasing values in [0, 1), got {list(ratios)}")
    return out


def analyze(model: nn.Module, evaluate: Callable[[nn.Module], float], ratios: Sequence[float], *,
            layers: Iterable[str] | None = None, prune_fn: PruneFn = magnitude_prune_layer,
            metric_name: str = "accuracy", progress: bool = True) -> Sensitivity:
    """Scan every layer (module names; default: all Linear/Conv) at every ratio, one layer pruned at a time."""
    ratios = _check_ratios(ratios)
    if layers is None:
        names = [w.removesuffix(".weight") for w in prunable_weights(model)]
    else:
        names = list(layers)
        if prune_fn is magnitude_prune_layer:
            resolve_names(model, names, "layers")
    if not names:
        raise ConfigError("layers: the model has no prunable layer to scan")
    result = Sensitivity(metric_name, float(evaluate(model)), ratios, backend=getattr(evaluate, "backend", "custom"))
    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("sensitivity", total=len(names) * len(ratios))
        rows = scan([(name, ratio) for name in names for ratio in ratios],
                    lambda change: prune_fn(model, *change),
                    lambda change, pruned: {"layer": change[0], "ratio": change[1], "metric": float(evaluate(pruned))},
                    on_row=lambda _, row: bar.update(job, advance=1,
                                                     description=f"sensitivity {row['layer']} @ {row['ratio']:.2f}"))
    for k, name in enumerate(names):  # rows are layer-major: one block of len(ratios) per layer
        result.curves[name] = [row["metric"] for row in rows[k * len(ratios):(k + 1) * len(ratios)]]
    return result


def select_ratios(result: Sensitivity, max_drop: float) -> dict[str, float]:
    """Per layer, the largest scanned ratio such that it and every smaller ratio lose at most
    ``max_drop`` of the metric (each layer judged alone, as in Han et al.'s sensitivity pruning)."""
    if not max_drop >= 0:
        raise ConfigError(f"max_drop: must be >= 0, got {max_drop}")
    chosen = {}
    for layer in result.curves:
        best = 0.0
        for ratio, lost in zip(result.ratios, result.drop(layer)):
            if lost > max_drop + 1e-12:
                break
            best = ratio
        chosen[layer] = best
    return chosen


def to_markdown(result: Sensitivity) -> str:
    """A markdown table: one row per layer, one column per ratio, the metric in each cell."""
    head = ["layer"] + [f"{r:.0%}" for r in result.ratios]
    cells = [[f"`{layer}`"] + [f"{v:.4f}" for v in values] for layer, values in result.curves.items()]
    return sensitivity_markdown([f"Sensitivity of {result.metric_name} ({result.backend}); unpruned: {result.baseline:.4f}"],
                                head, cells)


def write_table(result: Sensitivity, path: str | Path) -> None:
    """Write :func:`to_markdown` atomically."""
    io.write_text(path, to_markdown(result))


def plot_sensitivity(result: Sensitivity, path: str | Path) -> None:
    """Write a PNG (atomically) of the metric vs pruning ratio, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgeslim.report.plot import save_png

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for layer, values in result.curves.items():
        ax.plot(result.ratios, values, marker="o", label=layer)
    ax.axhline(result.baseline, color="gray", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("pruned fraction of the layer")
    ax.set_ylabel(f"{result.metric_name} ({result.backend})")
    ax.set_title("pruning sensitivity, one layer at a time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
