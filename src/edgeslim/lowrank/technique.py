"""The ``lowrank`` technique: factorize Linear and Conv2d layers, then optionally fine-tune with KD.

Per layer: choose ranks from the weight's spectrum (:mod:`edgeslim.lowrank.rank`), factorize
(truncated SVD for Linear and 1x1 convs, Tucker-2 for k x k convs), and keep the layer unchanged
when the factors would not be smaller than it (the note says why). The plan is computed for every
layer before any module is replaced, so bad ranks fail fast.

The sparsity of an earlier pruning step (``artifact.sparsity``) is carried for the layers left
unfactorized (kept through the fine-tune) and dropped for the factorized ones, whose dense
factors replace the pruned weight.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from rich.progress import Progress
from torch import nn

from edgeslim.config import TechniqueConfig
from edgeslim.distill.trainer import fine_tune
from edgeslim.errors import ConfigError
from edgeslim.lowrank.rank import (
    energy_rank, evbmf, finish_rank, svd_params_rank, tucker2_energy_ranks, tucker2_params_ranks,
)
from edgeslim.lowrank.svd import factorize_conv_svd, factorize_linear, svd_params
from edgeslim.lowrank.tucker import captured_energy, factorize_conv, mode_singular_values, tucker2_params, unfold
from edgeslim.registry import register
from edgeslim.task import ModelArtifact, Task, count_samples
from edgeslim.train import FineTune

__all__ = ["LayerPlan", "LowRankConfig", "apply_plan", "lowrank", "plan_for_speedup", "plan_ranks"]


@dataclass(frozen=True)
class LowRankConfig(TechniqueConfig):
    """Low-rank factorization: SVD for Linear (and 1x1 convs), Tucker-2 for k x k convs (``auto``).

    ``rank_by``: ``energy`` keeps the smallest rank holding ``energy`` of the squared singular
    values; ``params`` fits ``params_fraction`` of each layer's weights; ``vbmf`` uses analytic
    empirical VBMF (Nakajima et al. 2013; Kim et al. 2016); ``fixed`` uses ``rank`` everywhere;
    ``latency`` picks the highest kept energy whose factorized model is measured (ORT, 1 thread,
    the task's example input) at least ``target_speedup`` times faster than the input model.
    ``layers`` names modules (a container selects the layers inside it; empty = all), ``exclude``
    removes some. With ``fine_tune.epochs`` > 0 the factorized model is fine-tuned on ``task.train``
    (:class:`~edgeslim.train.FineTune`), distilling from the model entering the step when
    ``fine_tune.temperature`` > 0 (the default 4; Hinton et al. 2015; 0 = plain cross-entropy).
    """

    method: Literal["auto", "svd", "tucker2"] = "auto"
    rank_by: Literal["energy", "params", "vbmf", "fixed", "latency"] = "energy"
    energy: float = 0.9
    params_fraction: float = 0.5
    rank: int | None = None
    target_speedup: float = 2.0
    # Kept-energy levels rank_by="latency" tries (the highest that meets target_speedup wins).
    latency_energies: tuple[float, ...] = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    round_to: int = 1
    min_rank: int = 1
    fine_tune: FineTune = FineTune.defaults(lr=1e-4, temperature=4.0)

    def validate(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy: must be in (0, 1], got {self.energy}")
        if not 0.0 < self.params_fraction <= 1.0:
            raise ConfigError(f"params_fraction: must be in (0, 1], got {self.params_fraction}")
        if self.rank_by == "fixed" and self.rank is None:
            raise ConfigError("rank: rank_by 'fixed' needs a rank")
        if self.rank is not None and self.rank_by != "fixed":
            raise ConfigError(f"rank: only used with rank_by 'fixed' (rank_by is {self.rank_by!r})")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"rank: must be >= 1, got {self.rank}")
        for name, low in (("round_to", 1), ("min_rank", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        if not (math.isfinite(self.target_speedup) and self.target_speedup > 0):
            raise ConfigError(f"target_speedup: must be > 0, got {self.target_speedup}")
        bad = [e for e in self.latency_energies if not 0.0 < e <= 1.0]
        if bad or not self.latency_energies:
            raise ConfigError(f"latency_energies: need values in (0, 1], got {list(self.latency_energies)}")


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer: ``kind`` is ``svd``, ``tucker2`` or ``kept`` (then ``reason`` says why)."""

    name: str
    kind: str
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    reason: str = ""

    def to_note(self) -> dict:
        note = {"kind": self.kind, "ranks": list(self.ranks), "params_before": self.params_before,
                "params_after": self.params_after}
        return note | ({"reason": self.reason} if self.reason else {})


# --------------------------------------------------------------------------------- layer choice
def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def select_layers(
    model: nn.Module, layers: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules named by ``layers`` (or all) minus ``exclude``, in model order."""
    modules = dict(model.named_modules())
    for field, names in (("layers", layers), ("exclude", exclude)):
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            raise ConfigError(f"{field}: no module named {', '.join(map(repr, unknown))} in {type(model).__name__}")
    eligible = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for n in layers:
        if not any(_inside(e, n) for e in eligible):
            raise ConfigError(f"layers: {n!r} is a {type(modules[n]).__name__} with no Linear or Conv2d inside")
    chosen = {n: m for n, m in eligible.items() if not layers or any(_inside(n, p) for p in layers)}
    return {n: m for n, m in chosen.items() if not any(_inside(n, p) for p in exclude)}


def _weight_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


# ---------------------------------------------------------------------------------------- ranks
def _svd_rank(name: str, matrix: torch.Tensor, config: LowRankConfig) -> int:
    """Rank for ``matrix (out, in)`` per ``config.rank_by``, before rounding."""
    full = min(matrix.shape)
    if config.rank_by == "fixed":
        if config.rank > full:
            raise ConfigError(f"rank: {config.rank} exceeds the full rank {full} of layer {name!r} "
                              f"(weight {tuple(matrix.shape)})")
        return config.rank
    if config.rank_by == "params":
        return svd_params_rank(matrix.shape[0], matrix.shape[1], config.params_fraction)
    s = torch.linalg.svdvals(matrix.detach().double())
    if config.rank_by == "energy":
        return energy_rank(s, config.energy)
    return evbmf(s, tuple(matrix.shape)).rank


def _tucker_ranks(name: str, kernel: torch.Tensor, config: LowRankConfig) -> tuple[int, int]:
    """Tucker-2 ranks ``(R_out, R_in)`` per ``config.rank_by``, before rounding."""
    c_out, c_in, kh, kw = kernel.shape
    if config.rank_by == "fixed":
        if config.rank > min(c_out, c_in):
            raise ConfigError(f"rank: {config.rank} exceeds layer {name!r}'s channels (Cout {c_out}, Cin {c_in}) "
                              "for Tucker-2; exclude the layer or lower the rank")
        return config.rank, config.rank
    if config.rank_by == "params":
        return tucker2_params_ranks(c_out, c_in, kh * kw, config.params_fraction)
    if config.rank_by == "energy":
        return tucker2_energy_ranks(captured_energy(kernel), config.energy, kh * kw)
    s_out, s_in = mode_singular_values(kernel)
    return evbmf(s_out, tuple(unfold(kernel, 0).shape)).rank, evbmf(s_in, tuple(unfold(kernel, 1).shape)).rank


def _kind(module: nn.Module, method: str) -> str | None:
    """``svd``, ``tucker2``, or None with the layer kept (a reason is returned by :func:`_plan_layer`)."""
    if isinstance(module, nn.Linear):
        return "svd" if method != "tucker2" else None
    if module.groups != 1:
        return None
    if method == "auto":
        return "svd" if module.kernel_size == (1, 1) else "tucker2"
    return method


def _plan_layer(name: str, module: nn.Module, config: LowRankConfig) -> LayerPlan:
    before = _weight_params(module)
    kind = _kind(module, config.method)
    if kind is None:
        why = ("method 'tucker2' decomposes convs only" if isinstance(module, nn.Linear)
               else f"grouped conv (groups={module.groups}) is not decomposed")
        return LayerPlan(name, "kept", (), before, before, why)
    bias = module.bias is not None
    rounding = (config.round_to, config.min_rank)
    if kind == "svd":
        w = module.weight.reshape(module.weight.shape[0], -1)  # (out, in) or (Cout, Cin*kh*kw)
        ranks = (finish_rank(_svd_rank(name, w, config), min(w.shape), *rounding),)
        after = svd_params(w.shape[0], w.shape[1], ranks[0], bias)
    else:
        c_out, c_in, kh, kw = module.weight.shape
        r_out, r_in = _tucker_ranks(name, module.weight, config)
        ranks = (finish_rank(r_out, c_out, *rounding), finish_rank(r_in, c_in, *rounding))
        after = tucker2_params(c_out, c_in, kh * kw, ranks, bias)
    if after >= before:
        return LayerPlan(name, "kept", ranks, before, before,
                         f"{kind} at ranks {list(ranks)} needs {after} weights, not fewer than {before}")
    return LayerPlan(name, kind, ranks, before, after)


def plan_ranks(model: nn.Module, config: LowRankConfig) -> list[LayerPlan]:
    """One :class:`LayerPlan` per selected layer (raises ConfigError before any change is made)."""
    if config.rank_by == "latency":
        raise ConfigError("rank_by: 'latency' measures models on a task; use plan_for_speedup or the lowrank step")
    chosen = select_layers(model, config.layers, config.exclude)
    with Progress(disable=not config.fine_tune.progress, transient=True) as bar:
        task = bar.add_task("low-rank: choosing ranks", total=len(chosen))
        plans = []
        for name, module in chosen.items():
            plans.append(_plan_layer(name, module, config))
            bar.advance(task)
    return plans


# ---------------------------------------------------------------------------------------- apply
def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def apply_plan(model: nn.Module, plans: list[LayerPlan]) -> nn.Module:
    """A copy of ``model`` with every planned layer replaced by its factors (``model`` is unchanged)."""
    out = copy.deepcopy(model)
    for p in plans:
        if p.kind == "kept":
            continue
        module = out.get_submodule(p.name)
        if p.kind == "tucker2":
            new = factorize_conv(module, p.ranks)
        elif isinstance(module, nn.Linear):
            new = factorize_linear(module, p.ranks[0])
        else:
            new = factorize_conv_svd(module, p.ranks[0])
        _set_module(out, p.name, new)
    return out



def plan_for_speedup(model: nn.Module, config: LowRankConfig, task: Task) -> tuple[list[LayerPlan], dict]:
    """Energy plans at every level of ``config.latency_energies``, all exported and timed side by side
    with the dense model (ORT, 1 thread, interleaved medians); returns the highest-energy plan
    whose measured speedup reaches ``config.target_speedup`` and a note of every level's speedup.

    Measured, not estimated: extra 1x1 convs and memory traffic make MAC counts a poor predictor
    of latency for factorized layers. The choice can vary between runs when two levels are close.
    """
    from edgeslim.runtime import compare_latency

    candidates: dict[float, list[LayerPlan]] = {}
    seen: set[tuple] = set()
    for e in sorted(set(config.latency_energies), reverse=True):
        plans = plan_ranks(model, dataclasses.replace(config, rank_by="energy", energy=e))
        key = tuple((p.kind, p.ranks) for p in plans)
        if key not in seen and any(p.kind != "kept" for p in plans):
            seen.add(key)
            candidates[e] = plans
    graphs = {"dense": task.export(model)} | {str(e): task.export(apply_plan(model, p)) for e, p in candidates.items()}
    x = tuple(t.numpy() for t in task.example_inputs)
    lat = compare_latency(graphs, x if len(x) > 1 else x[0], threads=1, warmup=10, runs=100, rounds=5)
    speedups = {e: lat["dense"].p50_ms / lat[str(e)].p50_ms for e in candidates}
    ok = [e for e, v in speedups.items() if v >= config.target_speedup]
    if not ok:
        best = max(speedups, key=speedups.get, default=None)
        got = f"best measured {speedups[best]:.2f}x at energy {best}" if best is not None else "no level factorizes a layer"
        raise ConfigError(f"target_speedup: {config.target_speedup}x is out of reach ({got})")
    chosen = max(ok)
    note = {"energy": chosen, "measured_speedup": round(speedups[chosen], 3),
            "speedups": {str(e): round(v, 3) for e, v in speedups.items()}}
    return candidates[chosen], note


@register("lowrank", LowRankConfig)
def lowrank(model: ModelArtifact, config: LowRankConfig, task: Task) -> ModelArtifact:
    """Low-rank factorization (SVD / Tucker-2) with ranks by energy, parameter budget, VBMF or fixed."""
    ft = config.fine_tune
    if ft.epochs > 0 and (task.train is None or count_samples(task.train) == 0):
        raise ConfigError("fine_tune.epochs: fine-tuning after lowrank needs training data (task.train is empty)")
    teacher = model.float_copy("lowrank")
    latency_note = None
    if config.rank_by == "latency":
        plans, latency_note = plan_for_speedup(teacher, config, task)
    else:
        plans = plan_ranks(teacher, config)
    done = [p for p in plans if p.kind != "kept"]
    if not done:
        reasons = "; ".join(f"{p.name}: {p.reason}" for p in plans[:3]) or "no Linear or Conv2d layer selected"
        raise ConfigError(f"lowrank: no layer would shrink at these settings ({reasons})")
    student = apply_plan(teacher, plans)
    sparsity = model.sparsity.restricted_to(student) if model.sparsity is not None else None
    if ft.epochs > 0:
        student = fine_tune(student, teacher, ft, task.train, keep=sparsity)
    before, after = sum(p.params_before for p in plans), sum(p.params_after for p in plans)
    notes = {**model.notes, "lowrank": {
        "method": config.method, "rank_by": config.rank_by, "layers": {p.name: p.to_note() for p in plans},
        "factorized": len(done), "kept": len(plans) - len(done), "params_before": before, "params_after": after,
        "fine_tune_epochs": ft.epochs,
    } | ({"latency": latency_note} if latency_note else {})}
    return ModelArtifact(torch=student.eval(), notes=notes, files=dict(model.files), sparsity=sparsity)
