"""Fresh names for nodes, tensors and initializers that graph rewrites add."""

from __future__ import annotations

import onnx

__all__ = ["FreshNames"]


class FreshNames:
    """Fresh tensor/node names that cannot collide with the graph's own: ``base``, else ``base_1``, ..."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = {i.name for i in graph.initializer} | {i.name for i in graph.input}
        self.used |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name
