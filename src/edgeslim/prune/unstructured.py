"""Unstructured magnitude pruning (Han et al. 2015) and N:M semi-structured masks (Mishra et al. 2021).

A mask is a bool tensor shaped like one weight, ``True`` = kept. Masks are keyed by parameter
name as in ``model.named_parameters()`` (``"1.weight"``, ``"features.0.weight"``). Only the
weights of ``nn.Linear`` and ``nn.Conv{1,2,3}d`` are prunable; biases and BatchNorm stay dense.

Layer names given by the user (``layers``, ``exclude``, ``overrides``) may be module names
(``"features.0"``) or parameter names (``"features.0.weight"``); an unknown name is a
ConfigError that names it.

Counts are exact: a layer of ``numel`` weights pruned to sparsity ``s`` loses exactly
``round(s * numel)`` weights (the smallest ``|w|``, ties broken by position), so the achieved
sparsity matches the request to one weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from edgeslim.errors import ConfigError
from edgeslim.sparsity import Masks, apply_masks, mask_keeper  # their home; re-exported for the prune API

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

__all__ = [
    "PRUNABLE",
    "Masks",
    "apply_masks",
    "layer_sparsity",
    "magnitude_masks",
    "mask_keeper",
    "masks_from_zeros",
    "nm_masks",
    "prunable_weights",
    "resolve_names",
    "sparsity_of",
]


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of every Linear/Conv layer, by parameter name, in module order."""
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE) and isinstance(getattr(module, "weight", None), nn.Parameter):
            out[f"{mod_name}.weight" if mod_name else "weight"] = module.weight
    return out


def resolve_names(model: nn.Module, names: Iterable[str], field: str) -> list[str]:
    """Map module or parameter names to prunable weight names; ConfigError naming the first unknown one."""
    weights = prunable_weights(model)
    out = []
    for name in names:
        key = name if name in weights else f"{name}.weight"
        if key not in weights:
            known = ", ".join(w.removesuffix(".weight") for w in weights) or "none"
            raise ConfigError(f"{field}: no prunable (Linear/Conv) layer named {name!r} (prunable: {known})")
        out.append(key)
    return out


def _selected(model: nn.Module, layers: Iterable[str] | None, exclude: Iterable[str]) -> dict[str, nn.Parameter]:
    weights = prunable_weights(model)
    chosen = resolve_names(model, layers, "layers") if layers is not None else list(weights)
    dropped = set(resolve_names(model, exclude, "exclude"))
    return {k: weights[k] for k in chosen if k not in dropped}


def _check_sparsity(value: float, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value < 1.0):
        raise ConfigError(f"{field}: sparsity must be in [0, 1), got {value!r}")


def _keep_largest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool mask over ``scores`` (any shape) dropping exactly the ``n_prune`` smallest entries."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        order = torch.argsort(flat, stable=True)  # ties: the earlier position goes first
        mask[order[:n_prune]] = False
    return mask.reshape(scores.shape)


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "layer",
    layers: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    overrides: Mapping[str, float] | None = None,
) -> Masks:
    """Masks removing the smallest-magnitude weights (Han et al. 2015, "Learning both Weights and
    Connections"): ``scope="layer"`` prunes each layer to ``sparsity``; ``scope="global"`` ranks
    ``|w|`` across all selected layers together and prunes ``sparsity`` of their total.

    ``overrides`` maps a layer to its own sparsity; an overridden layer is pruned on its own
    (layer-wise) and left out of the global ranking. ``layers`` (default: every Linear/Conv) and
    ``exclude`` select the layers; excluded layers get no mask.
    """
    _check_sparsity(sparsity, "sparsity")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope: must be 'layer' or 'global', got {scope!r}")
    weights = _selected(model, layers, exclude)
    own: dict[str, float] = {}
    for name, value in (overrides or {}).items():
        key = resolve_names(model, [name], "overrides")[0]
        _check_sparsity(value, f"overrides.{name}")
        if key in weights:
            own[key] = float(value)
    if not weights:
        raise ConfigError("layers: no prunable (Linear/Conv) layer is selected")
    masks: Masks = {}
    for name, w in weights.items():
        if scope == "layer" or name in own:
            s = own.get(name, sparsity)
            masks[name] = _keep_largest(w.detach().abs(), round(s * w.numel()))
    pooled = [n for n in weights if n not in masks]
    if pooled:
        scores = torch.cat([weights[n].detach().abs().reshape(-1) for n in pooled])  # (sum numel,)
        flat = _keep_largest(scores, round(sparsity * scores.numel()))
        for name, part in zip(pooled, torch.split(flat, [weights[n].numel() for n in pooled])):
            masks[name] = part.reshape(weights[name].shape)
    return {n: masks[n] for n in weights}  # module order


@torch.no_grad()
def nm_masks(
    model: nn.Module, n: int = 2, m: int = 4, *, layers: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> Masks:
    """N:M masks: in each group of ``m`` consecutive input weights of one output row, keep the ``n``
    largest ``|w|`` (2:4 is what sparse tensor cores run; Mishra et al. 2021).

    Linear ``(out, in)``: groups along ``in``. Conv ``(out, in, *k)``: groups along the input
    channels at each kernel position (the ``(out, *k, in)`` layout sparse kernels expect).
    Layers whose input size is not a multiple of ``m`` are skipped when no ``layers`` are named,
    and a ConfigError when named; no eligible layer at all is a ConfigError.
    """
    if not (isinstance(m, int) and isinstance(n, int) and 0 < n < m):
        raise ConfigError(f"n: need 0 < n < m for N:M pruning, got n={n!r}, m={m!r}")
    weights = _selected(model, layers, exclude)
    masks: Masks = {}
    for name, w in weights.items():
        if w.ndim < 2 or w.shape[1] % m:
            if layers is not None:
                raise ConfigError(f"layers: {name} has input size {w.shape[1] if w.ndim > 1 else 1} "
                                  f"(shape {tuple(w.shape)}), not a multiple of m={m}")
            continue
        rows = w.detach().abs().movedim(1, -1)  # (out, *k, in)
        groups = rows.reshape(-1, m)  # (out * prod(k) * in/m, m)
        top = groups.topk(n, dim=1).indices  # (G, n)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
        masks[name] = keep.reshape(rows.shape).movedim(-1, 1).contiguous()
    if not masks:
        raise ConfigError(f"m: no Linear/Conv layer has an input size divisible by m={m}")
    return masks


def masks_from_zeros(model: nn.Module, names: Iterable[str] | None = None) -> Masks:
    """Masks recovered from a pruned model: ``True`` where the weight is nonzero (for the layers
    ``names``, default every prunable layer that has at least one zero)."""
    weights = prunable_weights(model)
    keys = resolve_names(model, names, "layers") if names is not None else list(weights)
    masks = {k: weights[k].detach() != 0 for k in keys}
    return masks if names is not None else {k: v for k, v in masks.items() if not bool(v.all())}


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each prunable weight, by parameter name."""
    return {k: float((w == 0).sum()) / w.numel() for k, w in prunable_weights(model).items()}


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros over all prunable (Linear/Conv) weights together."""
    weights = prunable_weights(model).values()
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights)) / total if total else 0.0
