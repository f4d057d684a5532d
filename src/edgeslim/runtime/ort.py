"""Thin, predictable wrappers around ONNX Runtime sessions.

Every measurement in edgeslim goes through :func:`make_session` so that thread counts,
graph optimisation level and provider are the same everywhere (CPU only, sequential
execution, a single inter-op thread) and numbers are comparable between stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from edgeslim.errors import RuntimeToolError, first_line

__all__ = ["OPTIMIZATION_LEVELS", "make_session", "run", "predict", "input_feed", "parse_shapes", "input_shapes",
           "dummy_feed", "with_static_shapes"]

OPTIMIZATION_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# ORT input type strings -> numpy dtypes, for casting user arrays and building dummy inputs.
ORT_TO_NUMPY: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(bool)": np.bool_,
}


def make_session(
    model: onnx.ModelProto | str | Path | bytes,
    *,
    threads: int | None = 1,
    optimization: str = "all",
    optimized_model_path: str | Path | None = None,
    flush_denormals: bool = False,
) -> ort.InferenceSession:
    """Create a CPU ``InferenceSession`` with fixed threading for reproducible measurements.

    ``threads`` is the intra-op thread count; None leaves ORT's default (one per physical core),
    for sessions that read values rather than time them (see :mod:`edgeslim.runtime.probe`).
    ``optimized_model_path`` makes ORT write the graph it will actually execute (after fusions
    and layout changes), which :mod:`edgeslim.runtime.inspect` reads back. ``flush_denormals``
    sets ORT's ``session.set_denormal_as_zero`` (its pool threads; see runtime.bench for the caller's).
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise RuntimeToolError(
            f"unknown optimization level {optimization!r}; use one of {', '.join(OPTIMIZATION_LEVELS)}"
        )
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise RuntimeToolError(f"threads must be a positive integer, got {threads!r}")

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    # 3 = ERROR: hides ORT's "Removing initializer ..." / fallback warnings that users cannot act on.
    opts.log_severity_level = 3
    if flush_denormals:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)

    if isinstance(model, onnx.ModelProto):
        source, label = model.SerializeToString(), "<in-memory ModelProto>"
    elif isinstance(model, (bytes, bytearray)):
        source, label = bytes(model), "<in-memory ONNX bytes>"
    elif isinstance(model, (str, Path)):
        path = Path(model)
        label = str(path)
        if not path.is_file():
            raise RuntimeToolError(f"ONNX file not found: {path}")
        source = str(path)
    else:
        raise RuntimeToolError(f"cannot build an ONNX Runtime session from {type(model).__name__}")

    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises pybind Fail/InvalidProtobuf/InvalidGraph/... subclasses
        raise RuntimeToolError(f"ONNX Runtime cannot load {label}: {first_line(exc)}") from exc


def _as_array(value: object, want: type | None) -> np.ndarray:
    arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    # Users (and sklearn-style loaders) often hand over float64; ORT fp32 inputs reject it.
    if arr.dtype == np.float64 and want in (None, np.float32):
        arr = arr.astype(np.float32)
    elif want is not None and arr.dtype != want and arr.dtype.kind == np.dtype(want).kind:
        arr = arr.astype(want)  # e.g. int32 labels/ids into an int64 input
    return np.ascontiguousarray(arr)


def input_feed(
    session: ort.InferenceSession,
    x: np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray],
) -> dict[str, np.ndarray]:
    """Map an array, a tuple of arrays (positional) or a dict onto the session's input names."""
    meta = session.get_inputs()
    names = [i.name for i in meta]
    wanted = {i.name: ORT_TO_NUMPY.get(i.type) for i in meta}
    if isinstance(x, Mapping):
        unknown = sorted(set(x) - set(names))
        if unknown:
            raise RuntimeToolError(f"unknown model input {unknown[0]!r}; the model takes {names}")
        missing = [n for n in names if n not in x]
        if missing:
            raise RuntimeToolError(f"missing model input {missing[0]!r}; the model takes {names}")
        return {n: _as_array(x[n], wanted[n]) for n in names}
    values = list(x) if isinstance(x, (tuple, list)) else [x]
    if len(values) != len(names):
        raise RuntimeToolError(f"the model takes {len(names)} input(s) {names}, got {len(values)} array(s)")
    return {n: _as_array(v, wanted[n]) for n, v in zip(names, values)}


def run(
    session: ort.InferenceSession,
    inputs: np.ndarray | Mapping[str, np.ndarray] | Sequence[np.ndarray],
) -> list[np.ndarray]:
    """Run the session once and return all outputs, with ORT errors turned into one-liners."""
    feed = input_feed(session, inputs)
    try:
        return list(session.run(None, feed))
    except Exception as exc:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in feed.items())
        raise RuntimeToolError(f"ONNX Runtime failed on inputs {shapes}: {first_line(exc)}") from exc


def predict(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """First output over a whole data set, run in batches (for accuracy evaluation)."""
    if batch_size < 1:
        raise RuntimeToolError(f"batch_size must be >= 1, got {batch_size}")
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise RuntimeToolError(f"predict needs a non-empty batch of inputs, got shape {tuple(x.shape)}")
    chunks = [run(session, x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(chunks, axis=0)


def parse_shapes(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["input=1x3x224x224", ...]`` -> ``{"input": [1, 3, 224, 224]}`` (the CLI's ``--shape``)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            values = [int(d) for d in dims.lower().split("x")] if sep and name else None
        except ValueError:
            values = None
        if values is None or not all(1 <= v <= 1_000_000 for v in values):
            raise RuntimeToolError(f"--shape {spec!r}: expected NAME=D1xD2x... with sizes in [1, 1000000], "
                                   "e.g. input=1x3x224x224")
        if name in shapes:
            raise RuntimeToolError(f"--shape: input {name!r} is given twice")
        shapes[name] = values
    return shapes


def input_shapes(session: ort.InferenceSession, shapes: Mapping[str, Sequence[int]] | None = None,
                 batch_size: int = 1) -> dict[str, list[int]]:
    """The concrete shape of every input: from ``shapes`` where given (checked against the model's
    fixed dims), else the model's dims with a dynamic first axis set to ``batch_size``. Any other
    dynamic axis is ambiguous: RuntimeToolError naming the input and the axis."""
    shapes = dict(shapes or {})
    names = [i.name for i in session.get_inputs()]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise RuntimeToolError(f"--shape: the model has no input {unknown[0]!r} (inputs: {', '.join(names)})")
    out: dict[str, list[int]] = {}
    for inp in session.get_inputs():
        dims = list(inp.shape)
        given = shapes.get(inp.name)
        if given is not None:
            if len(given) != len(dims):
                raise RuntimeToolError(f"--shape {inp.name}: the input has {len(dims)} axes, got {len(given)}")
            for axis, (d, g) in enumerate(zip(dims, given)):
                if isinstance(d, int) and d > 0 and d != g:
                    raise RuntimeToolError(f"--shape {inp.name}: axis {axis} is fixed to {d} in the model, got {g}")
            out[inp.name] = list(given)
            continue
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif axis == 0:
                shape.append(batch_size)
            else:
                sym = f" ({d!r})" if isinstance(d, str) else ""
                raise RuntimeToolError(f"input {inp.name!r} axis {axis}{sym} is dynamic: give its size with "
                                       f"--shape {inp.name}=" + "x".join(str(x) if isinstance(x, int) and x > 0
                                                                         else "N" for x in dims))
        out[inp.name] = shape
    return out


def dummy_feed(session: ort.InferenceSession, shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the given shapes: uniform [0, 1) floats, zeros for integer and bool inputs
    (token ids 0 and masks 0 are valid for every vocabulary). Refused, before anything is
    allocated, where they would take over :func:`~edgeslim.runtime.bench.input_memory_limit`."""
    from edgeslim.runtime.bench import input_memory_limit

    total = sum(int(np.prod(shapes[i.name])) * np.dtype(ORT_TO_NUMPY.get(i.type, np.float32)).itemsize
                for i in session.get_inputs())
    limit = input_memory_limit()
    if limit is not None and total > limit:
        raise RuntimeToolError(f"the inputs would take {total / 2**30:.1f} GiB, over a quarter of this machine's "
                               "memory; lower --batch-size or --shape")
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        dtype = ORT_TO_NUMPY.get(inp.type, np.float32)
        shape = list(shapes[inp.name])
        feeds[inp.name] = (rng.random(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(shape, dtype=dtype))
    return feeds


def with_static_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have the given fixed sizes (what ORT optimizes for them)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name in shapes:
            for dim, size in zip(inp.type.tensor_type.shape.dim, shapes[inp.name]):
                dim.Clear()
                dim.dim_value = int(size)
    return fixed
