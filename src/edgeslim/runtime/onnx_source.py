"""A float model given as an ONNX file instead of a PyTorch module.

Techniques that work on the graph (static and dynamic int8, weight-only, mixed precision; those
registered with ``graph_only=True``) run on such a model without its PyTorch source; the others
train or rewrite the module and refuse it before any work (:func:`edgeslim.pipeline.compress`).

The graph is used as the user wrote it, with one change: a batch axis fixed at 1 is made symbolic
("batch"), because calibration and evaluation feed batches of many samples. A graph that hard-codes
the batch size inside (a Reshape to ``[1, ...]``) then fails the two-sample check below with an
error that says so, instead of failing later inside a technique.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from edgeslim.errors import ModelError, NumericalError, first_line

__all__ = ["load_onnx_model", "check_onnx_model"]

_MAX_BYTES = 2 * 1024**3  # protobuf's limit; larger models keep weights as external data


def load_onnx_model(path: str | Path) -> onnx.ModelProto:
    """Read, check and return the float graph in ``path`` (ModelError with one line otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.onnx: file not found: {path}")
    if path.stat().st_size > _MAX_BYTES:
        raise ModelError(f"model.onnx: {path} is larger than 2 GB; such models are not supported")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as err:  # protobuf DecodeError, onnx ValidationError, missing external data
        raise ModelError(f"model.onnx: {path} is not a valid ONNX model: {first_line(err)}") from None
    return dynamic_batch(model)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph's real inputs (older exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs and outputs have a symbolic first axis where it was 1."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = False
    for value in list(graph_inputs(out)) + list(out.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"  # clears dim_value (a oneof)
            changed = True
    if changed:
        del out.graph.value_info[:]  # intermediate shapes inferred for batch 1 would contradict
    return out


def check_onnx_model(model: onnx.ModelProto, example_inputs: Sequence[np.ndarray], input_names: Sequence[str] | None) -> None:
    """Fail before any work if the graph's weights hold NaN/Inf, its inputs do not match the
    example inputs, or it does not run on them at batch 1 and batch 2."""
    from edgeslim.runtime.ort import make_session

    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            values = numpy_helper.to_array(init)
            if not np.isfinite(values).all():
                raise NumericalError(f"model: weight {init.name!r} holds NaN/Inf "
                                     f"({int((~np.isfinite(values)).sum())} of {values.size} values)")
    names = [i.name for i in graph_inputs(model)]
    if len(names) != len(example_inputs):
        raise ModelError(f"model: the ONNX graph takes {len(names)} inputs ({', '.join(names)}), "
                         f"the data gives {len(example_inputs)}")
    if input_names is not None and list(input_names) != names:
        raise ModelError(f"input_names: {list(input_names)} differ from the ONNX graph's inputs {names}")
    session = make_session(model, threads=1)
    for n in (1, 2):
        feed = {name: np.concatenate([x[:1]] * n) for name, x in zip(names, example_inputs)}
        try:
            session.run(None, feed)
        except Exception as err:  # ORT raises its own pybind exception types
            shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in feed.items())
            hint = " (the graph fixes its batch size; export it with a dynamic batch axis)" if n == 2 else ""
            raise ModelError(f"model: the ONNX graph does not run on {shapes}{hint}: {first_line(err)}") from None
