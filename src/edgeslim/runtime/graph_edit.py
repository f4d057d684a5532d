"""Helpers for the rewrites that edit ONNX graphs: fresh names, new constants, the node loop,
and the Linear layers (MatMul / Gemm with a constant weight) that quantizers replace.

A rewrite copies the model, walks its nodes in order, keeps most of them and replaces some with
new nodes whose names and constants must not collide with the graph's own; at the end the graph
gets the new node list and loses the initializers nobody reads any more (the float weights that
were replaced). :func:`replace_nodes` is that loop; :class:`NodeEditor` carries the fresh names,
the new constants and the nodes emitted so far. :func:`find_linear_sites` reads every Linear
layer as ``y = x @ W (+ b)`` whatever its ONNX spelling (MatMul, or Gemm with transB/alpha/beta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeslim.errors import ConfigError

__all__ = ["FreshNames", "LinearSite", "NewConstants", "NodeEditor", "check_exclude", "find_linear_sites",
           "node_label", "rebuild", "replace_nodes"]


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


class NewConstants:
    """Initializers a rewrite adds, under fresh names; ``tensors`` goes to :func:`rebuild`."""

    def __init__(self, fresh: FreshNames) -> None:
        self.fresh = fresh
        self.tensors: list[TensorProto] = []

    def __call__(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.tensors.append(numpy_helper.from_array(value, name))
        return name


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


class NodeEditor:
    """What a node replacement writes with: ``fresh`` names, ``const`` (new initializers) and
    ``nodes``, the new graph's nodes so far, in order (append to it, or use :meth:`add`)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.fresh = FreshNames(graph)
        self.const = NewConstants(self.fresh)
        self.nodes: list[onnx.NodeProto] = []

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        """Append an ``op_type`` node named ``fresh(name)``."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(name), **attrs))


def replace_nodes(model: onnx.ModelProto,
                  replace: Callable[[int, onnx.NodeProto, NodeEditor], bool]) -> onnx.ModelProto:
    """A copy of ``model`` in which ``replace(index, node, editor)`` may replace each node.

    ``replace`` returns False to keep the node as it is, or True after emitting the node's
    replacement into ``editor`` (whose output names must include the ones downstream nodes read).
    Then the graph is rebuilt: new nodes and constants in, unread initializers out (:func:`rebuild`).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    editor = NodeEditor(out.graph)
    for index, node in enumerate(out.graph.node):
        if not replace(index, node, editor):
            editor.nodes.append(node)
    rebuild(out.graph, editor.nodes, editor.const.tensors)
    return out


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


@dataclass
class LinearSite:
    """A Linear-like node with a constant weight, in MatMul form: ``y = x @ weight (+ bias)``."""

    index: int  # position in graph.node
    node: onnx.NodeProto
    weight: np.ndarray  # [K, N] float32: Gemm's transB undone and alpha folded in
    bias: np.ndarray | None  # Gemm's beta * C (constant), any shape broadcastable to [M, N]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _float_const(inits: dict[str, TensorProto], name: str, ndim: set[int] | None = None) -> np.ndarray | None:
    init = inits.get(name)
    if init is None or init.data_type != TensorProto.FLOAT or (ndim is not None and len(init.dims) not in ndim):
        return None
    return numpy_helper.to_array(init)


def find_linear_sites(model: onnx.ModelProto, ops: Collection[str] = ("MatMul", "Gemm"),
                      exclude: Collection[str] = ()) -> list[LinearSite]:
    """MatMul / Gemm nodes whose B is a constant 2-D float initializer (a Linear layer's weight).

    Gemm qualifies when ``transA == 0`` and C is absent or constant; its ``transB`` and ``alpha``
    are folded into the weight and ``beta`` into the bias, so every site reads ``x @ W + b``.
    ``exclude`` holds :func:`node_label` names to skip.
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
