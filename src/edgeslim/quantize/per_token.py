"""Per-token dynamic int8 for chosen Linear layers: one activation scale per row, computed per call.

Why: some layers see a few *tokens* whose activations are orders of magnitude larger than the
rest (BERT's FFN-down input after GELU on [CLS]/[SEP]/punctuation: the "massive activations" of
Sun et al. 2024). One scale per tensor, static or dynamic, spends the int8 grid on those rows and
rounds every other token coarsely; SmoothQuant moves *channel* outliers, not token ones.
Measured on all-MiniLM-L6-v2 (seq 128): with the six FFN-down projections per-token and the
rest static SmoothQuant int8, mean/min cosine to fp32 go from 0.9961/0.976 to 0.9985/0.991 at
~0.5-0.7 ms extra per call of ~10 (benchmarks/quant_vs_peers.py).

Lowered form, per layer (standard ONNX ops only; weights symmetric int8 per output column)::

    x2 = Reshape(x, [-1, K])                       rows = tokens
    s  = Max(ReduceMax(Abs(x2), axis 1) / 127, eps)   one scale per row
    xq = QuantizeLinear(x2, s, zp, axis=0)          per-axis along the rows
    y  = Reshape(Cast(MatMulInteger(xq, Wq, zp)) * (s[:, None] * w_scale[None, :]), [..., N]) (+ bias)

ORT 1.32 fuses ``MatMulInteger -> Cast -> Mul(s[:, None] * w_scale)`` into one
``MatMulIntegerToFloat`` with a per-row A scale, and computes it right; but when it also fuses a
following bias Add into that kernel, it multiplies the bias by the per-row scale too (measured:
MiniLM's cosine falls from 0.9987 to 0.96). The Reshape back to the input's rank stands between
the rescale and the bias Add, which keeps the bias out of the fused kernel. A reshape-free form
(scale by ``ReduceMax(keepdims)``, bias added with ``Sum``) saved ~2% of MiniLM's time at 25
tokens, not worth depending on which ops that fusion matches.
On x86 activations are uint8 with the zero point fixed at 128 (``MatMulInteger`` in ORT accepts
only a scalar A zero point, and U8S8 is MLAS's fast path), i.e. symmetric int8 stored offset by
128; elsewhere int8 with zero point 0.
"""

from __future__ import annotations

import fnmatch
from typing import Collection

import numpy as np
import onnx
from onnx import TensorProto

from edgeslim.errors import ConfigError
from edgeslim.quantize.lower import layer_name, quantize_weight
from edgeslim.runtime.graph_edit import NodeEditor, find_linear_sites, replace_nodes

__all__ = ["lower_per_token", "match_layers"]

_EPS = 1e-8  # an all-zero row gets a tiny scale instead of a division by zero


def match_layers(names: Collection[str], patterns: Collection[str], field: str = "per_token") -> set[str]:
    """The layer names matched by ``patterns`` (exact names or fnmatch globs such as ``*.output.dense``).

    A pattern that matches no layer is a ConfigError naming it and some of the candidates: a typo
    must not silently leave a layer on the per-tensor path."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"{field}: {pattern!r} matches no quantizable layer (layers: {shown or 'none'})")
        chosen |= hits
    return chosen


def lower_per_token(model: onnx.ModelProto, layers: Collection[str], activation_dtype: str = "uint8") -> onnx.ModelProto:
    """A copy of ``model`` whose float MatMul/Gemm layers named in ``layers`` run per-token dynamic int8.

    ``layers`` are layer names as :func:`edgeslim.quantize.lower.layer_name` gives them (the torch
    module path); every one must be a float Linear-like node of the graph (ConfigError otherwise).
    ``activation_dtype`` is "uint8" (zero point 128) or "int8" (zero point 0)."""
    if activation_dtype not in ("uint8", "int8"):
        raise ConfigError(f"activation_dtype: per-token quantization needs uint8 or int8, got {activation_dtype!r}")
    sites = {s.index: s for s in find_linear_sites(model) if layer_name(s.node) in layers}
    missing = set(layers) - {layer_name(s.node) for s in sites.values()}
    if missing:
        raise ConfigError(f"per_token: layer {sorted(missing)[0]!r} is not a float MatMul/Gemm with a constant weight "
                          "in the graph")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ConfigError(f"per_token: needs ONNX opset >= 13 (per-axis QuantizeLinear), the graph has opset {opset}")
    zp_dtype = np.uint8 if activation_dtype == "uint8" else np.int8
    zp_value = 128 if activation_dtype == "uint8" else 0

    def replace(index: int, node: onnx.NodeProto, edit: NodeEditor) -> bool:
        site = sites.get(index)
        if site is None:
            return False
        fresh, const = edit.fresh, edit.const
        base = layer_name(node)
        k, n = site.weight.shape
        w_q, w_scale = quantize_weight(site.weight, axis=1)
        t = {key: fresh(f"{base}/pt_{key}") for key in
             ("shape", "x2", "abs", "amax", "s0", "s", "s_shape", "zp", "xq", "acc", "acc_f", "s_col", "scale",
              "y2", "lead", "out_shape", "y")}

        def op(op_type: str, inputs: list[str], output: str, **attrs) -> None:
            edit.add(op_type, inputs, [t[output]], f"{base}/pt_{op_type}", **attrs)

        x = node.input[0]
        op("Shape", [x], "shape")
        op("Reshape", [x, const(f"{base}/pt_rows", np.array([-1, k], np.int64))], "x2")
        op("Abs", [t["x2"]], "abs")
        if opset >= 18:
            op("ReduceMax", [t["abs"], const(f"{base}/pt_axis", np.array([1], np.int64))], "amax", keepdims=0)
        else:
            op("ReduceMax", [t["abs"]], "amax", axes=[1], keepdims=0)
        op("Mul", [t["amax"], const(f"{base}/pt_inv127", np.array(1 / 127, np.float32))], "s0")
        op("Max", [t["s0"], const(f"{base}/pt_eps", np.array(_EPS, np.float32))], "s")
        # Per-axis QuantizeLinear wants a zero point shaped like the scale: (rows,), known at run time.
        op("Shape", [t["s"]], "s_shape")
        op("Expand", [const(f"{base}/pt_zp", np.array(zp_value, zp_dtype)), t["s_shape"]], "zp")
        op("QuantizeLinear", [t["x2"], t["s"], t["zp"]], "xq", axis=0)
        op("MatMulInteger", [t["xq"], const(f"{base}/W_int8", w_q), const(f"{base}/pt_azp", np.array(zp_value, zp_dtype))],
           "acc")
        op("Cast", [t["acc"]], "acc_f", to=TensorProto.FLOAT)
        op("Unsqueeze", [t["s"], const(f"{base}/pt_axis1", np.array([1], np.int64))], "s_col")
        op("Mul", [t["s_col"], const(f"{base}/W_scale", w_scale.reshape(1, n).astype(np.float32))], "scale")
        op("Mul", [t["acc_f"], t["scale"]], "y2")
        op("Slice", [t["shape"], const(f"{base}/pt_start", np.array([0], np.int64)),
                     const(f"{base}/pt_end", np.array([-1], np.int64))], "lead")
        op("Concat", [t["lead"], const(f"{base}/pt_n", np.array([n], np.int64))], "out_shape", axis=0)
        y = node.output[0]
        if site.bias is None:
            edit.add("Reshape", [t["y2"], t["out_shape"]], [y], f"{base}/pt_Reshape")
        else:
            op("Reshape", [t["y2"], t["out_shape"]], "y")
            edit.add("Add", [t["y"], const(f"{base}/bias", site.bias)], [y], f"{base}/pt_Bias")
        return True

    return replace_nodes(model, replace)
