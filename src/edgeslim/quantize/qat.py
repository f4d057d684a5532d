"""Quantization-aware training (QAT) whose learned int8 parameters deploy exactly in ORT's QDQ graph.

Placement comes from the lowering itself: the BN-folded float model is exported, ``plan_quantization``
decides where Q/DQ pairs go, and each planned tensor is located in the ``torch.fx`` graph of the
model by value (and module scope), so the fake quantizers sit exactly where ORT will quantize.
Training simulates the integer kernels (Jacob et al. 2018; Krishnamoorthi 2018): BN folded into
the fake-quantized conv weight, int32 biases, per-tensor int8 activations with EMA observers
and optionally LSQ step sizes (Esser et al. 2019). Export hands the trained scales, zero points
and int8 weights to ``lower_qdq`` unchanged, so ORT computes what the fake-quant model computed.
"""

from __future__ import annotations

import ast
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper
from rich.console import Console
from torch import nn

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError, DataError, ExportError, ModelError
from edgeslim.quantize.fake_quant import (CONVS, ActFakeQuant, QuantWeighted, conv_bn_pairs, fold_source, folded_params,
                                          node_scope, set_submodule, trace_model)
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import QuantPlan, lower_qdq, plan_quantization
from edgeslim.quantize.ptq import resolve_activation_dtype
from edgeslim.registry import register
from edgeslim.runtime.ort import make_session, run
from edgeslim.task import ModelArtifact, Task, count_samples
from edgeslim.train import FineTune, batches, check_loss, num_batches

PARITY_MAX_STEPS = 4.0  # ExportError beyond this many output quantization steps


@dataclass(frozen=True)
class QATConfig(TechniqueConfig):
    """Int8 quantization-aware training, lowered to the same integer kernels as ``ptq_int8``.

    Activation ranges start from ``calibration_samples`` (min/max), follow EMA min/max observers
    until epoch ``freeze_observers_epoch`` (0-based), then stay fixed, or are learned (LSQ) with
    ``learn_scales``, which also learns the per-channel weight step sizes from the start.
    BatchNorm uses batch statistics until epoch ``freeze_bn_epoch``, running statistics after.
    ``activation_dtype`` only changes the exported zero points (uint8 zp = int8 zp + 128 gives
    the same grid); "auto" is uint8 on x86-64, where ORT fuses shared int8 tensors poorly (see PTQ).
    ``op_types: ["MatMul"]`` switches to QAT of the Linear layers by module wrapping,
    which needs no torch.fx trace and takes several inputs (transformers; quantize/qat_linear.py):
    it trains on ``task.train``, or without it on the calibration inputs, reproducing the float
    model's outputs where there are no class labels; ``per_token`` as in ``ptq_int8``.
    ``fine_tune`` (:class:`~edgeslim.train.FineTune`; 2 epochs at lr 1e-4, decayed on a cosine here)
    trains on the labels: QAT takes no temperature or augment_shift.
    """

    fine_tune: FineTune = FineTune.defaults(epochs=2, lr=1e-4)
    learn_scales: bool = True
    freeze_observers_epoch: int = 1
    freeze_bn_epoch: int = 1
    calibration_samples: int = 256
    activation_dtype: Literal["auto", "int8", "uint8"] = "auto"
    op_types: tuple[str, ...] = ()
    per_token: tuple[str, ...] = ()

    def validate(self) -> None:
        ft = self.fine_tune
        if ft.epochs < 1:
            raise ConfigError(f"fine_tune.epochs: must be >= 1, got {ft.epochs}")
        for name in ("temperature", "augment_shift"):
            if getattr(ft, name):
                raise ConfigError(f"fine_tune.{name}: qat_int8 trains on the labels without it; must be 0, "
                                  f"got {getattr(ft, name)}")
        for name, low in (("freeze_observers_epoch", 0), ("freeze_bn_epoch", 0), ("calibration_samples", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be >= {low}, got {getattr(self, name)}")
        for op in self.op_types:
            if op != "MatMul":
                raise ConfigError(f"op_types: QAT of Linear layers supports MatMul only, got {op!r}")
        if self.per_token and not self.op_types:
            raise ConfigError("per_token: needs op_types (per-token layers exist on the Linear-layer QAT path)")


@dataclass
class QATModel:
    """A fake-quantized model and its link to the planned ONNX graph."""

    module: fx.GraphModule  # the fake-quant model that trains; shares layers with ``source``
    source: nn.Module  # the user's architecture (a copy) whose weights training updates
    plan: QuantPlan  # placement on the exported float graph
    act_quants: dict[str, ActFakeQuant]  # calibrated ONNX tensor name -> quantizer
    weighted: dict[str, QuantWeighted]  # ONNX Conv/Gemm/MatMul node name -> quantized layer
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv path, bn path) folded at export

    def scale_parameters(self) -> list[nn.Parameter]:
        return [q.scale for q in self.act_quants.values()] + [w.wq.scale for w in self.weighted.values()]

    @torch.no_grad()
    def simulate(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Output of the fake-quant model (eval mode) on ``x``: what the int8 graph should compute."""
        self.module.eval()
        out = self.module(torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x)
        return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


# ------------------------------------------------------------------------------- matching
def _onnx_scope(node: onnx.NodeProto | None) -> str | None:
    """Module path of an exported node from the dynamo exporter's ``name_scopes`` metadata."""
    meta = {p.key: p.value for p in node.metadata_props} if node is not None else {}
    try:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        return ".".join(s for s in scopes[:-1] if s)
    except (KeyError, ValueError, SyntaxError, TypeError):
        return None


def _clip_bounds(model: onnx.ModelProto, node: onnx.NodeProto | None) -> tuple[float, float] | None:
    """(min, max) of a Clip node with constant bounds, else None."""
    if node is None or node.op_type != "Clip":
        return None
    inits = {i.name: i for i in model.graph.initializer}
    bounds = [float(numpy_helper.to_array(inits[n])) if n in inits else None for n in list(node.input[1:3]) + [""] * 2][:2]
    return (-math.inf if bounds[0] is None else bounds[0], math.inf if bounds[1] is None else bounds[1])


def _onnx_values(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    session = make_session(probe, optimization="disable")
    outs = run(session, x)
    return {o.name: v for o, v in zip(session.get_outputs(), outs) if o.name in set(names)}


def _fx_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, np.ndarray]:
    values: dict[fx.Node, np.ndarray] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and n.op != "get_attr" and out.is_floating_point():
                values[n] = out.detach().numpy()
            return out

    gm.eval()
    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> bool:
    """Equal up to float reassociation (BN folded vs applied): max error <= rtol * max magnitude."""
    if a.shape != b.shape:
        return False
    bound = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return float(np.abs(a - b).max(initial=0.0)) <= rtol * bound + 1e-12


def _match_tensors(fp32: onnx.ModelProto, plan: QuantPlan, gm: fx.GraphModule, x: torch.Tensor) -> dict[str, fx.Node]:
    """Find the fx node computing each calibrated planned tensor: equal values on a probe batch,
    ties broken by module scope (exporter metadata), then by topological order."""
    onnx_vals = _onnx_values(fp32, plan.calibrated, x.numpy())
    fx_vals = _fx_values(gm, x)
    producers = {o: n for n in fp32.graph.node for o in n.output}
    used: set[fx.Node] = set()
    found: dict[str, fx.Node] = {}
    for name in plan.calibrated:
        cands = [n for n, v in fx_vals.items() if n not in used and _close(v, onnx_vals[name])]
        producer = producers.get(name)
        if not cands:
            op = f"output of ONNX {producer.op_type} {producer.name!r}" if producer is not None else "graph input"
            raise ModelError(f"qat_int8: int8 tensor {name!r} ({op}) has no counterpart in the torch.fx graph")
        scope = _onnx_scope(producer)
        best = next((n for n in cands if scope is not None and node_scope(n) == scope), cands[0])
        found[name] = best
        used.add(best)
    return found


def _match_weighted(fp32: onnx.ModelProto, plan: QuantPlan, gm: fx.GraphModule, pairs: dict[fx.Node, fx.Node]) -> dict[str, fx.Node]:
    """Map each planned Conv/Gemm/MatMul node to the fx layer whose (BN-folded) weight it holds."""
    modules = dict(gm.named_modules())
    inits = {i.name: i for i in fp32.graph.initializer}
    layers = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], CONVS + (nn.Linear,)):
            bn = modules[pairs[node].target] if node in pairs else None
            with torch.no_grad():
                layers[node] = folded_params(modules[node.target], bn)[0].numpy()
    found: dict[str, fx.Node] = {}
    for index in plan.weighted:
        onode = fp32.graph.node[index]
        w = numpy_helper.to_array(inits[onode.input[1]])
        match = next((n for n, v in layers.items() if n not in found.values() and (_close(v, w, 1e-6) or _close(v.T, w, 1e-6))), None)
        if match is None:
            raise ModelError(f"qat_int8: {onode.op_type} node {onode.name!r} has no Conv/Linear module with its weights in the model")
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == match.target) > 1:
            raise ModelError(f"qat_int8: module {match.target!r} is called more than once; QAT needs one call per layer")
        found[onode.name] = match
    return found


# -------------------------------------------------------------------------------- prepare
def prepare_qat(model: nn.Module, task: Task, config: QATConfig) -> QATModel:
    """Trace ``model`` (a copy), export its BN-folded float graph, plan int8 placement on it and
    insert fake quantizers at the matching torch tensors."""
    source = copy.deepcopy(model).eval()
    gm = trace_model(source)
    pairs = conv_bn_pairs(gm)
    pair_paths = [(str(c.target), str(b.target)) for c, b in pairs.items()]
    fp32 = fold_batchnorm(task.export(fold_source(source, pair_paths)))
    for i, node in enumerate(fp32.graph.node):
        node.name = node.name or f"qat_node_{i}"
    plan = plan_quantization(fp32)
    probe = next(x for x, _ in task.calibration_batches(8))
    if isinstance(probe, tuple):
        raise ModelError("qat_int8: models with several inputs are not supported")
    tensor_nodes = _match_tensors(fp32, plan, gm, torch.from_numpy(np.asarray(probe, dtype=np.float32)))
    layer_nodes = _match_weighted(fp32, plan, gm, pairs)

    graph, modules = gm.graph, dict(gm.named_modules())
    producers = {o: n for n in fp32.graph.node for o in n.output}
    folded = {c: b for c, b in pairs.items() if c in layer_nodes.values()}
    for conv, bn in folded.items():  # BN merges into its quantized conv (QuantWeighted)
        bn.replace_all_uses_with(conv)
        graph.erase_node(bn)
    bn_to_conv = {b: c for c, b in folded.items()}
    act_quants: dict[str, ActFakeQuant] = {}
    for i, (name, node) in enumerate(tensor_nodes.items()):
        node = bn_to_conv.get(node, node)  # BN output: computed by the folded conv now
        fq = ActFakeQuant(name)
        fq.clip = _clip_bounds(fp32, producers.get(name))
        gm.add_submodule(f"qat_act_{i}", fq)
        with graph.inserting_after(node):
            q = graph.call_module(f"qat_act_{i}", (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
        act_quants[name] = fq
    weighted: dict[str, QuantWeighted] = {}
    inputs = {fp32.graph.node[i].name: fp32.graph.node[i].input[0] for i in plan.weighted}
    for oname, node in layer_nodes.items():
        bn = modules[folded[node].target] if node in folded else None
        input_quant = act_quants.get(plan.same_as.get(inputs[oname], inputs[oname]))
        layer = QuantWeighted(modules[node.target], bn, config.learn_scales, input_quant)
        set_submodule(gm, str(node.target), layer)
        weighted[oname] = layer
    graph.lint()
    gm.recompile()
    return QATModel(gm, source, plan, act_quants, weighted, pair_paths)


@torch.no_grad()
def calibrate_qat(qat: QATModel, batches) -> int:
    """Initial activation ranges: min/max of the float model over ``batches``; returns samples seen."""
    seen = 0
    _set_modes(qat, enabled=False, calibrating=True)
    qat.module.eval()
    try:
        for x in batches:
            qat.module(torch.as_tensor(np.asarray(x, dtype=np.float32)))
            seen += len(x)
    finally:
        _set_modes(qat, enabled=True, calibrating=False)
    return seen


def _set_modes(qat: QATModel, enabled: bool, calibrating: bool) -> None:
    for fq in qat.act_quants.values():
        fq.enabled, fq.calibrating = enabled, calibrating
    for layer in qat.weighted.values():
        layer.enabled = enabled


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


# --------------------------------------------------------------------------------- train
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


def train_qat(qat: QATModel, data, config: QATConfig, on_epoch_end: Callable[[int, QATModel], None] | None = None,
              after_step: Callable[[], None] | None = None) -> QATModel:
    """Fine-tune the fake-quant model with cross-entropy, AdamW and cosine decay (deterministic).

    ``after_step()`` runs after every optimizer step (a pruned model's masks are re-applied there)."""
    x, y = (data, None) if isinstance(data, torch.utils.data.DataLoader) else data
    ft = config.fine_tune
    torch.manual_seed(ft.seed)
    gen = torch.Generator().manual_seed(ft.seed)
    opt = torch.optim.AdamW(param_groups(qat, ft.lr), lr=ft.lr, weight_decay=ft.weight_decay)
    steps = (num_batches(x, ft.batch_size) or 1) * ft.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss()
    console = Console(stderr=True, quiet=not ft.progress)
    for epoch in range(ft.epochs):
        set_epoch(qat, epoch, config)
        qat.module.train()
        seen, correct, loss_sum = 0, 0, 0.0
        for i, (xb, yb) in enumerate(batches(x, y, ft.batch_size, gen)):
            logits = qat.module(xb)
            loss = loss_fn(logits, yb)
            check_loss(loss, f"qat_int8 epoch {epoch + 1}, batch {i + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            sched.step()
            seen += len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(yb)
        if seen == 0:
            raise DataError("qat_int8: the training data yielded no batches")
        console.print(f"qat epoch {epoch + 1}/{ft.epochs}  loss {loss_sum / seen:.4f}  train acc {correct / seen:.2%}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, qat)
    set_epoch(qat, ft.epochs, config)
    qat.module.eval()
    return qat


# -------------------------------------------------------------------------------- export
def convert_qat(qat: QATModel, task: Task, activation_dtype: str = "auto") -> tuple[nn.Module, onnx.ModelProto]:
    """(float model with trained, BN-folded weights; QDQ graph carrying the learned parameters)."""
    qat.module.eval()
    float_model = fold_source(qat.source, qat.bn_pairs)
    fp32 = fold_batchnorm(task.export(float_model))
    for i, node in enumerate(fp32.graph.node):
        node.name = node.name or f"qat_node_{i}"
    plan = plan_quantization(fp32)
    # Same architecture, so same plan; exporter names may differ between exports: map by position.
    rename = dict(zip(plan.tensors, qat.plan.tensors))
    if (len(plan.tensors) != len(qat.plan.tensors) or len(plan.weighted) != len(qat.weighted)
            or {rename[k]: rename[v] for k, v in plan.same_as.items()} != qat.plan.same_as):
        raise ExportError("qat_int8: the exported graph's int8 plan changed during training; cannot carry scales over")
    dtype = resolve_activation_dtype(activation_dtype)
    shift = 128 if dtype == "uint8" else 0  # same grid: clamp(q + 128, 0, 255) == clamp(q, -128, 127) + 128
    act_params = {}
    for name in plan.calibrated:
        scale, zp = qat.act_quants[rename[name]].params()
        act_params[name] = (scale, zp + shift)
    inits = {i.name: i for i in fp32.graph.initializer}
    weight_params = {}
    with torch.no_grad():
        for index, layer in zip(plan.weighted, qat.weighted.values()):
            node = fp32.graph.node[index]
            w = folded_params(layer.op, layer.bn)[0]
            q, s = (t.numpy() for t in layer.wq.quantize(w))
            ref = numpy_helper.to_array(inits[node.input[1]])
            if ref.shape != q.shape:  # MatMul stores the weight as (in, out)
                q = q.T.copy()
            if not np.array_equal(ref, w.numpy() if ref.shape == w.shape else w.numpy().T):
                raise ExportError(f"qat_int8: exported weights of node {node.name!r} differ from the trained layer")
            weight_params[node.name] = (q, s)
    return float_model, lower_qdq(fp32, plan, {}, activation_dtype=dtype, act_params=act_params, weight_params=weight_params)


def integer_parity(qat: QATModel, qdq: onnx.ModelProto, x: np.ndarray) -> tuple[float, float]:
    """(max |ORT integer kernels - fake-quant torch| on ``x``, output quantization step)."""
    ref = qat.simulate(x)
    got = run(make_session(qdq, optimization="all"), np.asarray(x, dtype=np.float32))[0]
    out = qat.act_quants.get(qdq.graph.output[0].name)
    step = out.params()[0] if out is not None else max(float(ref.max() - ref.min()), 1e-6) / 255.0
    return float(np.abs(got - ref).max()) if ref.size else 0.0, step


def quantization_aware_training(model: ModelArtifact, config: QATConfig, task: Task) -> tuple[ModelArtifact, QATModel]:
    """Run QAT end to end; returns the deployable artifact and the fake-quant model it mirrors."""
    if task.train is None or count_samples(task.train) == 0:
        raise ConfigError("qat_int8: QAT needs training data (task.train is empty)")
    model.float_copy("qat_int8")  # refuses an already-lowered model
    qat = prepare_qat(model.torch, task, config)
    size = min(config.fine_tune.batch_size, config.calibration_samples)
    samples = calibrate_qat(qat, (x for x, _ in task.calibration_batches(size, limit=config.calibration_samples)))
    keep = model.sparsity.keeper() if model.sparsity is not None else None  # a pruned model must not regrow
    # the fake-quant layers wrap the very modules of qat.source, whose parameter names are the
    # model's; a zero weight quantizes to the integer 0 (symmetric grid): the int8 graph stays sparse
    train_qat(qat, task.train, config, after_step=None if keep is None else (lambda: keep(qat.source)))
    float_model, qdq = convert_qat(qat, task, config.activation_dtype)
    diff, step = integer_parity(qat, qdq, next(x for x, _ in task.calibration_batches(32)))
    if diff > PARITY_MAX_STEPS * step + 1e-6:
        raise ExportError(f"qat_int8: ORT integer kernels differ from the fake-quant model by {diff:.3g} "
                          f"(> {PARITY_MAX_STEPS:g} output steps of {step:.3g})")
    notes = {"qat_epochs": config.fine_tune.epochs, "calibration_samples": samples, "parity_max_abs_diff": diff,
             "parity_output_steps": diff / step}
    return ModelArtifact(torch=float_model, onnx=qdq, notes=notes, sparsity=model.sparsity), qat


@register("qat_int8", QATConfig)
def qat_int8(model: ModelArtifact, config: QATConfig, task: Task) -> ModelArtifact:
    """Quantization-aware int8 training, lowered to integer kernels (QDQ) with the learned scales."""
    if config.op_types:
        from edgeslim.quantize.qat_linear import linear_qat

        return linear_qat(model, config, task)
    return quantization_aware_training(model, config, task)[0]
