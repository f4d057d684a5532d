"""Quantization of ONNX graphs: observers, calibration, BN folding, lowering to graphs ORT runs on integer kernels.

Techniques (registered by name; each in <name>_technique.py): ptq_int8 (static), mixed_precision
(accuracy-aware static), dynamic_int8 (run-time activation quantization), weight_only (int4/int8
group-wise MatMulNBits). Quantization-aware training, which trains in PyTorch and lowers through
this package, is :mod:`edgeslim.qat` (qat_int8).
"""

from edgeslim.quantize.dynamic import quantize_dynamic_graph
from edgeslim.quantize.dynamic_technique import DynamicInt8Config
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import lower_qdq, plan_quantization
from edgeslim.quantize.mixed_technique import MixedPrecisionConfig, mixed_precision
from edgeslim.quantize.ptq import check_integer_parity, quantize_static
from edgeslim.quantize.ptq_technique import PTQInt8Config, ptq_int8
from edgeslim.quantize.weight_only import quantize_weight_only_graph
from edgeslim.quantize.weight_only_technique import WeightOnlyConfig

__all__ = [
    "DynamicInt8Config",
    "MixedPrecisionConfig",
    "PTQInt8Config",
    "WeightOnlyConfig",
    "check_integer_parity",
    "fold_batchnorm",
    "lower_qdq",
    "mixed_precision",
    "plan_quantization",
    "ptq_int8",
    "quantize_dynamic_graph",
    "quantize_static",
    "quantize_weight_only_graph",
]
