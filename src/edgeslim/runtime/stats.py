"""Static graph statistics of ONNX models: size, weights, MACs and op counts (no ORT).

These numbers describe the deployable file, so they must be the same for a float graph and its
QDQ-quantized twin where the arithmetic is the same (MACs) and must ignore quantization
bookkeeping (scales, zero points) and shape constants when counting weights.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto

from edgeslim.errors import ModelError, RuntimeToolError

__all__ = ["size_bytes", "count_params", "count_macs", "op_histogram", "op_key"]

_DEFAULT_DOMAINS = ("", "ai.onnx")

# Input slots that carry quantization parameters or shapes/indices/axes rather than weights.
_NON_WEIGHT_SLOTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "DynamicQuantizeLinear": frozenset(),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "ConvInteger": frozenset({2, 3}),
    "MatMulInteger": frozenset({2, 3}),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),
    "DynamicQuantizeMatMul": frozenset({2, 3}),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),
    "QLinearAdd": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearSigmoid": frozenset({1, 2, 3, 4}),
    "QLinearLeakyRelu": frozenset({1, 2, 3, 4}),
    "QLinearAveragePool": frozenset({1, 2, 3, 4}),
    "QLinearGlobalAveragePool": frozenset({1, 2, 3, 4}),
    "MatMulNBits": frozenset({2, 3, 4}),  # scales, zero points, g_idx
    "Reshape": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Split": frozenset({1}),
    "Pad": frozenset({1, 2, 3}),
    "Resize": frozenset({1, 2, 3}),
    "Upsample": frozenset({1}),
    "Clip": frozenset({1, 2}),
    "TopK": frozenset({1}),
    "Gather": frozenset({1}),
    "GatherElements": frozenset({1}),
    "ConstantOfShape": frozenset({0}),
    "Range": frozenset({0, 1, 2}),
    "OneHot": frozenset({1, 2}),
    "CumSum": frozenset({1}),
    **{op: frozenset({1}) for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
                                     "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare")},
}
# A 1-element tensor feeding only these is a literal from the forward code (x / 255, x * 0.5),
# not a learned weight; torch would not count it either.
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Greater",
                          "Less", "GreaterOrEqual", "LessOrEqual", "Where", "Sqrt"})
# Slots where an int32 tensor is a real (quantized) bias: int32 tensors elsewhere are shape-like.
_INT32_WEIGHT_SLOTS = {"DequantizeLinear": {0}, "QLinearConv": {8}, "QGemm": {6}}
_WEIGHT_DTYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
                            TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                            TensorProto.INT4, TensorProto.UINT4})

_CONV_OPS = {"Conv": 1, "FusedConv": 1, "NhwcConv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> weight slot
_MATMUL_OPS = {"MatMul": 0, "FusedMatMul": 0, "MatMulInteger": 0, "MatMulIntegerToFloat": 0,
               "QLinearMatMul": 0, "Gemm": 0, "FusedGemm": 0, "QGemm": 0}  # op -> A slot


def op_key(node: onnx.NodeProto) -> str:
    """Histogram key: ``"OpType"`` for the default ONNX domain, ``"domain:OpType"`` otherwise."""
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}"


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count nodes of the main graph by op type (keys from :func:`op_key`), most frequent first."""
    counts = Counter(op_key(n) for n in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def size_bytes(path: str | Path) -> int:
    """Size of a model file on disk in bytes (what gets shipped to the device)."""
    p = Path(path)
    if not p.is_file():
        raise RuntimeToolError(f"model file not found: {p}")
    return p.stat().st_size


def _non_weight_slot(op: str, slot: int) -> bool:
    if op == "QLinearConcat":  # y_scale, y_zero_point, then (x, x_scale, x_zero_point) triples
        return slot < 2 or (slot - 2) % 3 != 0
    return slot in _NON_WEIGHT_SLOTS.get(op, ())


def _numel(t: TensorProto) -> int:
    return math.prod(t.dims)  # prod(()) == 1 for scalars


def count_params(model: onnx.ModelProto) -> int:
    """Number of weight elements the graph holds (initializers and Constant tensors).

    Excludes quantization scales / zero points, int64/int32 shape-like tensors (Reshape shapes,
    Slice starts, axes...) and 1-element literals feeding element-wise ops, so a float graph and
    its QDQ twin report the same count. Only the main graph is scanned.
    """
    graph = model.graph
    tensors: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t

    uses: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in tensors:
                uses[name].append((node.op_type, slot))

    # MatMulNBits packs K*N weights into uint8 blobs: count the weights, not the bytes.
    packed = {node.input[1]: _attr(node, "K") * _attr(node, "N") for node in graph.node
              if node.op_type == "MatMulNBits" and len(node.input) > 1}
    total = 0
    for name, t in tensors.items():
        consumers = uses.get(name, [])
        if name in packed:
            total += packed[name]
            continue
        if _is_dequant_scale(name, consumers):
            continue
        if t.data_type == TensorProto.INT32:
            if any(slot in _INT32_WEIGHT_SLOTS.get(op, ()) for op, slot in consumers):
                total += _numel(t)
            continue
        if t.data_type not in _WEIGHT_DTYPES:
            continue  # int64 (shapes, indices, axes), bool, string
        if consumers and all(_non_weight_slot(op, slot) for op, slot in consumers):
            continue
        if _numel(t) == 1 and consumers and all(op in _ELEMENTWISE for op, _ in consumers):
            continue
        total += _numel(t)
    return total


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _is_dequant_scale(name: str, consumers: list[tuple[str, int]]) -> bool:
    # Dynamic quantization rescales the int32 accumulator with Mul(x_scale, w_scale): a tensor named
    # as a scale that only feeds such Muls is a quantization parameter, not a weight.
    # Int8 embedding rows are rescaled by a gathered per-row scale (quantize/embedding.py).
    return name.lower().endswith("scale") and bool(consumers) and all(op in ("Mul", "Gather") for op, _ in consumers)


def _static_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None) -> onnx.ModelProto:
    """Copy of ``model`` with every graph input fixed (overrides, else dynamic dims -> 1)."""
    fixed = copy.deepcopy(model)
    init_names = {t.name for t in fixed.graph.initializer}
    overrides = dict(input_shapes or {})
    real_inputs = [i for i in fixed.graph.input if i.name not in init_names]
    unknown = sorted(set(overrides) - {i.name for i in real_inputs})
    if unknown:
        raise ModelError(f"input_shapes names unknown model input {unknown[0]!r}; inputs are "
                         f"{[i.name for i in real_inputs]}")
    for inp in real_inputs:
        shape = inp.type.tensor_type.shape
        if inp.name in overrides:
            dims = [int(d) for d in overrides[inp.name]]
            if len(dims) != len(shape.dim) and len(shape.dim) > 0:
                raise ModelError(f"input_shapes[{inp.name!r}] has rank {len(dims)}, the model input has rank "
                                 f"{len(shape.dim)}")
            shape.ClearField("dim")
            for d in dims:
                shape.dim.add().dim_value = d
        else:
            for d in shape.dim:
                if not d.HasField("dim_value") or d.dim_value <= 0:
                    d.Clear()
                    d.dim_value = 1
    # Drop stale intermediate shapes (they may carry the old symbolic batch) before re-inferring.
    fixed.graph.ClearField("value_info")
    return fixed


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int] | None]:
    shapes: dict[str, list[int] | None] = {}
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = list(attr.t.dims)
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        shapes[vi.name] = None if any(d is None for d in dims) else dims
    return shapes


def _run_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, list[int]]:
    """Actual shapes of ``names``: run the graph once in ORT on zero inputs of its (fixed) input shapes."""
    import numpy as np

    from edgeslim.runtime.probe import probe_session  # ORT only when shape inference gave up

    try:
        sess, wanted = probe_session(model, names)
        inits = {t.name for t in model.graph.initializer}
        feeds = {}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            feeds[inp.name] = np.zeros([d.dim_value for d in inp.type.tensor_type.shape.dim], dtype=dtype)
        return {n: list(a.shape) for n, a in zip(wanted, sess.run(wanted, feeds))}
    except Exception:  # best effort: the caller reports what stays unknown
        return {}


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (dynamic dims -> 1 unless overridden).

    Counts Conv-like ops as ``prod(out) * C_in/group * prod(kernel)`` and MatMul/Gemm-like ops as
    ``prod(out) * K``, for float, integer and QLinear variants, so QDQ graphs match float ones.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(_static_shapes(model, input_shapes), data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ModelError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from exc
    shapes = _known_shapes(inferred)
    missing = [n for node in inferred.graph.node if node.op_type in _CONV_OPS or node.op_type in _MATMUL_OPS
               or node.op_type == "MatMulNBits" for n in list(node.input[:2]) + [node.output[0]]
               if n and shapes.get(n) is None]
    if missing:  # ONNX inference gave up (e.g. LayerNormalization after the exporter's rewrites): run it
        shapes.update(_run_shapes(_static_shapes(model, input_shapes), missing))

    def shape_of(name: str, node: onnx.NodeProto) -> list[int]:
        s = shapes.get(name)
        if s is None:
            raise ModelError(f"cannot infer static shape of {name!r} used by {node.op_type} node {node.name!r}; "
                             "pass input_shapes")
        return s

    total = 0
    for node in inferred.graph.node:
        op = node.op_type
        if op in _CONV_OPS:
            weight = shape_of(node.input[_CONV_OPS[op]], node)  # (M, C_in/group, k...)
            out = shape_of(node.output[0], node)
            total += math.prod(out) * math.prod(weight[1:])
        elif op == "ConvTranspose":
            x = shape_of(node.input[0], node)
            weight = shape_of(node.input[1], node)  # (C_in, M/group, k...)
            total += math.prod(x) * math.prod(weight[1:])
        elif op in _MATMUL_OPS:
            a = shape_of(node.input[_MATMUL_OPS[op]], node)
            attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
            if op in ("Gemm", "FusedGemm", "QGemm"):
                k = a[0] if attrs.get("transA", 0) else a[1]
            elif op == "FusedMatMul" and attrs.get("transA", 0):
                k = a[-2]
            else:
                k = a[-1]
            out = shapes.get(node.output[0])
            if out is None:  # contrib ops (QGemm, FusedMatMul) have no ONNX shape inference
                b_slot = 3 if op in ("QGemm", "QLinearMatMul") else 1
                b = shape_of(node.input[b_slot], node)
                trans_b = attrs.get("transB", 0)
                n = b[-2] if trans_b else b[-1]
                out = [math.prod(a) // k, n]  # batch dims * M rows, N cols
            total += math.prod(out) * k
    for node in inferred.graph.node:
        if node.op_type == "MatMulNBits":  # A (..., K) times the packed (K, N): no ONNX shape inference
            a = shapes.get(node.input[0])
            if a is not None:
                total += math.prod(a[:-1]) * _attr(node, "K") * _attr(node, "N")
    return int(total)
