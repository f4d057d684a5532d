"""BatchNorm folding on the ONNX graph: Conv -> BatchNormalization becomes one Conv.

The exporter usually folds BN already; doing it here too makes quantization independent of
that (a BN left behind would keep a float op between integer kernels).
W' = W * g / sqrt(v + eps) per output channel;  b' = (b - m) * g / sqrt(v + eps) + beta.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeslim.runtime.graph_edit import rebuild


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` with every foldable Conv -> BatchNormalization pair merged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    producers = {o: n for n in graph.node for o in n.output}
    drop: set[int] = set()  # indices of folded BatchNormalization nodes
    for index, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or users.get(bn.input[0], 0) != 1:
            continue
        if conv.input[1] not in inits or any(n not in inits for n in bn.input[1:5]):
            continue
        eps = next((helper.get_attribute_value(a) for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        has_bias = len(conv.input) > 2 and conv.input[2] in inits
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        factor = gamma / np.sqrt(var + eps)
        w_name, b_name = conv.input[1] + ".bnfold", f"{conv.name or conv.output[0]}.bias.bnfold"
        graph.initializer.append(numpy_helper.from_array((w * factor.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32), w_name))
        graph.initializer.append(numpy_helper.from_array(((b - mean) * factor + beta).astype(np.float32), b_name))
        conv.input[1] = w_name
        if has_bias:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        drop.add(index)
    if drop:
        rebuild(graph, [n for i, n in enumerate(graph.node) if i not in drop])
    return out
