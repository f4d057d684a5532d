"""Lower a float ONNX graph to a QDQ graph in the exact form ONNX Runtime fuses into integer kernels.

What ORT needs (onnxruntime/core/optimizer/qdq_transformer): a compute node whose every input
comes from a DequantizeLinear (weights: int8 initializer -> DQ; bias: int32 initializer -> DQ with
scale = x_scale * w_scale) and whose output goes into a QuantizeLinear becomes QLinearConv /
QGemm / QLinearMatMul. A Relu (or Clip) between the node and that Q is dropped by ORT when the
Q's zero point sits at the bottom of the integer range, so activations after a ReLU are
quantized asymmetrically with range [0, max]. Shape-only ops (MaxPool, Reshape, Flatten, ...)
get Q/DQ with the *same* parameters on both sides, which lets ORT run them on int8 directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeslim.runtime.graph_edit import rebuild

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# Ops whose output may reuse the input's quantization parameters (values are only moved).
SAME_SCALE_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
# Ops ORT has QLinear kernels for: inputs and output quantized with their own ranges.
QLINEAR_OPS = ("Add", "GlobalAveragePool", "AveragePool", "Concat")
FUSABLE_ACTIVATIONS = ("Relu", "Clip")


@dataclass
class QuantPlan:
    """Which tensors get Q/DQ pairs, which weights get quantized, and which ranges are borrowed."""

    weighted: list[int] = field(default_factory=list)  # indices of Conv/Gemm/MatMul nodes to quantize
    tensors: list[str] = field(default_factory=list)  # in topological order
    same_as: dict[str, str] = field(default_factory=dict)  # output tensor -> tensor whose params it reuses
    kept_float: list[int] = field(default_factory=list)  # excluded weighted nodes: they read float inputs

    @property
    def calibrated(self) -> list[str]:
        """Tensors whose range must be observed (the rest borrow a range)."""
        return [t for t in self.tensors if t not in self.same_as]


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _is_float_weight(init: onnx.TensorProto | None, ndim: set[int]) -> bool:
    return init is not None and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) in ndim


def _weight_ok(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    if len(node.input) < 2:
        return False
    w = inits.get(node.input[1])
    if node.op_type == "Conv":
        return _is_float_weight(w, {3, 4, 5})
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return False
        if len(node.input) > 2 and node.input[2] and not _is_float_weight(inits.get(node.input[2]), {1}):
            return False
        return _is_float_weight(w, {2})
    return node.op_type == "MatMul" and _is_float_weight(w, {2})


def layer_name(node: onnx.NodeProto) -> str:
    """A weighted node's layer name, i.e. the torch module it came from: its weight's parameter name
    without ".weight" (e.g. "features.3"), else the module path the exporter recorded in the node's
    metadata (transposed Linear weights lose their names), else the ONNX node name."""
    w = (node.input[1] if len(node.input) > 1 else "").removesuffix(".bnfold")
    if w.endswith(".weight"):
        return w.removesuffix(".weight")
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in prop.value.strip("[]").split(",")]
            if len(scopes) >= 2 and scopes[-2]:
                return scopes[-2]  # the last entry names the op, the one before it the module
    return node.name


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors (shape inference gives intermediate types): only those are quantized;
    transformer graphs also carry int64 arithmetic (mask and position computations)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort; unknown types are then treated as float
        inferred = model
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    known = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    return {t for t in produced if known.get(t, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT}


def plan_quantization(model: onnx.ModelProto, exclude: Collection[str] = (),
                      op_types: Collection[str] | None = None, activation_matmuls: bool = False) -> QuantPlan:
    """Decide the Q/DQ placement for ``model`` (BatchNorm already folded).

    Nodes named in ``exclude`` (ONNX node name or layer name) stay in float: mixed precision
    keeps sensitive layers there. ``op_types`` limits quantization to those op types; then a
    MatMul's output stays float (ORT runs DQ -> MatMul as MatMulIntegerToFloat), which suits
    transformers, where residual and mask Adds must not be squeezed into int8.
    ``activation_matmuls`` also quantizes both inputs of MatMuls between two activations
    (attention's Q·Kᵀ and P·V), which ORT then runs as integer kernels too.
    """
    graph = model.graph
    inits = _initializers(graph)
    users = _consumers(graph)
    floats = _float_tensors(model)
    allowed = set(op_types) if op_types else None
    graph_outputs = {o.name for o in graph.output}
    plan = QuantPlan()
    chosen: set[str] = set()

    def wanted(op: str) -> bool:
        return allowed is None or op in allowed

    def add(name: str, same_as: str | None = None) -> None:
        if name and name not in chosen and name not in inits and name in floats:
            chosen.add(name)
            plan.tensors.append(name)
            if same_as is not None:
                plan.same_as[name] = plan.same_as.get(same_as, same_as)

    for index, node in enumerate(graph.node):
        op = node.op_type
        if op in WEIGHTED_OPS and {node.name, layer_name(node)} & set(exclude):
            plan.kept_float.append(index)
        elif op in WEIGHTED_OPS and wanted(op) and _weight_ok(node, inits):
            plan.weighted.append(index)
            add(node.input[0])
            if allowed is not None and op == "MatMul":
                continue
            out = node.output[0]
            nxt = users.get(out, [])
            # Conv -> Relu -> Q: quantize after the activation so ORT folds the Relu away.
            if len(nxt) == 1 and nxt[0].op_type in FUSABLE_ACTIVATIONS and out not in graph_outputs:
                add(nxt[0].output[0])
            else:
                add(out)
        elif (op == "MatMul" and activation_matmuls and wanted(op) and not {node.name} & set(exclude)
              and all(n not in inits for n in node.input)):
            for name in node.input:
                add(name)
        elif op in SAME_SCALE_OPS and wanted(op) and node.input[0] in chosen:
            add(node.output[0], same_as=node.input[0])
        elif op in QLINEAR_OPS and wanted(op) and all(n in floats or n in inits for n in node.input if n):
            for name in node.input:
                if name not in inits:
                    add(name)
            add(node.output[0])
    return plan


def activation_params(lo: float, hi: float, dtype: str, symmetric: bool = False) -> tuple[float, int]:
    """Affine parameters ``(scale, zero_point)`` for a tensor observed in [lo, hi].

    Asymmetric (default): the grid covers [min(lo,0), max(hi,0)], so zero is exact and a ReLU
    output gets the zero point at the bottom of the range. Symmetric: zero point 0 (int8) or
    128 (uint8) and the grid covers [-max|x|, max|x|].
    """
    qmin, qmax = (-128, 127) if dtype == "int8" else (0, 255)
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        bound = max(-rmin, rmax)
        if bound <= 1e-12:
            return 1.0, 0 if dtype == "int8" else 128
        return float(bound / 127.0), 0 if dtype == "int8" else 128
    scale = (rmax - rmin) / (qmax - qmin)
    if scale <= 1e-12:  # a constant-zero tensor: any scale represents it exactly
        return 1.0, qmin if rmin == 0.0 else 0
    zero_point = int(np.clip(np.round(qmin - rmin / scale), qmin, qmax))
    return float(scale), zero_point


def quantize_weight(w: np.ndarray, axis: int | None, bound: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights in [-127, 127]; per-channel along ``axis`` or per-tensor (None).

    The grid spans ``[-bound, bound]``, by default the weights' largest magnitude (per channel);
    a smaller ``bound`` (float64, one per channel or a scalar) clips, e.g. at the MSE-optimal range.
    """
    if bound is not None:
        absmax = bound
    elif axis is None:
        absmax = np.array(np.abs(w).max(), dtype=np.float64)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        absmax = np.abs(w).max(axis=reduce).astype(np.float64)
    scale = (np.maximum(absmax, 1e-12) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a Conv / Gemm / MatMul weight: one scale per entry along it
    when weights are quantized per channel (Conv (C_out, C_in, ...): 0; MatMul B (K, N): 1)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1  # the output-feature axis of B
    return 1  # MatMul: B is (K, N)


def lower_qdq(
    model: onnx.ModelProto,
    plan: QuantPlan,
    ranges: dict[str, tuple[float, float]],
    *,
    activation_dtype: str = "int8",
    activation_symmetric: bool = False,
    per_channel: bool = True,
    act_params: Mapping[str, tuple[float, int]] | None = None,
    weight_params: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    dq_readers: Collection[int] | None = None,
) -> onnx.ModelProto:
    """Return a QDQ copy of ``model``: int8 weights + DQ, int32 biases + DQ, Q/DQ pairs on ``plan.tensors``.

    ``ranges`` gives each calibrated tensor's (lo, hi). ``act_params`` overrides a tensor's
    ``(scale, zero_point)`` exactly (QAT's learned scales); ``weight_params`` overrides a node's
    ``(int8 weights, scales)`` by node name (AdaRound, learned weight scales). By default every
    consumer of a quantized tensor reads it dequantized; with ``dq_readers`` (node indices) only
    those do and the others read the float tensor (Linear-layer QAT quantizes a LayerNorm output
    for q/k/v, not for the residual Add that also reads it).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = _initializers(graph)
    zp_np = np.int8 if activation_dtype == "int8" else np.uint8
    params: dict[str, tuple[float, int]] = {}
    act_params = act_params or {}
    weight_params = weight_params or {}
    for name in plan.tensors:
        source = plan.same_as.get(name, name)
        if source in act_params:
            params[name] = act_params[source]
            continue
        if source not in ranges:
            raise KeyError(f"no calibrated range for tensor {source!r}")
        params[name] = activation_params(*ranges[source], activation_dtype, activation_symmetric)

    new_inits: list[onnx.TensorProto] = []
    new_nodes: dict[str, list[onnx.NodeProto]] = {}  # producer output -> nodes inserted after it
    head_nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    # 1. Weights and biases -> integer initializers behind DequantizeLinear.
    for index in plan.weighted:
        node = graph.node[index]
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        axis = weight_axis(node) if per_channel else None
        qw, w_scale = weight_params[node.name] if node.name in weight_params else quantize_weight(w, axis)
        if w_scale.ndim == 0:
            axis = None
        tag = f"{node.name or w_name}"
        dq_inputs = [const(f"{tag}.w_q", qw), const(f"{tag}.w_scale", w_scale),
                     const(f"{tag}.w_zp", np.zeros_like(w_scale, dtype=np.int8))]
        dq_attrs = {"axis": axis} if axis is not None else {}
        dq = helper.make_node("DequantizeLinear", dq_inputs, [f"{tag}.w_dq"], name=f"{tag}.w_DQ", **dq_attrs)
        head_nodes.append(dq)
        node.input[1] = dq.output[0]
        if len(node.input) > 2 and node.input[2]:
            b_name = node.input[2]
            x_scale = params[node.input[0]][0]
            b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
            b_scale = (np.float64(x_scale) * w_scale.astype(np.float64)).astype(np.float32)
            b_scale = np.broadcast_to(b_scale, b.shape).copy() if b_scale.ndim else b_scale
            qb = np.clip(np.round(b / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
            battrs = {"axis": 0} if b_scale.ndim else {}
            bdq = helper.make_node(
                "DequantizeLinear",
                [const(f"{tag}.b_q", qb), const(f"{tag}.b_scale", b_scale),
                 const(f"{tag}.b_zp", np.zeros(b_scale.shape, dtype=np.int32))],
                [f"{tag}.b_dq"], name=f"{tag}.b_DQ", **battrs,
            )
            head_nodes.append(bdq)
            node.input[2] = bdq.output[0]

    # 2. Activations: rename the producer's output to NAME.f, then NAME.f -> Q -> DQ -> NAME, so
    #    every consumer (and a graph output of that name) reads the dequantized tensor unchanged.
    graph_inputs = {i.name for i in graph.input}
    producers = {o: n for n in graph.node for o in n.output}
    rename_in: dict[str, str] = {}
    for name in plan.tensors:
        scale, zp = params[name]
        s = const(f"{name}.scale", np.array(scale, dtype=np.float32))
        z = const(f"{name}.zp", np.array(zp, dtype=zp_np))
        if name in graph_inputs:
            src, dst = name, f"{name}.dq"
            rename_in[name] = dst
        else:
            src, dst = f"{name}.f", name
            producer = producers[name]
            producer.output[list(producer.output).index(name)] = src
        q = helper.make_node("QuantizeLinear", [src, s, z], [f"{name}.q"], name=f"{name}.Q")
        dq = helper.make_node("DequantizeLinear", [f"{name}.q", s, z], [dst], name=f"{name}.DQ")
        new_nodes.setdefault(src, []).extend([q, dq])
    kept_float = set(plan.kept_float)
    quantized = set(plan.tensors)
    if dq_readers is not None:
        kept_float |= set(range(len(graph.node))) - set(dq_readers)
    for index, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            if index in kept_float:
                # A layer kept in float reads the float tensor, even where the tensor is quantized
                # for its other consumers (q, k and v share one LayerNorm output).
                if name in quantized and name not in graph_inputs:
                    node.input[i] = f"{name}.f"
            elif name in rename_in:
                node.input[i] = rename_in[name]

    # Rebuild the node list in topological order: inserted Q/DQ right after their producer.
    ordered: list[onnx.NodeProto] = list(head_nodes)
    for name in graph_inputs:
        ordered.extend(new_nodes.get(name, []))
    for node in graph.node:
        ordered.append(node)
        for o in node.output:
            ordered.extend(new_nodes.get(o, []))
    rebuild(graph, ordered, new_inits)
    return out
