"""Static int8 post-training quantization (PTQ), lowered to an ONNX QDQ graph ORT runs on integer kernels."""

from __future__ import annotations

import platform
from dataclasses import dataclass, replace
from typing import Iterable, Literal

import numpy as np
import onnx

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError, ExportError
from edgeslim.quantize.adaround import adaround_weight_params
from edgeslim.quantize.bias_correction import correct_biases
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.debug import compare_layers
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.equalize import equalize_cross_layer, smooth_quant
from edgeslim.quantize.observers import OBSERVER_VALUES, ActivationObserver, MSEObserver, Percentile, observer_spec
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import QuantPlan, layer_name, lower_qdq, plan_quantization, quantize_weight, weight_axis
from edgeslim.quantize.per_token import lower_per_token, match_layers
from edgeslim.registry import register
from edgeslim.runtime.ort import input_feed, make_session
from edgeslim.task import ModelArtifact, Task


_DEFAULT_PERCENTILE = Percentile().percentile


@dataclass(frozen=True)
class PTQInt8Config(TechniqueConfig):
    """Static int8 PTQ: per-channel symmetric int8 weights, per-tensor activations, integer kernels.

    ``observer`` picks how activation ranges are estimated from calibration data (minmax,
    moving_average, percentile, mse, kl) and ``percentile`` is the percentile observer's
    parameter: together they spell one value, :attr:`activation_observer` (``observer="percentile",
    percentile=99.9`` is ``Percentile(99.9)``), which calibration uses. Python callers may also
    pass the value, ``observer=Percentile(99.9)``; it is stored in the recipe spelling.
    ``weight_observer`` "mse" clips each weight channel to the range of least squared error
    instead of its max. ``bias_correction`` cancels the mean
    output shift quantization causes; ``adaround`` learns each weight's rounding direction on the
    calibration set (Nagel et al. 2020). ``smoothquant_alpha`` migrates activation outliers of
    MatMul inputs into the weights (SmoothQuant, Xiao et al. 2023) and ``cross_layer_equalization``
    evens out weight ranges of Conv -> ReLU -> Conv pairs (Nagel et al. 2019): both keep the float
    function and make the int8 grid fit. ReLU6 pairs (``cle_relu6``): "skip" leaves them alone;
    "bound" rescales them exactly with a per-channel Min (measured: int8 latency doubles);
    "relu" turns ReLU6 into ReLU as the paper does for MobileNetV2 (changes the float model).
    ``exclude`` keeps layers (torch module or ONNX node names) in float; ``op_types`` limits
    quantization to those op types (``["MatMul"]`` for transformers: int8 projections, float
    residual stream); ``activation_matmuls`` also runs attention's activation-by-activation
    MatMuls in int8; ``embeddings`` stores embedding tables as int8 rows. ``per_token`` names
    layers (exact names or globs, e.g. ``"*.output.dense"``) whose input gets one int8 scale per
    token, computed per call (:mod:`edgeslim.quantize.per_token`: for layers with outlier tokens,
    like BERT's FFN-down). ``activation_dtype`` "auto" picks uint8 (U8S8) on x86-64
    and int8 elsewhere: on x86, ORT converts int8 activation Q/DQ pairs to uint8 only where a Q
    feeds a single DQ, so with int8 a tensor shared by two consumers (a ResNet shortcut) leaves
    its Conv unfused (measured: 45% of ResNet-20's convs on integer kernels with int8, 100% with uint8).
    """

    calibration_samples: int = 256
    batch_size: int = 32
    observer: Literal["minmax", "moving_average", "percentile", "mse", "kl"] = "minmax"
    percentile: float = _DEFAULT_PERCENTILE
    weight_observer: Literal["minmax", "mse"] = "minmax"
    activation_dtype: Literal["auto", "int8", "uint8"] = "auto"
    activation_symmetric: bool = False
    per_channel: bool = True
    bias_correction: bool = False
    adaround: bool = False
    smoothquant_alpha: float | None = None
    cross_layer_equalization: bool = False
    cle_relu6: Literal["skip", "bound", "relu"] = "skip"
    adaround_iterations: int = 500
    adaround_reg_weight: float = 0.01
    seed: int = 0
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    activation_matmuls: bool = False
    per_token: tuple[str, ...] = ()
    embeddings: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        # observer=Percentile(99.9) -> observer="percentile", percentile=99.9: to_dict/from_dict
        # and recipes keep one spelling, and the Literal check below sees a name.
        if isinstance(self.observer, OBSERVER_VALUES):
            spec = self.observer
            object.__setattr__(self, "observer", spec.name)
            if isinstance(spec, Percentile):
                if self.percentile not in (_DEFAULT_PERCENTILE, spec.percentile):
                    raise ConfigError(f"percentile: given twice, {self.percentile} and in observer={spec!r}")
                object.__setattr__(self, "percentile", spec.percentile)
        super().__post_init__()

    def validate(self) -> None:
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples: must be >= 1, got {self.calibration_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"smoothquant_alpha: must be in [0, 1], got {self.smoothquant_alpha}")
        if self.adaround_iterations < 1:
            raise ConfigError(f"adaround_iterations: must be >= 1, got {self.adaround_iterations}")
        if self.adaround_reg_weight < 0:
            raise ConfigError(f"adaround_reg_weight: must be >= 0, got {self.adaround_reg_weight}")
        Percentile(self.percentile)  # its range check, whichever observer is chosen

    @property
    def activation_observer(self) -> ActivationObserver:
        """The activation observer that ``observer`` and ``percentile`` spell, as a value."""
        return observer_spec(self.observer, self.percentile)


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
    fp32: onnx.ModelProto, batches: Iterable, config: PTQInt8Config = PTQInt8Config(), total: int | None = None
) -> onnx.ModelProto:
    """Quantize a float ONNX graph with ranges observed on ``batches`` (inputs of the graph)."""
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


@register("ptq_int8", PTQInt8Config)
def ptq_int8(model: ModelArtifact, config: PTQInt8Config, task: Task) -> ModelArtifact:
    """Static int8 post-training quantization, lowered to integer kernels (QDQ)."""
    module = model.float_copy("ptq_int8")
    fp32 = task.export(module)
    total = min(config.calibration_samples, _count(task))
    batches = [x for x, _ in task.calibration_batches(config.batch_size, limit=config.calibration_samples)]
    # Prepare (fold, equalize) once, so the parity report compares against the float graph that
    # was actually quantized (equalization rescales tensors that keep their names).
    prepared = prepare_float(fp32, batches, config)
    plain = replace(config, smoothquant_alpha=None, cross_layer_equalization=False)
    qdq = quantize_static(prepared, batches, plain, total=total)
    probe = next(x for x, _ in task.calibration_batches(min(8, config.batch_size)))
    parity = check_integer_parity(qdq, probe)
    layers = compare_layers(qdq, probe, fp32=prepared)
    first = layers.first_divergent
    notes = {"calibration_samples": total, "activation_dtype": resolve_activation_dtype(config.activation_dtype),
             "integer_parity_max_abs_diff": parity, "parity_first_divergent": None if first is None else first.tensor}
    return ModelArtifact(torch=module, onnx=qdq, notes=notes, files={"parity.md": layers.to_markdown()})


def _count(task: Task) -> int:
    from edgeslim.task import count_samples

    return count_samples(task.calibration)
