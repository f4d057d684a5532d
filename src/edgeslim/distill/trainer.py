"""Train a student on a frozen teacher's soft targets (Hinton et al. 2015), optionally with
FitNets hints (Romero et al. 2015), on the project's deterministic training loop.

The loop is :func:`edgeslim.train.train` (AdamW, one-cycle LR, seeded shuffling and ±k px jitter);
only the per-batch loss changes: the teacher sees the same augmented batch as the student.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from edgeslim.distill.losses import hint_loss, kd_loss, make_adapter
from edgeslim.errors import ConfigError, DataError, ModelError, first_line
from edgeslim.sparsity import Sparsity
from edgeslim.task import Data
from edgeslim.train import ArrayLike, FineTune, as_tensors, random_shift, train


class _Student(nn.Module):
    """The trainable part: the student plus the hint adapters (the teacher stays outside, frozen)."""

    def __init__(self, student: nn.Module, adapters: list[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleList(adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise ModelError(f"hint module output is a {type(out).__name__}, not a tensor")


def _hook(model: nn.Module, name: str, role: str, store: dict[str, torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        raise ModelError(f"hints: {role} has no module named {name!r}")

    def save(_m: nn.Module, _inp: object, out: object) -> None:
        store[name] = _first_tensor(out)

    return modules[name].register_forward_hook(save)


def _example_batch(x: ArrayLike | DataLoader, y: ArrayLike | None, batch_size: int) -> torch.Tensor:
    if isinstance(x, DataLoader):
        for xb, _ in x:
            return xb.float()
        raise DataError("distill: the data loader yielded no batches")
    xt, _ = as_tensors(x, y)
    return xt[: max(1, min(batch_size, xt.shape[0]))]


def _check_args(epochs: int, lr: float, batch_size: int, temperature: float, alpha: float, augment_shift: int) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"alpha: must be in [0, 1], got {alpha}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr: must be > 0, got {lr}")
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("augment_shift", augment_shift, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: ArrayLike | DataLoader,
    y: ArrayLike | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    temperature: float = 4.0,
    alpha: float = 0.9,
    seed: int = 0,
    augment_shift: int = 0,
    progress: bool = True,
    hints: list[tuple[str, str]] | None = None,
    hint_weight: float = 1.0,
    after_step: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Train ``student`` in place to match the frozen ``teacher``; returns the student in eval mode.

    Loss per batch (Hinton et al. 2015; Romero et al. 2015, eq. 2 for the hints)::

        kd_loss(z_s, z_t, y, T, alpha) + hint_weight * mean_k MSE(r_k(v_k), u_k)

    where ``hints`` pairs a student module name (features v_k, from a forward hook) with a teacher
    module name (features u_k) and r_k is an adapter sized from the two feature shapes on the first
    batch (:func:`make_adapter`), trained jointly with the student and then discarded.
    The teacher runs in eval mode with gradients off on the same (augmented) batch; its mode and
    ``requires_grad`` flags are restored afterwards. Deterministic under ``seed`` (same machine
    and thread count), like :func:`edgeslim.train.train`. ``after_step(student)`` runs after every
    optimizer step (pruning masks, shared weights).
    """
    _check_args(epochs, lr, batch_size, temperature, alpha, augment_shift)
    if not (math.isfinite(hint_weight) and hint_weight >= 0):
        raise ConfigError(f"hint_weight: must be >= 0, got {hint_weight}")
    hints = list(hints or [])
    s_feats: dict[str, torch.Tensor] = {}
    t_feats: dict[str, torch.Tensor] = {}
    handles = []
    teacher_mode = teacher.training
    grad_flags = [p.requires_grad for p in teacher.parameters()]
    try:
        for s_name, t_name in hints:
            handles.append(_hook(student, s_name, "student", s_feats))
            handles.append(_hook(teacher, t_name, "teacher", t_feats))
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

        xb = _example_batch(x, y, batch_size)
        if augment_shift:  # size adapters on the shapes training will see
            xb = random_shift(xb, augment_shift, torch.Generator().manual_seed(seed))
        student.eval()
        with torch.no_grad():
            try:
                t_out, s_out = teacher(xb), student(xb)
            except Exception as err:  # user model code
                first = first_line(err)
                raise ModelError(f"distill: forward failed on a batch of shape {tuple(xb.shape)}: {first}") from None
        if tuple(t_out.shape) != tuple(s_out.shape):
            raise ModelError(
                f"teacher output shape {tuple(t_out.shape)} differs from student output shape {tuple(s_out.shape)}"
            )
        torch.manual_seed(seed)  # adapter initialisation
        adapters = [make_adapter(s_feats[s].shape, t_feats[t].shape) for s, t in hints]
        wrapper = _Student(student, adapters)
        batch_loss = _make_batch_loss(teacher, hints, s_feats, t_feats, temperature, alpha, hint_weight)
        train(wrapper, x, y, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
              augment_shift=augment_shift, batch_loss=batch_loss,
              after_step=None if after_step is None else (lambda _wrapper: after_step(student)))
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(teacher.parameters(), grad_flags):
            p.requires_grad_(flag)
        teacher.train(teacher_mode)
        s_feats.clear()
        t_feats.clear()
    return student.eval()


def _make_batch_loss(
    teacher: nn.Module,
    hints: list[tuple[str, str]],
    s_feats: dict[str, torch.Tensor],
    t_feats: dict[str, torch.Tensor],
    temperature: float,
    alpha: float,
    hint_weight: float,
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The per-batch loss plugged into :func:`edgeslim.train.train`."""

    def batch_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            t_logits = teacher(xb)
        s_logits = model(xb)
        loss = kd_loss(s_logits, t_logits, yb, temperature, alpha)
        if hints and hint_weight > 0:
            h = sum(hint_loss(s_feats[s], t_feats[t], a) for (s, t), a in zip(hints, model.adapters))
            loss = loss + hint_weight * h / len(hints)
        return loss, s_logits

    return batch_loss


def fine_tune(student: nn.Module, teacher: nn.Module | None, settings: FineTune, data: Data, *,
              epochs: int | None = None, lr: float | None = None,
              after_step: Callable[[nn.Module], None] | None = None, keep: Sparsity | None = None) -> nn.Module:
    """The fine-tune every lossy step shares, as ``settings`` says: ``temperature > 0`` distils from
    ``teacher`` (Hinton KD with ``alpha``), 0 trains on the labels with cross-entropy (and
    ``weight_decay``). ``epochs`` and ``lr`` override the settings' (a final or per-round
    fine-tune); ``data`` is a DataLoader or an ``(x, y)`` pair. After every optimizer step
    ``after_step(student)`` runs, then the pruned weights of ``keep`` (the sparsity of the model
    entering the step, ``artifact.sparsity``) are zeroed again, so no fine-tune regrows them.

    With distillation, ``augment_shift`` > 0 shows teacher and student the same randomly shifted
    images ("function matching", Beyer et al. 2022): the student learns the teacher's function on
    inputs near the training set, which needs nothing but the teacher (no new labels)."""
    unset = settings.unset()
    if unset:
        raise ConfigError(f"fine_tune.{unset[0]}: not set (a step's config completes its fine_tune from its defaults)")
    x, y = (data, None) if not isinstance(data, (tuple, list)) else data
    common = {"epochs": settings.epochs if epochs is None else epochs, "lr": settings.lr if lr is None else lr,
              "batch_size": settings.batch_size, "seed": settings.seed, "progress": settings.progress,
              "after_step": _then(after_step, None if keep is None else keep.keeper()),
              "augment_shift": settings.augment_shift}
    if settings.temperature > 0:
        if teacher is None:
            raise ConfigError("fine_tune.temperature: distillation needs a teacher model")
        return distill(student, teacher, x, y, temperature=settings.temperature, alpha=settings.alpha, **common)
    return train(student, x, y, weight_decay=settings.weight_decay, **common)


def _then(first: Callable[[nn.Module], None] | None,
          second: Callable[[nn.Module], None] | None) -> Callable[[nn.Module], None] | None:
    """One ``after_step`` running ``first`` then ``second`` (either may be None)."""
    if first is None or second is None:
        return first or second

    def both(model: nn.Module) -> None:
        first(model)
        second(model)

    return both
