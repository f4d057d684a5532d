"""Dynamic int8 quantization of Linear layers (MatMul / Gemm): int8 weights, activations quantized at run time.

No calibration: each activation's uint8 scale and zero point are computed per call from its
actual min/max (ONNX ``DynamicQuantizeLinear``), so the method suits models whose activation
ranges vary with the input (transformers, RNN-like MLPs), at the cost of one extra pass over
each activation.

Lowered form. We emit standard ONNX ops, per Linear layer::

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zp)
    MatMulInteger(x_q, W_q int8 [K, N], x_zp) -> Cast(float) -> Mul(Mul(x_scale, w_scale)) [-> Add(bias)]

and let ORT's optimizer fuse it: ``MatMulIntegerToFloatFusion`` (onnxruntime/core/optimizer/
matmul_integer_to_float.cc) turns MatMulInteger -> Cast -> Mul, with the scales' Mul on the
other side and an optional constant 1-D bias Add, into ``com.microsoft::MatMulIntegerToFloat``;
``DynamicQuantizeMatMulFusion`` (dynamic_quantize_matmul_fusion.cc) then folds a
DynamicQuantizeLinear whose three outputs feed only that node into
``com.microsoft::DynamicQuantizeMatMul``. A DynamicQuantizeLinear shared by several layers
(q/k/v projections of one input) stays separate and those layers run as MatMulIntegerToFloat:
the input is quantized once. Why not emit the contrib ops directly: the standard form is a
valid ONNX graph any runtime (and ``onnx.checker``) accepts, and ORT 1.32 reaches the same fused
kernels from it (checked with ``inspect_optimized``; identical to what ORT's own
``quantize_dynamic`` produces for these layers). The scale Mul must read ``(x_scale, w_scale)``
in that order: the fusion takes its inputs 0 and 1 as A's and B's scale.

MatMuls between two activations (attention scores q @ k^T, attn @ v) stay in float by
default, as in ORT's ``quantize_dynamic``: quantizing both sides costs two extra quantize passes
and blocks ORT's Transpose/scale -> FusedMatMul fusion, and measured on a q/k/v/o block
(d=256, seq=128, 1 thread) it was slower (0.250 vs 0.211 ms) and less accurate (38.9 vs
41.2 dB SQNR). ``activation_matmuls=True`` quantizes them too (all compute on integer kernels).

Weights are symmetric int8 in [-127, 127] (zero point 0, so MatMulInteger's b_zero_point is
omitted), per output column or per tensor. Activations are uint8 (DynamicQuantizeLinear's only
output type), i.e. the U8S8 kernels; on x86 CPUs without VNNI, MLAS's U8S8 path can saturate
int16 intermediates (ORT's quantize_dynamic offers 7-bit reduce_range for such CPUs).

Transformers: ``smoothquant_alpha`` first migrates activation channel outliers into the weights
(SmoothQuant, quantize/equalize.py; needs calibration inputs for the channel maxima), and
``per_token`` layers get one scale per token instead of one per tensor (quantize/per_token.py;
BERT's FFN-down, whose outliers are tokens). On all-MiniLM-L6-v2 at real sentence lengths (SST-2
dev, median 24 tokens, 1 thread) this pair takes dynamic int8 from cosine 0.9923 to 0.9988 to
fp32 and runs ~10% faster than ORT's quantize_dynamic (the smoothed LayerNorm copies also keep
ORT from fusing SkipLayerNormalization, whose CPU kernel is slower than Add + LayerNormalization
in ORT 1.32); static int8 with the same choices is no faster at these lengths, as its separate
bias Adds and QuantizeLinear kernels cost what static scales save (benchmarks/quant_vs_peers.py).

The technique (``DynamicInt8Config``, the registered ``dynamic_int8``) is in dynamic_technique.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection, Iterable

import onnx
from onnx import TensorProto

from edgeslim.errors import ConfigError, ModelError
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.quantize.equalize import smooth_quant
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.quantize.lower import layer_name, quantize_weight
from edgeslim.quantize.per_token import lower_per_token, match_layers
from edgeslim.runtime.graph_edit import NodeEditor, check_exclude, find_linear_sites, node_label, replace_nodes

if TYPE_CHECKING:
    from edgeslim.quantize.dynamic_technique import DynamicInt8Config

SUPPORTED_OPS = ("MatMul", "Gemm")


def _dynamic_matmul_sites(graph: onnx.GraphProto, ops: Collection[str], exclude: Collection[str],
                          taken: set[int]) -> list[int]:
    """MatMuls with two run-time inputs (e.g. attention q @ k^T), for ``activation_matmuls``."""
    inits = {i.name for i in graph.initializer}
    return [i for i, n in enumerate(graph.node)
            if "MatMul" in ops and n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and i not in taken
            and node_label(n, i) not in exclude and len(n.input) == 2
            and n.input[0] not in inits and n.input[1] not in inits]


def quantize_dynamic_graph(model: onnx.ModelProto, config: DynamicInt8Config | None = None,
                           batches: Iterable | None = None) -> onnx.ModelProto:
    """A copy of float ``model`` with its MatMul/Gemm layers on dynamic int8 (see the module docstring);
    ``config`` None is ``DynamicInt8Config()``. ``batches`` (inputs of the graph) are needed only
    for ``config.smoothquant_alpha``: SmoothQuant's activation channel maxima.

    Raises ConfigError when ``config.exclude`` names an unknown node, a ``per_token`` pattern
    matches no layer, or SmoothQuant has no batches; ModelError when the graph's opset predates
    DynamicQuantizeLinear (11).
    """
    if config is None:
        from edgeslim.quantize.dynamic_technique import DynamicInt8Config  # it imports this module

        config = DynamicInt8Config()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise ModelError(f"dynamic int8 needs ONNX opset >= 11 (DynamicQuantizeLinear), the graph has opset {opset}")
    check_exclude(model.graph, config.exclude, config.ops)
    if config.smoothquant_alpha is not None:
        batches = list(batches or [])
        if not batches:
            raise ConfigError("smoothquant_alpha: SmoothQuant needs calibration inputs (batches) for the activation "
                              "channel maxima")
        model = smooth_quant(fold_batchnorm(model), batches, config.smoothquant_alpha, progress=False)[0]
    sites = {s.index: s for s in find_linear_sites(model, config.ops, config.exclude)}
    per_token: set[str] = set()
    if config.per_token:  # those layers leave the per-tensor path and are lowered per token at the end
        per_token = match_layers([layer_name(s.node) for s in sites.values()], config.per_token)
        sites = {i: s for i, s in sites.items() if layer_name(s.node) not in per_token}
    act_act = set()
    if config.activation_matmuls:
        act_act = set(_dynamic_matmul_sites(model.graph, config.ops, config.exclude, set(sites)))

    quantized: dict[str, tuple[str, str, str]] = {}  # float tensor -> its (q, scale, zero point)

    def quantize_input(tensor: str, edit: NodeEditor) -> tuple[str, str, str]:
        # One DynamicQuantizeLinear per tensor, shared by all its quantized consumers (q/k/v).
        if tensor not in quantized:
            q, s, z = edit.fresh(f"{tensor}/q"), edit.fresh(f"{tensor}/scale"), edit.fresh(f"{tensor}/zp")
            edit.add("DynamicQuantizeLinear", [tensor], [q, s, z], f"{tensor}/DynamicQuantize")
            quantized[tensor] = (q, s, z)
        return quantized[tensor]

    def replace(index: int, node: onnx.NodeProto, edit: NodeEditor) -> bool:
        if index not in sites and index not in act_act:
            return False
        fresh, const = edit.fresh, edit.const
        base = node_label(node, index)
        x_q, x_s, x_z = quantize_input(node.input[0], edit)
        if index in sites:
            site = sites[index]
            w_q, w_scale = quantize_weight(site.weight, axis=1 if config.per_channel else None)
            mm_inputs = [x_q, const(f"{base}/W_int8", w_q), x_z]
            scale_inputs = [x_s, const(f"{base}/W_scale", w_scale)]
            bias = site.bias
        else:
            b_q, b_s, b_z = quantize_input(node.input[1], edit)
            mm_inputs, scale_inputs, bias = [x_q, b_q, x_z, b_z], [x_s, b_s], None
        acc, acc_f, scale = fresh(f"{base}/acc_int32"), fresh(f"{base}/acc_float"), fresh(f"{base}/scale")
        y = node.output[0]
        y_mul = fresh(f"{base}/scaled") if bias is not None else y
        edit.add("MatMulInteger", mm_inputs, [acc], f"{base}/MatMulInteger")
        edit.add("Cast", [acc], [acc_f], f"{base}/Cast", to=TensorProto.FLOAT)
        edit.add("Mul", scale_inputs, [scale], f"{base}/ScaleProduct")
        edit.add("Mul", [acc_f, scale], [y_mul], f"{base}/Rescale")
        if bias is not None:
            edit.add("Add", [y_mul, const(f"{base}/bias", bias)], [y], f"{base}/Bias")
        return True

    out = replace_nodes(model, replace)
    if per_token:
        out = lower_per_token(out, per_token, "uint8")  # uint8 like DynamicQuantizeLinear's outputs
    if config.embeddings:
        out = quantize_embeddings(out)
    return out
