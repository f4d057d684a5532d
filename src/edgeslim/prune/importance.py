"""Channel importance for structured pruning: one score per channel of each dependency group.

A group's score for channel ``c`` sums over every coupled weight slice (the producing rows, the
consuming columns, depthwise filters), so a channel is judged by everything removing it deletes.

- ``l1``: sum of |w| (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- ``l2``: sqrt of the sum of w² over the same slices.
  For both, a Conv/Linear followed by a BatchNorm is scored on its BN-folded rows
  ``w * gamma / sqrt(var + eps)`` (and bias): BN rescales each filter, so the raw filter norm says
  little about a channel's output, while the folded one is what the exported model runs.
- ``bn``: |gamma| of the group's BatchNorm layers (Liu et al. 2017, "Network Slimming");
  groups without a BatchNorm fall back to ``l1``.
- ``taylor``: sum of |w * dL/dw| with the gradient of the cross-entropy over a few batches of task
  data (first-order Taylor expansion of the loss change, Molchanov et al. 2019).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from edgeslim.errors import ConfigError, DataError
from edgeslim.prune.graph import DependencyGraph, Group, Member

IMPORTANCES = ("l1", "l2", "bn", "taylor")


def _slices(mod: nn.Module, m: Member, tensors: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
    """The member's weights moved so that dim 0 runs over positions: [(P, ...)]."""
    out = []
    for key in ("weight", "bias"):
        t = tensors.get(key)
        if t is None or (key == "bias" and m.kind == "in"):
            continue
        out.append(t.transpose(0, m.dim) if m.dim != 0 else t)
    return out


def _scatter(values: torch.Tensor, index: tuple[int, ...], size: int) -> torch.Tensor:
    """Sum per-position values (P,) into per-channel scores (size,), skipping positions of other groups."""
    idx = torch.as_tensor(index)
    keep = idx >= 0
    return torch.zeros(size, dtype=torch.float64).index_add_(0, idx[keep], values[keep].double())


def _per_position(slices: list[torch.Tensor], power: int) -> torch.Tensor:
    total = None
    for s in slices:
        v = s.detach().abs().pow(power).reshape(s.shape[0], -1).sum(1)  # (P,)
        total = v if total is None else total + v
    return total


def _folded(graph: DependencyGraph, m: Member) -> dict[str, torch.Tensor]:
    """The rows of ``m.module`` with the following BatchNorm folded in (Ioffe & Szegedy 2015 eq. in sec. 3)."""
    mod, bn = graph.layers[m.module], graph.layers[graph.norm_after[m.module]]
    scale = (bn.weight if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    shape = (-1,) + (1,) * (mod.weight.dim() - 1)
    bias = mod.bias if mod.bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.bias is not None else 0.0
    return {"weight": mod.weight * scale.reshape(shape), "bias": (bias - bn.running_mean) * scale + shift}


def group_scores(graph: DependencyGraph, group: Group, kind: str,
                 grads: dict[str, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Per-channel importance (size,) of one group, float64."""
    score = torch.zeros(group.size, dtype=torch.float64)
    if kind == "bn":
        bns = [m for m in group.members if m.kind == "bn" and graph.layers[m.module].weight is not None]
        if not bns:
            return group_scores(graph, group, "l1")
        for m in bns:
            score += _scatter(graph.layers[m.module].weight.detach().abs(), m.index, group.size)
        return score
    for m in group.members:
        if m.kind == "bn":
            continue
        mod = graph.layers[m.module]
        if kind == "taylor":
            g = (grads or {}).get(m.module)
            if g is None:
                raise DataError(f"taylor importance: no gradient for layer {m.module!r}")
            params = {k: (getattr(mod, k) * g[k]) if getattr(mod, k, None) is not None and k in g else None
                      for k in ("weight", "bias")}  # w * dL/dw
            per_pos = _per_position(_slices(mod, m, params), 1)
        else:
            params = _folded(graph, m) if m.kind == "out" and m.module in graph.norm_after else \
                {"weight": mod.weight, "bias": mod.bias}
            per_pos = _per_position(_slices(mod, m, params), 1 if kind == "l1" else 2)
        score += _scatter(per_pos, m.index, group.size)
    return score.sqrt() if kind == "l2" else score


def taylor_gradients(model: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     layers: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """dL/dw of the summed cross-entropy over ``batches`` for the named layers (model in eval mode)."""
    modules = dict(model.named_modules())
    model.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    seen = 0
    was_training = model.training
    model.eval()  # BN uses running stats: the gradient of the deployed function
    try:
        for x, y in batches:
            if y is None:
                raise ConfigError("importance: 'taylor' needs labelled data (task.train or task.calibration with labels)")
            out = model(torch.as_tensor(x).float())  # (B, classes)
            loss_fn(out, torch.as_tensor(y).long().reshape(-1)).backward()
            seen += len(y)
        if seen == 0:
            raise DataError("taylor importance: the data yielded no batches")
        grads = {}
        for name in layers:
            mod = modules[name]
            grads[name] = {k: getattr(mod, k).grad.detach().clone() / seen for k in ("weight", "bias")
                           if getattr(mod, k, None) is not None and getattr(mod, k).grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return grads


def compute_importance(graph: DependencyGraph, kind: str, model: nn.Module | None = None,
                       batches: Iterable[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, torch.Tensor]:
    """Scores for every group of ``graph`` by group name; ``taylor`` needs ``model`` and ``batches``."""
    if kind not in IMPORTANCES:
        raise ConfigError(f"importance: {kind!r} is not one of {', '.join(IMPORTANCES)}")
    grads = None
    if kind == "taylor":
        if model is None or batches is None:
            raise ConfigError("importance: 'taylor' needs the model and batches of labelled data")
        names = {m.module for g in graph.groups for m in g.members if m.kind != "bn"}
        grads = taylor_gradients(model, batches, names)
    return {g.name: group_scores(graph, g, kind, grads) for g in graph.groups}
