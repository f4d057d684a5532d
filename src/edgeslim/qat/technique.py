"""The ``qat_int8`` technique: its config and the registered function, which picks the path.

Two ways to place the fake quantizers, one technique: torch.fx tracing (traced.py, the default:
CNNs, Conv+BN folded in training) and wrapping the Linear layers in place (linear.py, with
``op_types: ["MatMul"]``: transformers, several inputs). Both train one :class:`~edgeslim.qat.model.QATModel`
with the same loop (model.py) and lower through quantize's ``lower_qdq`` with the learned parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.qat.linear import linear_qat
from edgeslim.qat.traced import quantization_aware_training
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune


@dataclass(frozen=True)
class QATConfig(TechniqueConfig):
    """Int8 quantization-aware training, lowered to the same integer kernels as ``ptq_int8``.

    Activation ranges start from ``calibration_samples`` (min/max), follow EMA min/max observers
    until epoch ``freeze_observers_epoch`` (0-based), then stay fixed, or are learned (LSQ) with
    ``learn_scales``, which also learns the per-channel weight step sizes from the start.
    BatchNorm uses batch statistics until epoch ``freeze_bn_epoch``, running statistics after.
    ``activation_dtype`` only changes the exported zero points (uint8 zp = int8 zp + 128 gives
    the same grid); "auto" is uint8 on x86-64, where ORT fuses shared int8 tensors poorly (see PTQ).
    ``op_types: ["MatMul"]`` switches to QAT of the Linear layers by module wrapping,
    which needs no torch.fx trace and takes several inputs (transformers; qat/linear.py):
    it trains on ``task.train``, or without it on the calibration inputs, reproducing the float
    model's outputs where there are no class labels; ``per_token`` as in ``ptq_int8``.
    ``fine_tune`` (:class:`~edgeslim.train.FineTune`; 2 epochs at lr 1e-4, decayed on a cosine here)
    trains on the labels: QAT takes no temperature or augment_shift.
    """

    fine_tune: FineTune = FineTune.defaults(epochs=2, lr=1e-4)
    learn_scales: bool = True
    freeze_observers_epoch: int = 1
    freeze_bn_epoch: int = 1
    calibration_samples: int = 256
    activation_dtype: Literal["auto", "int8", "uint8"] = "auto"
    op_types: tuple[str, ...] = ()
    per_token: tuple[str, ...] = ()

    def validate(self) -> None:
        ft = self.fine_tune
        if ft.epochs < 1:
            raise ConfigError(f"fine_tune.epochs: must be >= 1, got {ft.epochs}")
        for name in ("temperature", "augment_shift"):
            if getattr(ft, name):
                raise ConfigError(f"fine_tune.{name}: qat_int8 trains on the labels without it; must be 0, "
                                  f"got {getattr(ft, name)}")
        for name, low in (("freeze_observers_epoch", 0), ("freeze_bn_epoch", 0), ("calibration_samples", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        for op in self.op_types:
            if op != "MatMul":
                raise ConfigError(f"op_types: QAT of Linear layers supports MatMul only, got {op!r}")
        if self.per_token and not self.op_types:
            raise ConfigError("per_token: needs op_types (per-token layers exist on the Linear-layer QAT path)")


@register("qat_int8", QATConfig)
def qat_int8(model: ModelArtifact, config: QATConfig, task: Task) -> ModelArtifact:
    """Quantization-aware int8 training, lowered to integer kernels (QDQ) with the learned scales."""
    if config.op_types:
        return linear_qat(model, config, task)
    return quantization_aware_training(model, config, task)[0]
