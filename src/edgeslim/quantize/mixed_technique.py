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
from edgeslim.quantize.mixed import Evaluator, choose_layers, hold_out, sensitivity_files
from edgeslim.quantize.per_token import lower_per_token
from edgeslim.quantize.ptq import mse_weight_params, plan_per_token, prepare_float, resolve_activation_dtype
from edgeslim.quantize.ptq_technique import PTQInt8Config
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task, batch_len


@dataclass(frozen=True)
class MixedPrecisionConfig(TechniqueConfig):
    """Raise the fewest layers to ``high`` precision so that the metric drops at most ``max_drop``
    (absolute: 0.001 is 0.1 accuracy point). ``high`` is "fp32" (the layer stays float) or
    "per_token" (int8 with one activation scale per token, computed per call: most of fp32's
    accuracy on outlier-token layers at a fraction of its cost; see quantize/per_token.py).
    ``ptq`` configures the int8 part.

    The layers are chosen on ``validation_samples`` samples held out from the calibration set
    (None: a quarter of it, at most 512), picked by a shuffle seeded with ``seed``; the ranges are
    calibrated on the others (up to ``ptq.calibration_samples``), and the task's evaluation set,
    which the run reports, is never used for choosing. With no labels in the calibration set the
    metric is taken against the float model's outputs (agreement, for accuracy). When int8
    everywhere already meets the budget, no layer is scanned. ``progress`` prints a line per
    scanned layer, with the time left."""

    max_drop: float = 0.001
    ptq: PTQInt8Config = field(default_factory=lambda: PTQInt8Config(progress=False))
    validation_samples: int | None = None
    seed: int = 0
    high: Literal["fp32", "per_token"] = "fp32"
    progress: bool = True

    def validate(self) -> None:
        if self.max_drop < 0:
            raise ConfigError(f"max_drop: must be >= 0, got {self.max_drop}")
        if self.validation_samples is not None and self.validation_samples < 1:
            raise ConfigError(f"validation_samples: must be >= 1, got {self.validation_samples}")


@register("mixed_precision", MixedPrecisionConfig, graph_only=True)
def mixed_precision(model: ModelArtifact, config: MixedPrecisionConfig, task: Task) -> ModelArtifact:
    """Accuracy-aware int8: all-int8 if it meets the budget, else per-layer sensitivity on a
    held-out validation split, then the fewest raised layers within the budget."""
    ptq = config.ptq
    dtype = resolve_activation_dtype(ptq.activation_dtype)
    held = hold_out(task, config.validation_samples, ptq.calibration_samples, config.seed, ptq.batch_size)
    batches = held.calibration
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

    ev = Evaluator(task, held, folded)
    # Sensitivity: each layer alone at static int8, every other one in float (whatever ``high`` is).
    choice = choose_layers(ev, list(zip(names, [n.op_type for n in nodes])), lower,
                           lambda name: lower(set(names) - {name}, "fp32"), config.max_drop, "int8", config.high,
                           config.progress)
    for r in choice.rows:
        if r["precision"] == "per_token" and r["layer"] not in linear:
            r["precision"] = "fp32"
    graph = quantize_embeddings(choice.graph) if ptq.embeddings else choice.graph
    kept = "kept in float" if config.high == "fp32" else "raised to per-token int8"
    files = sensitivity_files(choice, ev, config.max_drop, f"{len(choice.raised)} of {len(names)} layers {kept}",
                              "int8")
    notes = {"float_layers" if config.high == "fp32" else "per_token_layers": sorted(choice.raised),
             "budget_met": choice.met, "search_metric": choice.score, "validation_samples": ev.samples,
             "calibration_samples": sum(batch_len(b) for b in batches), "layers_scanned": choice.scanned,
             "warnings": choice.warnings}
    return ModelArtifact(torch=model.torch, onnx=graph, notes=notes, files=files)
