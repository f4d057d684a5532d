"""QAT for the Linear layers of any model (transformers included), by module wrapping instead of fx.

``qat_int8`` places fake quantizers by tracing the model with torch.fx, which covers CNNs but not
models fx cannot follow (Hugging Face encoders, several inputs). With ``op_types: ["MatMul"]``
(the transformer setting of ``ptq_int8``) QAT takes this path instead: every
``nn.Linear`` the int8 plan quantizes is wrapped in place (its input's activation quantizer, shared
by the layers that read one tensor, such as q/k/v, then the per-channel weight quantizer), so any
model with Linear layers trains, whatever its forward does. Linear layers on 2-D inputs export
as Gemm (int8 output and int32 bias in ORT's QGemm form) and stay float on this path.

Training loss: cross-entropy on class labels when the data has them; otherwise (a fidelity task
such as MiniLM's, whose targets are the float model's own outputs) the mean squared error to the
outputs of the model entering the step, on ``task.train`` inputs or, without them, on the
calibration inputs. Export: the trained float weights are exported again and lowered by
``lower_qdq`` with the learned activation scales and int8 weights, mapped layer by layer (module
name), so ORT computes what the fake-quant model computed; biases stay float (they follow the
MatMul as an Add, which ORT fuses into ``MatMulIntegerToFloat``). ``per_token`` layers train in
float and are lowered per token (quantize/per_token.py); embedding tables are stored as int8
rows (quantize/embedding.py), as ``ptq_int8`` stores them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from torch import nn

from edgeslim.errors import ConfigError, ExportError, ModelError
from edgeslim.evaluate.metrics import row_cosines
from edgeslim.qat.fake_quant import ActFakeQuant, QuantWeighted, set_submodule
from edgeslim.qat.model import BatchLoss, QATModel, activation_grid, calibrate, fit
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.lower import layer_name, lower_qdq, plan_quantization
from edgeslim.quantize.per_token import lower_per_token
from edgeslim.quantize.ptq import plan_per_token
from edgeslim.runtime.ort import make_session, run
from edgeslim.sparsity import Sparsity, mask_keeper
from edgeslim.task import ModelArtifact, Task, count_samples, iter_batches

if TYPE_CHECKING:
    from edgeslim.qat.technique import QATConfig

__all__ = ["QuantLinear", "linear_qat"]

PARITY_MIN_COSINE = 0.995  # ExportError below this cosine between a sample's ORT and simulated outputs (MiniLM: >= 0.998)


class QuantLinear(nn.Module):
    """``linear(fq_act(x), fq_w(W)) + b``: the MatMulIntegerToFloat kernel in float arithmetic."""

    def __init__(self, linear: nn.Linear, act: ActFakeQuant, learn: bool) -> None:
        super().__init__()
        self.layer = QuantWeighted(linear, None, learn, input_quant=None)  # no input_quant: bias stays float
        self._act = [act]  # shared with the other layers reading the same tensor; not a child module

    @property
    def act(self) -> ActFakeQuant:
        return self._act[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.act(x))


def _inputs(x: Any) -> tuple[torch.Tensor, ...]:
    arrays = [np.asarray(a) for a in (x if isinstance(x, tuple) else (x,))]
    return tuple(torch.as_tensor(a if a.dtype.kind in "iub" else a.astype(np.float32, copy=False)) for a in arrays)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _training_data(task: Task) -> tuple[Any, str]:
    """``task.train``; for a task without labels (fidelity to the float model) the calibration inputs."""
    if task.train is not None and count_samples(task.train) > 0:
        return task.train, "train"
    if task.calibration[1] is None:
        return task.calibration, "calibration"
    raise ConfigError("qat_int8: QAT needs training data (task.train is empty)")


def _shuffled(data: Any, seed: int) -> tuple[Any, Any]:
    x, y = data
    xs = x if isinstance(x, tuple) else (x,)
    order = np.random.default_rng(seed).permutation(len(xs[0]))
    xs = tuple(np.asarray(a)[order] for a in xs)
    return (xs if isinstance(x, tuple) else xs[0]), (None if y is None else np.asarray(y)[order])


def _wrap(source: nn.Module, fp32: onnx.ModelProto, plan, learn: bool) -> tuple[dict[str, ActFakeQuant], dict[str, QuantLinear]]:
    """Wrap each planned layer's nn.Linear; one ActFakeQuant per distinct input tensor."""
    modules = dict(source.named_modules())
    acts: dict[str, ActFakeQuant] = {}
    wrapped: dict[str, QuantLinear] = {}
    for index in plan.weighted:
        node = fp32.graph.node[index]
        name = layer_name(node)
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            kind = "no module" if linear is None else type(linear).__name__
            raise ModelError(f"qat_int8: layer {name!r} ({node.op_type}) is {kind}, not an nn.Linear; op_types QAT "
                             "wraps Linear layers only")
        tensor = plan.same_as.get(node.input[0], node.input[0])
        acts.setdefault(tensor, ActFakeQuant(tensor))
        wrapped[name] = QuantLinear(linear, acts[tensor], learn)
        set_submodule(source, name, wrapped[name])
    extra = set(plan.calibrated) - set(acts)
    if extra:
        raise ModelError(f"qat_int8: op_types QAT quantizes Linear inputs only, but the plan also quantizes "
                         f"{sorted(extra)[0]!r}")
    return acts, wrapped


def _unwrapped(source: nn.Module, wrapped: dict[str, QuantLinear]) -> nn.Module:
    """A copy of ``source`` with every QuantLinear replaced by its (trained) float Linear."""
    model = copy.deepcopy(source)
    for name in wrapped:
        set_submodule(model, name, copy.deepcopy(wrapped[name].layer.op))
    return model.eval()


def _keeper(sparsity: Sparsity | None, wrapped: dict[str, QuantLinear]) -> Callable[[nn.Module], None] | None:
    """``artifact.sparsity``'s keeper for the wrapped model: a wrapped Linear's weight is
    ``<layer>.layer.op.weight`` there (the float model after training has the original names)."""
    if sparsity is None:
        return None

    def renamed(name: str) -> str:
        module, _, leaf = name.rpartition(".")
        return f"{module}.layer.op.{leaf}" if module in wrapped else name

    return mask_keeper({renamed(n): m for n, m in sparsity.masks.items()})


def linear_qat(model: ModelArtifact, config: QATConfig, task: Task) -> ModelArtifact:
    """QAT of the Linear layers ``config.op_types`` selects; see the module docstring."""
    teacher = model.float_copy("qat_int8").eval()
    source = copy.deepcopy(teacher)
    data, data_name = _training_data(task)
    fp32 = task.export(source)
    plan, per_token = plan_per_token(fp32, config.per_token, op_types=config.op_types)
    if not plan.weighted:
        raise ModelError(f"qat_int8: no {'/'.join(config.op_types)} layer with a constant weight to quantize")
    acts, wrapped = _wrap(source, fp32, plan, config.learn_scales)
    qat = QATModel(source, source, plan, acts, {n: w.layer for n, w in wrapped.items()})
    ft = config.fine_tune
    # Initial ranges: min/max of the float model over the calibration inputs.
    calibrate(qat, (_inputs(x) for x, _ in task.calibration_batches(ft.batch_size, limit=config.calibration_samples)))

    def batch_loss(batch: tuple[Any, Any]) -> BatchLoss:
        x, y = batch
        xs = _inputs(x)
        out = _first(source(*xs))
        if y is not None and np.asarray(y).ndim == 1 and np.asarray(y).dtype.kind in "iu":
            loss = nn.functional.cross_entropy(out, torch.as_tensor(np.asarray(y), dtype=torch.long))
        else:  # no class labels: reproduce the float model (knowledge distillation on the outputs)
            with torch.no_grad():
                target = _first(teacher(*xs))
            loss = nn.functional.mse_loss(out, target)
        return BatchLoss(loss, len(xs[0]))

    keep = _keeper(model.sparsity, wrapped)
    fit(qat, config, -(-count_samples(data) // ft.batch_size),
        lambda epoch: iter_batches(_shuffled(data, ft.seed + epoch), ft.batch_size), batch_loss,
        after_step=None if keep is None else (lambda: keep(source)))

    # Export: the trained float weights, lowered with the learned parameters, layer by layer.
    float_model = _unwrapped(source, wrapped)
    fp32 = task.export(float_model)
    plan2 = plan_quantization(fp32, exclude=tuple(sorted(per_token)), op_types=config.op_types)
    dtype, shift = activation_grid(config.activation_dtype)
    act_params, weight_params = {}, {}
    inits = {i.name: i for i in fp32.graph.initializer}
    with torch.no_grad():
        for index in plan2.weighted:
            node = fp32.graph.node[index]
            layer = wrapped.get(layer_name(node))
            if layer is None:
                raise ExportError(f"qat_int8: exported layer {layer_name(node)!r} was not trained with a quantizer")
            w = layer.layer.op.weight.numpy()
            exported = numpy_helper.to_array(inits[node.input[1]])
            if not np.array_equal(exported, w.T if node.op_type == "MatMul" else w):
                raise ExportError(f"qat_int8: exported weights of node {node.name!r} differ from layer {layer_name(node)!r}")
            scale, zp = layer.act.params()
            act_params[plan2.same_as.get(node.input[0], node.input[0])] = (scale, zp + shift)
            q, s = (t.numpy() for t in layer.layer.wq.quantize(layer.layer.op.weight))
            weight_params[node.name] = (q.T.copy() if node.op_type == "MatMul" else q, s)
    # Only the quantized layers read the dequantized tensors, as in the fake-quant model (whose
    # quantizers sit on the Linear inputs): a residual Add reading the same LayerNorm output stays float.
    graph = lower_qdq(fp32, plan2, {}, activation_dtype=dtype, act_params=act_params, weight_params=weight_params,
                      dq_readers=plan2.weighted)

    # Parity before the per-token layers (which trained in float) are lowered.
    probe = next(x for x, _ in task.calibration_batches(8))
    with torch.no_grad():
        ref = _first(source(*_inputs(probe))).numpy()
    got = run(make_session(graph), probe)[0]
    diff = float(np.abs(got - ref).max())
    # A value on a rounding boundary can land one step apart in ORT and in torch (float sums in
    # another order) and that step travels through the layers after it (measured: ORT's own
    # optimized and unoptimized graphs differ as much on MiniLM), so parity is judged per sample,
    # by direction, not by the largest element.
    cos = row_cosines(got.reshape(len(got), -1), ref.reshape(len(ref), -1))
    if float(cos.min()) < PARITY_MIN_COSINE:
        raise ExportError(f"qat_int8: ORT integer kernels differ from the fake-quant model: a sample's outputs have "
                          f"cosine {float(cos.min()):.5f} < {PARITY_MIN_COSINE} (max abs diff {diff:.3g})")
    if per_token:
        graph = lower_per_token(graph, per_token, dtype)
    graph = quantize_embeddings(graph)  # int8 embedding rows, as ptq_int8 stores them
    notes = {"qat_epochs": config.fine_tune.epochs, "qat_data": data_name, "qat_layers": len(wrapped),
             "per_token_layers": sorted(per_token), "parity_max_abs_diff": diff, "parity_min_cosine": float(cos.min())}
    return ModelArtifact(torch=float_model, onnx=graph, notes=notes, sparsity=model.sparsity)
