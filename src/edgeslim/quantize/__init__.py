"""Quantization: observers, calibration, BN folding and lowering to ONNX QDQ graphs ORT fuses."""

from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import lower_qdq, plan_quantization
from edgeslim.quantize.ptq import PTQInt8Config, check_integer_parity, ptq_int8, quantize_static

__all__ = ["PTQInt8Config", "check_integer_parity", "fold_batchnorm", "lower_qdq", "plan_quantization", "ptq_int8", "quantize_static"]
