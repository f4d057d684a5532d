"""The ``prune_channels`` technique: structured channel pruning with physical removal, then an
optional fine-tune (plain, or knowledge distillation from the model entering the step).

The result is a smaller dense network (fewer channels per layer), so the speedup shows on any
runtime without sparse kernels. See :mod:`edgeslim.prune.graph` for what is coupled.

The sparsity of an earlier unstructured step (``artifact.sparsity``) is carried for the weights
this step leaves whole (same name and shape: kept through the fine-tune) and dropped for the
weights it cuts (their remaining zeros may regrow): prune channels first for both to hold.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeslim.config import TechniqueConfig
from edgeslim.distill.trainer import fine_tune
from edgeslim.errors import ConfigError, ModelError
from edgeslim.prune.graph import DependencyGraph, build_graph
from edgeslim.prune.importance import IMPORTANCES, compute_importance
from edgeslim.prune.structured import (
    PrunePlan,
    channel_counts,
    check_ratio,
    plan_keep,
    remove_channels,
)
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task, count_samples, iter_batches
from edgeslim.train import FineTune


@dataclass(frozen=True)
class PruneChannelsConfig(TechniqueConfig):
    """Remove whole channels (Conv filters, Linear units) ranked by importance; fine-tune optionally.

    ``ratio`` is the share of channels removed per group (``scope="uniform"``) or over all groups
    ranked together (``"global"``); ``overrides`` maps a producing layer to its own ratio;
    ``exclude`` lists layers left whole; kept counts are rounded to multiples of ``round_to``.
    ``fine_tune`` (:class:`~edgeslim.train.FineTune`; none by default): ``temperature > 0``
    distils from the unpruned model (Hinton et al. 2015). Taylor importance scores
    ``taylor_batches`` batches of ``fine_tune.batch_size``.
    """

    ratio: float = 0.25
    scope: str = "uniform"
    importance: str = "l1"
    round_to: int = 1
    overrides: dict[str, float] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    fine_tune: FineTune = FineTune.defaults()
    taylor_batches: int = 4

    def validate(self) -> None:
        check_ratio(self.ratio, "ratio")
        if self.scope not in ("uniform", "global"):
            raise ConfigError(f"scope: {self.scope!r} is not one of 'uniform', 'global'")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance: {self.importance!r} is not one of {', '.join(IMPORTANCES)}")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides: expected a mapping of layer -> ratio, got {type(self.overrides).__name__}")
        for layer, ratio in self.overrides.items():
            check_ratio(ratio, f"overrides.{layer}")
        for name, low in (("round_to", 1), ("taylor_batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")

    def plan(self) -> PrunePlan:
        return PrunePlan(ratio=self.ratio, scope=self.scope, round_to=self.round_to,
                         overrides=dict(self.overrides), exclude=tuple(self.exclude))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune_model(model: nn.Module, example: torch.Tensor, config: PruneChannelsConfig,
                task: Task | None = None) -> tuple[nn.Module, DependencyGraph, dict[str, torch.Tensor]]:
    """Prune a copy of ``model`` (no fine-tune): returns the pruned model, its graph and the kept indices.

    ``task`` supplies labelled batches for Taylor importance (``task.train``, else ``task.calibration``).
    """
    work = copy.deepcopy(model).eval()
    graph = build_graph(work, example)
    batches = None
    if config.importance == "taylor":
        if task is None:
            raise ConfigError("importance: 'taylor' needs task data with labels")
        data = task.train if task.train is not None else task.calibration
        size = config.fine_tune.batch_size
        batches = iter_batches(data, size, limit=size * config.taylor_batches)
    scores = compute_importance(graph, config.importance, work, batches)
    keep = plan_keep(graph, scores, config.plan())
    return remove_channels(work, graph, keep, example), graph, keep


@register("prune_channels", PruneChannelsConfig)
def prune_channels(model: ModelArtifact, config: PruneChannelsConfig, task: Task) -> ModelArtifact:
    """Structured channel pruning with physical removal (a smaller dense model), then fine-tune."""
    ft = config.fine_tune
    if ft.epochs > 0 and (task.train is None or count_samples(task.train) == 0):
        raise ConfigError("fine_tune.epochs: fine-tuning after pruning needs training data (task.train is empty); "
                          "set fine_tune: {epochs: 0} or give train data")
    if len(task.example_inputs) != 1:
        raise ModelError(f"prune_channels: supports single-input models, this one takes {len(task.example_inputs)}")
    source = model.float_copy("prune_channels")
    example = task.example_inputs[0]
    pruned, graph, keep = prune_model(source, example, config, task)
    if not graph.groups:
        raise ModelError(f"prune_channels: {type(source).__name__} has no prunable channel group "
                         "(every channel feeds the output or an op kept whole)")
    if (config.ratio > 0 or config.overrides) and not channel_counts(graph, keep):
        raise ConfigError(f"ratio: {config.ratio} removes no channel (groups too small for round_to={config.round_to}?)")
    sparsity = model.sparsity.restricted_to(pruned) if model.sparsity is not None else None
    if ft.epochs > 0:
        pruned = fine_tune(pruned, source, ft, task.train, keep=sparsity)
    macs_after = dict(build_graph(copy.deepcopy(pruned), example).macs)
    notes = {**model.notes, "prune_channels": {
        "ratio": config.ratio, "scope": config.scope, "importance": config.importance,
        "channels": {layer: list(v) for layer, v in channel_counts(graph, keep).items()},
        "params_before": _count(source), "params_after": _count(pruned),
        "macs_before": sum(graph.macs.values()), "macs_after": sum(macs_after.values()),
        "fine_tune": {"epochs": ft.epochs, "temperature": ft.temperature} if ft.epochs else None,
    }}
    return ModelArtifact(torch=pruned.eval(), notes=notes, files=dict(model.files), sparsity=sparsity)
