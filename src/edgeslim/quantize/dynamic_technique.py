"""The ``dynamic_int8`` technique: its config and the registered function (the rewrite is in dynamic.py)."""

from __future__ import annotations

from dataclasses import dataclass

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.quantize.dynamic import SUPPORTED_OPS, quantize_dynamic_graph
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task


@dataclass(frozen=True)
class DynamicInt8Config(TechniqueConfig):
    """Dynamic int8: int8 weights of MatMul/Gemm layers, activations quantized per call (no calibration).

    ``per_channel`` gives each output column its own weight scale. ``ops`` picks the layer types
    to quantize and ``exclude`` names nodes of the exported graph to keep in float.
    ``activation_matmuls`` also quantizes MatMuls between two activations (attention scores),
    both sides per call; off by default because it was slower and less accurate (module docstring).
    For transformers: ``smoothquant_alpha`` migrates activation channel outliers into the weights
    first (SmoothQuant; channel maxima from ``calibration_samples`` calibration samples), and
    ``per_token`` names layers (torch module names or globs, e.g.
    ``"bert.encoder.layer.?.output.dense"``) that get one activation scale per token instead of
    one per tensor; together they make the fastest accurate MiniLM int8 at real sentence lengths
    (``examples/minilm_int8.yaml``).
    """

    per_channel: bool = True
    ops: tuple[str, ...] = ("MatMul", "Gemm")
    exclude: tuple[str, ...] = ()
    activation_matmuls: bool = False
    embeddings: bool = True  # int8 rows for embedding tables (Gather): see quantize/embedding.py
    smoothquant_alpha: float | None = None
    per_token: tuple[str, ...] = ()
    calibration_samples: int = 64
    batch_size: int = 16

    def validate(self) -> None:
        if not self.ops:
            raise ConfigError(f"ops: give at least one of {', '.join(SUPPORTED_OPS)}")
        for op in self.ops:
            if op not in SUPPORTED_OPS:
                raise ConfigError(f"ops: {op!r} is not supported (use {', '.join(SUPPORTED_OPS)})")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"smoothquant_alpha: must be in [0, 1], got {self.smoothquant_alpha}")


@register("dynamic_int8", DynamicInt8Config, graph_only=True)
def dynamic_int8(model: ModelArtifact, config: DynamicInt8Config, task: Task) -> ModelArtifact:
    """Dynamic int8 quantization of Linear layers (int8 weights, activations quantized at run time)."""
    fp32 = model.float_graph("dynamic_int8", task)
    batches = None
    if config.smoothquant_alpha is not None:
        batches = [x for x, _ in task.calibration_batches(config.batch_size, limit=config.calibration_samples)]
    graph = quantize_dynamic_graph(fp32, config, batches)
    ops = [n.op_type for n in graph.graph.node]
    notes = {"quantized_layers": ops.count("MatMulInteger"),
             "dynamic_quantize_nodes": ops.count("DynamicQuantizeLinear"),
             "float_matmuls": ops.count("MatMul") + ops.count("Gemm")}
    return ModelArtifact(torch=model.torch, onnx=graph, notes=notes)
