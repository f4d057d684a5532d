"""Channel dependency graph: which channels of which layers must be removed together.

The model is traced with ``torch.fx`` and its shapes propagated on the example input. Every
tensor's channel dimension (dim 1) is described by one *atom* id per position; a Conv2d or
Linear output creates fresh atoms, pass-through ops (ReLU, pools, BatchNorm, depthwise convs,
dropout) keep them, ``torch.cat`` concatenates them (channel offsets), ``flatten`` repeats each
channel's atom H*W times (the Linear that follows sees C*H*W features), and an elementwise
addition of two tensors unions their atoms position by position (ResNet shortcuts). Atoms that
reach the model output or come from the model input are never pruned. Connected atoms form one
prunable channel; channels sharing a producing layer form one :class:`Group`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from edgeslim.errors import ModelError, first_line

# Modules and functions whose output channels are their input channels (one input tensor).
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                 nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_FUNCS = {torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.relu6, nn.functional.gelu,
               nn.functional.silu, nn.functional.hardswish, nn.functional.leaky_relu, nn.functional.dropout,
               nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
               torch.nn.functional.sigmoid, torch.clamp}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "tanh", "clamp", "contiguous", "clone", "detach", "float"}
# Elementwise binary ops: two tensor operands of the same channel layout are coupled channel by channel.
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
           torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
_FLATTEN = {torch.flatten}
_MEAN_METHODS = {"mean", "sum", "amax"}


@dataclass(frozen=True)
class Member:
    """One tensor slice of a group: ``module``'s parameters along ``dim``; ``index[p]`` is the group
    channel that position ``p`` of that dim belongs to (a flatten repeats a channel H*W times)."""

    module: str
    kind: str  # "out" (Conv/Linear rows), "in" (Conv/Linear columns), "bn" (norm stats), "dw" (depthwise conv)
    dim: int
    index: tuple[int, ...]  # -1 where a position belongs to another group (after a torch.cat)


@dataclass
class Group:
    """A set of channels that can only be removed together, across every layer they touch.

    Example (three layers, like Torch-Pruning's walk-through)::

        conv1 = Conv2d(3, 16, 3)   ->   bn1 = BatchNorm2d(16)   ->   conv2 = Conv2d(16, 32, 3)

    Removing output channel ``i`` of ``conv1`` also removes ``bn1``'s statistics ``i`` and input
    channel ``i`` of ``conv2``, so the group has 16 channels and three members:
    ``(conv1, out, dim 0, 0..15)``, ``(bn1, bn, dim 0, 0..15)``, ``(conv2, in, dim 1, 0..15)``.
    In a ResNet stage all convs whose outputs meet in one addition share a single group; after a
    flatten the Linear's ``in`` member maps its C*H*W inputs to C channels (index ``f // (H*W)``).
    """

    name: str  # the first producing layer: the name overrides and exclusions refer to
    producers: tuple[str, ...]  # layers whose output channels are this group's channels
    size: int
    members: list[Member] = field(default_factory=list)

    def modules(self) -> set[str]:
        return {m.module for m in self.members}


@dataclass
class DependencyGraph:
    """The traced model's prunable groups plus per-layer MACs (from shape propagation)."""

    groups: list[Group]
    macs: dict[str, int]
    layers: dict[str, nn.Module]  # every Conv/Linear/BN module by qualified name
    norm_after: dict[str, str] = field(default_factory=dict)  # conv/linear -> the BatchNorm fed by its output

    def group_of(self, layer: str) -> Group | None:
        """The group whose channels ``layer`` produces (None: the layer's outputs are not prunable)."""
        for g in self.groups:
            if layer in g.producers:
                return g
        return None


class _Atoms:
    """Union-find over channel atoms; an atom is blocked when it may never be pruned."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: set[int] = set()

    def new(self, n: int, blocked: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if blocked:
            self.blocked.update(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def blocked_roots(self) -> set[int]:
        return {self.find(a) for a in self.blocked}


def trace(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output shape."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises TraceError, TypeError, ... on data-dependent control flow
        raise ModelError(f"cannot trace {type(model).__name__} for structured pruning "
                         f"(data-dependent control flow?): {first_line(err)}") from None
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as err:  # noqa: BLE001 - any failure inside user model code
        raise ModelError(f"shape propagation through {type(model).__name__} failed on input "
                         f"{tuple(example.shape)}: {first_line(err)}") from None
    return gm


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Builder:
    """Walks the traced graph once, assigning atoms to tensors and recording member slices."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.atoms = _Atoms()
        self.chan: dict[torch.fx.Node, list[int]] = {}
        self.records: list[tuple[str, str, int, list[int]]] = []  # (module, kind, dim, atoms per position)
        self.producers: list[tuple[str, list[int]]] = []
        self.macs: dict[str, int] = {}
        self.called: set[str] = set()
        self.norm_after: dict[str, str] = {}

    # ------------------------------------------------------------------ helpers
    def _fail(self, node: torch.fx.Node, why: str) -> ModelError:
        what = node.target if node.op != "call_module" else f"{node.target} ({type(self.modules[node.target]).__name__})"
        return ModelError(f"structured pruning: {why} at node {node.name!r}: {what}")

    def _input(self, node: torch.fx.Node) -> list[int]:
        """Atoms of the module's first input (fresh, blocked atoms for a tensor we could not map)."""
        ins = self._tensor_args(node)
        if ins:
            return self.chan[ins[0]]
        arg = node.args[0] if node.args else None
        if isinstance(arg, torch.fx.Node) and _shape(arg) is not None:
            return self._fresh_like(arg)
        raise self._fail(node, "a layer without a tensor input")

    def _tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        args = list(node.args) + list(node.kwargs.values())
        flat: list = []
        for a in args:
            flat.extend(a if isinstance(a, (list, tuple)) else [a])
        return [a for a in flat if isinstance(a, torch.fx.Node) and a in self.chan]

    def _fresh_like(self, node: torch.fx.Node) -> list[int]:
        shape = _shape(node)
        return self.atoms.new(shape[1] if shape is not None and len(shape) > 1 else 1, blocked=True)

    def _prunable(self, atoms: list[int]) -> bool:
        roots = self.atoms.blocked_roots()
        return any(self.atoms.find(a) not in roots for a in atoms)

    # ------------------------------------------------------------------ walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.chan[node] = self._fresh_like(node)
            elif node.op == "output":
                for a in self._tensor_args(node):
                    self.atoms.blocked.update(self.chan[a])
            elif node.op == "get_attr":
                self.chan[node] = self._fresh_like(node)
            elif node.op == "call_module":
                self._module(node)
            else:
                self._function(node)

    def _module(self, node: torch.fx.Node) -> None:
        mod = self.modules[node.target]
        name = str(node.target)
        x = self._input(node)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            if name in self.called:
                raise self._fail(node, "a layer called more than once (shared weights) cannot be pruned")
            self.called.add(name)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            self._conv(node, mod, name, x)
        elif isinstance(mod, nn.Linear):
            self._linear(node, mod, name, x)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if len(x) != mod.num_features:
                raise self._fail(node, f"BatchNorm sees {len(x)} channels but has {mod.num_features}")
            self.records.append((name, "bn", 0, x))
            arg = node.args[0]
            if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and len(arg.users) == 1 and \
                    isinstance(self.modules[arg.target], (nn.Conv1d, nn.Conv2d, nn.Linear)):
                self.norm_after[str(arg.target)] = name  # conv -> BN: folded into one layer at export
            self.chan[node] = x
        elif isinstance(mod, _PASS_MODULES):
            self.chan[node] = x
        elif isinstance(mod, nn.Flatten):
            self._flatten(node, x, mod.start_dim)
        else:
            self._unknown(node)

    def _conv(self, node: torch.fx.Node, mod: nn.Conv2d, name: str, x: list[int]) -> None:
        out = _shape(node)
        self.macs[name] = int(torch.tensor(out).prod()) // out[0] * (mod.in_channels // mod.groups) * \
            int(torch.tensor(mod.kernel_size).prod())
        if len(x) != mod.in_channels:
            raise self._fail(node, f"conv sees {len(x)} input channels but has {mod.in_channels}")
        if mod.groups == 1:
            self.records.append((name, "in", 1, x))
            y = self.atoms.new(mod.out_channels)
            self.records.append((name, "out", 0, y))
            self.producers.append((name, y))
            self.chan[node] = y
        elif mod.groups == mod.in_channels == mod.out_channels:  # depthwise: channel c in -> channel c out
            self.records.append((name, "dw", 0, x))
            self.chan[node] = x
        else:  # grouped (or depthwise multiplier) conv: kept whole; its input and output are not pruned
            self.atoms.blocked.update(x)
            self.chan[node] = self.atoms.new(mod.out_channels, blocked=True)

    def _linear(self, node: torch.fx.Node, mod: nn.Linear, name: str, x: list[int]) -> None:
        shape = _shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        if shape is None or len(shape) != 2:
            if self._prunable(x):
                raise self._fail(node, f"Linear on a {len(shape or ())}-d input is not supported")
            self.chan[node] = self.atoms.new(mod.out_features, blocked=True)
            return
        self.macs[name] = mod.in_features * mod.out_features
        if len(x) != mod.in_features:
            raise self._fail(node, f"Linear sees {len(x)} input features but has {mod.in_features}")
        self.records.append((name, "in", 1, x))
        y = self.atoms.new(mod.out_features)
        self.records.append((name, "out", 0, y))
        self.producers.append((name, y))
        self.chan[node] = y

    def _flatten(self, node: torch.fx.Node, x: list[int], start_dim: int) -> None:
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if start_dim != 1 or shape_in is None or shape_out is None or len(shape_out) != 2:
            if self._prunable(x):
                raise self._fail(node, f"flatten from dim {start_dim} of a tensor of shape {shape_in}")
            self.chan[node] = self._fresh_like(node)
            return
        spatial = 1
        for s in shape_in[2:]:
            spatial *= s
        # (B, C, H, W) -> (B, C*H*W): feature f comes from channel f // (H*W)
        self.chan[node] = [a for a in x for _ in range(spatial)]

    def _function(self, node: torch.fx.Node) -> None:
        ins = self._tensor_args(node)
        if _shape(node) is None:  # x.size(0), x.shape, shape arithmetic: no tensor channels
            shape_query = node.target is getattr or (node.op == "call_method" and node.target in ("size", "dim"))
            if not shape_query and any(self._prunable(self.chan[a]) for a in ins):
                raise self._fail(node, "an op with a non-tensor (or tuple) output sits on prunable channels")
            return
        if not ins:  # a tensor made from constants or a tuple element: not prunable
            self.chan[node] = self._fresh_like(node)
            return
        target = node.target
        x = self.chan[ins[0]]
        if target in _PASS_FUNCS or (node.op == "call_method" and target in _PASS_METHODS):
            self.chan[node] = x
        elif target in _BINARY or (node.op == "call_method" and target in _BINARY_METHODS):
            self._binary(node, ins)
        elif target is torch.cat:
            self._cat(node, ins)
        elif target in _FLATTEN:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            self._flatten(node, x, start)
        elif node.op == "call_method" and target in ("view", "reshape", "flatten"):
            self._reshape(node, x)
        elif (target is torch.mean or (node.op == "call_method" and target in _MEAN_METHODS)) and \
                _shape(node) is not None and len(_shape(node)) >= 2 and _shape(node)[1] == len(x):
            self.chan[node] = x  # reduction over spatial dims only
        else:
            self._unknown(node)

    def _reshape(self, node: torch.fx.Node, x: list[int]) -> None:
        shape_in, shape_out = _shape(node.args[0]), _shape(node)
        if shape_in == shape_out:
            self.chan[node] = x
        elif shape_in is not None and shape_out is not None and len(shape_out) == 2 and shape_out[0] == shape_in[0]:
            self._flatten(node, x, 1)
        else:
            self._unknown(node)

    def _binary(self, node: torch.fx.Node, ins: list[torch.fx.Node]) -> None:
        if len(ins) == 1:  # tensor (op) scalar
            self.chan[node] = self.chan[ins[0]]
            return
        a, b = self.chan[ins[0]], self.chan[ins[1]]
        if len(a) == len(b):
            for i, j in zip(a, b):
                self.atoms.union(i, j)
            self.chan[node] = a
        elif len(b) == 1 or len(a) == 1:  # broadcast of a per-sample scalar
            self.atoms.blocked.update(a if len(a) == 1 else b)
            self.chan[node] = a if len(b) == 1 else b
        else:
            raise self._fail(node, f"elementwise op on {len(a)} and {len(b)} channels")

    def _cat(self, node: torch.fx.Node, ins: list[torch.fx.Node]) -> None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ndim = len(_shape(node))
        if dim % ndim == 1:  # channel concat: offsets are the running sum of input channels
            self.chan[node] = [a for n in ins for a in self.chan[n]]
        else:
            first = self.chan[ins[0]]
            for other in ins[1:]:
                for i, j in zip(first, self.chan[other]):
                    self.atoms.union(i, j)
            self.chan[node] = first

    def _unknown(self, node: torch.fx.Node) -> None:
        ins = self._tensor_args(node)
        if any(self._prunable(self.chan[a]) for a in ins):
            raise self._fail(node, "an op the dependency graph does not understand sits on prunable channels")
        self.chan[node] = self._fresh_like(node)


def _groups(b: _Builder) -> list[Group]:
    atoms = b.atoms
    blocked = atoms.blocked_roots()
    # Group channels: the connected atoms (roots) of each producer, in first-seen order.
    group_of_root: dict[int, int] = {}
    roots_of_group: list[list[int]] = []
    names: list[list[str]] = []
    for name, ys in b.producers:
        roots = [atoms.find(a) for a in ys]
        if any(r in blocked for r in roots):
            continue
        known = {group_of_root[r] for r in roots if r in group_of_root}
        if known:
            gid = min(known)
            for other in sorted(known - {gid}, reverse=True):  # a producer bridging two groups merges them
                for r in roots_of_group[other]:
                    group_of_root[r] = gid
                roots_of_group[gid] += roots_of_group[other]
                names[gid] += names[other]
                roots_of_group[other], names[other] = [], []
        else:
            gid = len(roots_of_group)
            roots_of_group.append([])
            names.append([])
        names[gid].append(name)
        for r in roots:
            if r not in group_of_root or group_of_root[r] != gid:
                group_of_root[r] = gid
                roots_of_group[gid].append(r)
    groups: list[Group] = []
    for gid, roots in enumerate(roots_of_group):
        if not roots:
            continue
        channel = {r: i for i, r in enumerate(roots)}
        g = Group(name=names[gid][0], producers=tuple(names[gid]), size=len(roots))
        for module, kind, dim, positions in b.records:
            rs = [atoms.find(a) for a in positions]
            if any(r in channel for r in rs):  # -1: a position that belongs to another group (cat)
                g.members.append(Member(module, kind, dim, tuple(channel.get(r, -1) for r in rs)))
        groups.append(g)
    return groups


def build_graph(model: nn.Module, example: torch.Tensor) -> DependencyGraph:
    """Trace ``model`` on ``example`` and return its prunable channel groups.

    ModelError names the node when the model cannot be traced or an unsupported op lies on a
    path between prunable layers (the model is never silently left unpruned).
    """
    gm = trace(model, example)
    b = _Builder(gm)
    b.run()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear,
                                                                          nn.BatchNorm1d, nn.BatchNorm2d))}
    return DependencyGraph(groups=_groups(b), macs=b.macs, layers=layers, norm_after=b.norm_after)
