"""Structured channel pruning with physical removal: a smaller dense model, not a masked one.

Flow: :func:`~edgeslim.prune.graph.build_graph` finds the coupled channel groups,
:func:`~edgeslim.prune.importance.compute_importance` scores their channels, :func:`plan_keep`
decides how many and which channels each group keeps (uniform or global ratio, per-layer
overrides, ``round_to`` multiples) and :func:`remove_channels` slices every coupled weight, bias
and BatchNorm statistic into a deep copy of the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeslim.errors import ConfigError, ModelError, first_line
from edgeslim.prune.graph import DependencyGraph, Group

# In a global ranking no group loses more than this share of its channels: a layer pruned to
# nothing would cut the network in two.
MAX_GLOBAL_RATIO = 0.9


@dataclass(frozen=True)
class PrunePlan:
    """How to choose channels: one ratio for all groups (``uniform``) or a global ranking."""

    ratio: float = 0.25
    scope: str = "uniform"  # "uniform" | "global"
    round_to: int = 1
    overrides: Mapping[str, float] = field(default_factory=dict)  # producing layer -> ratio
    exclude: tuple[str, ...] = ()


def check_ratio(value: float, where: str) -> None:
    """ConfigError unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ConfigError(f"{where}: ratio must be in [0, 1), got {value!r}")


def _check_layer(graph: DependencyGraph, layer: str, where: str) -> None:
    if layer not in graph.layers:
        known = ", ".join(sorted(g.name for g in graph.groups)) or "none"
        raise ConfigError(f"{where}: no Conv/Linear/BatchNorm layer named {layer!r} (prunable: {known})")


def _rounded(n: int, keep: int, round_to: int) -> int:
    """``keep`` rounded to the nearest multiple of ``round_to`` (at least one multiple, at most ``n``)."""
    if round_to > 1:
        keep = max(round_to, round_to * math.floor(keep / round_to + 0.5))
    return max(1, min(n, keep))


def _group_ratios(graph: DependencyGraph, plan: PrunePlan) -> dict[str, float | None]:
    """Fixed ratio per group (uniform scope or an override), None for groups ranked globally."""
    check_ratio(plan.ratio, "ratio")
    if plan.scope not in ("uniform", "global"):
        raise ConfigError(f"scope: {plan.scope!r} is not one of 'uniform', 'global'")
    if not isinstance(plan.round_to, int) or plan.round_to < 1:
        raise ConfigError(f"round_to: must be an integer >= 1, got {plan.round_to!r}")
    fixed: dict[str, float | None] = {g.name: (plan.ratio if plan.scope == "uniform" else None) for g in graph.groups}
    overridden: set[str] = set()
    for layer, ratio in plan.overrides.items():
        check_ratio(ratio, f"overrides.{layer}")
        _check_layer(graph, layer, f"overrides.{layer}")
        group = graph.group_of(layer)
        if group is None:
            raise ConfigError(f"overrides.{layer}: the output channels of {layer!r} are not prunable "
                              "(they feed the model output or an unprunable op)")
        # coupled layers (one residual group) with different overrides: the gentler one wins
        fixed[group.name] = min(fixed[group.name], ratio) if group.name in overridden else ratio
        overridden.add(group.name)
    for layer in plan.exclude:  # left whole: neither its outputs nor its inputs lose channels
        _check_layer(graph, layer, f"exclude.{layer}")
        for group in graph.groups:
            if layer in group.modules():
                fixed[group.name] = 0.0
    return fixed


def plan_keep(graph: DependencyGraph, scores: Mapping[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Sorted indices of the channels each group keeps."""
    fixed = _group_ratios(graph, plan)
    counts: dict[str, int] = {}
    for g in graph.groups:
        r = fixed[g.name]
        if r is not None:
            counts[g.name] = g.size if r == 0.0 else _rounded(g.size, round(g.size * (1 - r)), plan.round_to)
    pooled = [g for g in graph.groups if fixed[g.name] is None]
    if pooled:
        counts.update(_global_counts(pooled, scores, plan))
    keep = {}
    for g in graph.groups:
        top = torch.argsort(scores[g.name], descending=True, stable=True)[: counts[g.name]]
        keep[g.name] = torch.sort(top).values
    return keep


def _global_counts(groups: list[Group], scores: Mapping[str, torch.Tensor], plan: PrunePlan) -> dict[str, int]:
    """Channels kept per group when the lowest-scoring ``ratio`` of all pooled channels goes.

    Scores are divided by their group's mean first, so wide groups with many coupled weights
    (larger raw sums) do not dominate the ranking.
    """
    entries = []  # (normalised score, group name)
    for g in groups:
        s = scores[g.name]
        mean = float(s.mean())
        normed = s / mean if mean > 0 else torch.zeros_like(s)
        entries += [(float(v), g.name) for v in normed]
    entries.sort(key=lambda e: e[0])
    sizes = {g.name: g.size for g in groups}
    floor = {name: max(1, math.ceil(n * (1 - MAX_GLOBAL_RATIO))) for name, n in sizes.items()}
    kept = dict(sizes)
    to_remove = int(plan.ratio * sum(sizes.values()))
    for _, name in entries:
        if to_remove == 0:
            break
        if kept[name] > floor[name]:
            kept[name] -= 1
            to_remove -= 1
    return {name: _rounded(sizes[name], k, plan.round_to) for name, k in kept.items()}


def _masks(graph: DependencyGraph, keep: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """Boolean keep-mask per (module, kind), combined over every group the slice belongs to."""
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for g in graph.groups:
        kept = torch.zeros(g.size, dtype=torch.bool)
        kept[keep[g.name]] = True
        for m in g.members:
            idx = torch.as_tensor(m.index)
            mask = torch.where(idx >= 0, kept[idx.clamp(min=0)], torch.ones_like(idx, dtype=torch.bool))
            key = (m.module, m.kind)
            masks[key] = mask if key not in masks else masks[key] & mask
    return masks


def _param(t: torch.Tensor, mask: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(t.detach().index_select(dim, mask.nonzero().flatten()).clone(), requires_grad=t.requires_grad)


def _slice(mod: nn.Module, kind: str, mask: torch.Tensor) -> None:
    n = int(mask.sum())
    if kind == "bn":
        for key in ("weight", "bias"):
            if getattr(mod, key) is not None:
                setattr(mod, key, _param(getattr(mod, key), mask, 0))
        for key in ("running_mean", "running_var"):
            if getattr(mod, key) is not None:
                setattr(mod, key, getattr(mod, key)[mask].clone())
        mod.num_features = n
        return
    dim = 1 if kind == "in" else 0
    mod.weight = _param(mod.weight, mask, dim)
    if kind != "in" and mod.bias is not None:
        mod.bias = _param(mod.bias, mask, 0)
    if isinstance(mod, nn.Linear):
        setattr(mod, "in_features" if kind == "in" else "out_features", n)
    elif kind == "in":
        mod.in_channels = n
    elif kind == "out":
        mod.out_channels = n
    else:  # depthwise: one filter per channel
        mod.in_channels = mod.out_channels = mod.groups = n


def remove_channels(model: nn.Module, graph: DependencyGraph, keep: Mapping[str, torch.Tensor],
                    example: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with the unkept channels physically removed; checked by a forward pass."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    for (name, kind), mask in _masks(graph, keep).items():
        if not bool(mask.all()):
            _slice(modules[name], kind, mask)
    try:
        with torch.no_grad():
            pruned.eval()(example)
    except Exception as err:  # noqa: BLE001 - a coupling the graph missed: never hand back a broken model
        raise ModelError(f"pruned {type(model).__name__} no longer runs on input {tuple(example.shape)}: "
                         f"{first_line(err)}") from None
    return pruned.train(model.training)


def channel_counts(graph: DependencyGraph, keep: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """(before, after) output channels of every pruned producing layer."""
    return {p: (g.size, len(keep[g.name])) for g in graph.groups for p in g.producers if len(keep[g.name]) < g.size}
