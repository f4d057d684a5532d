"""Structured pruning of BERT-style encoders: whole attention heads and FFN neurons, removed physically.

A BERT layer ``encoder.layer[i]`` computes, per head ``h`` of size ``d``::

    ctx_h = softmax(Q_h K_hᵀ / √d) V_h        Q_h = x W_q[h·d:(h+1)·d]ᵀ, likewise K, V   # (B, S, d)
    attn  = concat_h(ctx_h) W_oᵀ                                                     # (B, S, H)
    ffn   = act(x W_1ᵀ) W_2ᵀ                    W_1: (I, H) rows = neurons, W_2: (H, I) columns

so a head is the rows ``h·d:(h+1)·d`` of ``query``/``key``/``value`` plus the same columns of
``attention.output.dense``, and an FFN neuron ``j`` is row ``j`` of ``intermediate.dense`` plus column
``j`` of ``output.dense``. Removing both slices drops that head's / neuron's contribution exactly
(the output bias is kept), and the smaller matrices make every MatMul cheaper on any runtime.

Importance (which ones to drop): the weight magnitude of each group, or the first-order Taylor
score of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"): a gate ξ multiplies
each head's context (each neuron's activation) and ``I = Σ_batches |∂L/∂ξ|`` at ξ = 1. ``L`` needs no
labels: it is the in-batch contrastive loss (Henderson et al. 2017; sentence-transformers'
MultipleNegativesRanking loss, which trained all-MiniLM) of the model's outputs against the
unpruned model's own outputs. At ξ = 1 a self-distillation loss such as 1 − cosine sits at its
minimum and has zero gradient; the contrastive loss does not, and it asks what the embeddings
are for: telling sentences apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.errors import DataError, ModelError

__all__ = [
    "contrastive_loss", "embed", "encoder_layers", "ffn_widths", "head_counts", "head_importance_magnitude",
    "magnitude_importance", "prune_and_reconstruct", "prune_ffn", "prune_heads", "select_heads", "select_neurons",
    "taylor_importance", "trim_padding",
]

_LAYOUT = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense")
_CONTRAST_SCALE = 20.0  # sentence-transformers MultipleNegativesRankingLoss default (cosine * 20)


# ------------------------------------------------------------------------------------- layout
def _sub(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def encoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BERT-style layers of ``model`` as ``(qualified name, layer)``, in order.

    The first submodule (the model itself included) with an ``encoder.layer`` list whose every
    item has the Linear layout of :data:`_LAYOUT`; ModelError naming the model otherwise.
    """
    for name, module in model.named_modules():
        layers = _sub(module, "encoder.layer")
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)) or len(layers) == 0:
            continue
        bad = [(i, p) for i, layer in enumerate(layers) for p in _LAYOUT if not isinstance(_sub(layer, p), nn.Linear)]
        prefix = f"{name}.encoder.layer" if name else "encoder.layer"
        if bad:
            i, p = bad[0]
            raise ModelError(f"{prefix}.{i} has no nn.Linear {p}: not a BERT-style encoder layer")
        return [(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]
    raise ModelError(
        f"{type(model).__name__} has no BERT-style encoder layers (encoder.layer[i] with "
        "attention.self.query/key/value, attention.output.dense, intermediate.dense, output.dense)"
    )


def _heads(layer: nn.Module, name: str) -> tuple[int, int]:
    """(number of heads, head size) of a layer, checked against the Q/K/V/output shapes."""
    att = layer.attention.self
    d = getattr(att, "attention_head_size", None)
    if not isinstance(d, int) or d < 1:
        raise ModelError(f"{name}.attention.self has no integer attention_head_size")
    width = att.query.out_features
    shapes_ok = (att.key.out_features == width and att.value.out_features == width
                 and layer.attention.output.dense.in_features == width)
    if not shapes_ok or width % d:
        raise ModelError(f"{name}: Q/K/V/output widths ({att.query.out_features}, {att.key.out_features}, "
                         f"{att.value.out_features}, {layer.attention.output.dense.in_features}) are not "
                         f"equal multiples of head size {d}")
    return width // d, d


def head_counts(model: nn.Module) -> list[int]:
    """Number of attention heads in each encoder layer (may differ per layer after pruning)."""
    return [_heads(layer, name)[0] for name, layer in encoder_layers(model)]


def ffn_widths(model: nn.Module) -> list[int]:
    """Number of FFN neurons (intermediate width) in each encoder layer."""
    return [layer.intermediate.dense.out_features for _, layer in encoder_layers(model)]


# ------------------------------------------------------------------------------------- removal
def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear holding only the output rows (dim 0) or input columns (dim 1) in ``keep``."""
    weight = linear.weight.detach().index_select(dim, keep).clone()  # (out', in) or (out, in')
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data.copy_(bias.index_select(0, keep) if dim == 0 else bias)  # input slicing keeps the bias
    new.train(linear.training)
    return new


def _removal(indices: Sequence[int], total: int, what: str, name: str) -> torch.Tensor:
    """Sorted unique indices to keep, after checking the ones to remove are in ``[0, total)``."""
    drop = sorted({int(i) for i in indices})
    if drop and (drop[0] < 0 or drop[-1] >= total):
        bad = drop[0] if drop[0] < 0 else drop[-1]
        raise ModelError(f"{name}: {what} index {bad} is out of range (the layer has {total})")
    return torch.tensor([i for i in range(total) if i not in set(drop)], dtype=torch.long)


def _check_layer_keys(spec: Mapping[int, Sequence[int]], n_layers: int, what: str) -> None:
    for key in spec:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= key < n_layers:
            raise ModelError(f"{what}: layer {key!r} does not exist (the encoder has {n_layers} layers)")


def prune_heads(model: nn.Module, heads: Mapping[int, Sequence[int]]) -> nn.Module:
    """Remove attention heads in place: ``{layer index: [head indices]}``; returns ``model``.

    Head indices count the heads the layer has now. Q/K/V lose the head's ``d`` output rows and the
    attention output projection the same ``d`` input columns; ``num_attention_heads`` and
    ``all_head_size`` follow. Removing every head of a layer raises ModelError naming the layer.
    """
    layers = encoder_layers(model)
    _check_layer_keys(heads, len(layers), "prune_heads")
    for i in sorted(heads):
        name, layer = layers[i]
        n, d = _heads(layer, name)
        keep_heads = _removal(heads[i], n, "head", name)
        if len(keep_heads) == 0:
            raise ModelError(f"{name}: cannot remove all {n} attention heads; keep at least one per layer")
        if len(keep_heads) == n:
            continue
        rows = (keep_heads[:, None] * d + torch.arange(d)).reshape(-1)  # (n_keep * d,) channel indices
        att = layer.attention.self
        att.query, att.key, att.value = (_slice_linear(getattr(att, p), rows, 0) for p in ("query", "key", "value"))
        layer.attention.output.dense = _slice_linear(layer.attention.output.dense, rows, 1)
        att.num_attention_heads = len(keep_heads)
        att.all_head_size = len(keep_heads) * d
    return model


def prune_ffn(model: nn.Module, neurons: Mapping[int, Sequence[int]]) -> nn.Module:
    """Remove FFN neurons in place: ``{layer index: [neuron indices]}``; returns ``model``.

    ``intermediate.dense`` loses the neurons' rows and ``output.dense`` the same columns. At least
    one neuron must stay in each layer (ModelError naming the layer otherwise).
    """
    layers = encoder_layers(model)
    _check_layer_keys(neurons, len(layers), "prune_ffn")
    for i in sorted(neurons):
        name, layer = layers[i]
        width = layer.intermediate.dense.out_features
        if layer.output.dense.in_features != width:
            raise ModelError(f"{name}: intermediate.dense has {width} outputs but output.dense takes "
                             f"{layer.output.dense.in_features} inputs")
        keep = _removal(neurons[i], width, "FFN neuron", name)
        if len(keep) == 0:
            raise ModelError(f"{name}: cannot remove all {width} FFN neurons; keep at least one per layer")
        if len(keep) == width:
            continue
        layer.intermediate.dense = _slice_linear(layer.intermediate.dense, keep, 0)
        layer.output.dense = _slice_linear(layer.output.dense, keep, 1)
    return model


# ------------------------------------------------------------------------------------- importance
def _group_norm(parts: Iterable[torch.Tensor], p: int) -> torch.Tensor:
    """L1 or L2 norm over the concatenated per-group slices; each part is (groups, k_i)."""
    cat = torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1)
    return cat.abs().sum(1) if p == 1 else cat.pow(2).sum(1).sqrt()


def head_importance_magnitude(layer: nn.Module, name: str, p: int = 2) -> torch.Tensor:
    """(heads,) norm of each head's Q/K/V weight rows and output-projection weight columns."""
    n, d = _heads(layer, name)
    att = layer.attention.self
    qkv = [getattr(att, k).weight.detach().reshape(n, d, -1) for k in ("query", "key", "value")]  # (n, d, H)
    out = layer.attention.output.dense.weight.detach().reshape(-1, n, d).transpose(0, 1)  # (n, H, d)
    return _group_norm([*qkv, out], p)


def magnitude_importance(model: nn.Module, p: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: (heads,) and (neurons,) weight norms (L1 if ``p`` is 1, else L2) of each group."""
    heads, neurons = [], []
    for name, layer in encoder_layers(model):
        heads.append(head_importance_magnitude(layer, name, p))
        w_in = layer.intermediate.dense.weight.detach()  # (I, H): row j feeds neuron j
        w_out = layer.output.dense.weight.detach().t()  # (I, H): column j reads neuron j
        neurons.append(_group_norm([w_in, w_out], p))
    return heads, neurons


def _first_tensor(out: Any, cls: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        tensor = next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
        if tensor is not None:
            return tensor
    raise ModelError(f"{cls} returned a {type(out).__name__}, not a tensor")


def embed(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, D) output vectors: the model's first output tensor, token states mean-pooled if (B, S, D)."""
    out = _first_tensor(model(*inputs), type(model).__name__)
    if out.dim() == 3:
        out = out.mean(dim=1)
    return out.reshape(out.shape[0], -1)


def contrastive_loss(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """In-batch contrastive loss: row i of ``out`` must be closest to row i of ``ref`` (cosine × 20)."""
    sim = nn.functional.normalize(out, dim=1) @ nn.functional.normalize(ref, dim=1).t()  # (B, B)
    return nn.functional.cross_entropy(sim * _CONTRAST_SCALE, torch.arange(len(out), device=out.device))


def _gate_hooks(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
    """Gates ξ = 1 on each head's context and each FFN neuron, as forward pre-hooks; (heads, neurons, handles)."""
    head_gates, ffn_gates, handles = [], [], []
    for name, layer in encoder_layers(model):
        n, d = _heads(layer, name)
        g_head = torch.ones(n, requires_grad=True)
        g_ffn = torch.ones(layer.output.dense.in_features, requires_grad=True)

        def gate_heads(_m: nn.Module, args: tuple, g: torch.Tensor = g_head, d: int = d) -> tuple:
            return (args[0] * g.repeat_interleave(d),) + args[1:]  # (B, S, n*d) * (n*d,)

        def gate_ffn(_m: nn.Module, args: tuple, g: torch.Tensor = g_ffn) -> tuple:
            return (args[0] * g,) + args[1:]  # (B, S, I) * (I,)

        handles.append(layer.attention.output.dense.register_forward_pre_hook(gate_heads))
        handles.append(layer.output.dense.register_forward_pre_hook(gate_ffn))
        head_gates.append(g_head)
        ffn_gates.append(g_ffn)
    return head_gates, ffn_gates, handles


def trim_padding(x: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Drop trailing all-padding columns of an ``(ids, mask)`` batch (padded tokens are masked out,
    so a sentence encoder's outputs do not change); other inputs are returned as they are."""
    x = tuple(x)
    if len(x) == 2 and x[1].ndim == 2 and x[0].shape == x[1].shape and np.isin(x[1], (0, 1)).all():
        used = np.flatnonzero(x[1].any(axis=0))
        if len(used):
            return tuple(a[:, : used[-1] + 1] for a in x)
    return x


def taylor_importance(
    model: nn.Module, batches: Iterable[Sequence[np.ndarray]], progress: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: (heads,) and (neurons,) scores ``Σ_batches |∂L/∂ξ|`` at ξ = 1 (Michel et al. 2019).

    ``L`` is :func:`contrastive_loss` of the model's outputs against its own outputs computed
    without gradients (the reference). Each batch needs at least two samples. The model runs in
    eval mode (no dropout) and is left with its parameters and mode unchanged.
    """
    from rich.progress import track

    was_training = model.training
    model.eval()
    head_gates, ffn_gates, handles = _gate_hooks(model)
    head_scores = [torch.zeros_like(g) for g in head_gates]
    ffn_scores = [torch.zeros_like(g) for g in ffn_gates]
    seen = 0
    try:
        for x in track(list(batches), description="taylor importance", disable=not progress, transient=True):
            inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in trim_padding(x)]
            if inputs[0].shape[0] < 2:
                continue  # a contrastive loss needs another sample to contrast with
            with torch.no_grad():
                ref = embed(model, inputs)
            loss = contrastive_loss(embed(model, inputs), ref)
            grads = torch.autograd.grad(loss, head_gates + ffn_gates)
            for acc, g in zip(head_scores + ffn_scores, grads):
                acc += g.abs()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise DataError("taylor importance needs calibration batches of at least 2 samples; got none")
    return head_scores, ffn_scores


# ------------------------------------------------------------------------------------- selection
def _normalised(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's scores divided by their L2 norm, so layers compete fairly in a global ranking
    (Michel et al. 2019, §4.2: per-layer normalisation of head importance)."""
    return [s / s.norm().clamp(min=1e-12) for s in scores]


def _count(ratio: float, total: int) -> int:
    return int(np.floor(ratio * total + 1e-9))


def select_heads(scores: list[torch.Tensor], ratio: float, scope: str) -> dict[int, list[int]]:
    """Heads to remove per layer: the lowest-scoring ``ratio`` of each layer (``scope="layer"``) or of
    all heads (``"global"``, per-layer normalised scores); at least one head stays in every layer."""
    if scope == "layer":
        out = {}
        for i, s in enumerate(scores):
            k = min(_count(ratio, len(s)), len(s) - 1)
            out[i] = sorted(int(j) for j in torch.argsort(s, stable=True)[:k])
        return out
    normed = _normalised(scores)
    flat = sorted((float(v), i, j) for i, s in enumerate(normed) for j, v in enumerate(s))
    budget = _count(ratio, len(flat))
    left = [len(s) for s in scores]
    out = {i: [] for i in range(len(scores))}
    for _, i, j in flat:
        if budget == 0:
            break
        if left[i] > 1:
            out[i].append(j)
            left[i] -= 1
            budget -= 1
    return {i: sorted(v) for i, v in out.items()}


def _round_keep(keep: int, width: int, round_to: int) -> int:
    """``keep`` rounded up to a multiple of ``round_to`` (never above ``width``, at least one)."""
    rounded = -(-max(keep, 1) // round_to) * round_to
    return min(max(rounded, 1), width)


def select_neurons(scores: list[torch.Tensor], ratio: float, scope: str, round_to: int = 1) -> dict[int, list[int]]:
    """FFN neurons to remove per layer, lowest scores first; kept widths are rounded up to a
    multiple of ``round_to`` (GEMM-friendly shapes) and never reach zero."""
    widths = [len(s) for s in scores]
    if scope == "layer":
        keeps = [w - _count(ratio, w) for w in widths]
    else:
        normed = _normalised(scores)
        flat = torch.cat(normed)
        k = _count(ratio, len(flat))
        cut = torch.argsort(flat, stable=True)[:k]
        removed = torch.zeros(len(flat), dtype=torch.bool)
        removed[cut] = True
        keeps = [int((~part).sum()) for part in torch.split(removed, widths)]
    out = {}
    for i, (s, w, keep) in enumerate(zip(scores, widths, keeps)):
        keep = _round_keep(keep, w, round_to)
        out[i] = sorted(int(j) for j in torch.argsort(s, stable=True)[: w - keep])
    return out


# ------------------------------------------------------------------------------------- reconstruction
class _Stop(Exception):
    """Raised by a capture hook once it has its input, so the forward pass ends early."""


def _gram(model: nn.Module, linear: nn.Linear, batches: Sequence[Sequence[np.ndarray]]) -> torch.Tensor:
    """(K+1, K+1) float64 Gram matrix Σ [a, 1]ᵀ[a, 1] of ``linear``'s inputs ``a`` (K,) over the real
    tokens of ``batches`` (the mask is the second input of an ``(ids, mask)`` pair; else all tokens)."""
    k = linear.in_features
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    state: dict[str, torch.Tensor] = {}

    def capture(_m: nn.Module, args: tuple) -> None:
        state["a"] = args[0].detach()
        raise _Stop

    handle = linear.register_forward_pre_hook(capture)
    try:
        for x in batches:
            x = trim_padding(x)
            try:
                with torch.no_grad():
                    model(*(torch.from_numpy(np.ascontiguousarray(a)) for a in x))
            except _Stop:
                pass
            a = state.pop("a").float()  # (B, S, K)
            if a.dim() == 3 and len(x) == 2 and x[1].shape == tuple(a.shape[:2]):
                a = a[torch.from_numpy(x[1]).bool()]  # (T, K): real tokens only
            a = a.reshape(-1, k)
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)  # (T, K+1)
            gram += (a.t() @ a).double()  # float32 product (4x faster than float64), float64 sum
    finally:
        handle.remove()
    return gram


def _refit(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, gram: torch.Tensor,
           damp: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights on the kept inputs that best reproduce the full layer's outputs.

    Solves ``min ‖A_k W'ᵀ + 1 δbᵀ − A Wᵀ‖² + λ‖[W' − W_k, δb]‖²`` over the calibration tokens from the
    Gram matrix alone (``A_kᵀA = G[k, :K]``); ``δb`` absorbs the removed inputs' mean contribution
    (bias compensation, An et al. 2024 "FLAP"), ``W'`` the part the kept inputs can explain (the
    least-squares mask tuning of Kwon et al. 2022, here with full weights). ``λ = damp · mean diag``.
    Returns the new (out, k) weight and bias.
    """
    k_all = weight.shape[1]
    idx = torch.cat([keep, torch.tensor([k_all])])  # kept inputs + the constant column
    lhs = gram[idx][:, idx]  # (k+1, k+1)
    rhs = gram[idx][:, :k_all] @ weight.detach().double().t()  # (k+1, out)
    lam = damp * float(lhs.diagonal().mean())
    # damped towards the original weights (and δb towards 0), not towards zero: when the removed
    # inputs carried nothing, the solution is exactly the kept weights
    prior = torch.cat([weight.detach().double()[:, keep].t(), torch.zeros(1, weight.shape[0], dtype=torch.float64)])
    sol = torch.linalg.solve(lhs + lam * torch.eye(len(idx), dtype=torch.float64), rhs + lam * prior)  # (k+1, out)
    new_w = sol[:-1].t().to(weight.dtype).contiguous()
    new_b = None if bias is None else (bias.detach().double() + sol[-1]).to(bias.dtype)
    return new_w, new_b


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None and linear.bias is not None:
            linear.bias.copy_(bias)


def prune_and_reconstruct(
    model: nn.Module, heads: Mapping[int, Sequence[int]], neurons: Mapping[int, Sequence[int]],
    batches: Sequence[Sequence[np.ndarray]], damp: float = 1.0,
) -> nn.Module:
    """Remove heads and neurons layer by layer, refitting each output projection to what it computed
    before (:func:`_refit`) on the calibration ``batches``; returns ``model`` (changed in place).

    Going in layer order, each layer's Gram matrix is taken on the already-pruned model, so a
    layer also corrects the drift its predecessors left (sequential reconstruction, as in
    SparseGPT). Costs two partial forward passes over the batches per pruned layer.
    """
    layers = encoder_layers(model)
    _check_layer_keys(heads, len(layers), "prune_heads")
    _check_layer_keys(neurons, len(layers), "prune_ffn")
    for i, (name, layer) in enumerate(layers):
        if heads.get(i):
            n, d = _heads(layer, name)
            dense = layer.attention.output.dense
            gram = _gram(model, dense, batches)
            keep_heads = _removal(heads[i], n, "head", name)
            cols = (keep_heads[:, None] * d + torch.arange(d)).reshape(-1)  # (n_keep * d,)
            weight, bias = _refit(dense.weight, dense.bias, cols, gram, damp)
            prune_heads(model, {i: heads[i]})
            _set_linear(layer.attention.output.dense, weight, bias)
        if neurons.get(i):
            dense = layer.output.dense
            gram = _gram(model, dense, batches)
            keep = _removal(neurons[i], dense.in_features, "FFN neuron", name)
            weight, bias = _refit(dense.weight, dense.bias, keep, gram, damp)
            prune_ffn(model, {i: neurons[i]})
            _set_linear(layer.output.dense, weight, bias)
    return model
