"""Quantization-aware training: fake-quant models trained in PyTorch, lowered to the integer
kernels ONNX Runtime runs with the learned scales (through :mod:`edgeslim.quantize`'s lowering).

Modules: fake_quant.py (fake quantizers, STE, LSQ; the torch-side model surgery), model.py (the
fake-quant model, calibration and the training loop both paths share), traced.py (placement by
torch.fx tracing: CNNs), linear.py (Linear layers wrapped in place: transformers, several inputs).
Technique (registered by name): qat_int8 (technique.py).
"""

from edgeslim.qat.technique import QATConfig, qat_int8

__all__ = ["QATConfig", "qat_int8"]
