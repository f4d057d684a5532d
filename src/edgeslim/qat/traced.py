"""QAT by torch.fx tracing (the default path of ``qat_int8``), whose learned int8 parameters deploy
exactly in ORT's QDQ graph.

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
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper
from torch import nn

from edgeslim.errors import ConfigError, ExportError, ModelError
from edgeslim.qat.fake_quant import (CONVS, ActFakeQuant, QuantWeighted, conv_bn_pairs, fold_source, folded_params,
                                     node_scope, set_submodule, trace_model)
from edgeslim.qat.model import BatchLoss, QATModel, activation_grid, calibrate, fit
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import QuantPlan, lower_qdq, plan_quantization
from edgeslim.runtime.ort import make_session, run
from edgeslim.task import ModelArtifact, Task, count_samples
from edgeslim.train import batches, num_batches

if TYPE_CHECKING:
    from edgeslim.qat.technique import QATConfig

PARITY_MAX_STEPS = 4.0  # ExportError beyond this many output quantization steps


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


def calibrate_qat(qat: QATModel, batches) -> int:
    """Initial activation ranges: min/max of the float model over ``batches``; returns samples seen."""
    return calibrate(qat, ((torch.as_tensor(np.asarray(x, dtype=np.float32)),) for x in batches))


# --------------------------------------------------------------------------------- train
def train_qat(qat: QATModel, data, config: QATConfig, on_epoch_end: Callable[[int, QATModel], None] | None = None,
              after_step: Callable[[], None] | None = None) -> QATModel:
    """Fine-tune the fake-quant model with cross-entropy on ``data`` (arrays or a DataLoader),
    batches shuffled by a generator seeded with ``fine_tune.seed`` (the loop: :func:`~edgeslim.qat.model.fit`).

    ``after_step()`` runs after every optimizer step (a pruned model's masks are re-applied there)."""
    x, y = (data, None) if isinstance(data, torch.utils.data.DataLoader) else data
    ft = config.fine_tune
    gen = torch.Generator().manual_seed(ft.seed)
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> BatchLoss:
        xb, yb = batch
        logits = qat.module(xb)
        return BatchLoss(loss_fn(logits, yb), len(yb), int((logits.argmax(1) == yb).sum()))

    return fit(qat, config, num_batches(x, ft.batch_size) or 1, lambda epoch: batches(x, y, ft.batch_size, gen),
               batch_loss, after_step=after_step, on_epoch_end=on_epoch_end)


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
    dtype, shift = activation_grid(activation_dtype)
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
