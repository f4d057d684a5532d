"""Parity debugging of a quantized graph, layer by layer.

Two questions, two comparisons on the same inputs:
- Does ORT compute what the quantization simulates? Every quantized tensor (the integer output
  of each QuantizeLinear) is read from the unfused QDQ graph (the float simulation) and from the
  graph ORT optimizes into integer kernels; the first tensor, in graph order, whose integers
  differ by more than ``tolerance`` steps on more than ``max_mismatch`` of its elements names the
  layer where the kernels diverge. (Requantization rounds differently in rare cases; one such
  step propagates and can grow downstream, but only on a sliver of elements. A kernel that
  computes something else disagrees almost everywhere.)
- Where does quantization error come from? Each quantized tensor, dequantized, is compared with
  the same tensor of the float model (SQNR in dB); a sharp SQNR drop names the layer that broke.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeslim.evaluate.metrics import sqnr_db
from edgeslim.report.markdown import table_lines
from edgeslim.runtime.ort import input_feed
from edgeslim.runtime.probe import probe_session


@dataclass(frozen=True)
class TensorParity:
    tensor: str  # the float tensor's name (the QDQ graph quantizes NAME via NAME.q)
    producer: str  # op type and node name that makes it
    max_steps: int  # max |integer difference| between simulation and integer kernels
    mismatch_fraction: float  # share of elements that differ at all
    beyond_tolerance: float  # share of elements that differ by more than the tolerance
    sqnr_db: float | None  # dequantized vs the float model's tensor (None without a float model)


@dataclass(frozen=True)
class ParityReport:
    tensors: list[TensorParity]
    tolerance: int
    max_mismatch: float

    @property
    def first_divergent(self) -> TensorParity | None:
        return next((t for t in self.tensors
                     if t.beyond_tolerance > self.max_mismatch), None)

    def to_markdown(self) -> str:
        first = self.first_divergent
        head = ("integer kernels match the simulation everywhere (within "
                f"{self.tolerance} step on all but {self.max_mismatch:.0%} of elements)" if first is None else
                f"first divergence: `{first.tensor}` from {first.producer} ({first.max_steps} steps)")
        cells = [[t.tensor, t.producer, str(t.max_steps), f"{t.mismatch_fraction:.2%}",
                  "–" if t.sqnr_db is None else f"{t.sqnr_db:.1f}"] for t in self.tensors]
        lines = ["# Quantization parity, layer by layer", "", head, "",
                 *table_lines(["tensor", "produced by", "max int diff", "mismatching", "SQNR vs float (dB)"], cells)]
        return "\n".join(lines) + "\n"


def compare_layers(qdq: onnx.ModelProto, inputs, fp32: onnx.ModelProto | None = None, tolerance: int = 1,
                   max_mismatch: float = 0.01) -> ParityReport:
    """Layer-by-layer parity of ``qdq`` on ``inputs`` (an array or tuple of arrays); see the module doc."""
    quant = [n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.output[0].endswith(".q")]
    names = [n.output[0] for n in quant]
    base = [name[: -len(".q")] for name in names]
    producers = {o: f"{n.op_type} {n.name}" for n in qdq.graph.node for o in n.output}
    sim, _ = probe_session(qdq, names, threads=1)
    fused, _ = probe_session(qdq, names, threads=1, optimization="all")
    a = sim.run(names, input_feed(sim, inputs))
    b = fused.run(names, input_feed(fused, inputs))
    float_values = {}
    if fp32 is not None:
        fp_names = {o for n in fp32.graph.node for o in n.output} | {i.name for i in fp32.graph.input}
        wanted = [n for n in base if n in fp_names]
        fs, _ = probe_session(fp32, wanted, threads=1)
        float_values = dict(zip(wanted, fs.run(wanted, input_feed(fs, inputs))))
    zp_scale = {n.output[0]: (n.input[1], n.input[2]) for n in quant}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qdq.graph.initializer}
    rows = []
    for name, t, x, y in zip(names, base, a, b):
        diff = np.abs(x.astype(np.int64) - y.astype(np.int64))
        sq = None
        if t in float_values:
            s_name, z_name = zp_scale[name]
            deq = (x.astype(np.float64) - inits[z_name].astype(np.float64)) * inits[s_name].astype(np.float64)
            sq = sqnr_db(float_values[t], deq)
        source = producers.get(t + ".f", producers.get(t, "graph input"))
        rows.append(TensorParity(t, source, int(diff.max()) if diff.size else 0,
                                 float((diff > 0).mean()) if diff.size else 0.0,
                                 float((diff > tolerance).mean()) if diff.size else 0.0, sq))
    return ParityReport(rows, tolerance, max_mismatch)
