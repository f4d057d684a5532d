"""Static int8 post-training quantization (PTQ), lowered to an ONNX QDQ graph ORT runs on integer kernels.

The algorithm: prepare the float graph (fold, equalize), plan, calibrate, lower, check parity.
The technique (``PTQInt8Config``, the registered ``ptq_int8``) is in ptq_technique.py.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Iterable

import numpy as np
import onnx

from edgeslim.errors import ExportError
from edgeslim.quantize.adaround import adaround_weight_params
from edgeslim.quantize.bias_correction import correct_biases
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.equalize import equalize_cross_layer, smooth_quant
from edgeslim.quantize.observers import MSEObserver
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import QuantPlan, layer_name, lower_qdq, plan_quantization, quantize_weight, weight_axis
from edgeslim.quantize.per_token import lower_per_token, match_layers
from edgeslim.runtime.ort import input_feed, make_session

if TYPE_CHECKING:
    from edgeslim.quantize.ptq_technique import PTQInt8Config

def resolve_activation_dtype(dtype: str) -> str:
    """"auto" -> uint8 on x86-64 (MLAS's native U8S8 kernels), int8 on other CPUs."""
    if dtype != "auto":
        return dtype
    return "uint8" if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else "int8"


def prepare_float(fp32: onnx.ModelProto, batches: list, config: PTQInt8Config) -> onnx.ModelProto:
    """The float graph quantization starts from: BatchNorm folded, then the optional equalizations."""
    folded = fold_batchnorm(fp32)
    if config.cross_layer_equalization:
        folded = equalize_cross_layer(folded, relu6=config.cle_relu6)[0]
    if config.smoothquant_alpha is not None:
        folded = smooth_quant(folded, batches, config.smoothquant_alpha, progress=config.progress)[0]
    return folded


def quantize_static(
    fp32: onnx.ModelProto, batches: Iterable, config: PTQInt8Config | None = None, total: int | None = None
) -> onnx.ModelProto:
    """Quantize a float ONNX graph with ranges observed on ``batches`` (inputs of the graph);
    ``config`` None is ``PTQInt8Config()``."""
    if config is None:
        from edgeslim.quantize.ptq_technique import PTQInt8Config  # it imports this module

        config = PTQInt8Config()
    batches = list(batches)
    dtype = resolve_activation_dtype(config.activation_dtype)
    folded = prepare_float(fp32, batches, config)
    plan, per_token = plan_per_token(folded, config.per_token, exclude=config.exclude,
                                     op_types=config.op_types or None, activation_matmuls=config.activation_matmuls)
    options = {"dtype": dtype, "symmetric": config.activation_symmetric}
    ranges = collect_ranges(folded, plan.calibrated, batches, observer=config.activation_observer,
                            observer_options=options, total=total, progress=config.progress)
    weights = mse_weight_params(folded, plan, config.per_channel) if config.weight_observer == "mse" else None

    if config.adaround:
        def lower_with(params):
            return lower_qdq(folded, plan, ranges, activation_dtype=dtype, activation_symmetric=config.activation_symmetric,
                             per_channel=config.per_channel, weight_params=params)

        weights = adaround_weight_params(
            folded, plan, lower_with, batches[: max(1, 256 // config.batch_size)],
            iterations=config.adaround_iterations, reg_weight=config.adaround_reg_weight, seed=config.seed,
            per_channel=config.per_channel, base_params=weights, progress=config.progress)

    def lower(graph: onnx.ModelProto) -> onnx.ModelProto:
        return lower_qdq(graph, plan, ranges, activation_dtype=dtype,
                         activation_symmetric=config.activation_symmetric, per_channel=config.per_channel,
                         weight_params=weights)

    if config.bias_correction:
        folded = correct_biases(folded, plan, lower, batches[: max(1, 256 // max(1, config.batch_size))],
                                progress=config.progress)
    out = lower(folded)
    if per_token:
        out = lower_per_token(out, per_token, dtype)
    return quantize_embeddings(out) if config.embeddings else out


def plan_per_token(folded: onnx.ModelProto, patterns: Iterable[str], *, exclude: Iterable[str] = (),
                   op_types: Iterable[str] | None = None, activation_matmuls: bool = False) -> tuple[QuantPlan, set[str]]:
    """The static int8 plan without the layers ``patterns`` (``per_token``) select, and those layers:
    they leave the static plan and are lowered per token at the end."""
    plan = plan_quantization(folded, exclude=tuple(exclude), op_types=op_types, activation_matmuls=activation_matmuls)
    patterns = tuple(patterns)
    if not patterns:
        return plan, set()
    per_token = match_layers([layer_name(folded.graph.node[i]) for i in plan.weighted], patterns)
    plan = plan_quantization(folded, exclude=tuple(exclude) + tuple(sorted(per_token)), op_types=op_types,
                             activation_matmuls=activation_matmuls)
    return plan, per_token


def mse_weight_params(folded: onnx.ModelProto, plan, per_channel: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel symmetric int8 weights clipped at the MSE-optimal range of each channel."""
    from onnx import numpy_helper

    inits = {i.name: i for i in folded.graph.initializer}
    out = {}
    for index in plan.weighted:
        node = folded.graph.node[index]
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        axis = weight_axis(node) if per_channel else None
        obs = MSEObserver(axis, symmetric=True)
        obs.update(w)
        lo, hi = obs.range()
        bound = np.maximum(np.abs(np.asarray(lo)), np.abs(np.asarray(hi)))
        out[node.name] = quantize_weight(w, axis, bound)
    return out


def check_integer_parity(qdq: onnx.ModelProto, x: np.ndarray | tuple[np.ndarray, ...], max_steps: float = 4.0) -> float:
    """Compare ORT's fused integer kernels with the unfused QDQ graph (float simulation of the same
    quantization). They may differ by requantization rounding, a few output steps at most; more
    means a fusion changed the math. Returns the max abs difference."""
    outs = []
    for level in ("disable", "all"):
        sess = make_session(qdq, threads=1, optimization=level)
        outs.append(sess.run(None, input_feed(sess, x)))
    worst = 0.0
    for name, ref, got in zip([o.name for o in qdq.graph.output], outs[0], outs[1]):
        diff = float(np.abs(ref - got).max()) if ref.size else 0.0
        span = float(ref.max() - ref.min()) if ref.size else 0.0
        step = span / 255.0 if span > 0 else 1e-6
        if diff > max_steps * step + 1e-5:
            raise ExportError(
                f"integer kernels diverge from the QDQ simulation on output {name!r}: "
                f"max abs diff {diff:.3g} > {max_steps} quantization steps ({step:.3g} each)"
            )
        worst = max(worst, diff)
    return worst
