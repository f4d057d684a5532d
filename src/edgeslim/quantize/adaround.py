"""AdaRound: learned up/down rounding of int8 weights (Nagel et al. 2020, "Up or Down? Adaptive
Rounding for Post-Training Quantization", ICML).

Rounding every weight to nearest is not what minimises the task loss; a second-order argument
(§3.1) reduces the choice, per layer, to the local reconstruction problem (Eq. 20/25)

    argmin_V  || f_a(W x) - f_a(W̃ x̃) ||_F^2 + λ f_reg(V)

with the soft-quantized weight (Eq. 22) W̃ = s · clip(⌊W/s⌋ + h(V), qmin, qmax), the rectified
sigmoid (Eq. 23) h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1), ζ = 1.1, γ = -0.1, and the regulariser
(Eq. 24) f_reg(V) = Σ_ij 1 - |2 h(V_ij) - 1|^β, whose β is annealed from 20 to 2 after a warm-up
(§3.2) so that every h(V) ends at 0 or 1. The learned weight is then ⌊W/s⌋ + [h(V) >= 0.5],
always the floor or the ceiling of W/s, hence within one step of nearest rounding.

Here: scales are fixed (per-channel symmetric int8 [-127, 127], scale = absmax / 127, as in
``quantize_weight``, or the ones given in ``base_params``); layers are handled one at a time in
graph order; f_a is the Relu/Clip that follows the layer when the lowering fuses it. The inputs
x̃ are those of the quantized model so far ("asymmetric reconstruction", §5, Eq. 25): the QDQ
simulation (ORT, optimisations off) with every earlier layer already rounded, read at the
layer's input, i.e. the DequantizeLinear output feeding it; the target f_a(W x) comes from the
float graph. The layer forward is a matrix product over sampled rows: for a Conv, a random
subset of output positions and their input patches (memory bounded for any image size); for a
Gemm/MatMul, a random subset of the input rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from rich.progress import Progress

from edgeslim.errors import ConfigError, DataError
from edgeslim.quantize.lower import QuantPlan, quantize_weight, weight_axis
from edgeslim.runtime.ort import input_feed
from edgeslim.runtime.probe import probe_session
from edgeslim.train import check_loss

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (Eq. 23)
QMIN, QMAX = -127, 127  # symmetric int8 weights, as lower_qdq writes them
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2  # β annealing and warm-up fraction (§3.2)
POOL_ROWS = 4096  # sampled rows (output positions / samples) per layer
POOL_FLOATS = 1 << 24  # cap on the stored input rows of one layer (64 MiB of float32)
BATCH_ROWS = 512  # rows per optimisation step

WeightParams = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass
class _Layer:
    """A weighted node in matrix form: output rows = x_rows (m, G, K) · w (G, O/G, K)ᵀ + bias."""

    node: onnx.NodeProto
    w: np.ndarray  # ONNX layout
    wm: np.ndarray  # (G, O/G, K) float32
    scale: np.ndarray  # as lower_qdq takes it: (O,) or a scalar
    bias: np.ndarray | None  # (O,)
    clamp: tuple[float, float] | None  # the fused Relu/Clip, as (lo, hi)
    conv: dict | None  # Conv: kernel, strides, dilations, begin/end pads, groups (2-D form); else None

    @property
    def out_features(self) -> int:
        return self.wm.shape[0] * self.wm.shape[1]

    def scale_matrix(self) -> np.ndarray:
        s = np.asarray(self.scale, dtype=np.float32)
        full = np.broadcast_to(s.reshape(-1) if s.ndim else s, (self.out_features,))
        return np.array(full, dtype=np.float32).reshape(self.wm.shape[:2] + (1,))

    def to_onnx(self, qm: np.ndarray) -> np.ndarray:
        """Integer weights in matrix form back to the ONNX weight layout."""
        if self.conv is not None:
            return qm.reshape(self.w.shape)
        q = qm.reshape(self.out_features, -1)
        return q if weight_axis(self.node) == 0 else q.T


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _conv_geometry(node: onnx.NodeProto, w: np.ndarray, in_shape: Sequence[int] | None) -> dict:
    """Strides, dilations, explicit (begin, end) pads and groups of a 1-D/2-D ONNX Conv."""
    a = _attrs(node)
    nd = w.ndim - 2
    kernel = list(w.shape[2:])
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * 2 * nd))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if in_shape is None:
            raise ConfigError(f"adaround: Conv {node.name!r} uses auto_pad={auto} on an input of unknown size")
        pads = [0] * 2 * nd
        for i in range(nd):
            size = int(in_shape[2 + i])
            total = max((-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[nd + i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 2 * nd
    if nd == 1:  # treat (N, C, L) as (N, C, 1, L)
        kernel, strides, dil, pads = [1] + kernel, [1] + strides, [1] + dil, [0, pads[0], 0, pads[1]]
    return {"kernel": kernel, "strides": strides, "dilations": dil, "begin": pads[:2], "end": pads[2:],
            "groups": int(a.get("group", 1))}


def _activation(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, float] | None:
    """The Relu/Clip the lowering fuses after ``node`` (its only consumer), as clamp bounds."""
    users = [n for n in model.graph.node if node.output[0] in n.input]
    if len(users) != 1 or node.output[0] in {o.name for o in model.graph.output}:
        return None
    act = users[0]
    if act.op_type == "Relu":
        return 0.0, float("inf")
    if act.op_type != "Clip":
        return None
    inits = {i.name: i for i in model.graph.initializer}
    a = _attrs(act)
    bounds = [a.get("min", -float("inf")), a.get("max", float("inf"))]
    for k, name in enumerate(act.input[1:3]):
        if name:
            if name not in inits:
                return None
            bounds[k] = float(numpy_helper.to_array(inits[name]))
    return float(bounds[0]), float(bounds[1])


def _layer(model: onnx.ModelProto, node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto],
           per_channel: bool, base: tuple[np.ndarray, np.ndarray] | None) -> _Layer | None:
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    axis = weight_axis(node) if per_channel else None
    scale = np.asarray(base[1] if base is not None else quantize_weight(w, axis)[1], dtype=np.float32)
    bias = None
    if len(node.input) > 2 and node.input[2] in inits:
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
    conv = None
    if node.op_type == "Conv":
        if w.ndim not in (3, 4):
            return None  # 3-D convolutions keep their nearest rounding
        conv = {}  # geometry filled in by _rows
        groups = int(_attrs(node).get("group", 1))
        wm = w.reshape(groups, w.shape[0] // groups, -1)
    else:
        wm = (w if weight_axis(node) == 0 else w.T)[None]
    return _Layer(node, w, np.ascontiguousarray(wm), scale, bias, _activation(model, node), conv)


def _rows(layer: _Layer, x: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Input rows (m, G, K) of the sampled outputs ``pick`` (flat indices over batch × positions)."""
    if layer.conv is None:
        return x.reshape(-1, x.shape[-1])[pick][:, None, :].astype(np.float32)
    if layer.conv == {}:  # geometry, from the first input seen (auto_pad needs its size)
        layer.conv = _conv_geometry(layer.node, layer.w, x.shape)
    g = layer.conv
    if x.ndim == 3:
        x = x[:, :, None, :]
    (kh, kw), (sh, sw), (dh, dw) = g["kernel"], g["strides"], g["dilations"]
    xp = np.pad(x, ((0, 0), (0, 0), (g["begin"][0], g["end"][0]), (g["begin"][1], g["end"][1])))
    ho = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    n, rem = np.divmod(pick, ho * wo)
    oy, ox = np.divmod(rem, wo)
    iy = oy[:, None] * sh + np.arange(kh) * dh  # (m, kh)
    ix = ox[:, None] * sw + np.arange(kw) * dw  # (m, kw)
    patches = xp.transpose(0, 2, 3, 1)[n[:, None, None], iy[:, :, None], ix[:, None, :]]  # (m, kh, kw, C)
    patches = patches.transpose(0, 3, 1, 2).reshape(len(pick), g["groups"], -1)  # C-major, as the weight
    return np.ascontiguousarray(patches, dtype=np.float32)


def _targets(layer: _Layer, y: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Output rows (m, O) of the sampled outputs."""
    if layer.conv is None:
        return y.reshape(-1, y.shape[-1])[pick].astype(np.float32)
    y = y.reshape(y.shape[0], y.shape[1], -1)  # (N, O, positions)
    n, pos = np.divmod(pick, y.shape[2])
    return y[n, :, pos].astype(np.float32)


def _positions(layer: _Layer, y: np.ndarray) -> int:
    return int(np.prod(y.shape[:-1])) if layer.conv is None else int(y.shape[0] * np.prod(y.shape[2:]))


def _forward(layer: _Layer, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.einsum("mgk,gok->mgo", rows, w).reshape(rows.shape[0], -1)
    if layer.bias is not None:
        out = out + torch.from_numpy(layer.bias)
    if layer.clamp is not None:
        out = out.clamp(*layer.clamp)
    return out


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)(ζ - γ) + γ, 0, 1)  (Eq. 23)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _recon(layer: _Layer, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, chunk: int = 2048) -> float:
    """Mean over rows of the squared output error ||f_a(W x) - f_a(W̃ x̃)||² (the Eq. 25 objective)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            total += float(((_forward(layer, x[i : i + chunk], w) - y[i : i + chunk]) ** 2).sum())
    return total / max(1, len(x))


def _fit(layer: _Layer, x: torch.Tensor, y: torch.Tensor, iterations: int, reg_weight: float, lr: float,
         gen: torch.Generator) -> tuple[np.ndarray, float, float]:
    """Learn the rounding of one layer; returns (integer weights in matrix form, loss nearest, loss learned)."""
    s = torch.from_numpy(layer.scale_matrix())
    ws = torch.from_numpy(layer.wm) / s
    floor = torch.floor(ws)
    nearest = torch.clamp(torch.round(ws), QMIN, QMAX)
    rest = (ws - floor).clamp(0.0, 1.0)
    # Start where h(V) equals the fractional part, so W̃ = W before any step (inverse of Eq. 23).
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    warm = int(WARMUP * iterations)
    for it in range(iterations):
        idx = torch.randint(0, len(x), (min(BATCH_ROWS, len(x)),), generator=gen)
        h = rectified_sigmoid(v)
        w_soft = s * torch.clamp(floor + h, QMIN, QMAX)  # Eq. 22
        loss = ((_forward(layer, x[idx], w_soft) - y[idx]) ** 2).sum(1).mean()
        if it >= warm:  # f_reg (Eq. 24) with β annealed linearly from 20 to 2 after the warm-up
            beta = BETA_START + (BETA_END - BETA_START) * (it - warm) / max(1, iterations - warm - 1)
            loss = loss + reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        check_loss(loss, f"adaround iteration {it + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    learned = torch.clamp(floor + (v.detach() >= 0).float(), QMIN, QMAX)  # h(V) >= 0.5  <=>  V >= 0
    base = _recon(layer, x, y, s * nearest)
    ada = _recon(layer, x, y, s * learned)
    return learned.numpy(), base, ada


def adaround_weight_params(
    folded: onnx.ModelProto,
    plan: QuantPlan,
    lower: Callable[[dict], onnx.ModelProto],
    batches: list,
    *,
    iterations: int = 500,
    reg_weight: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    lr: float = 1e-2,
    per_channel: bool = True,
    asymmetric: bool = True,
    base_params: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    stats: dict[str, tuple[float, float]] | None = None,
) -> WeightParams:
    """AdaRound every weighted layer of ``plan``; returns ``{node_name: (int8 weights, scales)}`` for
    ``lower_qdq(weight_params=...)``.

    ``folded`` is the float graph (BatchNorm folded) that ``plan`` indexes; ``lower(weight_params)``
    must return its QDQ lowering with those weight overrides and fixed activation ranges;
    ``batches`` are calibration inputs of the graph. Each layer runs ``iterations`` Adam steps
    (learning rate ``lr``) on ``BATCH_ROWS`` rows; ``reg_weight`` is λ. With ``asymmetric`` the
    layer inputs come from the QDQ simulation with earlier layers rounded (Eq. 25), otherwise
    from the float graph. ``base_params`` gives scales to keep (e.g. MSE-clipped ones). A layer
    whose learned rounding does not lower its reconstruction error on the sampled rows keeps
    nearest rounding. ``stats``, if given, receives ``{node_name: (mse_nearest, mse_adaround)}``.
    Deterministic for a fixed ``seed``: the steps run on one torch thread (fastest for these
    small products, and independent of the core count).
    """
    if iterations < 1:
        raise ConfigError(f"adaround: iterations must be >= 1, got {iterations}")
    if reg_weight < 0 or lr <= 0:
        raise ConfigError(f"adaround: need reg_weight >= 0 and lr > 0, got reg_weight={reg_weight}, lr={lr}")
    batches = list(batches)
    if not batches:
        raise DataError("adaround: no calibration batches; give at least one batch of inputs")
    graph = folded.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = [graph.node[i] for i in plan.weighted]
    names = [n.name for n in nodes]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise ConfigError("adaround: weighted nodes need unique names (lower_qdq keys weight overrides by node name)")
    base_params = dict(base_params or {})
    layers = [_layer(folded, n, inits, per_channel, base_params.get(n.name)) for n in nodes]
    params: WeightParams = {}
    for node, layer in zip(nodes, layers):
        if layer is None:  # unsupported geometry: nearest rounding (or the given base)
            w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = weight_axis(node) if per_channel else None
            params[node.name] = base_params[node.name] if node.name in base_params else quantize_weight(w, axis)
    active = [(n, lay) for n, lay in zip(nodes, layers) if lay is not None]
    if not active:
        return params

    # Float pass: the targets f_a(W x) at sampled rows, drawn once per layer and batch.
    rng = np.random.default_rng(seed)
    graph_inputs = {i.name for i in graph.input}
    wanted = [n.output[0] for n, _ in active] + ([] if asymmetric else [n.input[0] for n, _ in active])
    # One ORT thread: no thread pool (spinning or not) competing with the torch steps.
    fp, _ = probe_session(folded, [t for t in wanted if t not in graph_inputs], threads=1)
    picks: list[list[np.ndarray]] = [[] for _ in active]
    targets: list[list[torch.Tensor]] = [[] for _ in active]
    fp_rows: list[list[np.ndarray]] = [[] for _ in active]
    per_batch = [min(POOL_ROWS, POOL_FLOATS // max(1, lay.wm.shape[0] * lay.wm.shape[2])) for _, lay in active]
    for x in batches:
        feed = input_feed(fp, x)
        outs = {**feed, **dict(zip([o.name for o in fp.get_outputs()], fp.run(None, feed)))}
        for k, (node, layer) in enumerate(active):
            y = outs[node.output[0]]
            count = _positions(layer, y)
            pick = np.sort(rng.choice(count, size=min(count, -(-per_batch[k] // len(batches))), replace=False))
            picks[k].append(pick)
            targets[k].append(torch.from_numpy(_targets(layer, y, pick)))
            if not asymmetric:
                fp_rows[k].append(_rows(layer, outs[node.input[0]], pick))
    del fp

    gen = torch.Generator().manual_seed(seed)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("adaround", total=len(active))
        for k, (node, layer) in enumerate(active):
            bar.update(task, description=f"adaround {node.name}")
            if asymmetric:  # x̃: the DQ output feeding this node in the current QDQ simulation
                qdq = lower(dict(params))
                qnode = next((n for n in qdq.graph.node if n.name == node.name), None)
                if qnode is None:
                    raise ConfigError(f"adaround: node {node.name!r} is missing from the lowered graph")
                sess, _ = probe_session(qdq, [qnode.input[0]], threads=1)
                rows = [_rows(layer, sess.run([qnode.input[0]], input_feed(sess, x))[0], pick)
                        for x, pick in zip(batches, picks[k])]
                del sess, qdq
            else:
                rows = fp_rows[k]
            xr = torch.from_numpy(np.concatenate(rows))
            yt = torch.cat(targets[k])
            if layer.clamp is not None:
                yt = yt.clamp(*layer.clamp)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small products: one thread is fastest and the result is core-count free
            try:
                learned, mse_near, mse_ada = _fit(layer, xr, yt, iterations, reg_weight, lr, gen)
            finally:
                torch.set_num_threads(threads)
            if mse_ada > mse_near:  # keep nearest where learning did not help on these rows
                learned = np.clip(np.round(layer.wm / layer.scale_matrix()), QMIN, QMAX)
                mse_ada = mse_near
            if stats is not None:
                stats[node.name] = (mse_near, mse_ada)
            params[node.name] = (layer.to_onnx(learned).astype(np.int8), layer.scale)
            bar.advance(task)
    return params
