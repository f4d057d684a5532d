"""Static int8 post-training quantization (PTQ), lowered to an ONNX QDQ graph ORT runs on integer kernels."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Literal

import numpy as np
import onnx
import onnxruntime as ort

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError, ExportError
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import lower_qdq, plan_quantization
from edgeslim.registry import register
from edgeslim.runtime.ort import input_feed
from edgeslim.task import ModelArtifact, Task


@dataclass(frozen=True)
class PTQInt8Config(TechniqueConfig):
    """Static int8 PTQ: per-channel symmetric int8 weights, per-tensor asymmetric activations.

    ``activation_dtype`` int8 is ORT's default (S8S8); uint8 (U8S8) is the native form of x86's
    VNNI instructions. ``calibration_samples`` are taken from the task's calibration set.
    """

    calibration_samples: int = 256
    batch_size: int = 32
    observer: Literal["minmax"] = "minmax"
    activation_dtype: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples: must be >= 1, got {self.calibration_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


def quantize_static(
    fp32: onnx.ModelProto, batches: Iterable[np.ndarray], config: PTQInt8Config = PTQInt8Config(), total: int | None = None
) -> onnx.ModelProto:
    """Quantize a float ONNX graph with ranges observed on ``batches`` (arrays fed to its first input)."""
    folded = fold_batchnorm(fp32)
    plan = plan_quantization(folded)
    ranges = collect_ranges(folded, plan.calibrated, batches, observer=config.observer, total=total, progress=config.progress)
    return lower_qdq(folded, plan, ranges, activation_dtype=config.activation_dtype, per_channel=config.per_channel)


def check_integer_parity(qdq: onnx.ModelProto, x: np.ndarray | tuple[np.ndarray, ...], max_steps: float = 4.0) -> float:
    """Compare ORT's fused integer kernels with the unfused QDQ graph (float simulation of the same
    quantization). They may differ by requantization rounding, a few output steps at most; more
    means a fusion changed the math. Returns the max abs difference."""
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(qdq.SerializeToString(), opts, providers=["CPUExecutionProvider"])
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
    if model.onnx is not None:
        raise ConfigError("ptq_int8: the model is already lowered to a quantized graph; put ptq_int8 last")
    module = copy.deepcopy(model.torch).eval()
    fp32 = task.export(module)
    total = min(config.calibration_samples, _count(task))
    batches = (x for x, _ in task.calibration_batches(config.batch_size, limit=config.calibration_samples))
    qdq = quantize_static(fp32, batches, config, total=total)
    probe = next(x for x, _ in task.calibration_batches(min(8, config.batch_size)))
    parity = check_integer_parity(qdq, probe)
    return ModelArtifact(torch=module, onnx=qdq, notes={"calibration_samples": total, "integer_parity_max_abs_diff": parity})


def _count(task: Task) -> int:
    from edgeslim.task import count_samples

    return count_samples(task.calibration)
