"""The one graph-rebuild step the ONNX rewrites share."""

from __future__ import annotations

from typing import Iterable

import onnx


def rebuild(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto], new_initializers: Iterable[onnx.TensorProto] = ()) -> None:
    """Replace ``graph``'s nodes with ``nodes`` (in topological order), add ``new_initializers``,
    and drop every initializer no node reads any more (the float weights a rewrite replaced)."""
    nodes = list(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in list(graph.initializer) + list(new_initializers) if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
