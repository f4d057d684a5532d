"""Float-graph rewrites that make int8 easier while computing the same function in float.

Both move scale between neighbouring layers so that no tensor has a few channels much wider than
the rest, which a per-tensor int8 grid would otherwise have to cover:

* :func:`smooth_quant` (SmoothQuant, Xiao et al., ICML 2023, Eq. 4) moves activation outliers of a
  MatMul's input X into its weight W: ``s_j = max|X_j|^a / max|W_j,:|^(1-a)``,
  ``X W = (X diag(s)^-1)(diag(s) W)``. 1/s is folded into the LayerNormalization that produces X.
* :func:`equalize_cross_layer` (cross-layer equalization, Nagel et al., ICCV 2019, "Data-Free
  Quantization", §4.1) equalizes the per-channel weight ranges of Conv1 -> ReLU -> Conv2 pairs
  using ``ReLU(x / s) = ReLU(x) / s`` for ``s > 0``: ``s_i = sqrt(r1_i * r2_i) / r2_i``.

Both run on a float ONNX graph after :func:`~edgeslim.quantize.fold.fold_batchnorm` and before
:func:`~edgeslim.quantize.lower.plan_quantization`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeslim.errors import ConfigError
from edgeslim.quantize.calibrate import collect_ranges

__all__ = ["equalize_cross_layer", "search_alpha", "smooth_quant"]

_S_MIN, _S_MAX = 1e-5, 1e5  # scales beyond this only come from dead channels; keep them finite


# ----------------------------------------------------------------------------------- graph helpers
class _Graph:
    """Index of a graph: initializers, consumers, producers and graph outputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.outputs = {o.name for o in self.graph.output}
        self.constants = {n.output[0]: n for n in self.graph.node if n.op_type == "Constant"}
        self.inserts: dict[str, list[onnx.NodeProto]] = {}
        self.read_before = set(self.users)

    def array(self, name: str) -> np.ndarray | None:
        """Value of a float initializer or Constant-node output as float64, else None."""
        if name in self.inits:
            t = self.inits[name]
            return numpy_helper.to_array(t).astype(np.float64) if t.data_type == onnx.TensorProto.FLOAT else None
        node = self.constants.get(name)
        attr = next((a for a in node.attribute if a.name == "value"), None) if node is not None else None
        return None if attr is None else numpy_helper.to_array(attr.t).astype(np.float64)

    def sole_user(self, name: str, node: onnx.NodeProto) -> bool:
        return name not in self.outputs and all(u is node for u in self.users.get(name, []))

    def fresh(self, base: str) -> str:
        """``base``, or ``base.N`` if that name is already a tensor of the graph."""
        name, k = base, 1
        while name in self.inits or name in self.producers or name in self.users:
            name, k = f"{base}.{k}", k + 1
        self.users.setdefault(name, [])
        return name

    def add(self, value: np.ndarray, base: str) -> str:
        """A new float32 initializer with a fresh name based on ``base``."""
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def put(self, node: onnx.NodeProto, index: int, value: np.ndarray, tag: str) -> None:
        """Make ``node.input[index]`` hold ``value``: rewritten in place when ``node`` is the
        initializer's only reader (keeps torch-derived names, which layer names come from), else
        as a new initializer so that other readers keep the old value."""
        name = node.input[index]
        if name in self.inits and self.sole_user(name, node):
            self.inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))
        else:
            node.input[index] = self.add(value, f"{name}.{tag}")

    def insert_after(self, anchor: onnx.NodeProto | None, nodes: list[onnx.NodeProto]) -> None:
        """Queue ``nodes`` to go right after ``anchor`` (at the front for a graph input); see finish."""
        self.inserts.setdefault(anchor.output[0] if anchor is not None else "", []).extend(nodes)

    def finish(self) -> None:
        """Apply queued inserts in one rebuild (it detaches node references, so every edit through
        a reference comes first), keeping the order topological; drop initializers left unread."""
        ordered = list(self.inserts.get("", []))
        for node in list(self.graph.node):
            ordered.append(node)
            ordered.extend(self.inserts.get(node.output[0], []))
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        used = {name for node in self.graph.node for name in node.input} | self.outputs
        kept = [i for i in self.graph.initializer if i.name in used or i.name not in self.read_before]
        del self.graph.initializer[:]  # drop only what the rewrite disconnected
        self.graph.initializer.extend(kept)


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"model: expected an onnx.ModelProto, got {type(model).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _spread(values: np.ndarray, how: Callable[[np.ndarray], float]) -> float:
    """``max(values) / how(values)`` over the non-zero entries (1.0 when none)."""
    live = values[values > 0]
    return float(live.max() / max(how(live), 1e-30)) if live.size else 1.0


# ------------------------------------------------------------------------------------ SmoothQuant
def _weight_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as (K, N), rows = input channels: Gemm with transB stores it as (N, K)."""
    return w.T if node.op_type == "Gemm" and _attr(node, "transB", 0) else w


def _smoothable(node: onnx.NodeProto, x: str, g: _Graph) -> bool:
    if len(node.input) < 2 or node.input[0] != x or x == node.input[1]:
        return False
    w = g.array(node.input[1]) if node.input[1] in g.inits else None
    if node.op_type == "Gemm":
        return w is not None and w.ndim == 2 and not _attr(node, "transA", 0)
    return node.op_type == "MatMul" and w is not None and w.ndim == 2


def _smooth_groups(model: onnx.ModelProto) -> list[tuple[str, list[onnx.NodeProto]]]:
    """(X, the MatMuls/Gemms reading X with a constant weight): each group shares one s."""
    g = _Graph(model)
    groups = [(x, [n for n in readers if n.op_type in ("MatMul", "Gemm") and _smoothable(n, x, g)])
              for x, readers in g.users.items() if x not in g.inits]
    return [(x, nodes) for x, nodes in groups if nodes]


def _observe_maxima(model: onnx.ModelProto, groups: list, batches: Iterable, progress: bool) -> dict[str, np.ndarray]:
    """Per-channel ``max|X_j|`` over the last axis of every group input, on the float graph."""
    ranges = collect_ranges(model, [x for x, _ in groups], batches, observer="minmax",
                            observer_options={"axis": -1}, progress=progress)
    return {x: np.maximum(np.abs(np.asarray(lo, np.float64)), np.abs(np.asarray(hi, np.float64)))
            for x, (lo, hi) in ranges.items()}


def _foldable_layernorm(x: str, g: _Graph, k: int) -> onnx.NodeProto | None:
    """The LayerNormalization producing ``x`` if its gamma/beta are (K,) constants over the last axis."""
    ln = g.producers.get(x)
    if ln is None or ln.op_type != "LayerNormalization" or ln.output[0] != x or _attr(ln, "axis", -1) != -1:
        return None
    params = [n for n in ln.input[1:3] if n]
    if not all(n in g.inits and tuple(g.inits[n].dims) == (k,) for n in params):
        return None
    return ln


def _apply_smoothing(model: onnx.ModelProto, maxima: dict[str, np.ndarray], alpha: float,
                     fold_only: bool, copy_shared: bool) -> tuple[onnx.ModelProto, dict]:
    out = _copy(model)
    g = _Graph(out)
    stats: dict = {"alpha": alpha, "layers": {}, "skipped": {}, "ops_added": 0}
    for x, nodes in _smooth_groups(out):
        names = [n.name or n.output[0] for n in nodes]
        mx = maxima.get(x)
        ws = [_weight_rows(n, g.array(n.input[1])) for n in nodes]
        if mx is None or any(w.shape[0] != mx.size for w in ws):
            stats["skipped"].update({n: f"input {x!r} was not observed with {ws[0].shape[0]} channels" for n in names})
            continue
        others = [u for u in g.users.get(x, []) if all(u is not n for n in nodes)]
        shared = bool(others) or x in g.outputs
        ln = _foldable_layernorm(x, g, mx.size)
        if ln is not None and (not shared or copy_shared):
            how = "layernorm_copy" if shared else "layernorm"
        elif not fold_only:
            how = "mul"
        else:
            producer = g.producers.get(x)
            why = (f"{producer.op_type} output {x!r} also feeds {others[0].op_type if others else 'a graph output'}"
                   if ln is not None else
                   f"input {x!r} comes from {producer.op_type if producer else 'the graph input'}, which cannot absorb 1/s")
            stats["skipped"].update({n: why + " (fold_only=True)" for n in names})
            continue
        # SmoothQuant Eq. 4, one s for the group: max|W_j| over the rows of all weights (q, k, v).
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        live = (mx > 0) & (wmax > 0)
        s = np.ones_like(mx)
        s[live] = mx[live] ** alpha / wmax[live] ** (1.0 - alpha)
        s = np.clip(s, _S_MIN, _S_MAX)
        for node, w in zip(nodes, ws):  # W' = diag(s) W, back in the stored layout
            g.put(node, 1, _weight_rows(node, w * s[:, None]), "smooth")
        new_x = _fold_inverse(x, nodes, ln, how, s, g)
        stats["ops_added"] += how != "layernorm"
        entry = {"input": x, "smoothed_input": new_x, "fold": how, "group": names,
                 "act_ratio_before": _spread(mx, np.median), "act_ratio_after": _spread(mx / s, np.median),
                 "weight_ratio_before": _spread(wmax, np.median), "weight_ratio_after": _spread(wmax * s, np.median)}
        stats["layers"].update({n: entry for n in names})
    g.finish()
    return out, stats


def _fold_inverse(x: str, nodes: list, ln: onnx.NodeProto | None, how: str, s: np.ndarray, g: _Graph) -> str:
    """Make the group's MatMuls read X / s; returns the name of that tensor."""
    if how == "mul":  # an explicit Mul by 1/s: one extra elementwise op on the activation
        target = helper.make_node("Mul", [x, g.add(1.0 / s, f"{x}.smooth_inv_s")], [g.fresh(f"{x}.smooth")],
                                  name=f"{x}.smooth_Mul")
        g.insert_after(g.producers.get(x), [target])
    else:  # LN(x) / s = (gamma / s) * norm(x) + beta / s
        target = ln
        if how == "layernorm_copy":  # a private LN for the MatMuls; other readers keep the original
            target = onnx.NodeProto()
            target.CopyFrom(ln)
            target.name = f"{ln.name or ln.output[0]}.smooth"
            del target.output[:]
            target.output.append(g.fresh(f"{x}.smooth"))
            g.insert_after(ln, [target])
        for index in (1, 2):
            if len(target.input) > index and target.input[index]:
                g.put(target, index, g.array(target.input[index]) / s, "smooth")
    for node in nodes:
        node.input[0] = target.output[0]
    return target.output[0]


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{name}: must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def smooth_quant(model: onnx.ModelProto, batches: Iterable, alpha: float = 0.5, progress: bool = True, *,
                 fold_only: bool = True, copy_shared: bool = True) -> tuple[onnx.ModelProto, dict]:
    """SmoothQuant (Xiao et al. 2023, Eq. 4): migrate activation outliers into MatMul weights.

    Observes ``max|X_j|`` per input channel (last axis) of every MatMul/Gemm input X with a constant
    weight W (K, N) on ``batches`` (inputs of the float graph), then sets
    ``s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)``, ``W' = diag(s) W`` and ``X' = X / s``, so
    ``X' W' = X W``: the per-tensor activation grid no longer has to span a few outlier channels,
    and per-channel (per output column) weight quantization absorbs the scaled rows. MatMuls
    reading the same X (q, k, v) share one s, from the max over all of their weight rows.

    1/s is folded into the LayerNormalization producing X (gamma / s, beta / s), so no op is added.
    If that LN's output also feeds other ops (BERT's post-LN residual Add, which must keep X),
    ``copy_shared`` folds 1/s into a private copy of the LN that feeds only the MatMuls: one extra
    LayerNormalization (float) per group, and no change for the other readers. Inputs with another
    producer (GELU, Reshape) are left alone when ``fold_only``; with ``fold_only=False`` they get
    an explicit ``Mul(X, 1/s)``, which costs one elementwise float op per group in the int8 graph.

    Returns the rewritten copy and stats: ``layers`` maps each smoothed node to its input, how
    1/s was folded and the outlier ratio (max over channels of max|X_j| / median) of X before
    and after (also for the weight rows); ``skipped`` maps nodes left alone to why.
    """
    alpha = _check_alpha(alpha)
    groups = _smooth_groups(_copy(model))
    if not groups:
        return _copy(model), {"alpha": alpha, "layers": {}, "skipped": {}, "ops_added": 0}
    maxima = _observe_maxima(model, groups, batches, progress)
    return _apply_smoothing(model, maxima, alpha, fold_only, copy_shared)


def search_alpha(model: onnx.ModelProto, batches: Iterable, eval_fn: Callable[[onnx.ModelProto], float],
                 alphas: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9), *, fold_only: bool = True,
                 copy_shared: bool = True, progress: bool = False) -> float:
    """The alpha in ``alphas`` whose smoothed graph gets the highest ``eval_fn`` score.

    SmoothQuant's alpha trades activation against weight difficulty and its best value is
    model-dependent (Xiao et al. 2023 use 0.5 for OPT/BLOOM and 0.75 for GLM-130B), so it is searched. ``eval_fn`` receives each smoothed float graph and returns a score where
    higher is better (typically: quantize it, evaluate, return cosine or accuracy). Activation
    maxima are observed once and reused for every alpha. Ties go to the earlier alpha.
    """
    alphas = [_check_alpha(a, "alphas") for a in alphas]
    if not alphas:
        raise ConfigError("alphas: give at least one alpha to search")
    groups = _smooth_groups(_copy(model))
    maxima = _observe_maxima(model, groups, list(batches), progress) if groups else {}
    best, best_score = alphas[0], -math.inf
    for alpha in alphas:
        smoothed, _ = _apply_smoothing(model, maxima, alpha, fold_only, copy_shared)
        score = float(eval_fn(smoothed))
        if math.isfinite(score) and score > best_score:
            best, best_score = alpha, score
    return best


# --------------------------------------------------------------------------- cross-layer equalization
@dataclass
class _Pair:
    """Conv1 -> activation chain -> Conv2, where only Conv2 reads Conv1's (activated) output;
    ``bound``: the per-channel upper clip (ReLU6: 6) to rescale with the channels."""

    conv1: onnx.NodeProto
    conv2: onnx.NodeProto
    acts: list[onnx.NodeProto]
    bound: np.ndarray | None


def _clip_bounds(node: onnx.NodeProto, g: _Graph) -> tuple[float, float] | None:
    """(min, max) of an opset >= 11 Clip with constant bounds (None for opset-6 attribute Clips)."""
    lo, hi = -math.inf, math.inf
    if node.attribute:
        return None
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            value = g.array(node.input[index])
            if value is None or value.size != 1:
                return None
            lo, hi = (float(value), hi) if index == 1 else (lo, float(value))
    return float(lo), float(hi)


def _conv_weight(node: onnx.NodeProto, g: _Graph) -> np.ndarray | None:
    ok = node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in g.inits
    ok = ok and g.sole_user(node.input[1], node) and (len(node.input) < 3 or not node.input[2]
                                                     or (node.input[2] in g.inits and g.sole_user(node.input[2], node)))
    return g.array(node.input[1]) if ok else None


def _cle_pairs(g: _Graph, relu6: str) -> tuple[list[_Pair], dict[str, str]]:
    pairs, skipped = [], {}
    for conv1 in g.graph.node:
        w1 = _conv_weight(conv1, g)
        if w1 is None:
            continue
        cur, acts, bound, reason = conv1.output[0], [], None, None
        while reason is None:
            readers = g.users.get(cur, [])
            if cur in g.outputs or len(readers) != 1:
                reason = "output has several readers" if len(readers) > 1 else "output is not read by a Conv"
                break
            nxt = readers[0]
            if nxt.op_type == "Conv" and nxt.input[0] == cur:
                w2 = _conv_weight(nxt, g)
                if w2 is None or w2.shape[1] * _attr(nxt, "group", 1) != w1.shape[0]:
                    reason = f"next Conv {nxt.name!r} has shared/non-constant weights or a channel mismatch"
                    break
                pairs.append(_Pair(conv1, nxt, acts, bound))
                break
            clip = _clip_bounds(nxt, g) if nxt.op_type == "Clip" else None
            if nxt.op_type == "Relu" and not acts:
                acts.append(nxt)
            elif clip is not None and clip[0] == 0.0 and not acts:
                acts.append(nxt)
                if math.isfinite(clip[1]):
                    if relu6 == "skip":
                        reason = f"{nxt.op_type} {nxt.name!r} clips at {clip[1]:g}, not positively homogeneous"
                    bound = np.full(w1.shape[0], clip[1])
            elif nxt.op_type == "Min" and len(acts) == 1 and bound is not None and nxt.input[0] == cur:
                value = g.array(nxt.input[1])  # a per-channel bound left by an earlier equalization
                if value is None or value.size not in (1, w1.shape[0]):
                    reason = f"Min {nxt.name!r} has a non-constant bound"
                    break
                acts.append(nxt)
                bound = np.minimum(bound, value.reshape(-1))
            else:
                reason = f"{nxt.op_type} {nxt.name!r} between the convs is not a ReLU/ReLU6"
                break
            cur = nxt.output[0]
        if reason is not None and cur != conv1.output[0]:
            skipped[conv1.name or conv1.output[0]] = reason
    return pairs, skipped


def _in_channel_view(w2: np.ndarray, group: int) -> np.ndarray:
    """Conv2's weight as (groups, out_per_group, in_per_group, *kernel): input channel
    ``i = g * in_per_group + l`` is read only by ``[g, :, l]`` (for depthwise: output channel i)."""
    return w2.reshape(group, w2.shape[0] // group, *w2.shape[1:])


def equalize_cross_layer(model: onnx.ModelProto, iterations: int = 1, *,
                         relu6: Literal["bound", "skip", "relu"] = "bound") -> tuple[onnx.ModelProto, dict]:
    """Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1), BN already folded.

    For each Conv1 -> (Relu | Clip(0, c)) -> Conv2 pair where Conv2 is Conv1's only reader (also
    no activation; Conv1 and/or Conv2 may be grouped/depthwise), with ``r1_i = max|W1[i]|``
    (Conv1 output channel i) and ``r2_i = max|W2 entries reading input channel i|``, set
    ``s_i = sqrt(r1_i * r2_i) / r2_i`` (§4.1) and ``W1[i] /= s_i``, ``b1[i] /= s_i``,
    ``W2[:, i] *= s_i``: both channels then have range ``sqrt(r1_i r2_i)``, which a per-tensor
    weight grid resolves far better. ReLU(x / s) = ReLU(x) / s keeps the output exact. For a
    depthwise Conv2, input channel i is read only by its output channel i, so that channel's
    weights scale by s_i and its bias stays: its output is unchanged. ``iterations`` repeats the
    sweep over all pairs (the paper iterates to convergence; a depthwise conv sits in two pairs).

    ReLU6 = Clip(0, 6) is not positively homogeneous: ``clip(x/s, 0, 6) != clip(x, 0, 6) / s``.
    ``relu6="bound"`` keeps it exact with the per-channel bound ``6 / s_i``: the Clip becomes
    ``Clip(0, max_i 6/s_i) -> Min(6/s)`` (ONNX Clip takes scalar bounds only), one extra float Min
    per pair in the int8 graph while the Conv+Clip still fuses. ``"skip"`` leaves such pairs alone;
    ``"relu"`` replaces ReLU6 by ReLU as the paper does for MobileNetV2 (§5), which changes the
    float function wherever a pre-activation exceeds 6.

    Returns the rewritten copy and stats: ``pairs`` (conv1, conv2, activation, max/min of s per
    pair), ``convs`` (per conv: max/min of its per-output-channel weight ranges before and after),
    ``skipped`` (conv1 -> reason) and ``ops_added``.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations: must be an integer >= 1, got {iterations!r}")
    if relu6 not in ("bound", "skip", "relu"):
        raise ConfigError(f"relu6: must be 'bound', 'skip' or 'relu', got {relu6!r}")
    out = _copy(model)
    g = _Graph(out)
    pairs, skipped = _cle_pairs(g, relu6)
    weights: dict[str, np.ndarray] = {}
    for p in pairs:
        for conv in (p.conv1, p.conv2):
            weights.setdefault(conv.input[1], g.array(conv.input[1]))
            if len(conv.input) > 2 and conv.input[2]:
                weights.setdefault(conv.input[2], g.array(conv.input[2]))

    def ranges(name: str) -> np.ndarray:
        w = weights[name]
        return np.abs(w).reshape(w.shape[0], -1).max(axis=1)

    before = {n: _spread(ranges(n), np.min) for p in pairs for n in (p.conv1.input[1], p.conv2.input[1])}
    total = [np.ones(weights[p.conv1.input[1]].shape[0]) for p in pairs]
    for _ in range(iterations):
        for p, acc in zip(pairs, total):
            w1, group = weights[p.conv1.input[1]], _attr(p.conv2, "group", 1)
            w2 = _in_channel_view(weights[p.conv2.input[1]], group)
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = np.moveaxis(np.abs(w2), 2, 1).reshape(group * w2.shape[2], -1).max(axis=1)
            live = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[live] = np.sqrt(r1[live] * r2[live]) / r2[live]  # §4.1: both ranges become sqrt(r1 r2)
            expand = (-1,) + (1,) * (w1.ndim - 1)
            weights[p.conv1.input[1]] = w1 / s.reshape(expand)
            if len(p.conv1.input) > 2 and p.conv1.input[2]:
                weights[p.conv1.input[2]] = weights[p.conv1.input[2]] / s
            scaled = w2 * s.reshape(group, 1, -1, *(1,) * (w2.ndim - 3))
            weights[p.conv2.input[1]] = scaled.reshape(weights[p.conv2.input[1]].shape)
            acc *= s
    for name, value in weights.items():
        reader = next(n for p in pairs for n in (p.conv1, p.conv2) if name in n.input[1:3])
        g.put(reader, list(reader.input).index(name), value, "cle")
    ops_added = sum(_rewrite_bound(p, acc, g, relu6) for p, acc in zip(pairs, total))
    g.finish()
    stats = {
        "pairs": [{"conv1": p.conv1.name, "conv2": p.conv2.name, "activation": "+".join(a.op_type for a in p.acts),
                   "s_spread": _spread(acc, np.min)} for p, acc in zip(pairs, total)],
        "convs": {n: {"range_spread_before": v, "range_spread_after": _spread(ranges(n), np.min)}
                  for n, v in before.items()},
        "skipped": skipped, "ops_added": ops_added,
    }
    return out, stats


def _rewrite_bound(p: _Pair, scale: np.ndarray, g: _Graph, relu6: str) -> int:
    """Rescale a ReLU6 bound to ``bound_i / s_i`` (or drop it for ``relu6="relu"``); returns ops added."""
    if p.bound is None:
        return 0
    clip = p.acts[0]
    if relu6 == "relu" and len(p.acts) == 1:
        clip.op_type = "Relu"
        del clip.input[1:]
        return 0
    bound = p.bound / scale  # clip(x, 0, c) / s = clip(x / s, 0, c / s)
    tag = clip.name or clip.output[0]
    shape = (-1,) + (1,) * (len(g.inits[p.conv1.input[1]].dims) - 2)
    g.put(clip, 2, np.array(bound.max()), "cle")  # the scalar Clip keeps the fused Conv+Clip range
    if len(p.acts) > 1:  # a Min from an earlier pass: rescale its bound
        g.put(p.acts[1], 1, bound.reshape(shape), "cle")
        return 0
    out = clip.output[0]
    clip.output[0] = g.fresh(f"{out}.clip")
    values = g.add(bound.reshape(shape), f"{tag}.cle_bound")
    g.insert_after(clip, [helper.make_node("Min", [clip.output[0], values], [out], name=g.fresh(f"{tag}.cle_Min"))])
    return 1
