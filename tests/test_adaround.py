"""AdaRound: learned rounding stays within one step of nearest, lowers every layer's reconstruction
error and the output error of the integer-kernel graph, and is deterministic."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from conftest import small_cnn
from edgeslim.data import load_digits
from edgeslim.errors import ConfigError, DataError
from edgeslim.quantize import fold_batchnorm, lower_qdq, plan_quantization
from edgeslim.quantize import adaround as ada
from edgeslim.quantize.adaround import adaround_weight_params
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.lower import quantize_weight, weight_axis
from edgeslim.runtime import export_onnx, inspect_optimized
from edgeslim.train import train


def session(model: onnx.ModelProto, outputs=(), level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - got)))


@pytest.fixture(scope="module")
def setup():
    digits = load_digits()
    model = train(small_cnn(), digits.x_train, digits.y_train, epochs=3, progress=False)
    fp32 = export_onnx(model, (torch.from_numpy(digits.x_test[:1]),))
    folded = fold_batchnorm(fp32)
    plan = plan_quantization(folded)
    calib = np.random.default_rng(0).random((256, 1, 8, 8), dtype=np.float32)
    batches = [calib[i : i + 64] for i in range(0, len(calib), 64)]
    ranges = collect_ranges(folded, plan.calibrated, batches, progress=False, observer_options={"dtype": "uint8"})

    def lower(weight_params):
        return lower_qdq(folded, plan, ranges, activation_dtype="uint8", weight_params=weight_params)

    stats: dict = {}
    params = adaround_weight_params(folded, plan, lower, batches, progress=False, stats=stats)
    return folded, plan, lower, batches, calib, params, stats


def test_learned_rounding_is_floor_or_ceil_in_int8_range(setup):
    folded, plan, _, _, _, params, _ = setup
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    nodes = [folded.graph.node[i] for i in plan.weighted]
    assert sorted(params) == sorted(n.name for n in nodes) and len(nodes) == 3
    changed = 0
    for node in nodes:
        q, scale = params[node.name]
        w = inits[node.input[1]]
        nearest, ref_scale = quantize_weight(w, weight_axis(node))
        assert q.dtype == np.int8 and q.shape == w.shape
        np.testing.assert_array_equal(scale, ref_scale)  # scales stay fixed
        assert q.min() >= -127 and q.max() <= 127
        assert np.abs(q.astype(np.int32) - nearest.astype(np.int32)).max() <= 1
        changed += int((q != nearest).sum())
    assert changed > 0  # some weights were rounded the other way


def test_every_layer_reconstructs_better_than_nearest(setup):
    """||f(W x) - f(W̃ x̃)||² over all positions, x̃ read from the AdaRound QDQ simulation."""
    folded, plan, lower, _, calib, params, stats = setup
    nodes = [folded.graph.node[i] for i in plan.weighted]
    qdq = lower(params)
    qnodes = {n.name: n for n in qdq.graph.node}
    x_q = session(qdq, [qnodes[n.name].input[0] for n in nodes], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    x_q = dict(zip([o.name for o in x_q.get_outputs()], x_q.run(None, {x_q.get_inputs()[0].name: calib})))
    fp = session(folded, [n.output[0] for n in nodes], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fp = dict(zip([o.name for o in fp.get_outputs()], fp.run(None, {fp.get_inputs()[0].name: calib})))
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    ratios = []
    for node, act in zip(nodes, (F.relu, F.relu, lambda t: t)):  # conv-relu, conv-relu, linear
        x = torch.from_numpy(x_q[qnodes[node.name].input[0]])
        target = act(torch.from_numpy(fp[node.output[0]]))
        bias = torch.from_numpy(inits[node.input[2]])
        w_ada = torch.from_numpy(params[node.name][0].astype(np.float32))
        q_near, scale = quantize_weight(inits[node.input[1]], weight_axis(node))
        errors = []
        for q in (w_ada, torch.from_numpy(q_near.astype(np.float32))):
            s = torch.from_numpy(scale).reshape(-1, *[1] * (q.ndim - 1))
            out = F.conv2d(x, q * s, bias, padding=1) if node.op_type == "Conv" else F.linear(x, q * s, bias)
            errors.append(float(((act(out) - target) ** 2).sum(1).mean()))
        ratios.append(errors[0] / errors[1])
        assert stats[node.name][1] <= stats[node.name][0]
    print("layer MSE ratio adaround/nearest", ratios)
    assert all(r <= 1.0 for r in ratios), ratios
    assert min(ratios) < 0.9, ratios  # and clearly better somewhere


def test_integer_graph_output_sqnr_not_worse(setup):
    folded, _, lower, _, calib, params, _ = setup
    fp = session(folded)
    ref = fp.run(None, {fp.get_inputs()[0].name: calib})[0]
    results = []
    for weights in ({}, params):
        qdq = lower(weights)
        assert inspect_optimized(qdq).int8_op_fraction == 1.0
        sess = session(qdq)
        results.append(sqnr_db(ref, sess.run(None, {sess.get_inputs()[0].name: calib})[0]))
    near, learned = results
    print("SQNR nearest, adaround", results)
    assert near > 30.0
    assert learned >= near, results


def test_same_seed_same_weights(setup):
    folded, plan, lower, batches, _, params, _ = setup
    again = adaround_weight_params(folded, plan, lower, batches, progress=False, iterations=500, seed=0)
    for name, (q, s) in params.items():
        np.testing.assert_array_equal(again[name][0], q)
        np.testing.assert_array_equal(again[name][1], s)


def test_per_tensor_scales(setup):
    folded, plan, _, batches, _, _, _ = setup
    ranges = collect_ranges(folded, plan.calibrated, batches, progress=False, observer_options={"dtype": "uint8"})

    def lower(weight_params):
        return lower_qdq(folded, plan, ranges, activation_dtype="uint8", per_channel=False, weight_params=weight_params)

    params = adaround_weight_params(folded, plan, lower, batches, iterations=50, per_channel=False, progress=False)
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    for node in (folded.graph.node[i] for i in plan.weighted):
        q, scale = params[node.name]
        nearest, ref_scale = quantize_weight(inits[node.input[1]], None)
        assert scale.ndim == 0 and scale == ref_scale
        assert np.abs(q.astype(np.int32) - nearest).max() <= 1
    assert inspect_optimized(lower(params)).int8_op_fraction == 1.0


def test_bad_arguments_raise_one_line_errors(setup):
    folded, plan, lower, batches, _, _, _ = setup
    with pytest.raises(ConfigError, match="iterations"):
        adaround_weight_params(folded, plan, lower, batches, iterations=0, progress=False)
    with pytest.raises(ConfigError, match="reg_weight"):
        adaround_weight_params(folded, plan, lower, batches, reg_weight=-1.0, progress=False)
    with pytest.raises(DataError, match="calibration"):
        adaround_weight_params(folded, plan, lower, [], progress=False)


def _check_rows_reproduce_outputs(model: onnx.ModelProto, x: np.ndarray) -> None:
    """The matrix form (sampled input rows · W) gives exactly the node outputs ORT computes."""
    plan = plan_quantization(model)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = [model.graph.node[i] for i in plan.weighted]
    names = [t for n in nodes for t in (n.input[0], n.output[0])]
    sess = session(model, names, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    assert nodes
    for node in nodes:
        layer = ada._layer(model, node, inits, True, None)
        xin, y = outs[node.input[0]], outs[node.output[0]]
        pick = np.arange(ada._positions(layer, y))
        rows = torch.from_numpy(ada._rows(layer, xin, pick))
        got = ada._forward(layer, rows, torch.from_numpy(layer.wm)).numpy()
        if layer.clamp is None:
            np.testing.assert_allclose(got, ada._targets(layer, y, pick), rtol=1e-4, atol=1e-4)
        q = layer.to_onnx(np.round(layer.wm / layer.scale_matrix()))  # back to the ONNX layout
        np.testing.assert_array_equal(q, quantize_weight(layer.w, weight_axis(node))[0])


def test_conv_geometry_strides_groups_dilation_1d():
    torch.manual_seed(0)
    net2d = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
        nn.Conv2d(8, 6, (2, 3), stride=(1, 2), padding=(0, 1)), nn.Flatten(), nn.Linear(6 * 5 * 3, 5),
    ).eval()
    x = torch.rand(3, 4, 11, 9)
    _check_rows_reproduce_outputs(export_onnx(net2d, (x,)), x.numpy())
    net1d = nn.Sequential(nn.Conv1d(3, 5, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(5 * 6, 4)).eval()
    x1 = torch.rand(2, 3, 12)
    _check_rows_reproduce_outputs(export_onnx(net1d, (x1,)), x1.numpy())


def test_gemm_without_transb_and_matmul_on_3d_input():
    rng = np.random.default_rng(0)
    w_gemm = rng.standard_normal((6, 4)).astype(np.float32)  # (K, N): transB = 0, channel axis 1
    w_mm = rng.standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape2"], ["x2"], name="r0"),
         helper.make_node("Gemm", ["x2", "wg", "bg"], ["g"], name="gemm"),
         helper.make_node("Reshape", ["g", "shape3"], ["g3"], name="r1"),
         helper.make_node("MatMul", ["g3", "wm"], ["y"], name="mm")],
        "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w_gemm, "wg"),
         numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bg"),
         numpy_helper.from_array(w_mm, "wm"), numpy_helper.from_array(np.array([-1, 6]), "shape2"),
         numpy_helper.from_array(np.array([-1, 5, 4]), "shape3")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _check_rows_reproduce_outputs(model, rng.standard_normal((2, 5, 6)).astype(np.float32))


@pytest.mark.parametrize("auto_pad,kernel", [("SAME_UPPER", 3), ("SAME_LOWER", 2)])
def test_conv_auto_pad(auto_pad, kernel):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 2, kernel, kernel)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", auto_pad=auto_pad, strides=[2, 2])],
        "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 7, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    _check_rows_reproduce_outputs(model, rng.standard_normal((2, 2, 7, 8)).astype(np.float32))
