"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2, empirical variant).

Quantizing weights (and the inputs they see) shifts the mean of a layer's output:
E[W̃x̃] ≠ E[Wx]. Subtracting the measured per-channel shift from the bias removes that bias error.
Layers are corrected in order, each measured in the QDQ simulation with every earlier layer
already corrected, so corrections do not compound.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from rich.progress import Progress

from edgeslim.quantize.lower import QuantPlan
from edgeslim.runtime.ort import input_feed
from edgeslim.runtime.probe import probe_session


def _channel_means(x: np.ndarray, op_type: str) -> np.ndarray:
    """Mean of each output channel: axis 1 for Conv (B, C, ...), the last axis otherwise."""
    axis = 1 if op_type == "Conv" else x.ndim - 1
    return x.astype(np.float64).mean(axis=tuple(i for i in range(x.ndim) if i != axis))


def _output_means(model: onnx.ModelProto, names: list[str], ops: list[str], batches: Sequence) -> list[np.ndarray]:
    """Per-channel mean of each tensor in ``names`` over ``batches`` (a QDQ graph runs as its float simulation)."""
    sess, _ = probe_session(model, names)
    sums = [None] * len(names)
    for x in batches:
        outs = sess.run(names, input_feed(sess, x))
        for i, (out, op) in enumerate(zip(outs, ops)):
            m = _channel_means(out, op) * len(out)
            sums[i] = m if sums[i] is None else sums[i] + m
    total = sum(len(x[0]) if isinstance(x, tuple) else len(x) for x in batches)
    return [s / total for s in sums]


def correct_biases(
    folded: onnx.ModelProto,
    plan: QuantPlan,
    lower: Callable[[onnx.ModelProto], onnx.ModelProto],
    batches: Sequence,
    progress: bool = True,
) -> onnx.ModelProto:
    """Return a copy of the float graph ``folded`` whose biases cancel the quantization shift.

    ``lower(float_graph) -> qdq_graph`` must lower with fixed ranges; ``batches`` is a small
    list of calibration inputs (a few hundred samples is plenty for a mean).
    """
    model = onnx.ModelProto()
    model.CopyFrom(folded)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [model.graph.node[i] for i in plan.weighted]
    nodes = [n for n in nodes if len(n.input) > 2 and n.input[2] in inits]
    if not nodes:
        return model
    fp_means = _output_means(model, [n.output[0] for n in nodes], [n.op_type for n in nodes], batches)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("bias correction", total=len(nodes))
        for node, fp_mean in zip(nodes, fp_means):
            qdq = lower(model)
            # In the QDQ graph a quantized output was renamed NAME.f before its Q node.
            name = node.output[0] + ".f" if node.output[0] in plan.tensors else node.output[0]
            (q_mean,) = _output_means(qdq, [name], [node.op_type], batches)
            bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            corrected = (bias - (q_mean - fp_mean)).astype(np.float32)
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(corrected, node.input[2]))
            bar.advance(task)
    return model
