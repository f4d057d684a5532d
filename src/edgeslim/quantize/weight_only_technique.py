"""The ``weight_only`` technique: its config and the registered function (the rewrite and the
bit-width budget search are in weight_only.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.quantize.weight_only import SUPPORTED_BITS, budgeted_bits, quantize_weight_only_graph
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task


@dataclass(frozen=True)
class WeightOnlyConfig(TechniqueConfig):
    """Weight-only quantization of MatMul/Gemm weights to ``bits`` bits in groups of ``group_size`` inputs.

    ``symmetric`` stores no zero points (codes centred on 2^(bits-1)); asymmetric groups use
    their own min/max range. ``exclude`` names nodes of the exported graph to keep in float.
    ``accuracy_level`` 0 computes in fp32 with exactly decoded weights; 4 lets ORT quantize the
    activations to int8 inside the kernel (several times faster, slightly less accurate).
    ``layer_bits`` sets the width of named layers; with ``max_drop``, each layer is measured alone
    at ``bits`` and the fewest most-sensitive layers go to ``high_bits`` to keep the metric within
    the budget (int4 with a few int8 layers; the table is written as ``sensitivity.md``), measured on
    ``validation_samples`` samples of the calibration set picked by a shuffle seeded with ``seed``
    (None: all of it, at most 512), never on the evaluation set; none is scanned when every
    layer at ``bits`` already meets the budget.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    exclude: tuple[str, ...] = ()
    accuracy_level: int = 0
    embeddings: bool = True  # int8 rows for embedding tables (Gather): see quantize/embedding.py
    scale_search: bool = True  # per-group clipping that minimises the squared weight error
    layer_bits: dict[str, int] = field(default_factory=dict)  # node name -> bits, overriding ``bits``
    max_drop: float | None = None  # accuracy budget: promote the fewest layers to ``high_bits`` to meet it
    high_bits: int = 8
    validation_samples: int | None = None  # held out from calibration for the budget search (see mixed.hold_out)
    seed: int = 0  # shuffles the validation split
    progress: bool = True  # a line per layer of the budget search

    def validate(self) -> None:
        for name, value in [("bits", self.bits), ("high_bits", self.high_bits),
                            *((f"layer_bits.{k}", v) for k, v in self.layer_bits.items())]:
            if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= 8:
                raise ConfigError(f"{name}: must be in 2..8, got {value!r}")
            if value not in SUPPORTED_BITS:
                raise ConfigError(f"{name}: ONNX Runtime's CPU MatMulNBits kernel runs 2, 4 or 8 bits, got {value}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ConfigError(f"max_drop: must be >= 0, got {self.max_drop}")
        if self.validation_samples is not None and self.validation_samples < 1:
            raise ConfigError(f"validation_samples: must be >= 1, got {self.validation_samples}")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise ConfigError("group_size: must be a power of two >= 16 (MatMulNBits block_size), "
                              f"got {self.group_size}")
        if self.accuracy_level not in (0, 4):
            raise ConfigError("accuracy_level: must be 0 (fp32 compute) or 4 (int8 activations), "
                              f"got {self.accuracy_level}")


@register("weight_only", WeightOnlyConfig, graph_only=True)
def weight_only(model: ModelArtifact, config: WeightOnlyConfig, task: Task) -> ModelArtifact:
    """Weight-only group-wise int4/int8 quantization of Linear layers (ORT MatMulNBits)."""
    fp32 = model.float_graph("weight_only", task)
    files: dict[str, str | bytes] = {}
    if config.max_drop is not None:
        config, files = budgeted_bits(fp32, config, task)
    graph = quantize_weight_only_graph(fp32, config)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    widths = [next(a.i for a in n.attribute if a.name == "bits") for n in nbits]
    notes = {"quantized_layers": len(nbits), "bits": config.bits, "group_size": config.group_size,
             "layers_at_bits": {str(b): widths.count(b) for b in sorted(set(widths))}}
    return ModelArtifact(torch=model.torch, onnx=graph, notes=notes, files=files)
