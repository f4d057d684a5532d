"""int8 PTQ lowering: the graph ORT builds from it runs on integer kernels and stays accurate."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeslim.errors import ConfigError, DataError
from edgeslim.quantize import PTQInt8Config, check_integer_parity, fold_batchnorm, quantize_static
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.lower import activation_params, plan_quantization, quantize_weight
from edgeslim.runtime import export_onnx, inspect_optimized


def run(model: onnx.ModelProto, x: np.ndarray, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - got)))


@pytest.fixture
def quantized(cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    q = quantize_static(fp32, [images[:32], images[32:]], PTQInt8Config(progress=False))
    return fp32, q


def test_optimized_graph_runs_integer_kernels(quantized, tmp_path):
    _, q = quantized
    report = inspect_optimized(q)
    assert report.int8_op_fraction == 1.0
    assert report.op_histogram.get("QLinearConv", 0) + report.op_histogram.get("com.microsoft:QLinearConv", 0) == 2
    assert any("QGemm" in op for op in report.op_histogram)
    assert report.fp_compute_nodes == []


def test_weights_are_int8_per_channel_and_bias_int32(quantized):
    _, q = quantized
    inits = {i.name: i for i in q.graph.initializer}
    assert not any(n.op_type == "BatchNormalization" for n in q.graph.node)
    dq_weights = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(".w_DQ")]
    assert len(dq_weights) == 3
    for node in dq_weights:
        assert inits[node.input[0]].data_type == TensorProto.INT8
        assert list(inits[node.input[1]].dims) in ([8], [16], [10])  # one scale per output channel
    biases = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith(".b_DQ")]
    assert len(biases) == 3 and all(inits[n.input[0]].data_type == TensorProto.INT32 for n in biases)
    # no float weight tensors remain
    assert all(i.data_type != TensorProto.FLOAT or len(i.dims) <= 1 for i in q.graph.initializer)


def test_quantized_outputs_track_float(quantized, cnn, images):
    fp32, q = quantized
    x = images[:16]
    ref = cnn(torch.from_numpy(x)).detach().numpy()
    got = run(q, x)
    assert sqnr_db(ref, got) > 25.0
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.9


def test_integer_kernels_match_qdq_simulation(quantized, images):
    _, q = quantized
    sim = run(q, images[:8], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fused = run(q, images[:8])
    span = sim.max() - sim.min()
    assert np.abs(sim - fused).max() <= 4 * span / 255
    assert check_integer_parity(q, images[:8]) >= 0.0


def test_uint8_activations_also_fuse(cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    q = quantize_static(fp32, [images], PTQInt8Config(activation_dtype="uint8", progress=False))
    assert inspect_optimized(q).int8_op_fraction == 1.0
    zps = [i for i in q.graph.initializer if i.name.endswith(".zp")]
    assert zps and all(i.data_type == TensorProto.UINT8 for i in zps)


def test_relu_outputs_get_zero_point_at_range_bottom():
    assert activation_params(0.0, 6.0, "int8") == (pytest.approx(6.0 / 255), -128)
    assert activation_params(0.0, 6.0, "uint8") == (pytest.approx(6.0 / 255), 0)
    scale, zp = activation_params(-1.0, 3.0, "int8")
    assert -128 < zp < 127 and scale == pytest.approx(4.0 / 255)
    # zero is exactly representable
    assert (0 - zp) * scale == 0.0 or abs(round(-zp) * scale + zp * scale) < 1e-9


def test_weight_rounding_error_is_at_most_half_a_step():
    w = np.random.default_rng(1).normal(size=(6, 3, 3, 3)).astype(np.float32)
    q, scale = quantize_weight(w, axis=0)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    err = np.abs(w - q * scale.reshape(-1, 1, 1, 1))
    assert np.all(err <= scale.reshape(-1, 1, 1, 1) / 2 + 1e-7)


def _conv_bn_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "B"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "g"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "var"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"], epsilon=1e-3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_batchnorm_keeps_outputs():
    model = _conv_bn_graph()
    folded = fold_batchnorm(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    x = np.random.default_rng(2).normal(size=(1, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run(folded, x), run(model, x), atol=1e-5)


def test_collect_ranges_sees_exact_min_max():
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    a = np.array([[-2.0, 0.5, 1.0]], np.float32)
    b = np.array([[3.0, -1.0, 0.25]], np.float32)
    ranges = collect_ranges(model, ["x", "y"], [a, b], progress=False)
    assert ranges == {"x": (-2.0, 3.0), "y": (0.0, 3.0)}
    with pytest.raises(DataError, match="calibration set is empty"):
        collect_ranges(model, ["x"], [], progress=False)


def test_plan_quantizes_after_relu_and_shares_maxpool_scale(cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    plan = plan_quantization(fold_batchnorm(fp32))
    producers = {o: n.op_type for n in fp32.graph.node for o in n.output}
    kinds = [producers.get(t, "input") for t in plan.tensors]
    assert "Conv" not in kinds  # conv outputs are quantized after their ReLU
    assert kinds.count("Relu") == 2
    pooled = [t for t in plan.tensors if producers.get(t) == "MaxPool"]
    assert pooled and all(producers[plan.same_as[t]] == "Relu" for t in pooled)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="calibration_samples"):
        PTQInt8Config(calibration_samples=0)
    with pytest.raises(ConfigError, match="activation_dtype"):
        PTQInt8Config.from_dict({"activation_dtype": "int4"}, "steps[0]")
    cfg = PTQInt8Config(activation_dtype="uint8")
    d = cfg.to_dict()
    assert d["technique"] == "ptq_int8"
    d.pop("technique")
    assert PTQInt8Config.from_dict(d) == cfg


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "vgg_small", "resnet20", "mobilenetv2_small"])
def test_every_reference_model_runs_fully_on_integer_kernels(name):
    """Residual adds and depthwise convs included: with the default (auto) activation type every
    Conv/Gemm of every reference model becomes an integer kernel in ORT's optimized graph."""
    from edgeslim.models import build_model

    torch.manual_seed(0)
    model = build_model(name).eval()
    for m in model.modules():  # trained-like BN statistics, so folded biases are non-zero
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    q = quantize_static(export_onnx(model, (torch.from_numpy(x[:1]),)), [x], PTQInt8Config(progress=False))
    report = inspect_optimized(q)
    assert report.int8_op_fraction == 1.0, report.fp_compute_nodes


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse", "kl"])
def test_every_observer_quantizes_accurately(observer, cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    q = quantize_static(fp32, [images[:32], images[32:]], PTQInt8Config(observer=observer, progress=False))
    ref = cnn(torch.from_numpy(images)).detach().numpy()
    # KL clips hardest (it trades outliers for resolution), hence the common 15 dB floor
    assert sqnr_db(ref, run(q, images)) > 15.0
    assert inspect_optimized(q).int8_op_fraction == 1.0


def test_bias_correction_removes_the_mean_output_shift(cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    ref = cnn(torch.from_numpy(images)).detach().numpy()
    shifts = {}
    for bc in (False, True):
        cfg = PTQInt8Config(weight_observer="mse", bias_correction=bc, progress=False)
        got = run(quantize_static(fp32, [images[:32], images[32:]], cfg), images)
        shifts[bc] = float(np.abs((got - ref).mean(axis=0)).mean())
    assert shifts[True] < shifts[False]


def test_observers_on_a_known_distribution():
    from edgeslim.quantize.observers import make_observer

    x = np.random.default_rng(0).normal(size=200_000).astype(np.float32)
    x[0] = 40.0  # one outlier
    ranges = {}
    for name in ("minmax", "percentile", "mse", "kl"):
        obs = make_observer(name, symmetric=True)
        for chunk in np.array_split(x, 7):  # histograms re-bin as the range grows
            obs.update(chunk)
        ranges[name] = obs.range()
    assert ranges["minmax"][1] == pytest.approx(40.0)
    for name in ("percentile", "kl"):  # both ignore the single outlier
        assert 2.0 < ranges[name][1] < 10.0, (name, ranges[name])
    # MSE weighs the outlier's clipping error against everyone's rounding error: it clips, partly
    assert 2.0 < ranges["mse"][1] < 39.0
    per_channel = make_observer("minmax", axis=1)
    per_channel.update(np.array([[1.0, -2.0], [3.0, 0.5]], np.float32))
    lo, hi = per_channel.range()
    assert lo.tolist() == [1.0, -2.0] and hi.tolist() == [3.0, 0.5]


def test_observer_values_are_what_the_recipe_spelling_means(cnn, images):
    from edgeslim.quantize.observers import KL, MSE, MinMax, MovingAverage, Percentile, observer_spec

    assert [observer_spec(n) for n in ("minmax", "moving_average", "mse", "kl")] == [MinMax(), MovingAverage(), MSE(), KL()]
    spelled = PTQInt8Config(observer="percentile", percentile=99.9, progress=False)
    given = PTQInt8Config(observer=Percentile(99.9), progress=False)
    assert spelled.activation_observer == Percentile(99.9) and given == spelled  # stored in the recipe spelling
    assert PTQInt8Config(percentile=99.9).activation_observer == MinMax()  # the percentile waits for its observer
    assert PTQInt8Config.from_dict({k: v for k, v in given.to_dict().items() if k != "technique"}) == given
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    a, b = (quantize_static(fp32, [images[:32], images[32:]], c) for c in (spelled, given))
    assert a.SerializeToString() == b.SerializeToString()
    x = np.random.default_rng(1).normal(size=(4, 1000)).astype(np.float32)
    for spec in (MinMax(), MovingAverage(), Percentile(99.0), MSE(), KL()):
        obs = spec.build(axis=None, dtype="uint8")
        obs.update(x)
        lo, hi = obs.range()
        assert lo < 0 < hi, spec
    with pytest.raises(ConfigError, match="percentile: given twice"):
        PTQInt8Config(observer=Percentile(99.9), percentile=99.0)
    with pytest.raises(ConfigError, match="percentile: must be in"):
        Percentile(20.0)


def test_embedding_rows_are_int8_and_decode_exactly():
    from edgeslim.quantize.embedding import quantize_embeddings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(200, 16), torch.nn.Flatten(), torch.nn.Linear(16 * 5, 3)).eval()
    ids = torch.randint(0, 200, (4, 5))
    fp32 = export_onnx(model, (ids,))
    q = quantize_embeddings(fp32)
    table = next(i for i in q.graph.initializer if i.name.endswith(".int8"))
    scale = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name.endswith(".row_scale")))
    assert table.data_type == TensorProto.INT8 and list(table.dims) == [200, 16]
    # ORT's output equals the float model evaluated on the dequantized table, exactly
    deq = numpy_helper.to_array(table).astype(np.float32) * scale
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(deq))
        ref = model(ids).numpy()
    got = run(q, ids.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # the table shrinks 4x, plus one float scale per row
    assert table.ByteSize() + scale.nbytes < 0.32 * 200 * 16 * 4


def test_adaround_through_the_ptq_config(cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    ref = cnn(torch.from_numpy(images)).detach().numpy()
    nearest = quantize_static(fp32, [images[:32], images[32:]], PTQInt8Config(progress=False))
    learned = quantize_static(fp32, [images[:32], images[32:]],
                              PTQInt8Config(adaround=True, adaround_iterations=200, progress=False))
    w = lambda g: [numpy_helper.to_array(i) for i in g.graph.initializer if i.name.endswith(".w_q")]  # noqa: E731
    changed = sum(int((a != b).sum()) for a, b in zip(w(nearest), w(learned)))
    assert changed > 0 and all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(w(nearest), w(learned)))
    assert inspect_optimized(learned).int8_op_fraction == 1.0
    assert sqnr_db(ref, run(learned, images)) > 25.0
    with pytest.raises(ConfigError, match="adaround_iterations"):
        PTQInt8Config(adaround=True, adaround_iterations=0)


def test_equalizations_through_the_ptq_config():
    """SmoothQuant and CLE are float rewrites: the quantized graph still runs fully on int8 kernels
    and tracks the float model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    x = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    x[:, 3] *= 30  # an outlier channel, what SmoothQuant is for
    fp32 = export_onnx(model, (torch.from_numpy(x[:1]),))
    ref = model(torch.from_numpy(x)).detach().numpy()
    smoothed = quantize_static(fp32, [x], PTQInt8Config(smoothquant_alpha=0.5, cross_layer_equalization=True, progress=False))
    assert sqnr_db(ref, run(smoothed, x)) > 25.0
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        PTQInt8Config(smoothquant_alpha=1.5)


class _TinyAttention(torch.nn.Module):
    """q/k/v projections and the two activation-by-activation products of attention."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, d)
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 4.0  # (B, S, S)
        return torch.softmax(scores, dim=-1) @ self.v(x)  # (B, S, d)


def test_transformer_setting_runs_every_matmul_on_integer_kernels():
    torch.manual_seed(0)
    model = _TinyAttention().eval()
    x = np.random.default_rng(0).normal(size=(8, 12, 16)).astype(np.float32)
    fp32 = export_onnx(model, (torch.from_numpy(x[:1]),))
    ref = model(torch.from_numpy(x)).detach().numpy()
    projections = quantize_static(fp32, [x], PTQInt8Config(op_types=("MatMul",), progress=False))
    everything = quantize_static(fp32, [x], PTQInt8Config(op_types=("MatMul",), activation_matmuls=True, progress=False))
    assert inspect_optimized(projections).int8_op_fraction < 1.0  # the two products stay float
    assert inspect_optimized(everything).int8_op_fraction == 1.0
    assert sqnr_db(ref, run(everything, x)) > 20.0
