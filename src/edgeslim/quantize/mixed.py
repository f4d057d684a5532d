"""Accuracy-aware mixed precision: int8 everywhere except the fewest layers the budget requires.

Answers "accuracy collapsed and I don't know which layer": every weighted layer is quantized
alone and measured (metric and output SQNR on ONNX Runtime's integer kernels); then the smallest
number k of most-sensitive layers returned to float that brings the metric within ``max_drop`` of
fp32 is found by binary search. The
per-layer table is written beside the stage's model as ``sensitivity.md`` / ``sensitivity.json``.
Here: the search (``Evaluator``, ``fewest_layers``, ``sensitivity_files``, which weight-only's
budget reuses); the technique (``MixedPrecisionConfig``, ``mixed_precision``) is in mixed_technique.py.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import onnx
import torch
from rich.console import Console

from edgeslim.evaluate.metrics import sqnr_db
from edgeslim.evaluate.sensitivity import scan, sensitivity_markdown
from edgeslim.runtime.ort import make_session, run
from edgeslim.task import Task, iter_batches

console = Console(stderr=True)


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
