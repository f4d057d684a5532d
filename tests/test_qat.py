"""Quantization-aware training: the exported int8 graph computes exactly what the fake-quant model trained.

Parity tolerance: at most 1 output quantization step. Both sides use the same integer grids
(identical scales, zero points, int8 weights and int32 biases), so they can only differ where
float32 rounding differs: ORT requantizes int32 accumulators with a float32 multiplier
x_s * w_s / y_s, torch sums float products and divides by y_s; a value within ~1e-6 of a
rounding midpoint may land one step apart. In practice the outputs are bit-identical here.
"""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import small_cnn
from torch import nn

from edgeslim import registry
from edgeslim.data import load_digits
from edgeslim.errors import ConfigError, ModelError
from edgeslim.qat import QATConfig, qat_int8
from edgeslim.qat.traced import calibrate_qat, prepare_qat, quantization_aware_training, train_qat
from edgeslim.quantize import PTQInt8Config, ptq_int8
from edgeslim.runtime import inspect_optimized
from edgeslim.runtime.ort import make_session, run
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def make_task(model: nn.Module, d, n_train: int | None = None) -> Task:
    n = n_train or len(d.x_train)
    return Task(model, (torch.from_numpy(d.x_train[:1]),), calibration=(d.x_train[:256], d.y_train[:256]),
                evaluation=(d.x_test, d.y_test), train=(d.x_train[:n], d.y_train[:n]))


def ort_accuracy(graph, d) -> float:
    return float(np.mean(run(make_session(graph), d.x_test)[0].argmax(1) == d.y_test))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def cnn_runs(digits):
    """A small Conv-BN-ReLU-MaxPool-Conv-ReLU-Flatten-Linear trained 3 epochs, then PTQ and QAT."""
    model = train(small_cnn(), digits.x_train, digits.y_train, epochs=3, lr=3e-3, progress=False)
    task = make_task(model, digits)
    ptq = ptq_int8(ModelArtifact(model), PTQInt8Config(progress=False), task)
    qat_art, qat = quantization_aware_training(ModelArtifact(model), QATConfig(fine_tune=FineTune(progress=False)), task)
    return ptq, qat_art, qat


def check_parity(art, qat, x: np.ndarray) -> float:
    """ORT (ORT_ENABLE_ALL, integer kernels) vs the fake-quant torch model, in output steps."""
    got = run(make_session(art.onnx, optimization="all"), x)[0]
    ref = qat.simulate(x)
    step = qat.act_quants[art.onnx.graph.output[0].name].params()[0]
    steps = np.abs(got - ref) / step
    assert steps.max() <= 1.0 + 1e-4
    assert np.mean(steps < 1e-3) >= 0.99  # all but rare rounding-midpoint flips are bit-identical
    assert inspect_optimized(art.onnx).int8_op_fraction == 1.0
    return float(steps.max())


def test_cnn_parity_ort_matches_fake_quant(cnn_runs, digits):
    _, art, qat = cnn_runs
    check_parity(art, qat, digits.x_test)  # held out: never trained or calibrated on
    assert art.notes["qat_epochs"] == 2 and art.notes["parity_output_steps"] <= 1.0
    # BN is folded in the returned float model and no BatchNormalization reaches the graph
    assert not any(isinstance(m, nn.BatchNorm2d) for m in art.torch.modules())
    assert not any(n.op_type == "BatchNormalization" for n in art.onnx.graph.node)
    ops = {n.op_type for n in art.onnx.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops


def test_mlp_parity_ort_matches_fake_quant(digits):
    model = train(mlp(), digits.x_train, digits.y_train, epochs=2, lr=3e-3, progress=False)
    art, qat = quantization_aware_training(ModelArtifact(model), QATConfig(fine_tune=FineTune(epochs=1, progress=False)),
                                           make_task(model, digits, n_train=512))
    check_parity(art, qat, digits.x_test)
    assert len(qat.weighted) == 2 and len(qat.act_quants) == 3  # input, ReLU output, logits


def test_qat_holds_or_improves_ptq_accuracy(cnn_runs, digits):
    ptq, art, _ = cnn_runs
    acc_ptq, acc_qat = ort_accuracy(ptq.onnx, digits), ort_accuracy(art.onnx, digits)
    print(f"digits small CNN on ORT int8: PTQ {acc_ptq:.4f}, QAT {acc_qat:.4f}")
    assert acc_qat >= acc_ptq - 0.005
    assert acc_qat > 0.85


def snapshot(qat):
    return {
        "act": {k: q.params() for k, q in qat.act_quants.items()},
        "range": {k: (float(q.lo), float(q.hi)) for k, q in qat.act_quants.items()},
        "w": [layer.wq.scale.detach().clone() for layer in qat.weighted.values()],
        "bn": [layer.bn.running_mean.clone() for layer in qat.weighted.values() if layer.bn is not None],
    }


@pytest.fixture(scope="module")
def prepared(digits):
    model = small_cnn()
    task = make_task(model, digits, n_train=256)
    qat = prepare_qat(model, task, QATConfig())
    calibrate_qat(qat, [digits.x_train[:256]])
    return qat, task


@pytest.mark.parametrize("learn", [False, True])
def test_scales_observers_and_bn_freeze(prepared, learn):
    base, task = prepared
    qat = copy.deepcopy(base)
    for layer in qat.weighted.values():  # a copied QATModel keeps its own layers and quantizers
        assert layer.input_quant in qat.act_quants.values()
    for layer in qat.weighted.values():
        layer.wq.learn = learn
    config = QATConfig(fine_tune=FineTune(epochs=2, lr=1e-3, batch_size=64, progress=False), learn_scales=learn,
                       freeze_observers_epoch=1, freeze_bn_epoch=1)
    snaps = [snapshot(qat)]
    train_qat(qat, task.train, config, on_epoch_end=lambda epoch, q: snaps.append(snapshot(q)))
    calib, ep0, ep1 = snaps
    # epoch 0: EMA observers move the activation ranges, BN running statistics update
    assert calib["range"] != ep0["range"] and calib["act"] != ep0["act"]
    assert not torch.equal(calib["bn"][0], ep0["bn"][0])
    # epoch 1: observers and BN statistics frozen
    assert ep0["range"] == ep1["range"]
    assert torch.equal(ep0["bn"][0], ep1["bn"][0])
    if learn:  # LSQ keeps learning activation and weight step sizes
        changed = [k for k in ep0["act"] if ep0["act"][k][0] != ep1["act"][k][0]]
        assert len(changed) == len(ep0["act"])
        assert all(ep0["act"][k][1] == ep1["act"][k][1] for k in ep0["act"])  # zero points stay fixed
        assert not torch.equal(calib["w"][0], ep1["w"][0])
    else:
        assert ep0["act"] == ep1["act"]


def test_qat_without_training_data_is_a_config_error(digits):
    model = small_cnn()
    task = Task(model, (torch.from_numpy(digits.x_train[:1]),), calibration=(digits.x_train[:8], digits.y_train[:8]),
                evaluation=(digits.x_test[:8], digits.y_test[:8]))
    task.export = lambda module: pytest.fail("qat_int8 did work before checking for training data")
    with pytest.raises(ConfigError, match=r"^qat_int8: QAT needs training data \(task.train is empty\)$"):
        qat_int8(ModelArtifact(model), QATConfig(fine_tune=FineTune(progress=False)), task)


def test_untraceable_module_is_named(digits):
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow: torch.fx cannot trace it

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Gate()).eval()
    with pytest.raises(ModelError, match="module '2'"):
        prepare_qat(model, make_task(model, digits, n_train=8), QATConfig())


def test_config_round_trip_and_registration():
    config = QATConfig(fine_tune=FineTune(epochs=3, lr=5e-4, seed=7), learn_scales=False, freeze_observers_epoch=2,
                       activation_dtype="int8")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["technique"] == "qat_int8"
    assert QATConfig.from_dict({k: v for k, v in data.items() if k != "technique"}) == config
    assert registry.get("qat_int8").config_type is QATConfig


@pytest.mark.parametrize(
    "field, value",
    [("fine_tune.epochs", 0), ("fine_tune.lr", 0.0), ("fine_tune.lr", float("nan")), ("fine_tune.batch_size", 0),
     ("fine_tune.temperature", 4.0), ("freeze_observers_epoch", -1), ("freeze_bn_epoch", -2), ("calibration_samples", 0),
     ("learn_scales", "yes"), ("activation_dtype", "int4")],
)
def test_bad_values_name_the_field(field, value):
    outer, _, inner = field.partition(".")
    with pytest.raises(ConfigError, match=rf"^step\.{field}: "):
        QATConfig.from_dict({outer: {inner: value}} if inner else {field: value})


def test_qat_after_a_prune_step_keeps_the_zeros(digits):
    """A recipe chain prune -> QAT: QAT training must not regrow pruned weights, and the int8 graph
    ORT runs carries them as integer zeros."""
    import onnx
    from onnx import numpy_helper

    from edgeslim.prune.magnitude_technique import PruneMagnitudeConfig

    model = train(mlp(), digits.x_train, digits.y_train, epochs=15, lr=3e-3, progress=False)
    task = make_task(model, digits, n_train=512)
    prune = PruneMagnitudeConfig(sparsity=0.6, fine_tune=FineTune(progress=False))
    pruned = registry.get("prune_magnitude").fn(ModelArtifact(model), prune, task)
    zeros = {n: p == 0 for n, p in pruned.torch.named_parameters() if n.endswith("weight")}
    assert sum(int(z.sum()) for z in zeros.values()) >= 0.6 * (64 * 32 + 32 * 10) - 2
    art, qat = quantization_aware_training(pruned, QATConfig(fine_tune=FineTune(epochs=1, lr=1e-3, progress=False)), task)
    trained = dict(qat.source.named_parameters())
    for name, z in zeros.items():
        assert bool((trained[name][z] == 0).all()), name  # not one pruned weight regrew
    int8 = [numpy_helper.to_array(i) for i in art.onnx.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    weights = [w for w in int8 if w.ndim == 2]  # the two Linear weights (biases are int32)
    assert sum(w.size for w in weights) == 64 * 32 + 32 * 10
    assert sum(int((w == 0).sum()) for w in weights) >= sum(int(z.sum()) for z in zeros.values())
    from edgeslim.train import evaluate_accuracy

    assert ort_accuracy(art.onnx, digits) >= evaluate_accuracy(pruned.torch, digits.x_test, digits.y_test) - 0.03
