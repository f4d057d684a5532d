"""The ``cluster`` technique: weight sharing with a Huffman-coded compact file (Deep Compression).

Each selected Linear/Conv weight is clustered by k-means over its nonzero entries (pruned zeros
stay zero; the layers left unclustered keep the zeros of ``artifact.sparsity``), the codebooks
are fine-tuned with shared gradients on ``task.train`` (optionally with knowledge distillation
from the model entering the step), and the result is written in the format of
:mod:`edgeslim.cluster.format`. The stage's ``size_bytes`` is that file's size; the module it
returns holds plain float32 weights equal to the codebook values, so its ONNX export is a dense
float graph (no speedup: the gain is storage).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from edgeslim.cluster.format import encode_state
from edgeslim.cluster.kmeans import check_bits, clusterable_layers, finalize, share_weights
from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.prune.unstructured import resolve_names
from edgeslim.registry import register
from edgeslim.sparsity import Sparsity
from edgeslim.task import ModelArtifact, Task, count_samples
from edgeslim.train import FineTune

FILE_NAME = "weights.esdc"


@dataclass(frozen=True)
class ClusterConfig(TechniqueConfig):
    """Weight sharing (Han et al. 2016): per-layer k-means with k = 2^bits, centroid fine-tune, Huffman file.

    Defaults follow the paper: 8 bits for conv layers and 5 for fully connected ones (codebook
    indices), relative indices of 8 bits (conv) and 5 bits (fc; null picks the width giving the
    smallest file). ``layer_bits`` overrides the width
    per layer (module name -> bits). ``layers`` (default: every Linear/Conv) and ``exclude`` select
    the layers. ``fine_tune`` (:class:`~edgeslim.train.FineTune`; 1 epoch at lr 1e-4 by default):
    ``epochs: 0`` skips it; ``temperature > 0`` fine-tunes with knowledge distillation from the
    model entering the step (``alpha`` weights the soft term).
    """

    conv_bits: int = 8
    fc_bits: int = 5
    layer_bits: dict[str, int] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    conv_index_bits: int | None = 8
    fc_index_bits: int | None = 5
    fine_tune: FineTune = FineTune.defaults(epochs=1, lr=1e-4)

    def validate(self) -> None:
        check_bits(self.conv_bits, "conv_bits")
        check_bits(self.fc_bits, "fc_bits")
        for name, bits in self.layer_bits.items():
            check_bits(bits, f"layer_bits.{name}")
        for name in ("conv_index_bits", "fc_index_bits"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16):
                raise ConfigError(f"{name}: must be an integer in 1..16 (or null: smallest file), got {value!r}")


def _module_names(model: nn.Module, names: tuple[str, ...] | list[str], where: str) -> list[str]:
    return [w.removesuffix("weight").removesuffix(".") for w in resolve_names(model, names, where)]


def layer_plan(model: nn.Module, config: ClusterConfig) -> dict[str, tuple[int, int | None]]:
    """``{module name: (codebook bits, index bits)}`` for every layer the config clusters."""
    layers = clusterable_layers(model)
    chosen = _module_names(model, config.layers, "layers") if config.layers else list(layers)
    dropped = set(_module_names(model, config.exclude, "exclude"))
    overrides = dict(zip(_module_names(model, list(config.layer_bits), "layer_bits"), config.layer_bits.values()))
    plan = {}
    for name in chosen:
        if name in dropped:
            continue
        conv = not isinstance(layers[name], nn.Linear)
        bits = overrides.get(name, config.conv_bits if conv else config.fc_bits)
        plan[name] = (bits, config.conv_index_bits if conv else config.fc_index_bits)
    if not plan:
        raise ConfigError(f"layers: no Linear/Conv layer of {type(model).__name__} is left to cluster")
    return plan


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """Keep BatchNorm layers in eval mode (running statistics used, not updated) even while the
    training loop switches the model to train mode: a short fine-tune on a small set would
    otherwise overwrite the statistics the model was trained with."""

    def to_eval(module: nn.Module, _inputs: object) -> None:
        module.training = False

    handles = [m.register_forward_pre_hook(to_eval) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fine_tune(student: nn.Module, teacher: nn.Module, sparsity: Sparsity | None, config: ClusterConfig,
               task: Task) -> None:
    """Train the codebooks (and the unshared parameters) on ``task.train``. The pruned zeros of
    ``sparsity`` are kept: in a clustered layer by its shared-weight parametrization (zeros are not
    clustered), in the others by the fine-tune, which re-applies their masks after every step."""
    from edgeslim.distill.trainer import fine_tune

    keep = sparsity.restricted_to(student) if sparsity is not None else None  # leaves out the parametrized
    with frozen_batchnorm(student):
        fine_tune(student, teacher, config.fine_tune, task.train, keep=keep)


@register("cluster", ClusterConfig)
def cluster_step(model: ModelArtifact, config: ClusterConfig, task: Task) -> ModelArtifact:
    """Weight sharing: k-means codebooks per layer, shared-gradient fine-tune, Huffman-coded file."""
    if config.fine_tune.epochs and (task.train is None or count_samples(task.train) == 0):
        raise ConfigError("fine_tune.epochs: centroid fine-tuning needs training data (task.train is empty); "
                          "set fine_tune: {epochs: 0} to skip it")
    teacher = model.float_copy("cluster")
    student = copy.deepcopy(teacher)
    plan = layer_plan(student, config)
    share_weights(student, {name: bits for name, (bits, _) in plan.items()})
    try:
        if config.fine_tune.epochs:
            _fine_tune(student, teacher, model.sparsity, config, task)
    finally:
        finalize(student)
    # the same weights in the copy made before clustering: parameters keep their registration
    # order (removing a parametrization re-registers the weight after the bias)
    teacher.load_state_dict(student.state_dict())
    student = teacher
    data = encode_state(student, {name: ib for name, (_, ib) in plan.items()} | {"*": config.fc_index_bits})
    notes = {**model.notes, "cluster": {"bits": {n: b for n, (b, _) in plan.items()}, "file_bytes": len(data),
                                        "fine_tune_epochs": config.fine_tune.epochs}}
    files = {k: v for k, v in model.files.items() if k != model.size_file} | {FILE_NAME: data}
    # the sparsity carries on (its zeros are zeros of the codebook file too); this stage's size is that file
    return ModelArtifact(torch=student.eval(), notes=notes, files=files, size_file=FILE_NAME, sparsity=model.sparsity)
