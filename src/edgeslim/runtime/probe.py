"""Probe sessions: run an ONNX graph on ONNX Runtime and read its intermediate tensors.

Calibration, bias correction, AdaRound, the layer-by-layer parity report and the MAC counter all
need values of tensors inside the graph. ORT returns graph outputs only, so a probe is a copy of
the model with the wanted tensors added as outputs. Graph optimizations are off by default: a
fusion may remove or rename an intermediate tensor, and the unfused graph is the float
simulation of a QDQ model that these tools reason about.
"""

from __future__ import annotations

from typing import Iterable

import onnx
import onnxruntime as ort

from edgeslim.runtime.ort import make_session

__all__ = ["probe_session"]


def probe_session(
    model: onnx.ModelProto,
    tensors: Iterable[str],
    *,
    threads: int | None = None,
    optimization: str = "disable",
) -> tuple[ort.InferenceSession, list[str]]:
    """A CPU session on a copy of ``model`` that also outputs ``tensors``, and their names.

    The names come back deduplicated in the order given: pass them to ``session.run(names, feed)``.
    ``model`` is not modified. ``threads`` is the intra-op thread count (None: ORT's default, one
    per physical core); ``optimization`` is a level of :data:`edgeslim.runtime.ort.OPTIMIZATION_LEVELS`
    ("disable" keeps every tensor name of the input graph; graph outputs survive any level).
    ORT logs at error level only, as in :func:`edgeslim.runtime.ort.make_session`, which builds it.
    """
    names = list(dict.fromkeys(tensors))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return make_session(probe, threads=threads, optimization=optimization), names
