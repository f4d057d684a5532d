"""The ``prune_magnitude`` technique: unstructured (or N:M) magnitude pruning with a schedule and
an optional (distillation) fine-tune; the stage's size is its measured sparse file.

Unstructured zeros do not make ONNX Runtime's dense kernels faster; the gain is the compact
file (:mod:`edgeslim.prune.sparse`), which the stage reports as its ``size_bytes``. The step sets
``artifact.sparsity`` (its masks and ``index_bits``): later steps keep the zeros, and the pipeline
writes the sparse file of this stage and of every later one that carries them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.prune.schedule import GradualPruner, iterative_prune
from edgeslim.prune.unstructured import (
    Masks,
    apply_masks,
    layer_sparsity,
    magnitude_masks,
    mask_keeper,
    nm_masks,
    resolve_names,
    sparsity_of,
)
from edgeslim.registry import register
from edgeslim.sparsity import Sparsity
from edgeslim.task import ModelArtifact, Task, count_samples
from edgeslim.train import FineTune


@dataclass(frozen=True)
class PruneMagnitudeConfig(TechniqueConfig):
    """Unstructured magnitude pruning (Han et al. 2015), or N:M when ``m > 0`` (then ``sparsity``,
    ``scope`` and ``overrides`` do not apply: the pattern fixes the sparsity at 1 - n/m).

    ``schedule``: ``one_shot`` prunes once, then fine-tunes ``fine_tune.epochs``; ``gradual`` prunes
    during the epochs of fine-tuning on Zhu & Gupta's cubic schedule (``updates`` mask updates);
    ``iterative`` runs ``rounds`` of prune + ``fine_tune.epochs`` of retraining (Han et al.).
    ``final_epochs`` then fine-tunes the finished sparse model once more, at ``final_lr`` (default
    ``fine_tune.lr``): a short retraining per round and a long one at the end. ``overrides`` maps a
    layer (module or weight name) to its own sparsity. ``fine_tune`` (:class:`~edgeslim.train.FineTune`;
    ``temperature > 0`` distils from the model entering the step, see
    :func:`edgeslim.distill.trainer.fine_tune`). The sparse file stores gaps in ``index_bits``.
    """

    sparsity: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    schedule: Literal["one_shot", "gradual", "iterative"] = "one_shot"
    overrides: dict[str, float] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    n: int = 2
    m: int = 0
    rounds: int = 3
    updates: int = 10
    fine_tune: FineTune = FineTune.defaults()
    final_epochs: int = 0
    final_lr: float | None = None
    index_bits: int = 5

    def validate(self) -> None:
        if isinstance(self.sparsity, bool) or not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"sparsity: must be in [0, 1), got {self.sparsity}")
        for name, value in self.overrides.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
                raise ConfigError(f"overrides.{name}: sparsity must be in [0, 1), got {value!r}")
        if self.m:
            if not 0 < self.n < self.m:
                raise ConfigError(f"n: N:M pruning needs 0 < n < m, got n={self.n}, m={self.m}")
            if self.schedule != "one_shot" or self.overrides or self.scope != "layer":
                raise ConfigError("m: N:M pruning is one_shot and layer-wise, without overrides")
        elif self.m < 0:
            raise ConfigError(f"m: must be >= 0 (0 = unstructured), got {self.m}")
        lows = (("rounds", 1), ("updates", 1), ("index_bits", 1), ("final_epochs", 0))
        for name, low in lows:
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if self.index_bits > 16:
            raise ConfigError(f"index_bits: must be <= 16, got {self.index_bits}")
        if self.schedule != "one_shot" and self.fine_tune.epochs < 1:
            raise ConfigError(f"fine_tune.epochs: the {self.schedule} schedule prunes while fine-tuning; "
                              "set fine_tune: {epochs: 1} or more")
        if self.final_lr is not None and not (math.isfinite(self.final_lr) and self.final_lr > 0):
            raise ConfigError(f"final_lr: must be > 0 (or null: fine_tune.lr), got {self.final_lr}")
        if self.final_epochs and self.fine_tune.epochs < 1:
            raise ConfigError("final_epochs: a final fine-tune needs the fine-tune settings; set fine_tune.epochs >= 1")


def _mask_fn(config: PruneMagnitudeConfig) -> Callable[[nn.Module, float], Masks]:
    """Masks at a fraction ``ramp`` of every layer's final sparsity (see schedule.py)."""

    def masks(model: nn.Module, ramp: float) -> Masks:
        if config.m:
            return nm_masks(model, config.n, config.m, exclude=config.exclude)
        overrides = {k: v * ramp for k, v in config.overrides.items()}
        return magnitude_masks(model, config.sparsity * ramp, scope=config.scope, exclude=config.exclude,
                               overrides=overrides)

    return masks


def _fine_tune(config: PruneMagnitudeConfig, task: Task, teacher: nn.Module | None, epochs: int,
               lr: float | None = None) -> Callable[[nn.Module, Callable[[nn.Module], None]], nn.Module]:
    """``retrain(model, after_step)``: ``epochs`` of CE training, or of KD from ``teacher``."""
    from edgeslim.distill.trainer import fine_tune

    def retrain(model: nn.Module, after_step: Callable[[nn.Module], None]) -> nn.Module:
        return fine_tune(model, teacher, config.fine_tune, task.train, epochs=epochs, lr=lr, after_step=after_step)

    return retrain


def _steps_per_epoch(task: Task, batch_size: int) -> int:
    data = task.train
    if isinstance(data, (tuple, list)):
        return math.ceil(count_samples(data) / batch_size)
    return len(data)


def prune_model(model: nn.Module, config: PruneMagnitudeConfig, task: Task) -> tuple[nn.Module, Masks]:
    """Prune a copy of ``model`` as ``config`` says, fine-tuning on ``task.train``; returns it and its masks."""
    for name in (*config.overrides, *config.exclude):
        resolve_names(model, [name], "overrides" if name in config.overrides else "exclude")
    ft = config.fine_tune
    if ft.epochs > 0 and (task.train is None or count_samples(task.train) == 0):
        raise ConfigError("fine_tune.epochs: fine-tuning needs training data (task.train is empty); "
                          "set fine_tune: {epochs: 0}")
    teacher = copy.deepcopy(model).eval() if ft.temperature > 0 and ft.epochs > 0 else None
    student = copy.deepcopy(model)
    mask_fn = _mask_fn(config)
    retrain = _fine_tune(config, task, teacher, ft.epochs) if ft.epochs > 0 else None
    if config.schedule == "iterative":
        masks = iterative_prune(student, mask_fn, config.rounds, retrain, ft.progress)
    elif config.schedule == "gradual":
        total = ft.epochs * _steps_per_epoch(task, ft.batch_size)
        pruner = GradualPruner.over(mask_fn, total, n=config.updates, progress=ft.progress)
        student = retrain(student, pruner)
        masks = pruner.finish(student)
    else:
        masks = mask_fn(student, 1.0)
        apply_masks(student, masks)
        if retrain is not None:
            student = retrain(student, mask_keeper(masks))
    if config.final_epochs:
        final = _fine_tune(config, task, teacher, config.final_epochs, config.final_lr)
        student = final(apply_masks(student, masks), mask_keeper(masks))
    return apply_masks(student.eval(), masks), masks


@register("prune_magnitude", PruneMagnitudeConfig)
def prune_magnitude(model: ModelArtifact, config: PruneMagnitudeConfig, task: Task) -> ModelArtifact:
    """Magnitude pruning (unstructured or N:M) with a schedule; size is the measured sparse file."""
    base = model.float_copy("prune_magnitude")
    pruned, masks = prune_model(base, config, task)
    kept = sum(int(m.sum()) for m in masks.values())
    notes = {**model.notes, "sparsity": round(sparsity_of(pruned), 6),
             "layer_sparsity": {k: round(v, 6) for k, v in layer_sparsity(pruned).items()}, "kept_weights": kept}
    # these masks replace any earlier step's: they are the zeros of the model this step returns
    return ModelArtifact(torch=pruned, notes=notes, files=dict(model.files),
                         sparsity=Sparsity(masks, index_bits=config.index_bits))
