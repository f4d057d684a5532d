"""Accuracy-aware mixed precision: int8 everywhere except the fewest layers the budget requires.

Answers "accuracy collapsed and I don't know which layer": every weighted layer is quantized
alone and measured (metric and output SQNR on ONNX Runtime's integer kernels); then the smallest
number k of most-sensitive layers returned to float that brings the metric within ``max_drop`` of
fp32 is found by binary search. The
per-layer table is written beside the stage's model as ``sensitivity.md`` / ``sensitivity.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import onnx
import torch
from rich.console import Console

from edgeslim.config import TechniqueConfig
from edgeslim.evaluate.metrics import sqnr_db
from edgeslim.evaluate.sensitivity import scan, sensitivity_markdown
from edgeslim.errors import ConfigError
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.lower import layer_name, lower_qdq, plan_quantization
from edgeslim.quantize.per_token import lower_per_token
from edgeslim.quantize.ptq import (
    PTQInt8Config, mse_weight_params, plan_per_token, prepare_float, resolve_activation_dtype,
)
from edgeslim.registry import register
from edgeslim.runtime.ort import make_session, run
from edgeslim.task import ModelArtifact, Task, iter_batches

console = Console(stderr=True)


@dataclass(frozen=True)
class MixedPrecisionConfig(TechniqueConfig):
    """Raise the fewest layers to ``high`` precision so that the metric drops at most ``max_drop``
    (absolute: 0.001 is 0.1 accuracy point). ``high`` is "fp32" (the layer stays float) or
    "per_token" (int8 with one activation scale per token, computed per call: most of fp32's
    accuracy on outlier-token layers at a fraction of its cost; see quantize/per_token.py).
    ``ptq`` configures the int8 part; ``eval_samples`` caps the evaluation samples used for the
    search (None: all)."""

    max_drop: float = 0.001
    ptq: PTQInt8Config = field(default_factory=lambda: PTQInt8Config(progress=False))
    eval_samples: int | None = None
    high: Literal["fp32", "per_token"] = "fp32"

    def validate(self) -> None:
        if self.max_drop < 0:
            raise ConfigError(f"max_drop: must be >= 0, got {self.max_drop}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"eval_samples: must be >= 1, got {self.eval_samples}")


class Evaluator:
    """Runs candidate graphs on ORT over a fixed evaluation subset and scores them."""

    def __init__(self, task: Task, samples: int | None) -> None:
        self.task = task
        self.batches = list(iter_batches(task.evaluation, task.eval_batch_size, samples))
        self.targets = torch.from_numpy(np.concatenate([y for _, y in self.batches]))

    def outputs(self, graph: onnx.ModelProto) -> np.ndarray:
        session = make_session(graph, threads=torch.get_num_threads())
        return np.concatenate([run(session, x)[0] for x, _ in self.batches])

    def score(self, out: np.ndarray) -> float:
        return float(self.task.metric(torch.from_numpy(out), self.targets))

    def sensitivity(self, names: list[str], build_one: Callable[[str], onnx.ModelProto], ref: np.ndarray,
                    base: float, precision: str, ops: list[str]) -> list[dict[str, Any]]:
        """One row per layer: the metric and output SQNR with only that layer at low precision
        (``build_one(name)``), against the float outputs ``ref`` and metric ``base``."""
        def measure(layer: tuple[str, str], graph: onnx.ModelProto) -> dict[str, Any]:
            out = self.outputs(graph)
            score = self.score(out)
            return {"layer": layer[0], "op": layer[1], "sqnr_db": sqnr_db(ref, out), "metric_alone": score,
                    "drop_alone": score - base, "precision": precision}

        def log(i: int, row: dict[str, Any]) -> None:
            console.print(f"  sensitivity {i + 1}/{len(names)} {row['layer']}: {self.task.metric_name} "
                          f"{row['metric_alone']:.4f}, SQNR {row['sqnr_db']:.1f} dB")

        return scan(list(zip(names, ops)), lambda layer: build_one(layer[0]), measure, on_row=log)


def fewest_layers(rows: list[dict[str, Any]], build: Callable[[set[str]], onnx.ModelProto], ev: Evaluator,
                  base: float, max_drop: float, high: str) -> tuple[set[str], float, bool, onnx.ModelProto]:
    """The fewest most-sensitive layers to raise to precision ``high`` so the metric drops at most ``max_drop``.

    Binary search over k (the k most sensitive layers, by metric drop then SQNR), assuming that
    raising more of them does not hurt: log2(n) evaluations instead of n. Marks the chosen rows'
    ``precision`` and returns (layers, metric, budget met, graph).
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["drop_alone"], rows[i]["sqnr_db"]))
    cache: dict[int, tuple[float, onnx.ModelProto]] = {}

    def trial(k: int) -> tuple[float, onnx.ModelProto]:
        if k not in cache:
            graph = build({rows[i]["layer"] for i in order[:k]})
            cache[k] = (ev.score(ev.outputs(graph)), graph)
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


def sensitivity_files(rows: list[dict[str, Any]], metric: str, base: float, score: float, max_drop: float,
                      met: bool, kept: str) -> dict[str, str | bytes]:
    """``sensitivity.md`` (the per-layer table: which layer broke) and ``sensitivity.json``."""
    summary = (f"fp32 {metric} {base:.4f}; mixed {score:.4f} (drop {base - score:+.4f}, budget {max_drop}); {kept}"
               + ("" if met else " — BUDGET NOT MET even with every layer raised"))
    headers = ["layer", "op", "SQNR dB (alone)", f"{metric} (alone)", "drop", "precision"]
    cells = [[r["layer"] + (f" ({r['module']})" if r.get("module", r["layer"]) != r["layer"] else ""), r["op"],
              f"{r['sqnr_db']:.1f}", f"{r['metric_alone']:.4f}", f"{r['drop_alone']:+.4f}", r["precision"]]
             for r in rows]
    table = sensitivity_markdown([f"# Per-layer sensitivity ({metric})", "", summary], headers, cells)
    return {"sensitivity.md": table,
            "sensitivity.json": json.dumps({"fp32_metric": base, "mixed_metric": score, "budget": max_drop,
                                            "budget_met": met, "layers": rows}, indent=2, default=float)}


@register("mixed_precision", MixedPrecisionConfig)
def mixed_precision(model: ModelArtifact, config: MixedPrecisionConfig, task: Task) -> ModelArtifact:
    """Accuracy-aware int8: per-layer sensitivity, then the fewest float layers within the budget."""
    module = model.float_copy("mixed_precision")
    ptq = config.ptq
    dtype = resolve_activation_dtype(ptq.activation_dtype)
    batches = [x for x, _ in task.calibration_batches(ptq.batch_size, limit=ptq.calibration_samples)]
    folded = prepare_float(task.export(module), batches, ptq)
    # ``fixed``: per-token by the user's choice (ptq.per_token), not searched
    full, fixed = plan_per_token(folded, ptq.per_token, exclude=ptq.exclude, op_types=ptq.op_types or None,
                                 activation_matmuls=ptq.activation_matmuls)
    options = {"dtype": dtype, "symmetric": ptq.activation_symmetric}
    # Every planned tensor gets its own range: a tensor that borrows its input's range in the
    # full plan (after a MaxPool) needs one of its own once that input's layer returns to float.
    ranges = collect_ranges(folded, full.tensors, batches, observer=ptq.activation_observer, observer_options=options,
                            progress=ptq.progress)
    weights = mse_weight_params(folded, full, ptq.per_channel) if ptq.weight_observer == "mse" else None
    nodes = [folded.graph.node[i] for i in full.weighted]
    names = [layer_name(n) for n in nodes]
    linear = {name for name, n in zip(names, nodes) if n.op_type in ("MatMul", "Gemm")}

    def lower(raised: set[str], high: str = config.high) -> onnx.ModelProto:
        plan = plan_quantization(folded, exclude=tuple(ptq.exclude) + tuple(sorted(raised | fixed)),
                                 op_types=ptq.op_types or None, activation_matmuls=ptq.activation_matmuls)
        graph = lower_qdq(folded, plan, ranges, activation_dtype=dtype, activation_symmetric=ptq.activation_symmetric,
                          per_channel=ptq.per_channel, weight_params=weights)
        per_token = fixed | (raised & linear if high == "per_token" else set())  # a raised Conv stays float
        return lower_per_token(graph, per_token, dtype) if per_token else graph

    ev = Evaluator(task, config.eval_samples)
    ref_out = ev.outputs(folded)
    base = ev.score(ref_out)
    # Sensitivity: each layer alone at static int8, every other one in float (whatever ``high`` is).
    rows = ev.sensitivity(names, lambda name: lower(set(names) - {name}, "fp32"), ref_out, base, "int8",
                          [n.op_type for n in nodes])
    raised, score, met, graph = fewest_layers(rows, lower, ev, base, config.max_drop, config.high)
    for r in rows:
        if r["precision"] == "per_token" and r["layer"] not in linear:
            r["precision"] = "fp32"
    if ptq.embeddings:
        graph = quantize_embeddings(graph)
    kept = "kept in float" if config.high == "fp32" else "raised to per-token int8"
    files = sensitivity_files(rows, task.metric_name, base, score, config.max_drop, met,
                              f"{len(raised)} of {len(rows)} layers {kept}")
    notes = {"float_layers" if config.high == "fp32" else "per_token_layers": sorted(raised), "budget_met": met,
             "search_metric": score}
    return ModelArtifact(torch=module, onnx=graph, notes=notes, files=files)
