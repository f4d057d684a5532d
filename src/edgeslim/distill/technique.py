"""The ``distill`` technique: a knowledge-distillation fine-tune (Hinton et al. 2015).

The teacher is the model as it enters the step (``model.torch``, frozen); the student starts as a
copy of it and is fine-tuned on ``task.train`` with soft targets plus labels. Used after a lossy
step (pruning, low-rank), the soft targets of the model entering the step regularise the
fine-tune (self-distillation). For distinct teacher and student models use
:func:`edgeslim.distill.distill`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from edgeslim.config import TechniqueConfig
from edgeslim.distill.trainer import fine_tune
from edgeslim.errors import ConfigError
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task, count_samples
from edgeslim.train import FineTune


@dataclass(frozen=True)
class DistillConfig(TechniqueConfig):
    """Knowledge-distillation fine-tune (Hinton et al. 2015): soft targets at ``temperature``.

    Loss: ``alpha * T² * KL(teacher || student at T) + (1 - alpha) * CE(student, labels)``, trained
    with the project's AdamW + one-cycle loop on ``task.train``; ``fine_tune`` sets T
    (``temperature``, > 0 here), ``alpha``, epochs (>= 1) and the rest (:class:`~edgeslim.train.FineTune`).
    """

    fine_tune: FineTune = FineTune.defaults(epochs=2, lr=1e-4, temperature=4.0)

    def validate(self) -> None:
        if self.fine_tune.temperature <= 0:
            raise ConfigError(f"fine_tune.temperature: must be > 0 (distillation), got {self.fine_tune.temperature}")
        if self.fine_tune.epochs < 1:
            raise ConfigError(f"fine_tune.epochs: must be >= 1, got {self.fine_tune.epochs}")


@register("distill", DistillConfig)
def distill_step(model: ModelArtifact, config: DistillConfig, task: Task) -> ModelArtifact:
    """Knowledge-distillation fine-tune: a copy of the model learns from the model's soft targets."""
    if task.train is None or count_samples(task.train) == 0:
        raise ConfigError("distill: knowledge distillation needs training data (task.train is empty)")
    teacher = model.float_copy("distill")
    student = copy.deepcopy(teacher)
    ft = config.fine_tune
    # an earlier pruning step's zeros stay zero through the fine-tune (and the stage's sparse file)
    student = fine_tune(student, teacher, ft, task.train, keep=model.sparsity)
    notes = {**model.notes, "distill": {"temperature": ft.temperature, "alpha": ft.alpha, "epochs": ft.epochs}}
    return ModelArtifact(torch=student, notes=notes, files=dict(model.files), sparsity=model.sparsity)
