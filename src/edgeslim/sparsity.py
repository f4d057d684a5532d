"""What a pruning step leaves for the steps after it: the masks of the weights it removed.

A mask is a bool tensor shaped like one weight, ``True`` = kept, keyed by parameter name as in
``model.named_parameters()`` (``"features.0.weight"``). :class:`Sparsity` travels on the
:class:`~edgeslim.task.ModelArtifact` (``artifact.sparsity``), set by ``prune_magnitude``. Every
later step that trains keeps it the same way: its training loop runs :meth:`Sparsity.keeper`
after each optimizer step (:func:`edgeslim.distill.trainer.fine_tune` does it for the shared
fine-tune), so pruned weights never regrow. The pipeline writes the stage's sparse file
(``weights.sparse``, ``index_bits`` wide gaps) for every stage whose model carries sparsity.

This module sits below the technique packages (it imports torch only), so ``prune``, ``distill``,
``cluster``, ``lowrank`` and ``quantize`` all use it without importing one another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from edgeslim.errors import ConfigError, ModelError

Masks = dict[str, torch.Tensor]
SPARSE_FILE = "weights.sparse"  # the stage file the pipeline writes for a model that carries sparsity

__all__ = ["SPARSE_FILE", "Masks", "Sparsity", "apply_masks", "mask_keeper"]


def _check_masks(params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        if name not in params:
            raise ModelError(f"mask for {name!r}: the model has no such parameter")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ModelError(f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(params[name].shape)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the pruned weights in place (``+0.0``, never ``-0.0``); returns ``model``."""
    params = dict(model.named_parameters())
    _check_masks(params, masks)
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device, torch.bool), 0.0)
    return model


def mask_keeper(masks: Mapping[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """A callable for ``train(..., after_step=...)``: re-zeroes pruned weights after every optimizer
    step, so fine-tuning cannot regrow them (the optimizer's momentum would otherwise)."""
    frozen = {k: v.to(torch.bool) for k, v in masks.items()}

    def keep(model: nn.Module) -> None:
        apply_masks(model, frozen)

    return keep


@dataclass(frozen=True, eq=False)
class Sparsity:
    """The pruned weights a model carries between steps and how its sparse file stores them.

    ``masks``: weight name -> bool mask of the kept weights (the weights outside it are zero and
    stay zero); ``index_bits``: width of the relative indices of the sparse file
    (:func:`edgeslim.prune.sparse.encode_sparse`).
    """

    masks: Masks
    index_bits: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.index_bits, bool) or not isinstance(self.index_bits, int) or not 1 <= self.index_bits <= 16:
            raise ConfigError(f"index_bits: must be an integer in 1..16, got {self.index_bits!r}")
        if not isinstance(self.masks, Mapping) or not all(isinstance(m, torch.Tensor) for m in self.masks.values()):
            raise ModelError("sparsity masks: expected a mapping of weight name -> bool tensor")
        object.__setattr__(self, "masks", {k: v.detach().to(torch.bool) for k, v in self.masks.items()})

    def keeper(self) -> Callable[[nn.Module], None]:
        """``after_step`` for a training loop: re-zero the pruned weights of the model it is given."""
        return mask_keeper(self.masks)

    def restricted_to(self, model: nn.Module) -> Sparsity | None:
        """The masks whose weight ``model`` still has, under the same name and shape; None if none.

        For a step that changes the architecture (``prune_channels``, ``lowrank``): a weight it
        reshaped or replaced loses its mask (its zeros may regrow in the step's fine-tune), one it
        left alone keeps it. A weight behind a parametrization (a clustered layer) is not a plain
        parameter of ``model`` and is left out too."""
        params = dict(model.named_parameters())
        kept = {k: m for k, m in self.masks.items() if k in params and tuple(params[k].shape) == tuple(m.shape)}
        return Sparsity(kept, self.index_bits) if kept else None

    @torch.no_grad()
    def check(self, model: nn.Module, where: str) -> None:
        """ModelError naming ``where`` unless every mask fits a weight of ``model`` whose pruned
        entries are zero: a step that carries sparsity must have kept it."""
        params = dict(model.named_parameters())
        try:
            _check_masks(params, self.masks)
        except ModelError as err:
            raise ModelError(f"{where}: carries sparsity that does not fit its model: {err}") from None
        for name, mask in self.masks.items():
            regrown = int((params[name].detach()[~mask] != 0).sum())
            if regrown:
                raise ModelError(f"{where}: {regrown} pruned weights of {name!r} are nonzero (a step that trains "
                                 "must re-apply artifact.sparsity after each optimizer step, or drop it)")
