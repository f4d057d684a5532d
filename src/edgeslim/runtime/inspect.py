"""Report on the graph ONNX Runtime actually executes, after its own optimisations.

A QDQ model only runs in integer arithmetic where ORT fuses DequantizeLinear -> Conv ->
QuantizeLinear into QLinearConv (and friends). Inspecting the *input* graph cannot tell
whether that happened, so we ask ORT to save its optimized graph and count ops in that.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from edgeslim.errors import RuntimeToolError
from edgeslim.runtime.ort import first_line, make_session
from edgeslim.runtime.stats import op_histogram

__all__ = ["COMPUTE_OPS", "INT8_OPS", "GraphReport", "report_graph", "inspect_optimized"]

# Integer (quantized) compute ops, ONNX standard and com.microsoft contrib.
INT8_OPS: frozenset[str] = frozenset({
    "QLinearConv", "NhwcQLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention", "QOrderedAttention",
    "QOrderedMatMul", "MatMulNBits", "MatMulBnb4", "DynamicQuantizeLSTM", "QLinearConvTranspose",
})
# Ops that carry the bulk of the arithmetic (MACs). Matched by op type regardless of domain:
# at level "all" ORT rewrites fp32 Conv into com.microsoft.nchwc:Conv and fuses Conv+act into
# com.microsoft:FusedConv, which must still count as (float) compute.
COMPUTE_OPS: frozenset[str] = INT8_OPS | frozenset({
    "Conv", "FusedConv", "NhwcConv", "NhwcFusedConv", "ConvTranspose", "MatMul", "FusedMatMul",
    "Gemm", "FusedGemm", "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN",
    "Einsum",
})


@dataclass(frozen=True)
class GraphReport:
    """Op statistics of an (optimized) graph and how much of its compute is integer."""

    op_histogram: dict[str, int]
    compute_ops: int
    int_compute_ops: int
    int8_op_fraction: float | None  # None when the graph has no compute ops at all
    fp_compute_nodes: list[str] = field(default_factory=list)  # float compute nodes: "which layer is not quantized"

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


def report_graph(model: onnx.ModelProto) -> GraphReport:
    """Build a :class:`GraphReport` for ``model`` as given (no ORT involved)."""
    compute = int_compute = 0
    fp_nodes: list[str] = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in COMPUTE_OPS:
            continue
        compute += 1
        if node.op_type in INT8_OPS:
            int_compute += 1
        else:
            fp_nodes.append(node.name or (node.output[0] if node.output else f"{node.op_type}_{i}"))
    return GraphReport(
        op_histogram=op_histogram(model),
        compute_ops=compute,
        int_compute_ops=int_compute,
        int8_op_fraction=(int_compute / compute) if compute else None,
        fp_compute_nodes=fp_nodes,
    )


def inspect_optimized(
    model: onnx.ModelProto | str | Path,
    *,
    threads: int = 1,
    optimization: str = "all",
) -> GraphReport:
    """Report on the graph ORT runs for ``model`` at ``optimization`` level (not the input graph)."""
    with tempfile.TemporaryDirectory(prefix="edgeslim-opt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(model, threads=threads, optimization=optimization, optimized_model_path=out)
        if not out.is_file():
            raise RuntimeToolError(f"ONNX Runtime did not write its optimized graph to {out}")
        try:
            # The file may hold contrib-domain ops (com.microsoft, com.microsoft.nchwc); we only
            # read nodes, never check or re-run it, and skip any external weight data.
            optimized = onnx.load(str(out), load_external_data=False)
        except Exception as exc:
            raise RuntimeToolError(f"cannot read ORT's optimized graph {out}: {first_line(exc)}") from exc
    return report_graph(optimized)
