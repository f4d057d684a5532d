"""The fake-quant model both QAT paths build, and how it calibrates and trains.

Both paths (traced.py: fx tracing, CNNs; linear.py: Linear layers wrapped in place, transformers)
end with the same :class:`QATModel`: activation quantizers by ONNX tensor name, quantized layers
by ONNX node (or layer) name. Everything that does not depend on how the quantizers were placed
lives here, once: the quantizer modes, min/max calibration, the observer / LSQ / BatchNorm
schedule per epoch, the optimizer's parameter groups, the training loop (AdamW, cosine decay,
optional step hook) and the activation grid the trained parameters are exported on. What differs
stays with each path: batching (a torch generator vs a NumPy permutation per epoch, several
inputs), the loss, the export mapping and the parity check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch
from rich.console import Console
from torch import nn

from edgeslim.errors import DataError
from edgeslim.qat.fake_quant import ActFakeQuant, QuantWeighted, folded_params
from edgeslim.quantize.lower import QuantPlan
from edgeslim.quantize.ptq import resolve_activation_dtype
from edgeslim.train import check_loss

if TYPE_CHECKING:
    from edgeslim.qat.technique import QATConfig


@dataclass
class QATModel:
    """A fake-quantized model and its link to the planned ONNX graph."""

    module: nn.Module  # the fake-quant model that trains (an fx.GraphModule on the traced path)
    source: nn.Module  # the user's architecture (a copy) whose weights training updates
    plan: QuantPlan  # placement on the exported float graph
    act_quants: dict[str, ActFakeQuant]  # calibrated ONNX tensor name -> quantizer
    weighted: dict[str, QuantWeighted]  # ONNX Conv/Gemm/MatMul node (or layer) name -> quantized layer
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv path, bn path) folded at export

    def scale_parameters(self) -> list[nn.Parameter]:
        return [q.scale for q in self.act_quants.values()] + [w.wq.scale for w in self.weighted.values()]

    def set_modes(self, enabled: bool, calibrating: bool) -> None:
        """Quantizers on or off (float passes), activation quantizers collecting plain min/max or not."""
        for fq in self.act_quants.values():
            fq.enabled, fq.calibrating = enabled, calibrating
        for layer in self.weighted.values():
            layer.enabled = enabled

    def train_mode(self, training: bool) -> None:
        """``module.train(training)``, and the activation quantizers too: on the Linear path they are
        shared between layers and are not child modules of ``module``."""
        self.module.train(training)
        for fq in self.act_quants.values():
            fq.train(training)

    @torch.no_grad()
    def simulate(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Output of the fake-quant model (eval mode) on ``x``: what the int8 graph should compute."""
        self.module.eval()
        out = self.module(torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x)
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


@torch.no_grad()
def calibrate(qat: QATModel, inputs: Iterable[tuple[torch.Tensor, ...]]) -> int:
    """Initial activation ranges: min/max of the float model (quantizers off) over ``inputs``, each
    the model's input tensors for one batch; returns the samples seen."""
    seen = 0
    qat.set_modes(enabled=False, calibrating=True)
    qat.train_mode(False)
    try:
        for xs in inputs:
            qat.module(*xs)
            seen += len(xs[0])
    finally:
        qat.set_modes(enabled=True, calibrating=False)
    return seen


def set_epoch(qat: QATModel, epoch: int, config: QATConfig) -> None:
    """Observer / LSQ / BN modes for 0-based ``epoch`` (epoch >= fine_tune.epochs: all frozen)."""
    epochs = config.fine_tune.epochs
    observing = epoch < config.freeze_observers_epoch and epoch < epochs
    for fq in qat.act_quants.values():
        fq.observing = observing
        fq.learn = config.learn_scales and not observing and epoch < epochs
        fq.scale.requires_grad_(fq.learn)
    for layer in qat.weighted.values():
        layer.wq.scale.requires_grad_(config.learn_scales and epoch < epochs)
        layer.bn_frozen = layer.bn is None or epoch >= config.freeze_bn_epoch or epoch >= epochs


def param_groups(qat: QATModel, lr: float) -> list[dict]:
    """Weights at ``lr``; each step size at ``lr * s0 / w_ref``. Adam moves every parameter by
    about lr per step whatever its size, so a step size s0 ~ 1e-3 would jump by ~lr; this gives
    it the relative rate of a typical weight (w_ref = mean |folded weight|) instead."""
    scales = qat.scale_parameters()
    ids = {id(p) for p in scales}
    with torch.no_grad():
        mags = [folded_params(layer.op, layer.bn)[0].abs().mean() for layer in qat.weighted.values()]
    w_ref = float(torch.stack(mags).mean()) if mags else 1.0
    groups = [{"params": [p for p in qat.module.parameters() if id(p) not in ids and p.requires_grad]}]
    for p in scales:
        groups.append({"params": [p], "lr": lr * float(p.detach().abs().mean()) / max(w_ref, 1e-12)})
    return groups


@dataclass
class BatchLoss:
    """One training batch's loss, its sample count and (with class labels) its correct predictions."""

    loss: torch.Tensor
    samples: int
    correct: int | None = None


def fit(qat: QATModel, config: QATConfig, steps_per_epoch: int, epoch_batches: Callable[[int], Iterable],
        batch_loss: Callable[[object], BatchLoss], after_step: Callable[[], None] | None = None,
        on_epoch_end: Callable[[int, QATModel], None] | None = None) -> QATModel:
    """Fine-tune the fake-quant model (deterministic): AdamW over :func:`param_groups`, cosine decay
    over ``steps_per_epoch * fine_tune.epochs`` steps, :func:`set_epoch` at each epoch start.

    ``epoch_batches(epoch)`` yields the epoch's batches and ``batch_loss(batch)`` scores one
    (the path's data and loss); ``after_step()`` runs after every optimizer step, without grad
    (a pruned model's masks are re-applied there). Ends in eval mode with everything frozen."""
    ft = config.fine_tune
    torch.manual_seed(ft.seed)
    opt = torch.optim.AdamW(param_groups(qat, ft.lr), lr=ft.lr, weight_decay=ft.weight_decay)
    steps = max(1, steps_per_epoch) * ft.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    console = Console(stderr=True, quiet=not ft.progress)
    for epoch in range(ft.epochs):
        set_epoch(qat, epoch, config)
        qat.train_mode(True)
        seen, correct, loss_sum = 0, 0, 0.0
        for i, batch in enumerate(epoch_batches(epoch)):
            out = batch_loss(batch)
            check_loss(out.loss, f"qat_int8 epoch {epoch + 1}, batch {i + 1}")
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            sched.step()
            seen += out.samples
            correct += out.correct or 0
            loss_sum += out.loss.item() * out.samples
        if seen == 0:
            raise DataError("qat_int8: the training data yielded no batches")
        accuracy = f"  train acc {correct / seen:.2%}" if out.correct is not None else ""
        console.print(f"qat epoch {epoch + 1}/{ft.epochs}  loss {loss_sum / seen:.6f}{accuracy}  ({seen} samples)")
        if on_epoch_end is not None:
            on_epoch_end(epoch, qat)
    set_epoch(qat, ft.epochs, config)
    qat.train_mode(False)
    return qat


def activation_grid(activation_dtype: str) -> tuple[str, int]:
    """(activation dtype the graph stores, shift added to the trained int8 zero points): uint8
    stores the same grid with zp + 128, since clamp(q + 128, 0, 255) == clamp(q, -128, 127) + 128."""
    dtype = resolve_activation_dtype(activation_dtype)
    return dtype, 128 if dtype == "uint8" else 0
