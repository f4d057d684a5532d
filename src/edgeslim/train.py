"""Deterministic training, accuracy evaluation and safe checkpoint I/O; :class:`FineTune`, the
settings of every step that fine-tunes.

Training uses AdamW with a one-cycle schedule: it reaches good accuracy on the small benchmark
sets in 2-3 epochs without per-model learning-rate tuning, which SGD+momentum needs.
Checkpoints are written as safetensors and never unpickled arbitrarily on load.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Callable, Iterator, Mapping
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader

from edgeslim.config import Partial
from edgeslim.errors import CheckpointError, DataError, NumericalError
from edgeslim.io import write_bytes

ArrayLike = np.ndarray | torch.Tensor
# Per-batch loss: (model, x batch, y batch) -> (scalar loss, logits used for the train accuracy).
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class FineTune(Partial):
    """How a step fine-tunes (``fine_tune: {epochs: 1, lr: 0.002}`` in a recipe): one value shared
    by ``prune_magnitude``, ``prune_channels``, ``lowrank``, ``cluster``, ``distill`` and ``qat_int8``.

    A field left unset (None) takes the step's own default: each step declares a complete
    ``FineTune`` as its default (``distill``: 2 epochs at lr 1e-4, temperature 4), so
    ``fine_tune: {epochs: 1}`` changes the epochs only. Ranges are checked once, by field name
    (:data:`edgeslim.config.INT_RANGES`, :data:`~edgeslim.config.FLOAT_RANGES`); a step adds its
    own rules (``distill`` needs ``temperature > 0``).

    ``epochs`` (0 = no fine-tune), ``lr`` (AdamW, one-cycle peak), ``batch_size``, ``seed``
    (shuffling, augmentation, dropout), ``augment_shift`` (shift each image by up to ±k pixels).
    ``temperature > 0`` distils from the model entering the step (Hinton et al. 2015) with
    ``alpha`` weighting the soft term; 0 trains on the labels. ``weight_decay`` (AdamW) applies to
    the label fine-tune (temperature 0); the distillation loss runs without it. ``progress`` shows
    the step's progress output (its training and its other long loops).
    """

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    temperature: float | None = None
    alpha: float | None = None
    augment_shift: int | None = None
    seed: int | None = None
    progress: bool | None = None

    @classmethod
    def defaults(cls, **changes: object) -> "FineTune":
        """Complete settings for a step's default: no fine-tune (epochs 0), lr 1e-3, batch 64, no
        weight decay, labels (temperature 0, alpha 0.9 once it distils), no shift, seed 0, progress
        shown; ``changes`` replace some of them (``FineTune.defaults(epochs=2, lr=1e-4)``)."""
        base = cls(epochs=0, lr=1e-3, batch_size=64, weight_decay=0.0, temperature=0.0, alpha=0.9, augment_shift=0,
                   seed=0, progress=True)
        return cls(**changes).over(base)

    def unset(self) -> list[str]:
        """The fields still None (empty for the settings a config holds)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]


# ------------------------------------------------------------------------------------- batching
def as_tensors(x: ArrayLike, y: ArrayLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x float32, y int64 of shape (N,))`` from arrays or tensors; DataError when they do not pair up."""
    if y is None:
        raise DataError("labels y are required when x is an array (pass a DataLoader to omit y)")
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().reshape(-1)
    if xt.shape[0] != yt.shape[0]:
        raise DataError(f"x has {xt.shape[0]} samples but y has {yt.shape[0]} labels")
    if xt.shape[0] == 0:
        raise DataError("x is empty (0 samples)")
    return xt, yt


def batches(
    x: ArrayLike | DataLoader, y: ArrayLike | None, batch_size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) batches; shuffled with ``generator`` when one is given."""
    if isinstance(x, DataLoader):
        for xb, yb in x:
            yield xb.float(), yb.long()
        return
    xt, yt = as_tensors(x, y)
    n = xt.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield xt[idx], yt[idx]


def num_batches(x: ArrayLike | DataLoader, batch_size: int) -> int | None:
    """Batches per epoch (None for a loader without a length): the one-cycle schedule's step count."""
    if isinstance(x, DataLoader):
        try:
            return len(x)
        except TypeError:  # iterable-style loader without a length
            return None
    return math.ceil(len(x) / batch_size)


def random_shift(xb: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-k, k], filling with zeros."""
    if xb.dim() != 4:
        raise DataError(f"augment_shift: shifts images, needs batches shaped (N, C, H, W), got {tuple(xb.shape)}")
    b, _, h, w = xb.shape
    padded = nn.functional.pad(xb, (k, k, k, k))  # (B, C, H+2k, W+2k)
    off = torch.randint(0, 2 * k + 1, (2, b), generator=generator)
    rows = off[0][:, None] + torch.arange(h)  # (B, H)
    cols = off[1][:, None] + torch.arange(w)  # (B, W)
    bidx = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------- training
def check_loss(loss: torch.Tensor, where: str) -> None:
    """NumericalError when a training loss is NaN/Inf: stop before it reaches the weights (and
    before a diverged model can be cached). ``where`` names the step, e.g. "epoch 2, batch 7"."""
    if not bool(torch.isfinite(loss)):
        raise NumericalError(f"training diverged at {where}: loss is {loss.item()} (lower the learning rate, "
                             "or check the data for NaN/Inf)")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators: this torch seeds its default
    generator differently in every process, so a model built without this differs per process."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    x: ArrayLike | DataLoader,
    y: ArrayLike | None = None,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    augment_shift: int = 0,
    batch_loss: BatchLoss | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Train ``model`` with cross-entropy, AdamW and a one-cycle LR; returns it in eval mode.

    ``batch_loss`` replaces the cross-entropy per batch (e.g. a distillation loss, see
    ``edgeslim.distill``); it gets the (augmented) batch and returns ``(loss, logits)``.
    ``after_step`` runs after every optimizer step (e.g. re-applying pruning masks).
    Same model, data and seed give bit-identical weights (on the same machine and thread count).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or augment_shift < 0:
        raise DataError(
            f"train: need epochs >= 1, batch_size >= 1, lr > 0, augment_shift >= 0; got "
            f"epochs={epochs}, batch_size={batch_size}, lr={lr}, augment_shift={augment_shift}"
        )
    if not isinstance(x, DataLoader):
        as_tensors(x, y)  # validate once, before any work
    torch.manual_seed(seed)  # dropout and any other layer-level randomness
    gen = torch.Generator().manual_seed(seed)  # shuffling and augmentation
    steps_per_epoch = num_batches(x, batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DataError(f"train: {type(model).__name__} has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = None
    if steps_per_epoch:
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
        )
    if batch_loss is None:
        ce = nn.CrossEntropyLoss()

        def batch_loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = m(xb)
            return ce(logits, yb), logits

    console = Console(stderr=True, quiet=not progress)
    # Long runs drive some weights and gradients into denormal floats, which x86 handles in
    # microcode (~7x slower steps seen in distillation); flushing them to zero costs nothing here.
    flushed = torch.set_flush_denormal(True)
    try:
        _epochs(model, x, y, epochs, batch_size, gen, augment_shift, batch_loss, opt, sched, steps_per_epoch,
                console, progress, after_step)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return model.eval()


def _epochs(model, x, y, epochs, batch_size, gen, augment_shift, batch_loss, opt, sched, steps_per_epoch,
            console, progress, after_step) -> None:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not progress,
    ) as bar:
        task = bar.add_task("training", total=steps_per_epoch)
        for epoch in range(1, epochs + 1):
            model.train()
            bar.reset(task, total=steps_per_epoch)
            seen, correct, loss_sum = 0, 0, 0.0
            for i, (xb, yb) in enumerate(batches(x, y, batch_size, gen)):
                if augment_shift:
                    xb = random_shift(xb, augment_shift, gen)
                loss, logits = batch_loss(model, xb, yb)
                check_loss(loss, f"epoch {epoch}, batch {i + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    with torch.no_grad():
                        after_step(model)
                if sched is not None and sched.last_epoch < sched.total_steps:
                    sched.step()
                seen += yb.shape[0]
                correct += int((logits.argmax(1) == yb).sum())
                loss_sum += loss.item() * yb.shape[0]
                bar.update(task, advance=1, description=f"epoch {epoch}/{epochs} loss {loss_sum / seen:.4f}")
            if seen == 0:
                raise DataError("train: the data yielded no batches")
            console.print(
                f"epoch {epoch}/{epochs}  loss {loss_sum / seen:.4f}  train acc {correct / seen:.2%}"
            )


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, x: ArrayLike | DataLoader, y: ArrayLike | None = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy in [0, 1]; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    seen = correct = 0
    try:
        for xb, yb in batches(x, y, batch_size, None):
            correct += int((model(xb).argmax(1) == yb).sum())
            seen += yb.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("evaluate_accuracy: no samples to evaluate")
    return correct / seen


# ----------------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write the state dict atomically: safetensors, or a plain ``torch.save`` for .pt/.pth/.bin."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: checkpoint must end in .safetensors, .pt, .pth or .bin")
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        data = save(state)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    write_bytes(path, data)


def _read_state(path: Path) -> Mapping[str, object]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint type; use .safetensors, .pt, .pth or .bin")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is not a plain state dict; refusing to unpickle arbitrary objects "
            "(weights_only=True) — save model.state_dict() or use safetensors"
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def _shape(t: object) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` after checking every key and shape; returns the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = dict(_read_state(path))
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    expected = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        k = missing[0]
        raise CheckpointError(
            f"{path}: missing key {k!r} (model shape {_shape(expected[k])}, checkpoint shape: absent)"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(
            f"{path}: unexpected key {k!r} (checkpoint shape {_shape(state[k])}, model shape: absent)"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    for key, ref in expected.items():
        if _shape(ref) != _shape(state[key]):
            raise CheckpointError(
                f"{path}: shape mismatch for {key!r}: checkpoint {_shape(state[key])}, model {_shape(ref)}"
            )
    model.load_state_dict(state, strict=True)
    return model

