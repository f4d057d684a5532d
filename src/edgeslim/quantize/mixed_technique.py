"""The ``mixed_precision`` technique: its config and the registered function (the search is in mixed.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import onnx

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.lower import layer_name, lower_qdq, plan_quantization
from edgeslim.quantize.mixed import Evaluator, fewest_layers, sensitivity_files
from edgeslim.quantize.per_token import lower_per_token
from edgeslim.quantize.ptq import mse_weight_params, plan_per_token, prepare_float, resolve_activation_dtype
from edgeslim.quantize.ptq_technique import PTQInt8Config
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task


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


@register("mixed_precision", MixedPrecisionConfig, graph_only=True)
def mixed_precision(model: ModelArtifact, config: MixedPrecisionConfig, task: Task) -> ModelArtifact:
    """Accuracy-aware int8: per-layer sensitivity, then the fewest float layers within the budget."""
    ptq = config.ptq
    dtype = resolve_activation_dtype(ptq.activation_dtype)
    batches = [x for x, _ in task.calibration_batches(ptq.batch_size, limit=ptq.calibration_samples)]
    folded = prepare_float(model.float_graph("mixed_precision", task), batches, ptq)
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
    return ModelArtifact(torch=model.torch, onnx=graph, notes=notes, files=files)
