"""Weight-only group-wise quantization (int2/int4/int8) of Linear layers, lowered to ``com.microsoft::MatMulNBits``.

Weights are stored as ``bits``-bit codes with one float scale (and, asymmetric, one zero point)
per group of ``group_size`` consecutive input features of each output column; activations stay
float. On 3x Linear 512x512 the file is 16% (int4, group 32) / 29% (int8) of fp32's, scales
and zero points included. It pays where weights dominate: big Linear layers, small batches.

Layout, from the MatMulNBits contrib-op schema shipped in onnxruntime 1.32
(``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``, mirrored in
docs/ContribOperators.md); the logical weight is ``W [K, N]`` of ``y = x @ W``:

- attributes ``K``, ``N``, ``bits``, ``block_size`` (a power of two >= 16);
- ``B``: uint8 ``[N, k_blocks, blob_size]``, ``k_blocks = ceil(K / block_size)``,
  ``blob_size = block_size * bits / 8``; row n holds column n of W (so W transposed), codes
  packed along K, low bits first (4-bit: element 2i in the low nibble of byte i);
- ``scales``: ``[N, k_blocks]`` in A's float type (older specs: flat ``[N * k_blocks]``; ORT
  1.32 accepts both, we write the 2-D form the current schema documents);
- ``zero_points`` (optional): uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed like B, each row
  padded to whole bytes; absent means ``2^(bits-1)`` (8 for 4-bit);
- decode: ``W[k, n] = (code - zero_point) * scale`` of k's block; ``bias`` (optional) ``[N]``.

ORT 1.32's CPU kernel accepts bits 2, 4 and 8 only (matmul_nbits.cc: "Only 2b, 4b and 8b
quantization is supported"), so other widths are rejected up front. A MatMul's following bias
Add is left in the graph: ORT's optimizer folds it into MatMulNBits' bias input itself.

``accuracy_level`` (the kernel attribute). 0 (default) leaves A in fp32, so ORT's result equals
``x @ dequantize(...)`` to float rounding (the tests hold it to 1e-4) and the method is truly
weight-only. 4 lets the kernel quantize A to int8 per block, W4A8/W8A8 arithmetic; measured on
3x Linear 512x512 (ORT 1.32, 1 thread, batch 1, p50): fp32 0.112 ms; int4 0.068 ms (level 0)
vs 0.022 ms (level 4) at 19.7 vs 19.6 dB SQNR; int8 0.89 ms (level 0: no fast fp32 path for
8-bit codes, slower than fp32) vs 0.023 ms (level 4) at 44.4 vs 39.8 dB; int2 2.3 vs 0.04 ms.

The technique (``WeightOnlyConfig``, the registered ``weight_only``) is in weight_only_technique.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from edgeslim.errors import ConfigError
from edgeslim.quantize.embedding import quantize_embeddings
from edgeslim.runtime.graph_edit import (
    LinearSite, NodeEditor, check_exclude, find_linear_sites, node_label, replace_nodes,
)
from edgeslim.task import Task

if TYPE_CHECKING:
    from edgeslim.quantize.weight_only_technique import WeightOnlyConfig

SUPPORTED_BITS = (2, 4, 8)  # what onnxruntime's CPU MatMulNBits kernel runs (1.32)
MS_DOMAIN = "com.microsoft"


@dataclass
class NBitsWeight:
    """The MatMulNBits tensors of one weight ``W [K, N]`` (see the module docstring for the layout)."""

    b: np.ndarray  # uint8 [N, k_blocks, blob_size]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None when symmetric
    bits: int
    block_size: int
    k: int
    n: int


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes along the last axis, low bits first; the axis is zero-padded to whole bytes."""
    per_byte = 8 // bits
    codes = np.asarray(codes, dtype=np.uint8)
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint8)], axis=-1)
    groups = codes.reshape(codes.shape[:-1] + (-1, per_byte)).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits)
    return (groups << shifts).sum(axis=-1).astype(np.uint8)  # disjoint bit fields: sum == or


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes along the last axis."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(packed.shape[:-1] + (-1,))[..., :count]


def quantize_groups(w: np.ndarray, bits: int, group_size: int, symmetric: bool, search: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Group-quantize ``w [K, N]`` along K: codes uint8 [N, k_blocks, group_size], scales [N, k_blocks], zero points.

    Asymmetric: each group's range [min, max] is widened to hold 0 (an integer zero point must
    exist), ``scale = range / (2^bits - 1)``. Symmetric: the group's largest-magnitude value m
    maps to code -2^(bits-1) with ``scale = m / -2^(bits-1)`` (scale negative when m > 0), so all
    2^bits codes are used; the zero point is the kernel's default 2^(bits-1) and is not stored.
    With ``search``, each group's range is also shrunk by factors down to 0.5 and the factor with
    the smallest squared rounding + clipping error is kept (outliers clipped to tighten the grid
    for the rest: the "clip search" of AWQ/RTN int4 recipes, on weights alone).
    """
    k, n = w.shape
    g = np.asarray(w, dtype=np.float64).T.reshape(n, k // group_size, group_size)
    factors = np.linspace(1.0, 0.5, 11) if search else np.ones(1)
    best = None
    for f in factors:
        codes, scales, zp = _quantize_groups_at(g, bits, symmetric, f)
        zp_f = float(1 << (bits - 1)) if zp is None else zp[..., None].astype(np.float64)
        decoded = (codes.astype(np.float64) - zp_f) * scales[..., None].astype(np.float64)
        err = ((decoded - g) ** 2).sum(axis=-1)  # [N, k_blocks]
        if best is None:
            best = [codes, scales, zp, err]
            continue
        better = err < best[3]  # per group
        best[0] = np.where(better[..., None], codes, best[0])
        best[1] = np.where(better, scales, best[1])
        if zp is not None:
            best[2] = np.where(better, zp, best[2])
        best[3] = np.minimum(err, best[3])
    return best[0], best[1], best[2]


def _quantize_groups_at(g: np.ndarray, bits: int, symmetric: bool, shrink: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One grid per group of ``g [N, k_blocks, group]``, its range scaled by ``shrink``."""
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        extreme = np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)[..., 0] * shrink
        scales = (extreme / -half).astype(np.float32)
        scales[scales == 0] = 1.0  # an all-zero group: any scale decodes it exactly
        q = np.clip(np.round(g / scales[..., None]), -half, half - 1) + half
        return q.astype(np.uint8), scales, None
    lo, hi = np.minimum(g.min(axis=-1), 0.0) * shrink, np.maximum(g.max(axis=-1), 0.0) * shrink
    scales = ((hi - lo) / qmax).astype(np.float32)
    scales[scales == 0] = 1.0
    zp = np.clip(np.round(-lo / scales), 0, qmax)
    q = np.clip(np.round(g / scales[..., None]) + zp[..., None], 0, qmax)
    return q.astype(np.uint8), scales, zp.astype(np.uint8)


def pack_weight(w: np.ndarray, bits: int, group_size: int, symmetric: bool, search: bool = False) -> NBitsWeight:
    """Quantize and pack ``w [K, N]`` (K divisible by ``group_size``) into MatMulNBits tensors."""
    k, n = w.shape
    codes, scales, zp = quantize_groups(w, bits, group_size, symmetric, search)
    packed_zp = None if zp is None else pack_bits(zp, bits)  # [N, ceil(k_blocks * bits / 8)]
    return NBitsWeight(pack_bits(codes, bits), scales, packed_zp, bits, group_size, k, n)


def dequantize(weight: NBitsWeight) -> np.ndarray:
    """Decode MatMulNBits tensors back to the float ``W [K, N]`` the kernel multiplies by (numpy reference)."""
    blocks = weight.b.shape[1]
    codes = unpack_bits(weight.b, weight.bits, weight.block_size).astype(np.float32)  # [N, blocks, block]
    if weight.zero_points is None:
        zp = np.full((weight.n, blocks), 1 << (weight.bits - 1), np.float32)
    else:
        zp = unpack_bits(weight.zero_points, weight.bits, blocks).astype(np.float32)
    w = (codes - zp[..., None]) * weight.scales.reshape(weight.n, blocks)[..., None]
    return np.ascontiguousarray(w.reshape(weight.n, -1)[:, : weight.k].T)


def check_group_size(sites: list[LinearSite], group_size: int) -> None:
    """ConfigError naming the first layer whose in-features (K) are not a multiple of ``group_size``."""
    for site in sites:
        k = site.weight.shape[0]
        if k % group_size:
            raise ConfigError(f"layer {node_label(site.node, site.index)!r} ({site.node.op_type}) has {k} in-features, "
                              f"not divisible by group_size {group_size}")


def quantize_weight_only_graph(model: onnx.ModelProto, config: WeightOnlyConfig | None = None) -> onnx.ModelProto:
    """A copy of float ``model`` with every MatMul/Gemm of constant weight replaced by MatMulNBits
    (``config`` None is ``WeightOnlyConfig()``).

    Gemm becomes MatMulNBits with its ``beta * C`` as the kernel's bias when C has N elements,
    else MatMulNBits followed by Add. Checks every layer before rewriting any.
    """
    if config is None:
        from edgeslim.quantize.weight_only_technique import WeightOnlyConfig  # it imports this module

        config = WeightOnlyConfig()
    check_exclude(model.graph, config.exclude, ("MatMul", "Gemm"))
    sites = find_linear_sites(model, ("MatMul", "Gemm"), config.exclude)
    check_group_size(sites, config.group_size)
    labels = {node_label(s.node, s.index) for s in sites}
    unknown = sorted(set(config.layer_bits) - labels)
    if unknown:
        shown = ", ".join(sorted(labels)[:8]) + (", ..." if len(labels) > 8 else "")
        raise ConfigError(f"layer_bits: no quantizable MatMul/Gemm named {unknown[0]!r} (candidates: {shown})")
    by_index = {s.index: s for s in sites}

    def replace(index: int, node: onnx.NodeProto, edit: NodeEditor) -> bool:
        site = by_index.get(index)
        if site is None:
            return False
        const = edit.const
        base = node_label(node, index)
        k, n = site.weight.shape
        bits = config.layer_bits.get(base, config.bits)
        packed = pack_weight(site.weight, bits, config.group_size, config.symmetric, config.scale_search)
        inputs = [node.input[0], const(f"{base}/B_q{bits}", packed.b), const(f"{base}/scales", packed.scales)]
        inputs.append("" if packed.zero_points is None else const(f"{base}/zero_points", packed.zero_points))
        extra_add = None
        if site.bias is not None and site.bias.size == n:
            inputs += ["", const(f"{base}/bias", site.bias.reshape(n))]  # slot 4 is the deprecated g_idx
        elif site.bias is not None:  # e.g. a [M, N] Gemm C: add it after the kernel
            extra_add = const(f"{base}/C", site.bias)
        while inputs[-1] == "":  # trailing empty optional inputs are dropped
            inputs.pop()
        y = node.output[0]
        y_mm = edit.fresh(f"{y}/nbits") if extra_add else y
        attrs = {"K": k, "N": n, "bits": bits, "block_size": config.group_size}
        if config.accuracy_level:
            attrs["accuracy_level"] = config.accuracy_level
        edit.add("MatMulNBits", inputs, [y_mm], f"{base}/MatMulNBits", domain=MS_DOMAIN, **attrs)
        if extra_add:
            edit.add("Add", [y_mm, extra_add], [y], f"{base}/Bias")
        return True

    out = replace_nodes(model, replace)
    if sites and not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if config.embeddings:
        out = quantize_embeddings(out)
    return out


def budgeted_bits(fp32: onnx.ModelProto, config: WeightOnlyConfig, task: Task
                   ) -> tuple[WeightOnlyConfig, dict[str, str | bytes]]:
    """Every layer at ``bits`` if that meets ``max_drop``; else per-layer sensitivity at ``bits``,
    then the fewest layers at ``high_bits`` that meet it. Measured on a validation split of the
    calibration set (:func:`edgeslim.quantize.mixed.hold_out`; weight-only calibrates nothing, so
    every sample it reads validates), never on the task's evaluation set."""
    from edgeslim.quantize.lower import layer_name
    from edgeslim.quantize.mixed import Evaluator, choose_layers, hold_out, sensitivity_files

    sites = find_linear_sites(fp32, ("MatMul", "Gemm"), config.exclude)
    names = [node_label(s.node, s.index) for s in sites if node_label(s.node, s.index) not in config.layer_bits]
    ev = Evaluator(task, hold_out(task, config.validation_samples, 0, config.seed), fp32)
    solo = replace(config, embeddings=False, max_drop=None)

    def graph_with(low: set[str]) -> onnx.ModelProto:
        """Layers in ``low`` at ``bits``, every other layer float (for the one-at-a-time sensitivity)."""
        others = [n for n in names if n not in low]
        return quantize_weight_only_graph(fp32, replace(solo, exclude=tuple(config.exclude) + tuple(others)))

    def mixed(high: set[str]) -> onnx.ModelProto:
        return quantize_weight_only_graph(fp32, replace(solo, layer_bits={**config.layer_bits,
                                                                          **{n: config.high_bits for n in high}}))

    low, high_name = f"int{config.bits}", f"int{config.high_bits}"
    choice = choose_layers(ev, [(n, "MatMulNBits") for n in names], mixed, lambda name: graph_with({name}),
                           config.max_drop, low, high_name, config.progress)
    modules = {node_label(s.node, s.index): layer_name(s.node) for s in sites}
    for row in choice.rows:
        row["module"] = modules[row["layer"]]  # the torch module, where the exporter recorded it
    files = sensitivity_files(choice, ev, config.max_drop,
                              f"{len(choice.raised)} of {len(names)} layers at {high_name}, the rest at {low}", low)
    return replace(config, max_drop=None,
                   layer_bits={**config.layer_bits, **{n: config.high_bits for n in choice.raised}}), files
