"""Quantization: observers, calibration, BN folding, lowering to graphs ORT runs on integer kernels.

Techniques (registered by name): ptq_int8 (static), mixed_precision (accuracy-aware static),
qat_int8 (quantization-aware training, learned scales exported exactly),
dynamic_int8 (run-time activation quantization), weight_only (int4/int8 group-wise MatMulNBits).
"""

from edgeslim.quantize.dynamic import DynamicInt8Config, quantize_dynamic_graph
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import lower_qdq, plan_quantization
from edgeslim.quantize.mixed import MixedPrecisionConfig, mixed_precision
from edgeslim.quantize.ptq import PTQInt8Config, check_integer_parity, ptq_int8, quantize_static
from edgeslim.quantize.qat import QATConfig, qat_int8
from edgeslim.quantize.weight_only import WeightOnlyConfig, quantize_weight_only_graph

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
