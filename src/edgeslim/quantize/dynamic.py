"""Dynamic int8 quantization of Linear layers (MatMul / Gemm): int8 weights, activations quantized at run time.

No calibration: each activation's uint8 scale and zero point are computed per call from its
actual min/max (ONNX ``DynamicQuantizeLinear``), so the method suits models whose activation
ranges vary with the input (transformers, RNN-like MLPs), at the cost of one extra pass over
each activation.

Lowered form. We emit standard ONNX ops, per Linear layer::

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zp)
    MatMulInteger(x_q, W_q int8 [K, N], x_zp) -> Cast(float) -> Mul(Mul(x_scale, w_scale)) [-> Add(bias)]

and let ORT's optimizer fuse it: ``MatMulIntegerToFloatFusion`` (onnxruntime/core/optimizer/
matmul_integer_to_float.cc) turns MatMulInteger -> Cast -> Mul, with the scales' Mul on the
other side and an optional constant 1-D bias Add, into ``com.microsoft::MatMulIntegerToFloat``;
``DynamicQuantizeMatMulFusion`` (dynamic_quantize_matmul_fusion.cc) then folds a
DynamicQuantizeLinear whose three outputs feed only that node into
``com.microsoft::DynamicQuantizeMatMul``. A DynamicQuantizeLinear shared by several layers
(q/k/v projections of one input) stays separate and those layers run as MatMulIntegerToFloat:
the input is quantized once. Why not emit the contrib ops directly: the standard form is a
valid ONNX graph any runtime (and ``onnx.checker``) accepts, and ORT 1.32 reaches the same fused
kernels from it (checked with ``inspect_optimized``; identical to what ORT's own
``quantize_dynamic`` produces for these layers). The scale Mul must read ``(x_scale, w_scale)``
in that order: the fusion takes its inputs 0 and 1 as A's and B's scale.

MatMuls between two activations (attention scores q @ k^T, attn @ v) stay in float by
default, as in ORT's ``quantize_dynamic``: quantizing both sides costs two extra quantize passes
and blocks ORT's Transpose/scale -> FusedMatMul fusion, and measured on a q/k/v/o block
(d=256, seq=128, 1 thread) it was slower (0.250 vs 0.211 ms) and less accurate (38.9 vs
41.2 dB SQNR). ``activation_matmuls=True`` quantizes them too (all compute on integer kernels).

Weights are symmetric int8 in [-127, 127] (zero point 0, so MatMulInteger's b_zero_point is
omitted), per output column or per tensor. Activations are uint8 (DynamicQuantizeLinear's only
output type), i.e. the U8S8 kernels; on x86 CPUs without VNNI, MLAS's U8S8 path can saturate
int16 intermediates (ORT's quantize_dynamic offers 7-bit reduce_range for such CPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslim.config import TechniqueConfig
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.graph_edit import rebuild
from edgeslim.errors import ConfigError, ModelError
from edgeslim.quantize.lower import quantize_weight
from edgeslim.runtime.names import FreshNames
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task

SUPPORTED_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class DynamicInt8Config(TechniqueConfig):
    """Dynamic int8: int8 weights of MatMul/Gemm layers, activations quantized per call (no calibration).

    ``per_channel`` gives each output column its own weight scale. ``ops`` picks the layer types
    to quantize and ``exclude`` names nodes of the exported graph to keep in float.
    ``activation_matmuls`` also quantizes MatMuls between two activations (attention scores),
    both sides per call; off by default because it was slower and less accurate (module docstring).
    """

    per_channel: bool = True
    ops: tuple[str, ...] = ("MatMul", "Gemm")
    exclude: tuple[str, ...] = ()
    activation_matmuls: bool = False
    embeddings: bool = True  # int8 rows for embedding tables (Gather): see quantize/embedding.py

    def validate(self) -> None:
        if not self.ops:
            raise ConfigError(f"ops: give at least one of {', '.join(SUPPORTED_OPS)}")
        for op in self.ops:
            if op not in SUPPORTED_OPS:
                raise ConfigError(f"ops: {op!r} is not supported (use {', '.join(SUPPORTED_OPS)})")


@dataclass
class LinearSite:
    """A Linear-like node with a constant weight, in MatMul form: ``y = x @ weight (+ bias)``."""

    index: int  # position in graph.node
    node: onnx.NodeProto
    weight: np.ndarray  # [K, N] float32: Gemm's transB undone and alpha folded in
    bias: np.ndarray | None  # Gemm's beta * C (constant), any shape broadcastable to [M, N]


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or ``OpType_index`` when the exporter left it unnamed."""
    return node.name or f"{node.op_type}_{index}"


def check_exclude(graph: onnx.GraphProto, exclude: Collection[str], ops: Collection[str]) -> None:
    """ConfigError when ``exclude`` names a node the graph does not have (listing the candidates)."""
    names = {node_label(n, i) for i, n in enumerate(graph.node)}
    for name in exclude:
        if name not in names:
            candidates = [node_label(n, i) for i, n in enumerate(graph.node) if n.op_type in ops]
            shown = ", ".join(candidates[:12]) + (", ..." if len(candidates) > 12 else "")
            raise ConfigError(f"exclude: no node named {name!r} in the exported graph "
                              f"({'/'.join(ops)} nodes: {shown or 'none'})")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _float_const(inits: dict[str, TensorProto], name: str, ndim: set[int] | None = None) -> np.ndarray | None:
    init = inits.get(name)
    if init is None or init.data_type != TensorProto.FLOAT or (ndim is not None and len(init.dims) not in ndim):
        return None
    return numpy_helper.to_array(init)


def find_linear_sites(model: onnx.ModelProto, ops: Collection[str] = SUPPORTED_OPS,
                      exclude: Collection[str] = ()) -> list[LinearSite]:
    """MatMul / Gemm nodes whose B is a constant 2-D float initializer (a Linear layer's weight).

    Gemm qualifies when ``transA == 0`` and C is absent or constant; its ``transB`` and ``alpha``
    are folded into the weight and ``beta`` into the bias, so every site reads ``x @ W + b``.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    sites: list[LinearSite] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in ops or node.domain not in ("", "ai.onnx") or node_label(node, index) in exclude:
            continue
        if len(node.input) < 2 or node.input[0] in inits:
            continue
        w = _float_const(inits, node.input[1], {2})
        if w is None:
            continue
        bias = None
        if node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transA", 0):
                continue
            if len(node.input) > 2 and node.input[2]:
                c = _float_const(inits, node.input[2])
                if c is None:
                    continue
                bias = (np.float32(a.get("beta", 1.0)) * c).astype(np.float32)
            w = w.T if a.get("transB", 0) else w
            w = w * np.float32(a.get("alpha", 1.0))
        sites.append(LinearSite(index, node, np.ascontiguousarray(w, dtype=np.float32), bias))
    return sites


class NewConstants:
    """Initializers a rewrite adds, under fresh names; ``tensors`` goes to ``rebuild``."""

    def __init__(self, fresh: FreshNames) -> None:
        self.fresh = fresh
        self.tensors: list[TensorProto] = []

    def __call__(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.tensors.append(numpy_helper.from_array(value, name))
        return name


def _dynamic_matmul_sites(graph: onnx.GraphProto, ops: Collection[str], exclude: Collection[str],
                          taken: set[int]) -> list[int]:
    """MatMuls with two run-time inputs (e.g. attention q @ k^T), for ``activation_matmuls``."""
    inits = {i.name for i in graph.initializer}
    return [i for i, n in enumerate(graph.node)
            if "MatMul" in ops and n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and i not in taken
            and node_label(n, i) not in exclude and len(n.input) == 2
            and n.input[0] not in inits and n.input[1] not in inits]


def quantize_dynamic_graph(model: onnx.ModelProto, config: DynamicInt8Config = DynamicInt8Config()) -> onnx.ModelProto:
    """A copy of float ``model`` with its MatMul/Gemm layers on dynamic int8 (see the module docstring).

    Raises ConfigError when ``config.exclude`` names an unknown node, ModelError when the graph's
    opset predates DynamicQuantizeLinear (11).
    """
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ModelError(f"dynamic int8 needs ONNX opset >= 11 (DynamicQuantizeLinear), the graph has opset {opset}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    check_exclude(graph, config.exclude, config.ops)
    sites = {s.index: s for s in find_linear_sites(out, config.ops, config.exclude)}
    act_act = set()
    if config.activation_matmuls:
        act_act = set(_dynamic_matmul_sites(graph, config.ops, config.exclude, set(sites)))
    fresh = FreshNames(graph)
    const = NewConstants(fresh)

    quantized: dict[str, tuple[str, str, str]] = {}  # float tensor -> its (q, scale, zero point)

    def quantize_input(tensor: str, nodes: list[onnx.NodeProto]) -> tuple[str, str, str]:
        # One DynamicQuantizeLinear per tensor, shared by all its quantized consumers (q/k/v).
        if tensor not in quantized:
            q, s, z = fresh(f"{tensor}/q"), fresh(f"{tensor}/scale"), fresh(f"{tensor}/zp")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [tensor], [q, s, z],
                                          name=fresh(f"{tensor}/DynamicQuantize")))
            quantized[tensor] = (q, s, z)
        return quantized[tensor]

    ordered: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if index not in sites and index not in act_act:
            ordered.append(node)
            continue
        base = node_label(node, index)
        x_q, x_s, x_z = quantize_input(node.input[0], ordered)
        if index in sites:
            site = sites[index]
            w_q, w_scale = quantize_weight(site.weight, axis=1 if config.per_channel else None)
            mm_inputs = [x_q, const(f"{base}/W_int8", w_q), x_z]
            scale_inputs = [x_s, const(f"{base}/W_scale", w_scale)]
            bias = site.bias
        else:
            b_q, b_s, b_z = quantize_input(node.input[1], ordered)
            mm_inputs, scale_inputs, bias = [x_q, b_q, x_z, b_z], [x_s, b_s], None
        acc, acc_f, scale = fresh(f"{base}/acc_int32"), fresh(f"{base}/acc_float"), fresh(f"{base}/scale")
        y = node.output[0]
        y_mul = fresh(f"{base}/scaled") if bias is not None else y
        ordered += [
            helper.make_node("MatMulInteger", mm_inputs, [acc], name=fresh(f"{base}/MatMulInteger")),
            helper.make_node("Cast", [acc], [acc_f], name=fresh(f"{base}/Cast"), to=TensorProto.FLOAT),
            helper.make_node("Mul", scale_inputs, [scale], name=fresh(f"{base}/ScaleProduct")),
            helper.make_node("Mul", [acc_f, scale], [y_mul], name=fresh(f"{base}/Rescale")),
        ]
        if bias is not None:
            b = const(f"{base}/bias", bias)
            ordered.append(helper.make_node("Add", [y_mul, b], [y], name=fresh(f"{base}/Bias")))

    rebuild(graph, ordered, const.tensors)
    if config.embeddings:
        out = quantize_embeddings(out)
    return out


@register("dynamic_int8", DynamicInt8Config)
def dynamic_int8(model: ModelArtifact, config: DynamicInt8Config, task: Task) -> ModelArtifact:
    """Dynamic int8 quantization of Linear layers (int8 weights, activations quantized at run time)."""
    module = model.float_copy("dynamic_int8")
    fp32 = task.export(module)
    graph = quantize_dynamic_graph(fp32, config)
    ops = [n.op_type for n in graph.graph.node]
    notes = {"quantized_layers": ops.count("MatMulInteger"),
             "dynamic_quantize_nodes": ops.count("DynamicQuantizeLinear"),
             "float_matmuls": ops.count("MatMul") + ops.count("Gemm")}
    return ModelArtifact(torch=module, onnx=graph, notes=notes)
