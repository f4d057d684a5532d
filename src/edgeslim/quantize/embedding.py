"""Int8 embedding tables: Gather from a float table becomes Gather from an int8 table, rescaled per row.

Embedding tables are often the biggest tensors of a language model (MiniLM: 47 of its 91 MB) and
Conv/MatMul quantizers leave them in float. Dequantizing the whole table at every run would cost
more than it saves, so rows are gathered first and only they are dequantized:

    Gather(W, ids) -> Cast(Gather(W_q, ids), float) * Gather(scale, ids)[..., None]

with W_q = round(W / scale) in [-127, 127], scale = max|row| / 127 (one per row): the gathered
values equal the dequantized table exactly.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeslim.runtime.graph_edit import rebuild


def quantize_embeddings(model: onnx.ModelProto, min_rows: int = 64) -> onnx.ModelProto:
    """Return a copy of ``model`` whose row lookups (Gather, axis 0, from a 2-D float initializer with
    at least ``min_rows`` rows) read an int8 table."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    done: dict[str, tuple[str, str]] = {}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if (table is None or axis != 0 or len(table.dims) != 2 or table.dims[0] < min_rows
                or table.data_type != onnx.TensorProto.FLOAT):
            nodes.append(node)
            continue
        name = node.input[0]
        if name not in done:
            w = numpy_helper.to_array(table).astype(np.float32)
            scale = (np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0).astype(np.float32)
            q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
            graph.initializer.extend([numpy_helper.from_array(q, f"{name}.int8"),
                                      numpy_helper.from_array(scale[:, None], f"{name}.row_scale")])
            done[name] = (f"{name}.int8", f"{name}.row_scale")
        q_name, s_name = done[name]
        ids, y = node.input[1], node.output[0]
        tag = node.name or y
        nodes += [
            helper.make_node("Gather", [q_name, ids], [f"{y}.q"], name=f"{tag}.GatherInt8", axis=0),
            helper.make_node("Cast", [f"{y}.q"], [f"{y}.f"], name=f"{tag}.Cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [s_name, ids], [f"{y}.s"], name=f"{tag}.GatherScale", axis=0),
            helper.make_node("Mul", [f"{y}.f", f"{y}.s"], [y], name=f"{tag}.Rescale"),
        ]
    if done:
        rebuild(graph, nodes)
    return out
