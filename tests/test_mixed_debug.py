"""Mixed precision meets a budget by returning the broken layer to float; parity names the layer."""

import json

import numpy as np
import pytest
import torch

from conftest import small_cnn
from edgeslim.data import load_digits
from edgeslim.errors import ConfigError
from edgeslim.pipeline import evaluate_onnx
from edgeslim.quantize import MixedPrecisionConfig, PTQInt8Config, mixed_precision, quantize_static
from edgeslim.quantize import mixed as mixed_mod
from edgeslim.quantize.debug import compare_layers
from edgeslim.quantize.fold import fold_batchnorm
from edgeslim.runtime import export_onnx, inspect_optimized
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import train


@pytest.fixture(scope="module")
def digits_task():
    split = load_digits()
    model = train(small_cnn(), split.x_train, split.y_train, epochs=4, lr=3e-3, progress=False)
    return Task(model, (torch.from_numpy(split.x_test[:1]),), calibration=(split.x_train[:256], split.y_train[:256]),
                evaluation=(split.x_test, split.y_test))


def _sabotage(model: torch.nn.Module) -> torch.nn.Module:
    """Kill conv2's channel 0 (bias -1000 before ReLU) and give the classifier huge weights on
    those always-zero features: the float model is unchanged, but int8 weights of the classifier
    (scale = 1000/127) round every real weight to zero."""
    model = __import__("copy").deepcopy(model)
    with torch.no_grad():
        model[4].bias[0] = -1000.0
        model[7].weight[:, 0:16] = 1000.0
    return model


def test_mixed_precision_keeps_only_the_broken_layer_in_float(digits_task):
    task = digits_task
    broken = _sabotage(task.model)
    task = Task(broken, task.example_inputs, task.calibration, task.evaluation)
    fp32 = evaluate_onnx(task.export(broken), task)
    full_int8 = quantize_static(task.export(broken), [task.calibration[0]], PTQInt8Config(progress=False))
    assert evaluate_onnx(full_int8, task) < fp32 - 0.3  # int8 everywhere collapses
    out = mixed_precision(ModelArtifact(broken), MixedPrecisionConfig(max_drop=0.01), task)
    assert out.notes["float_layers"] == ["7"]  # the classifier, nothing else
    assert out.notes["budget_met"] is True
    assert evaluate_onnx(out.onnx, task) >= fp32 - 0.01
    table = out.files["sensitivity.md"]
    assert table.count("| fp32 |") == 1 and table.count("| int8 |") == 2
    assert "| 7 | Gemm |" in table


def _count_evaluations(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = mixed_mod.Evaluator.outputs

    def counted(self, graph):
        calls.append(1)
        return real(self, graph)

    monkeypatch.setattr(mixed_mod.Evaluator, "outputs", counted)
    return calls


def test_mixed_precision_with_no_loss_returns_all_int8_without_a_scan(digits_task, monkeypatch):
    calls = _count_evaluations(monkeypatch)
    out = mixed_precision(ModelArtifact(digits_task.model), MixedPrecisionConfig(max_drop=0.05), digits_task)
    assert out.notes["float_layers"] == [] and out.notes["budget_met"]
    assert len(calls) == 2  # the float reference and the all-int8 model: no layer measured alone
    assert out.notes["layers_scanned"] == 0
    assert "no layer was scanned" in out.files["sensitivity.md"]
    assert json.loads(out.files["sensitivity.json"])["layers"] == []
    assert inspect_optimized(out.onnx).int8_op_fraction == 1.0  # every layer on integer kernels


def test_mixed_precision_scans_every_layer_when_int8_misses_the_budget(digits_task, monkeypatch):
    broken = _sabotage(digits_task.model)
    task = Task(broken, digits_task.example_inputs, digits_task.calibration, digits_task.evaluation)
    calls = _count_evaluations(monkeypatch)
    out = mixed_precision(ModelArtifact(broken), MixedPrecisionConfig(max_drop=0.02, progress=False), task)
    assert out.notes["layers_scanned"] == 3
    assert 2 + 3 <= len(calls) <= 2 + 3 + 2  # reference, all-int8, one per layer, log2(3) search steps


def test_hold_out_is_disjoint_seeded_and_never_the_evaluation_set(digits_task, monkeypatch):
    x = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)  # sample i holds the value i
    task = Task(torch.nn.Linear(4, 3), (torch.from_numpy(x[:1]),), calibration=(x, np.arange(100) % 3),
                evaluation=(x[:10] + 1000, np.zeros(10)))
    held = mixed_mod.hold_out(task, 20, 50, seed=0, batch_size=16)
    val = set(held.validation[:, 0].tolist())
    cal = set(np.concatenate(held.calibration)[:, 0].tolist())
    assert len(val) == 20 and len(cal) == 50 and not val & cal
    assert held.labels.tolist() == [int(v) % 3 for v in held.validation[:, 0]]  # labels follow their samples
    assert mixed_mod.hold_out(task, 20, 50, seed=0).validation.tolist() == held.validation.tolist()
    assert mixed_mod.hold_out(task, 20, 50, seed=1).validation.tolist() != held.validation.tolist()
    with pytest.raises(ConfigError, match="validation_samples: 100 would leave no calibration sample"):
        mixed_mod.hold_out(task, 100, 50, seed=0)

    # The technique measures its candidates on the held-out split only, never on evaluation samples.
    seen: list[np.ndarray] = []
    real = mixed_mod.Evaluator.__init__

    def spy(self, task, held, reference, batch_size=None):
        seen.append(held.validation)
        real(self, task, held, reference, batch_size)

    monkeypatch.setattr(mixed_mod.Evaluator, "__init__", spy)
    out = mixed_precision(ModelArtifact(digits_task.model), MixedPrecisionConfig(max_drop=0.05, validation_samples=40),
                          digits_task)
    rows = {r.tobytes() for r in seen[0]}
    assert len(rows) == 40 and out.notes["validation_samples"] == 40
    assert out.notes["calibration_samples"] == 256 - 40
    assert not rows & {r.tobytes() for r in digits_task.evaluation[0]}


def test_budget_finer_than_one_validation_sample_warns(digits_task, capsys):
    out = mixed_precision(ModelArtifact(digits_task.model),
                          MixedPrecisionConfig(max_drop=0.001, validation_samples=50), digits_task)
    warning = out.notes["warnings"][0]
    assert "max_drop 0.001 is below the resolution" in warning and "by 0.02" in warning  # 1 of 50 samples
    assert warning in out.files["sensitivity.md"]
    assert "max_drop 0.001 is below the resolution" in capsys.readouterr().err.replace("\n", " ")
    quiet = mixed_precision(ModelArtifact(digits_task.model),
                            MixedPrecisionConfig(max_drop=0.05, validation_samples=50), digits_task)
    assert quiet.notes["warnings"] == []


def test_parity_report_names_the_first_divergent_layer(cnn, images):
    fp32 = export_onnx(cnn, (torch.from_numpy(images[:1]),))
    q = quantize_static(fp32, [images], PTQInt8Config(progress=False))
    report = compare_layers(q, images[:8], fp32=fold_batchnorm(fp32))
    assert report.first_divergent is None
    assert all(t.sqnr_db is not None and t.sqnr_db > 25 for t in report.tensors)



def test_parity_names_the_first_tensor_that_differs():
    """ORT's requantization rounds differently from the float simulation in rare cases (1 step):
    with zero tolerance the report names the first such tensor; with the default (1 step, or
    on at most 1% of elements) propagated rounding is not mistaken for a divergent kernel."""
    from edgeslim.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    q = quantize_static(export_onnx(model, (torch.from_numpy(x[:1]),)), [x], PTQInt8Config(progress=False))
    strict = compare_layers(q, x[:8], tolerance=0, max_mismatch=0.0)
    assert strict.first_divergent is not None
    assert strict.tensors.index(strict.first_divergent) > 0  # the quantized input itself always agrees
    assert strict.first_divergent.max_steps == 1
    assert compare_layers(q, x[:8]).first_divergent is None
