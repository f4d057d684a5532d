"""When to prune: Zhu & Gupta's gradual cubic schedule and Han et al.'s iterative prune-retrain.

Both drive a ``mask_fn(model, ramp) -> masks`` where ``ramp`` in [0, 1] is how far along the way
to the final sparsity the schedule is (0: none pruned, 1: final). A layer whose final sparsity
is ``s_f`` is pruned to ``s_i + ramp * (s_f - s_i)``, which is Zhu & Gupta's formula per layer
(it is linear in ``s_i`` and ``s_f``), so per-layer targets follow one shared ramp.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from torch import nn

from edgeslim.errors import ConfigError
from edgeslim.sparsity import Masks, apply_masks, mask_keeper

MaskFn = Callable[[nn.Module, float], Masks]
Retrain = Callable[[nn.Module, Callable[[nn.Module], None]], nn.Module]

__all__ = ["GradualPruner", "cubic_ramp", "cubic_sparsity", "iterative_prune"]


def cubic_sparsity(t: float, s_i: float, s_f: float, t0: float, n: int, dt: float) -> float:
    """Zhu & Gupta 2017 ("To prune, or not to prune", eq. 1): the sparsity at step ``t``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**3`` for ``t0 <= t <= t0 + n*dt``;
    ``s_i`` before ``t0`` and ``s_f`` after. Pruning is fast at first, when redundant weights
    abound, and slows as fewer remain.
    """
    if n < 1 or dt <= 0:
        raise ConfigError(f"schedule: need n >= 1 pruning steps and dt > 0, got n={n}, dt={dt}")
    frac = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - frac) ** 3


def cubic_ramp(t: float, t0: float, n: int, dt: float) -> float:
    """The fraction of the way from ``s_i`` to ``s_f`` at step ``t`` (cubic_sparsity with 0 -> 1)."""
    return cubic_sparsity(t, 0.0, 1.0, t0, n, dt)


class GradualPruner:
    """An ``after_step`` callable: every ``dt`` optimizer steps from ``t0`` it recomputes the masks at
    the cubic ramp (``n`` updates in all), and after every step it re-zeroes the pruned weights.

    Weights pruned earlier are zero, hence the smallest, so the pruned set only grows.
    ``masks`` holds the current masks; ``updates`` counts the mask updates made.
    """

    def __init__(self, mask_fn: MaskFn, *, t0: int, n: int, dt: int, progress: bool = False) -> None:
        if t0 < 0 or n < 1 or dt < 1:
            raise ConfigError(f"schedule: need t0 >= 0, n >= 1, dt >= 1, got t0={t0}, n={n}, dt={dt}")
        self.mask_fn, self.t0, self.n, self.dt = mask_fn, t0, n, dt
        self.step, self.updates = 0, 0
        self.masks: Masks = {}
        self.console = Console(stderr=True, quiet=not progress)

    @classmethod
    def over(cls, mask_fn: MaskFn, total_steps: int, n: int = 10, end_fraction: float = 0.75,
             progress: bool = False) -> GradualPruner:
        """Spread ``n`` updates from the first step to ``end_fraction`` of ``total_steps``, leaving the
        rest for recovery at the final sparsity (Zhu & Gupta stop pruning before training ends)."""
        if total_steps < 1:
            raise ConfigError(f"schedule: need at least one training step, got {total_steps}")
        n = max(1, min(n, total_steps))
        dt = max(1, int(end_fraction * total_steps) // n)
        return cls(mask_fn, t0=0, n=n, dt=dt, progress=progress)

    def __call__(self, model: nn.Module) -> None:
        t = self.step
        self.step += 1
        if t >= self.t0 and (t - self.t0) % self.dt == 0 and self.updates < self.n:
            self.updates += 1
            # The step numbered t0 + k*dt closes update k; the last update lands on the final ramp 1.
            ramp = cubic_ramp(self.t0 + self.updates * self.dt, self.t0, self.n, self.dt)
            self.masks = self.mask_fn(model, ramp)
            self.console.print(f"gradual pruning: update {self.updates}/{self.n}, ramp {ramp:.3f}")
        if self.masks:
            apply_masks(model, self.masks)

    def finish(self, model: nn.Module) -> Masks:
        """Reach the final sparsity if training ended before the last update; returns the masks."""
        if self.updates < self.n:
            self.updates = self.n
            self.masks = self.mask_fn(model, 1.0)
            apply_masks(model, self.masks)
        return self.masks


def iterative_prune(model: nn.Module, mask_fn: MaskFn, rounds: int, retrain: Retrain | None,
                    progress: bool = False) -> Masks:
    """Han et al. 2015's iterative pruning: ``rounds`` times, prune to a higher sparsity, then retrain
    with the pruned weights held at zero. Round ``r`` reaches the cubic ramp at ``r / rounds``,
    the last round the final sparsity. ``retrain(model, after_step)`` fine-tunes in place;
    ``None`` prunes without retraining. Returns the final masks."""
    if rounds < 1:
        raise ConfigError(f"rounds: must be >= 1, got {rounds}")
    console = Console(stderr=True, quiet=not progress)
    masks: Masks = {}
    for r in range(1, rounds + 1):
        ramp = cubic_ramp(r, 0, rounds, 1)
        masks = mask_fn(model, ramp)
        apply_masks(model, masks)
        console.print(f"iterative pruning: round {r}/{rounds}, ramp {ramp:.3f}")
        if retrain is not None:
            model = retrain(model, mask_keeper(masks))
            apply_masks(model, masks)
    return masks
