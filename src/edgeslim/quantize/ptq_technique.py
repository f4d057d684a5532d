"""The ``ptq_int8`` technique: its config and the registered function (the algorithm is in ptq.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.quantize.debug import compare_layers
from edgeslim.quantize.observers import OBSERVER_VALUES, ActivationObserver, Percentile, observer_spec
from edgeslim.quantize.ptq import check_integer_parity, prepare_float, quantize_static, resolve_activation_dtype
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task, count_samples

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


@register("ptq_int8", PTQInt8Config, graph_only=True)
def ptq_int8(model: ModelArtifact, config: PTQInt8Config, task: Task) -> ModelArtifact:
    """Static int8 post-training quantization, lowered to integer kernels (QDQ)."""
    fp32 = model.float_graph("ptq_int8", task)
    total = min(config.calibration_samples, count_samples(task.calibration))
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
    return ModelArtifact(torch=model.torch, onnx=qdq, notes=notes, files={"parity.md": layers.to_markdown()})

