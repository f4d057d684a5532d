"""Quantization: observers, calibration, BN folding, lowering to graphs ORT runs on integer kernels.

Techniques (registered by name): ptq_int8 (static), mixed_precision (accuracy-aware static),
qat_int8 (quantization-aware training, learned scales exported exactly),
dynamic_int8 (run-time activation quantization), weight_only (int4/int8 group-wise MatMulNBits).
"""

from edgeslim.quantize.dynamic import quantize_dynamic_graph
from edgeslim.quantize.dynamic_technique import DynamicInt8Config
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import lower_qdq, plan_quantization
from edgeslim.quantize.mixed_technique import MixedPrecisionConfig, mixed_precision
from edgeslim.quantize.ptq import check_integer_parity, quantize_static
from edgeslim.quantize.ptq_technique import PTQInt8Config, ptq_int8
from edgeslim.quantize.qat import QATConfig, qat_int8
from edgeslim.quantize.weight_only import quantize_weight_only_graph
from edgeslim.quantize.weight_only_technique import WeightOnlyConfig

__all__ = [
    "DynamicInt8Config",
    "MixedPrecisionConfig",
    "PTQInt8Config",
    "QATConfig",
    "WeightOnlyConfig",
    "check_integer_parity",
    "fold_batchnorm",
    "lower_qdq",
    "mixed_precision",
    "plan_quantization",
    "ptq_int8",
    "qat_int8",
    "quantize_dynamic_graph",
    "quantize_static",
    "quantize_weight_only_graph",
]
