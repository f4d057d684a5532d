"""Float-graph rewrites that make int8 easier while computing the same function in float.

:func:`smooth_quant` (SmoothQuant, Xiao et al., ICML 2023) moves activation outliers of a MatMul
input into its weight; :func:`equalize_cross_layer` (Nagel et al., ICCV 2019, "Data-Free
Quantization", §4.1) equalizes the weight ranges of Conv -> ReLU -> Conv pairs. Both leave no
tensor with a few channels much wider than the rest for one per-tensor int8 grid to cover; both
take a float graph with BatchNorm folded (``fold_batchnorm``) and return a copy to plan/lower.
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
from edgeslim.quantize.observers import MinMax

__all__ = ["equalize_cross_layer", "search_alpha", "smooth_quant"]


# ----------------------------------------------------------------------------------- graph helpers
class _Graph:
    """Index of a graph (initializers, readers, producers) plus the edits a rewrite queues."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.outputs = {o.name for o in self.graph.output}
        self.inserts: dict[str, list[onnx.NodeProto]] = {}
        self.read_before = set(self.users)

    def array(self, name: str) -> np.ndarray | None:  # a float initializer as float64, else None
        t = self.inits.get(name)
        return numpy_helper.to_array(t).astype(np.float64) if t and t.data_type == onnx.TensorProto.FLOAT else None

    def sole_user(self, name: str, node: onnx.NodeProto) -> bool:  # and not a graph output
        return name not in self.outputs and all(u is node for u in self.users.get(name, []))

    def fresh(self, base: str) -> str:  # ``base``, or ``base.N`` if that name is taken
        name, k = base, 1
        while name in self.inits or name in self.producers or name in self.users:
            name, k = f"{base}.{k}", k + 1
        self.users.setdefault(name, [])
        return name

    def add(self, value: np.ndarray, base: str) -> str:  # a new initializer; returns its name
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def put(self, node: onnx.NodeProto, index: int, value: np.ndarray, tag: str) -> None:
        """``node.input[index]`` := ``value``: in place if ``node`` is the only reader (layer names come
        from torch weight names), else as a new initializer."""
        name = node.input[index]
        if name in self.inits and self.sole_user(name, node):
            self.inits[name].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))
        else:
            node.input[index] = self.add(value, f"{name}.{tag}")

    def insert_after(self, anchor: onnx.NodeProto | None, nodes: list[onnx.NodeProto]) -> None:
        """Queue ``nodes`` to go right after ``anchor`` (first for a graph input)."""
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
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    if not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"model: expected an onnx.ModelProto, got {type(model).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _spread(values: np.ndarray, how: Callable[[np.ndarray], float]) -> float:  # max / how, of values > 0
    live = values[values > 0]
    return float(live.max() / max(how(live), 1e-30)) if live.size else 1.0


# ------------------------------------------------------------------------------------ SmoothQuant
def _weight_rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """The weight as (K, N), rows = input channels (Gemm with transB stores (N, K)); self-inverse."""
    return w.T if node.op_type == "Gemm" and _attr(node, "transB", 0) else w


def _smooth_groups(model: onnx.ModelProto) -> list[tuple[str, list[onnx.NodeProto]]]:
    """(X, the MatMuls/Gemms reading X as input A with a constant 2-D weight): one s per group."""
    g, groups = _Graph(model), {}
    for n in model.graph.node:
        w = g.array(n.input[1]) if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
        if w is not None and w.ndim == 2 and n.input[0] not in g.inits and not _attr(n, "transA", 0):
            groups.setdefault(n.input[0], []).append(n)
    return list(groups.items())


def _observe_maxima(model: onnx.ModelProto, groups: list, batches: Iterable, progress: bool) -> dict[str, np.ndarray]:
    """Per-channel ``max|X_j|`` over the last axis of every group input, on the float graph."""
    ranges = collect_ranges(model, [x for x, _ in groups], batches, observer=MinMax(),
                            observer_options={"axis": -1}, progress=progress)
    return {x: np.maximum(np.abs(np.asarray(lo, np.float64)), np.abs(np.asarray(hi, np.float64)))
            for x, (lo, hi) in ranges.items()}


def _foldable_layernorm(x: str, g: _Graph, k: int) -> onnx.NodeProto | None:
    """The LayerNormalization producing ``x`` if its gamma/beta are (K,) constants over the last axis."""
    ln = g.producers.get(x)
    ok = ln is not None and ln.op_type == "LayerNormalization" and ln.output[0] == x and _attr(ln, "axis", -1) == -1
    return ln if ok and all(getattr(g.array(n), "shape", None) == (k,) for n in ln.input[1:3] if n) else None


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
            op = g.producers[x].op_type if x in g.producers else "the graph input"
            why = (f"{op} output {x!r} also feeds {others[0].op_type if others else 'a graph output'}" if ln is not None
                   else f"input {x!r} comes from {op}, which cannot absorb 1/s")
            stats["skipped"].update({n: why + " (fold_only=True)" for n in names})
            continue
        # SmoothQuant Eq. 4 with one s per group: max|W_j| over the rows of all its weights (q, k, v)
        wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        live = (mx > 0) & (wmax > 0)  # a dead channel keeps s = 1
        s = np.clip(np.where(live, np.maximum(mx, 1e-30) ** alpha / np.maximum(wmax, 1e-30) ** (1 - alpha), 1.0),
                    1e-5, 1e5)  # wider only for near-dead channels: keep 1/s finite in float32
        for node, w in zip(nodes, ws):  # W' = diag(s) W, back in the stored layout
            g.put(node, 1, _weight_rows(node, w * s[:, None]), "smooth")
        entry = {"input": x, "smoothed_input": _fold_inverse(x, nodes, ln, how, s, g), "fold": how, "group": names,
                 "act_ratio_before": _spread(mx, np.median), "act_ratio_after": _spread(mx / s, np.median),
                 "weight_ratio_before": _spread(wmax, np.median), "weight_ratio_after": _spread(wmax * s, np.median)}
        stats["ops_added"] += how != "layernorm"
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
            target = helper.make_node("LayerNormalization", list(ln.input), [g.fresh(f"{x}.smooth")],
                                      name=f"{ln.name or x}.smooth", domain=ln.domain)
            target.attribute.extend(ln.attribute)
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

    With ``max|X_j|`` per input channel (last axis) of each MatMul/Gemm input X, observed on
    ``batches``, and its constant weight W (K, N): ``s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)``,
    ``W' = diag(s) W``, ``X' = X / s``; ``X' W' = X W``, but the per-tensor activation grid no longer
    spans a few outlier channels. MatMuls reading one X (q, k, v) share s (max over all their rows).

    1/s goes into the LayerNormalization producing X (gamma / s, beta / s): no op added. If the LN
    output also feeds other ops (BERT's post-LN residual Add must keep X), ``copy_shared`` folds 1/s
    into a private LN copy feeding only the MatMuls (+1 float LayerNormalization per group). Other
    producers (GELU, Reshape) are skipped if ``fold_only``, else get ``Mul(X, 1/s)`` (+1 float op).

    Returns the copy and stats: ``layers`` (per smoothed node: input, fold, outlier ratio = max over
    channels of max|X_j| / median, of X and of the weight rows, before/after), ``skipped`` (why)."""
    alpha = _check_alpha(alpha)
    groups = _smooth_groups(_copy(model))
    maxima = _observe_maxima(model, groups, batches, progress) if groups else {}
    return _apply_smoothing(model, maxima, alpha, fold_only, copy_shared)


def search_alpha(model: onnx.ModelProto, batches: Iterable, eval_fn: Callable[[onnx.ModelProto], float],
                 alphas: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9), *, fold_only: bool = True,
                 copy_shared: bool = True, progress: bool = False) -> float:
    """The alpha in ``alphas`` whose smoothed graph gets the highest ``eval_fn`` score.

    Alpha trades activation against weight difficulty and its best value depends on the model
    (Xiao et al. 2023 use 0.5 for OPT/BLOOM, 0.75 for GLM-130B), hence a search. ``eval_fn`` gets
    each smoothed float graph and returns a higher-is-better score (typically: quantize, evaluate,
    return cosine or accuracy). Maxima are observed once for all alphas; ties go to the earlier."""
    alphas = [_check_alpha(a, "alphas") for a in alphas]
    if not alphas:
        raise ConfigError("alphas: give at least one alpha to search")
    groups = _smooth_groups(_copy(model))
    maxima = _observe_maxima(model, groups, list(batches), progress) if groups else {}
    best, best_score = alphas[0], -math.inf
    for alpha in alphas:
        score = float(eval_fn(_apply_smoothing(model, maxima, alpha, fold_only, copy_shared)[0]))
        if math.isfinite(score) and score > best_score:
            best, best_score = alpha, score
    return best


# --------------------------------------------------------------------------- cross-layer equalization
@dataclass
class _Pair:
    """Conv1 -> activations -> Conv2, Conv2 the only reader; ``bound``: a ReLU6 clip per channel."""

    conv1: onnx.NodeProto
    conv2: onnx.NodeProto
    acts: list[onnx.NodeProto]
    bound: np.ndarray | None


def _clip_bounds(node: onnx.NodeProto, g: _Graph) -> tuple[float, float] | None:
    """(min, max) of an opset >= 11 Clip with constant bounds (None for opset-6 attribute Clips)."""
    values = [g.array(n) if n else np.array(d) for n, d in zip(list(node.input[1:3]) + ["", ""], (-math.inf, math.inf))]
    ok = not node.attribute and all(v is not None and v.size == 1 for v in values)
    return (float(values[0]), float(values[1])) if ok else None


def _conv_weight(node: onnx.NodeProto, g: _Graph) -> np.ndarray | None:
    """Conv weight, if it and the bias are constants only this Conv reads."""
    params = [n for n in node.input[1:3] if n]
    ok = node.op_type == "Conv" and params and all(n in g.inits and g.sole_user(n, node) for n in params)
    return g.array(node.input[1]) if ok else None


def _cle_pairs(g: _Graph, relu6: str) -> tuple[list[_Pair], dict[str, str]]:
    """Every Conv1 -> [Relu | Clip(0, c) [-> Min(bound)]] -> Conv2 chain with single readers."""
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
            clip = _clip_bounds(nxt, g) if nxt.op_type == "Clip" else None
            if nxt.op_type == "Conv" and nxt.input[0] == cur:
                w2 = _conv_weight(nxt, g)
                if w2 is None or w2.shape[1] * _attr(nxt, "group", 1) != w1.shape[0]:
                    reason = f"Conv {nxt.name!r} has shared or non-constant weights"
                else:
                    pairs.append(_Pair(conv1, nxt, acts, bound))
                break
            if not acts and (nxt.op_type == "Relu" or (clip is not None and clip[0] == 0.0)):
                if clip is not None and math.isfinite(clip[1]):
                    bound = np.full(w1.shape[0], clip[1])
                    if relu6 == "skip":
                        reason = f"Clip {nxt.name!r} clips at {clip[1]:g}: not positively homogeneous"
            elif nxt.op_type == "Min" and len(acts) == 1 and bound is not None and nxt.input[0] == cur:
                value = g.array(nxt.input[1])  # a per-channel bound left by an earlier equalization
                if value is None or value.size not in (1, w1.shape[0]):
                    reason = f"Min {nxt.name!r} has a non-constant bound"
                    break
                bound = np.minimum(bound, value.reshape(-1))
            else:
                reason = f"{nxt.op_type} {nxt.name!r} between the convs is not a ReLU/ReLU6"
                break
            acts.append(nxt)
            cur = nxt.output[0]
        if reason is not None and cur != conv1.output[0]:
            skipped[conv1.name or conv1.output[0]] = reason
    return pairs, skipped


def equalize_cross_layer(model: onnx.ModelProto, iterations: int = 1, *,
                         relu6: Literal["bound", "skip", "relu"] = "bound") -> tuple[onnx.ModelProto, dict]:
    """Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1), BN folded first.

    For each Conv1 -> (Relu | Clip(0, c) | nothing) -> Conv2, Conv2 the only reader (grouped and
    depthwise allowed), ``r1_i = max|W1[i]|``, ``r2_i`` = max |W2| over the weights reading input
    channel i: ``s_i = sqrt(r1_i * r2_i) / r2_i``, ``W1[i] /= s_i``, ``b1[i] /= s_i``,
    ``W2[:, i] *= s_i``. Both ranges become ``sqrt(r1_i r2_i)`` (kinder to a per-tensor weight grid)
    and ``ReLU(x / s) = ReLU(x) / s`` keeps the output exact. A depthwise Conv2 reads channel i only
    in output channel i: those weights scale by s_i, its bias stays (its output is unchanged).
    ``iterations`` repeats the sweep (a depthwise conv sits in two pairs).

    ReLU6 = Clip(0, 6) is not positively homogeneous (``clip(x/s, 0, 6) != clip(x, 0, 6) / s``).
    ``relu6="bound"`` keeps it exact with the per-channel bound ``6 / s_i``: the Clip becomes
    ``Clip(0, max_i 6/s_i) -> Min(6/s)`` (Clip bounds are scalars), so Conv+Clip still fuse in int8,
    plus one float Min per pair. ``"skip"`` leaves such pairs alone; ``"relu"`` makes ReLU6 a ReLU
    as the paper does for MobileNetV2 (§5), changing the function wherever an input exceeds 6.

    Returns the copy and stats: ``pairs`` (conv1, conv2, activation, max/min of s), ``convs`` (weight
    -> max/min of its per-output-channel ranges, before/after), ``skipped``, ``ops_added``."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ConfigError(f"iterations: must be an integer >= 1, got {iterations!r}")
    if relu6 not in ("bound", "skip", "relu"):
        raise ConfigError(f"relu6: must be 'bound', 'skip' or 'relu', got {relu6!r}")
    out = _copy(model)
    g = _Graph(out)
    pairs, skipped = _cle_pairs(g, relu6)
    weights = {n: g.array(n) for p in pairs for conv in (p.conv1, p.conv2) for n in conv.input[1:3] if n}

    def ranges(name: str) -> np.ndarray:  # per-output-channel max|W|
        return np.abs(weights[name]).reshape(len(weights[name]), -1).max(axis=1)

    before = {n: _spread(ranges(n), np.min) for p in pairs for n in (p.conv1.input[1], p.conv2.input[1])}
    total = [np.ones(len(weights[p.conv1.input[1]])) for p in pairs]
    for _ in range(iterations):
        for p, acc in zip(pairs, total):
            w1, r1, group, w2_shape = (weights[p.conv1.input[1]], ranges(p.conv1.input[1]), _attr(p.conv2, "group", 1),
                                       weights[p.conv2.input[1]].shape)
            # Conv2 as (groups, out/group, in/group, *kernel): input channel i = g * in/group + l is
            # read only by [g, :, l] (depthwise: output channel i)
            w2 = weights[p.conv2.input[1]].reshape(group, w2_shape[0] // group, *w2_shape[1:])
            r2 = np.moveaxis(np.abs(w2), 2, 1).reshape(group * w2.shape[2], -1).max(axis=1)
            # §4.1: s_i = sqrt(r1_i r2_i) / r2_i = sqrt(r1_i / r2_i); a dead channel keeps s = 1
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-300)), 1.0)
            weights[p.conv1.input[1]] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if len(p.conv1.input) > 2 and p.conv1.input[2]:
                weights[p.conv1.input[2]] = weights[p.conv1.input[2]] / s
            weights[p.conv2.input[1]] = (w2 * s.reshape(group, 1, -1, *(1,) * (w2.ndim - 3))).reshape(w2_shape)
            acc *= s
    for name, value in weights.items():
        reader = next(n for p in pairs for n in (p.conv1, p.conv2) if name in n.input[1:3])
        g.put(reader, list(reader.input).index(name), value, "cle")
    stats = {"pairs": [{"conv1": p.conv1.name, "conv2": p.conv2.name, "activation": "+".join(a.op_type for a in p.acts),
                        "s_spread": _spread(acc, np.min)} for p, acc in zip(pairs, total)],
             "convs": {n: {"range_spread_before": v, "range_spread_after": _spread(ranges(n), np.min)}
                       for n, v in before.items()},
             "skipped": skipped, "ops_added": sum(_rewrite_bound(p, acc, g, relu6) for p, acc in zip(pairs, total))}
    g.finish()
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
    shape = (-1,) + (1,) * (len(g.inits[p.conv1.input[1]].dims) - 2)
    g.put(clip, 2, np.array(bound.max()), "cle")  # the scalar Clip keeps the fused Conv+Clip range
    if len(p.acts) > 1:  # a Min from an earlier pass: rescale its bound
        g.put(p.acts[1], 1, bound.reshape(shape), "cle")
        return 0
    tag, out = clip.name or clip.output[0], clip.output[0]
    clip.output[0] = g.fresh(f"{out}.clip")
    values = g.add(bound.reshape(shape), f"{tag}.cle_bound")
    g.insert_after(clip, [helper.make_node("Min", [clip.output[0], values], [out], name=g.fresh(f"{tag}.cle_Min"))])
    return 1
