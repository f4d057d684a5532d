"""Softmax inputs floored at (row max - 80): the same float32 outputs without denormal exps.

Why: a masked attention softmax (BERT's padding mask adds float32's minimum to padded keys)
takes exp of very negative numbers, and ONNX Runtime's x86 exp kernel is ~10x slower where its
results fall below float32's normal range (inputs under about -87.3) — measured on a
1x12x128x128 Softmax: 0.08 ms with ordinary logits, 0.9-2.1 ms with masked ones, which made
Softmax 18% of fp32 MiniLM's time at seq 128 and 34% of its int8 graph's. Flushing denormals
(x86 FTZ/DAZ, see ``edgeslim.runtime.bench``) also cures it, but only where the deployment sets
that thread state; this rewrite cures it in the graph.

Exactness: ``Softmax(max(x, m - 80))`` with ``m`` the row max changes only entries that are more
than 80 below the max. Their exp was below exp(-80) ~ 1.8e-35 and becomes exactly that, a normal
float32; the row sum is >= 1 (the max contributes exp(0)), so the sum moves by under 1.8e-35 per
floored entry, below float32's resolution at 1 (1.2e-7) unless a row had ~1e27 of them, and each
floored probability moves by under 1.8e-35 absolute. Measured: all-MiniLM-L6-v2 embeddings are
bit-identical with and without the rewrite, and the fp32 graph is 1.17-1.19x faster (1 thread).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeslim.runtime.graph_edit import FreshNames

__all__ = ["SOFTMAX_FLOOR", "bound_softmax_inputs"]

SOFTMAX_FLOOR = 80.0  # exp(-80) ~ 1.8e-35 is still a normal float32 (FLT_MIN ~ 1.2e-38 = exp(-87.3))


def bound_softmax_inputs(model: onnx.ModelProto, floor: float = SOFTMAX_FLOOR) -> onnx.ModelProto:
    """A copy of ``model`` where every default-domain Softmax reads ``Max(x, ReduceMax(x, axis) - floor)``.

    Graphs before opset 13 (whose Softmax flattens from ``axis`` on) and graphs without Softmax
    come back unchanged (as a copy)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = out.graph

    def is_softmax(node: onnx.NodeProto) -> bool:
        return node.op_type == "Softmax" and node.domain in ("", "ai.onnx")

    if opset < 13 or not any(is_softmax(n) for n in graph.node):
        return out
    fresh = FreshNames(graph)
    floor_name = fresh("softmax_floor")
    graph.initializer.append(numpy_helper.from_array(np.array(floor, np.float32), floor_name))
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        if is_softmax(node):
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
            base = node.name or node.output[0]
            x, row_max, low, bounded = node.input[0], fresh(f"{base}/row_max"), fresh(f"{base}/low"), fresh(f"{base}/bounded")
            if opset >= 18:  # ReduceMax takes axes as an input from opset 18 on
                axes = fresh(f"{base}/axes")
                graph.initializer.append(numpy_helper.from_array(np.array([axis], np.int64), axes))
                ordered.append(helper.make_node("ReduceMax", [x, axes], [row_max], name=fresh(f"{base}/RowMax"), keepdims=1))
            else:
                ordered.append(helper.make_node("ReduceMax", [x], [row_max], name=fresh(f"{base}/RowMax"), axes=[axis],
                                                keepdims=1))
            ordered.append(helper.make_node("Sub", [row_max, floor_name], [low], name=fresh(f"{base}/Low")))
            ordered.append(helper.make_node("Max", [x, low], [bounded], name=fresh(f"{base}/Bound")))
            node.input[0] = bounded
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return out
