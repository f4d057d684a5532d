"""The ``distill`` technique: a knowledge-distillation fine-tune (Hinton et al. 2015).

The teacher is the model as it enters the step (``model.torch``, frozen); the student starts as a
copy of it and is fine-tuned on ``task.train`` with soft targets plus labels. Used after a lossy
step (pruning, low-rank), the soft targets of the model entering the step regularise the
fine-tune (self-distillation). For distinct teacher and student models use
:func:`edgeslim.distill.distill`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from edgeslim.config import TechniqueConfig
from edgeslim.distill.trainer import distill
from edgeslim.errors import ConfigError
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task, count_samples


@dataclass(frozen=True)
class DistillConfig(TechniqueConfig):
    """Knowledge-distillation fine-tune (Hinton et al. 2015): soft targets at ``temperature``.

    Loss: ``alpha * T² * KL(teacher || student at T) + (1 - alpha) * CE(student, labels)``, trained
    with the project's AdamW + one-cycle loop on ``task.train``.
    """

    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.9
    seed: int = 0
    augment_shift: int = 0
    progress: bool = True

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("augment_shift", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be >= {low}, got {getattr(self, name)}")


@register("distill", DistillConfig)
def distill_step(model: ModelArtifact, config: DistillConfig, task: Task) -> ModelArtifact:
    """Knowledge-distillation fine-tune: a copy of the model learns from the model's soft targets."""
    if task.train is None or count_samples(task.train) == 0:
        raise ConfigError("distill: knowledge distillation needs training data (task.train is empty)")
    from edgeslim.prune.magnitude_technique import (  # lazy: prune imports distill
        pruned_masks,
        repack_sparse,
    )
    from edgeslim.prune.unstructured import mask_keeper

    teacher = model.float_copy("distill")
    student = copy.deepcopy(teacher)
    masks = pruned_masks(model)  # a pruning step before this one: keep its zeros through the fine-tune
    x, y = (task.train, None) if not isinstance(task.train, (tuple, list)) else task.train
    student = distill(student, teacher, x, y, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                      temperature=config.temperature, alpha=config.alpha, seed=config.seed,
                      augment_shift=config.augment_shift, progress=config.progress,
                      after_step=None if masks is None else mask_keeper(masks))
    notes = {**model.notes, "distill": {"temperature": config.temperature, "alpha": config.alpha,
                                        "epochs": config.epochs}}
    out = ModelArtifact(torch=student, notes=notes, files=dict(model.files))
    return out if masks is None else repack_sparse(out)  # the sparse file must hold the new weights
