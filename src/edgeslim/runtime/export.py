"""PyTorch -> ONNX export with a dynamic batch dimension, verified against ONNX Runtime.

An export is only useful if ORT computes what PyTorch computes, for more than the one batch
size used while tracing; :func:`export_onnx` checks both before handing the model back.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np
import onnx

from edgeslim import io
from edgeslim.errors import ExportError, ModelError, RuntimeToolError, exception_chain, reraise_interrupt
from edgeslim.runtime.ort import first_line, make_session, run
from edgeslim.runtime.softmax import bound_softmax_inputs

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["export_onnx", "strip_stack_traces", "validate_outputs"]

# The dynamo exporter logs progress and registry warnings (e.g. "torchvision is not installed")
# through these loggers, and emits FutureWarnings from torch.export internals.
_NOISY_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "torch._export", "onnxscript")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _shapes(tensors: Sequence[object]) -> str:
    return ", ".join(str(tuple(getattr(t, "shape", ()))) for t in tensors)


def _to_numpy(t: "torch.Tensor") -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _forward(model: "nn.Module", inputs: tuple["torch.Tensor", ...]) -> list[np.ndarray]:
    """Run the eager model and flatten its outputs (tensor, tuple, list or dict) to arrays."""
    import torch
    from torch.utils._pytree import tree_leaves

    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:
        raise ModelError(
            f"model forward failed on example input of shape {_shapes(inputs)}: {first_line(exc)}"
        ) from exc
    leaves = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ModelError(f"{type(model).__name__} returned no tensor for input of shape {_shapes(inputs)}")
    return [_to_numpy(x) for x in leaves]


def _default_names(prefix: str, n: int) -> list[str]:
    return [prefix] + [f"{prefix}_{i}" for i in range(1, n)]


def _check_dynamic_batch(proto: onnx.ModelProto, cls: str) -> None:
    # Quirk: when torch.export cannot keep Dim("batch") symbolic (the model hard-codes the batch
    # size), the ONNX exporter silently retries with other strategies and may return a graph with
    # a static batch instead of failing, so check the result.
    init_names = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name not in init_names and dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"ONNX export of {cls} fixed the batch dimension of input {inp.name!r} to {dims[0].dim_value} "
                "(the model hard-codes the batch size); fix the model or pass dynamic_batch=False"
            )


def _export_failure(model: "nn.Module", example_inputs: tuple, dynamic_shapes: object, exc: Exception) -> str:
    """One line for a failed export: the operator the exporter could not convert and the module
    that calls it, where the exception chain names one; else the exporter's own first line."""
    import re

    import torch

    cls = type(model).__name__
    text = "\n".join(str(e) for e in exception_chain(exc))
    op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.:]+)', overload='(\w+)'\)>", text)
    if op is None:
        if "Dim" in text and "batch" in text or "Constraints violated" in text:
            return (f"ONNX export of {cls} failed: the batch dimension cannot stay dynamic (the model hard-codes "
                    f"the batch size?): {first_line(exc)}")
        return f"ONNX export of {cls} failed: {first_line(exc)}"
    target = f"{op.group(1)}.{op.group(2)}"
    where = ""
    for shapes in (dynamic_shapes, None):  # find the module that calls it, from torch.export's module stack
        try:
            with _quiet(), torch.no_grad():
                program = torch.export.export(model, example_inputs, dynamic_shapes=shapes).run_decompositions()
        except Exception:  # e.g. the batch is not dynamic: try a static export
            continue
        for node in program.graph.nodes:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if str(node.target) == target and stack:
                path, kind = stack[-1]
                where = f" in module {path or '(root)'!r} ({str(kind).rsplit('.', 1)[-1]})"
                break
        break
    return (f"ONNX export of {cls} failed: operator {target} has no ONNX conversion{where}; replace it "
            "with supported operations or register a custom ONNX function")


_STACK_TRACE = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the exporter's per-node Python stack traces (in place; returns ``proto``).

    They hold absolute paths of the machine that exported the model (its home folder, its
    checkout), which a deployable file must not carry to whoever receives it, and which make the
    same model's bytes differ between two checkouts. The module scopes (``name_scopes``), which
    map nodes to layers, are kept.
    """
    def strip(nodes) -> None:
        for node in nodes:
            kept = [p for p in node.metadata_props if p.key != _STACK_TRACE]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)
            for attr in node.attribute:  # control-flow subgraphs
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    strip(g.node)

    strip(proto.graph.node)
    for fn in proto.functions:
        strip(fn.node)
    return proto


def export_onnx(
    model: "nn.Module",
    example_inputs: tuple["torch.Tensor", ...],
    path: str | Path | None = None,
    *,
    opset: int = 18,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_dims: Sequence[Mapping[int, str]] | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    bound_softmax: bool = True,
) -> onnx.ModelProto:
    """Export ``model`` to ONNX (dynamo exporter), optionally validate in ORT and save atomically.

    Returns the ModelProto with weights inline. Weight initializers keep the torch parameter
    names (e.g. ``features.0.weight``); BatchNorm is folded into the preceding Conv by the
    exporter's optimizer. With ``validate`` the ORT outputs are compared to PyTorch on the
    example batch and on a batch twice as large, which proves the batch dimension is dynamic.
    ``dynamic_dims`` names further dynamic axes per input, e.g. ``[{1: "seq"}, {1: "seq"}]`` for
    token ids and attention mask; axes sharing a name share one symbol. ``bound_softmax`` floors
    every Softmax input at its row max - 80 (:mod:`edgeslim.runtime.softmax`: same float32 outputs,
    no slow denormal exps under attention masks).
    """
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ExportError(f"example_inputs for {type(model).__name__} must be a non-empty tuple of tensors")
    if input_names is not None and len(input_names) != len(example_inputs):
        raise ExportError(
            f"input_names has {len(input_names)} name(s) but {len(example_inputs)} example input(s) were given"
        )

    model = model.eval()
    reference = _forward(model, example_inputs)
    in_names = list(input_names) if input_names else _default_names("input", len(example_inputs))
    out_names = list(output_names) if output_names else _default_names("output", len(reference))
    if len(out_names) != len(reference):
        raise ExportError(f"output_names has {len(out_names)} name(s) but the model returns {len(reference)} tensor(s)")

    dynamic_shapes = None
    if dynamic_batch or dynamic_dims:
        symbols: dict[str, object] = {}  # one symbol per name: e.g. all inputs share the batch size

        def dim(name: str) -> object:
            return symbols.setdefault(name, torch.export.Dim(name))

        extra = list(dynamic_dims or []) + [{}] * (len(example_inputs) - len(dynamic_dims or []))
        dynamic_shapes = tuple(
            ({0: dim("batch")} if dynamic_batch and t.dim() > 0 else {}) | {a: dim(n) for a, n in extra[i].items()} or None
            for i, t in enumerate(example_inputs)
        )

    cls = type(model).__name__
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                model,
                example_inputs,
                dynamo=True,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                report=False,
            )
            proto = program.model_proto
    except Exception as exc:
        reraise_interrupt(exc)
        raise ExportError(_export_failure(model, example_inputs, dynamic_shapes, exc)) from exc

    if dynamic_batch:
        _check_dynamic_batch(proto, cls)
    strip_stack_traces(proto)
    if bound_softmax:
        proto = bound_softmax_inputs(proto)
    if validate:
        feeds = [tuple(_to_numpy(t) for t in example_inputs)]
        refs = [reference]
        if dynamic_batch and all(t.dim() > 0 for t in example_inputs):
            doubled = tuple(torch.cat([t, t], dim=0) for t in example_inputs)
            feeds.append(tuple(_to_numpy(t) for t in doubled))
            refs.append(_forward(model, doubled))
        for feed, ref in zip(feeds, refs):
            try:
                validate_outputs(proto, feed, ref, atol=atol, rtol=rtol)
            except RuntimeToolError as exc:
                raise ExportError(f"exported ONNX model of {cls} does not run in ONNX Runtime: {exc}") from exc

    if path is not None:
        try:
            io.write_bytes(path, proto.SerializeToString())
        except OSError as exc:
            raise ExportError(f"cannot write ONNX file {path}: {first_line(exc)}") from exc
    return proto


def validate_outputs(
    model: onnx.ModelProto | str | Path,
    inputs: Mapping[str, np.ndarray] | tuple,
    reference: list[np.ndarray] | tuple,
    *,
    atol: float,
    rtol: float,
) -> float:
    """Run ``model`` in ORT and check every output against ``reference`` like ``np.allclose``.

    Returns the largest absolute difference over all outputs; raises ExportError naming the
    output with the worst violation of ``|ort - ref| <= atol + rtol * |ref|``.
    """
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    outputs = run(session, inputs)
    if len(outputs) != len(reference):
        raise ExportError(f"ONNX model has {len(outputs)} output(s) {names} but {len(reference)} reference array(s) were given")

    max_diff = 0.0
    worst: tuple[float, str, float, tuple[int, ...]] | None = None  # (excess, name, diff, index)
    for name, got, ref in zip(names, outputs, reference):
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            raise ExportError(
                f"ONNX Runtime output {name!r} has shape {tuple(got.shape)}, PyTorch gives {tuple(ref.shape)}"
            )
        if got.size == 0:
            continue
        g, r = got.astype(np.float64), ref.astype(np.float64)
        diff = np.abs(g - r)
        both_nan = np.isnan(g) & np.isnan(r)
        diff = np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
        excess = diff - (atol + rtol * np.abs(np.nan_to_num(r)))
        flat = int(np.argmax(excess))
        max_diff = max(max_diff, float(diff.max()))
        if excess.flat[flat] > 0 and (worst is None or excess.flat[flat] > worst[0]):
            worst = (float(excess.flat[flat]), name, float(diff.flat[flat]), np.unravel_index(flat, diff.shape))
    if worst is not None:
        _, name, diff_at, index = worst
        idx = tuple(int(i) for i in index)
        raise ExportError(
            f"ONNX Runtime output {name!r} differs from PyTorch: max abs diff {diff_at:.1e} at index "
            f"{idx} > atol {atol:g} + rtol {rtol:g}*|ref|"
        )
    return max_diff
