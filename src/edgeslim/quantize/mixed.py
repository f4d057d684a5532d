"""Accuracy-aware mixed precision: int8 everywhere except the fewest layers the budget requires.

Answers "accuracy collapsed and I don't know which layer". First the whole model is quantized and
measured: when that already meets the budget (``max_drop``) it is the answer and no layer is
scanned. Otherwise every weighted layer is quantized alone and measured (metric and output SQNR
on ONNX Runtime's integer kernels); then the smallest number k of most-sensitive layers raised
to the higher precision that brings the metric within ``max_drop`` of fp32 is found by binary
search. The per-layer table is written beside the stage's model as ``sensitivity.md`` /
``sensitivity.json``.

Choices are measured on a **validation split** held out from the calibration set
(:func:`hold_out`): a seeded shuffle picks ``validation_samples`` samples, which neither
calibrate the ranges nor belong to the task's evaluation set, so the metric the run reports was
not used to choose. Here: the split, the search (``Evaluator``, ``choose_layers``,
``sensitivity_files``, which weight-only's budget reuses); the technique (``MixedPrecisionConfig``,
``mixed_precision``) is in mixed_technique.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import torch
from rich.console import Console

from edgeslim.errors import ConfigError, DataError
from edgeslim.evaluate.metrics import metric_resolution, sqnr_db
from edgeslim.evaluate.sensitivity import scan, sensitivity_markdown
from edgeslim.runtime.ort import make_session, run
from edgeslim.task import Task, batch_len, count_samples, iter_batches

console = Console(stderr=True)

Inputs = Any  # one array, or a tuple of arrays for a multi-input model


def _concat(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))
    return np.concatenate(parts)


def _pick(x: Inputs, idx: np.ndarray) -> Inputs:
    return tuple(v[idx] for v in x) if isinstance(x, tuple) else x[idx]


def _batches(x: Inputs, batch_size: int) -> list[Inputs]:
    n = batch_len(x)
    return [_pick(x, np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


@dataclass
class HeldOut:
    """The calibration set split in two by a seeded shuffle: input batches to calibrate on, and
    ``validation`` inputs (with their labels, or None) to choose on. The two share no sample."""

    calibration: list[Inputs]
    validation: Inputs
    labels: np.ndarray | None
    available: int  # calibration samples the split was drawn from

    @property
    def validation_samples(self) -> int:
        return batch_len(self.validation)


MAX_DEFAULT_VALIDATION = 512  # resolves a 0.2-point accuracy budget; more makes every candidate slow


def default_validation_samples(available: int, calibrates: bool = True) -> int:
    """A quarter of the calibration samples (at least 1) when the rest calibrates, all of them
    otherwise; at most :data:`MAX_DEFAULT_VALIDATION`."""
    return max(1, min(available // 4 if calibrates else available, MAX_DEFAULT_VALIDATION))


def hold_out(task: Task, validation_samples: int | None, calibration_samples: int, seed: int,
             batch_size: int = 32, where: str = "validation_samples") -> HeldOut:
    """Split the task's calibration set: ``validation_samples`` samples (None: see
    :func:`default_validation_samples`) picked by a shuffle seeded with ``seed``, and up to
    ``calibration_samples`` of the others, in ``batch_size`` batches, to calibrate on
    (``calibration_samples`` 0: every sample validates, for a technique that does not calibrate).

    Only the first ``validation_samples + calibration_samples`` samples are read. DataError when
    the calibration set cannot give both parts a sample.
    """
    total = count_samples(task.calibration)
    want = (validation_samples if validation_samples is not None
            else default_validation_samples(total, calibrates=calibration_samples > 0))
    if calibration_samples > 0 and total < 2:
        raise DataError(f"{where}: the calibration set has {total} sample; it must give the validation split "
                        "and the calibration at least one each")
    if calibration_samples > 0 and want >= total:
        raise ConfigError(f"{where}: {want} would leave no calibration sample (the calibration set has {total})")
    want = min(want, total)
    xs, ys = [], []
    for x, y in iter_batches(task.calibration, 256, want + calibration_samples):
        xs.append(x)
        ys.append(y)
    x_all = _concat(xs)
    labels = None if any(y is None for y in ys) else np.concatenate(ys)
    order = np.random.default_rng(seed).permutation(batch_len(x_all))
    val, cal = order[:want], order[want:want + calibration_samples]
    return HeldOut(calibration=_batches(_pick(x_all, cal), batch_size) if len(cal) else [],
                   validation=_pick(x_all, val), labels=None if labels is None else labels[val], available=total)


class Evaluator:
    """Runs candidate graphs on ORT over the validation inputs and scores them with the task metric.

    Targets are the validation samples' labels; where the calibration set has none (a fidelity
    task: MiniLM's embeddings), they are the float graph's own outputs, or for ``accuracy`` its
    top-1 classes: the metric then measures agreement with the float model. ``evaluations``
    counts graphs run (the float reference included).
    """

    def __init__(self, task: Task, held: HeldOut, reference: onnx.ModelProto, batch_size: int | None = None) -> None:
        self.task = task
        self.batches = _batches(held.validation, batch_size or task.eval_batch_size)
        self.samples = held.validation_samples
        self.evaluations = 0
        self.reference = self.outputs(reference)
        if held.labels is not None:
            targets = held.labels
        elif self._counts_classes():
            targets = self.reference.argmax(axis=-1)
        else:
            targets = self.reference
        self.targets = torch.from_numpy(np.asarray(targets))
        try:
            self.base = self.score(self.reference)
        except Exception as err:  # a user metric that cannot take these targets
            raise DataError(f"the metric {task.metric_name} cannot score the validation split: {err} "
                            "(give the calibration set labels the metric takes)") from None

    def _counts_classes(self) -> bool:
        from edgeslim.evaluate.metrics import accuracy

        return self.task.metric is accuracy

    def outputs(self, graph: onnx.ModelProto) -> np.ndarray:
        self.evaluations += 1
        session = make_session(graph, threads=torch.get_num_threads())
        return np.concatenate([run(session, x)[0] for x in self.batches])

    def score(self, out: np.ndarray) -> float:
        return float(self.task.metric(torch.from_numpy(out), self.targets))

    def resolution(self) -> float | None:
        """The smallest change of the metric one validation sample can make (None: continuous)."""
        return metric_resolution(self.task.metric, self.samples)


@dataclass
class Choice:
    """What :func:`choose_layers` found: the per-layer rows (empty when nothing was scanned), the
    layers raised, the metric on the validation split, whether it meets the budget, the graph,
    and warnings for the report."""

    rows: list[dict[str, Any]]
    raised: set[str]
    score: float
    met: bool
    graph: onnx.ModelProto
    scanned: int
    warnings: list[str] = field(default_factory=list)


def budget_warning(ev: Evaluator, max_drop: float) -> str | None:
    """A warning when a non-zero budget is finer than one validation sample's worth of the metric
    (such a budget means "no drop at all" on this split), stating both numbers."""
    step = ev.resolution()
    if step is None or not 0 < max_drop < step:
        return None
    return (f"max_drop {max_drop:g} is below the resolution of the validation split: one of its "
            f"{ev.samples} samples changes {ev.task.metric_name} by {step:.4g}; give more validation "
            f"samples or a budget of at least {step:.4g}")


def choose_layers(ev: Evaluator, layers: list[tuple[str, str]], build: Callable[[set[str]], onnx.ModelProto],
                  build_one: Callable[[str], onnx.ModelProto], max_drop: float, low: str, high: str,
                  progress: bool = True) -> Choice:
    """The fewest layers to raise to ``high`` so the metric drops at most ``max_drop`` below fp32.

    ``layers`` are (name, op) pairs; ``build(raised)`` is the model with those layers at ``high``
    and the others at ``low``; ``build_one(name)`` the model with only that layer at ``low``
    (for the sensitivity row). The all-``low`` model is measured first: if it meets the budget
    it is returned and no layer is scanned (the scan costs one evaluation per layer).
    """
    warning = budget_warning(ev, max_drop)
    if warning and progress:
        console.print(f"  [yellow]warning[/yellow]: {warning}")
    name = ev.task.metric_name
    graph = build(set())
    score = ev.score(ev.outputs(graph))
    if ev.base - score <= max_drop:
        if progress:
            console.print(f"  every layer at {low}: {name} {score:.4f} (fp32 {ev.base:.4f}, {ev.samples} validation "
                          f"samples) is within max_drop {max_drop:g}: no layer scanned")
        return Choice([], set(), score, True, graph, 0, [warning] if warning else [])
    if progress:
        console.print(f"  every layer at {low}: {name} {score:.4f} (fp32 {ev.base:.4f}): over max_drop {max_drop:g}; "
                      f"scanning {len(layers)} layers on {ev.samples} validation samples")
    rows = sensitivity(ev, layers, build_one, low, progress)
    raised, score, met, graph = fewest_layers(rows, build, ev, max_drop, high, {0: (score, graph)}, progress)
    return Choice(rows, raised, score, met, graph, len(rows), [warning] if warning else [])


def sensitivity(ev: Evaluator, layers: list[tuple[str, str]], build_one: Callable[[str], onnx.ModelProto],
                precision: str, progress: bool = True) -> list[dict[str, Any]]:
    """One row per layer: the metric and output SQNR with only that layer at ``precision``
    (``build_one(name)``), against the float outputs and metric; a progress line per layer with
    the time left."""
    t0 = time.perf_counter()

    def measure(layer: tuple[str, str], graph: onnx.ModelProto) -> dict[str, Any]:
        out = ev.outputs(graph)
        score = ev.score(out)
        return {"layer": layer[0], "op": layer[1], "sqnr_db": sqnr_db(ev.reference, out), "metric_alone": score,
                "drop_alone": score - ev.base, "precision": precision}

    def log(i: int, row: dict[str, Any]) -> None:
        if progress:
            left = (time.perf_counter() - t0) / (i + 1) * (len(layers) - i - 1)
            console.print(f"  sensitivity {i + 1}/{len(layers)} {row['layer']}: {ev.task.metric_name} "
                          f"{row['metric_alone']:.4f}, SQNR {row['sqnr_db']:.1f} dB (~{left:.0f} s left)")

    return scan(layers, lambda layer: build_one(layer[0]), measure, on_row=log)


def fewest_layers(rows: list[dict[str, Any]], build: Callable[[set[str]], onnx.ModelProto], ev: Evaluator,
                  max_drop: float, high: str, cache: dict[int, tuple[float, onnx.ModelProto]] | None = None,
                  progress: bool = True) -> tuple[set[str], float, bool, onnx.ModelProto]:
    """The fewest most-sensitive rows' layers to raise to ``high`` so the metric drops at most ``max_drop``.

    Binary search over k (the k most sensitive layers, by metric drop then SQNR), assuming that
    raising more of them does not hurt: log2(n) evaluations instead of n. ``cache`` holds trials
    already measured (k -> (metric, graph)). Marks the chosen rows' ``precision`` and returns
    (layers, metric, budget met, graph).
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["drop_alone"], rows[i]["sqnr_db"]))
    cache = dict(cache or {})
    base = ev.base

    def trial(k: int) -> tuple[float, onnx.ModelProto]:
        if k not in cache:
            graph = build({rows[i]["layer"] for i in order[:k]})
            cache[k] = (ev.score(ev.outputs(graph)), graph)
            if progress:
                console.print(f"  {k} layer(s) at {high}: {ev.task.metric_name} {cache[k][0]:.4f} (fp32 {base:.4f})")
        return cache[k]

    lo, hi = 0, len(order)
    if base - trial(0)[0] <= max_drop:
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if base - trial(mid)[0] <= max_drop:
            hi = mid
        else:
            lo = mid + 1
    score, graph = trial(hi)
    for i in order[:hi]:
        rows[i]["precision"] = high
    return {rows[i]["layer"] for i in order[:hi]}, score, base - score <= max_drop, graph


def sensitivity_files(choice: Choice, ev: Evaluator, max_drop: float, kept: str, low: str) -> dict[str, str | bytes]:
    """``sensitivity.md`` (the per-layer table: which layer broke) and ``sensitivity.json``."""
    metric, base, score = ev.task.metric_name, ev.base, choice.score
    summary = [f"fp32 {metric} {base:.4f}; mixed {score:.4f} (drop {base - score:+.4f}, budget {max_drop}) on "
               f"{ev.samples} validation samples held out from the calibration set; {kept}"
               + ("" if choice.met else " — BUDGET NOT MET even with every layer raised")]
    if not choice.scanned:
        summary.append(f"Every layer at {low} meets the budget: no layer was scanned.")
    summary += [f"Warning: {w}." for w in choice.warnings]
    headers = ["layer", "op", "SQNR dB (alone)", f"{metric} (alone)", "drop", "precision"]
    cells = [[r["layer"] + (f" ({r['module']})" if r.get("module", r["layer"]) != r["layer"] else ""), r["op"],
              f"{r['sqnr_db']:.1f}", f"{r['metric_alone']:.4f}", f"{r['drop_alone']:+.4f}", r["precision"]]
             for r in choice.rows]
    table = sensitivity_markdown([f"# Per-layer sensitivity ({metric})", "", "\n\n".join(summary)], headers, cells)
    return {"sensitivity.md": table,
            "sensitivity.json": json.dumps({"fp32_metric": base, "mixed_metric": score, "budget": max_drop,
                                            "budget_met": choice.met, "validation_samples": ev.samples,
                                            "layers_scanned": choice.scanned, "warnings": choice.warnings,
                                            "layers": choice.rows}, indent=2, default=float)}
