"""Linear-layer QAT (module wrapping): models fx cannot take (two inputs), parity with ORT, the
float residual, output distillation without labels, and its errors."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.errors import ConfigError, ModelError
from edgeslim.evaluate.metrics import cosine
from edgeslim.qat import QATConfig, qat_int8
from edgeslim.quantize import PTQInt8Config, quantize_static
from edgeslim.runtime import make_session, run
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune

T, D = 12, 32


class MaskedBlock(nn.Module):
    """(tokens, mask) -> LayerNorm -> q/k/v -> masked attention -> out + residual -> mean pool.

    Two inputs and a residual that reads the LayerNorm output the q/k/v layers quantize."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(D)
        self.q, self.k, self.v, self.out = (nn.Linear(D, D) for _ in range(4))
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / D**0.5 + (1.0 - mask[:, None, :]) * -1e4
        h = h + self.out(torch.softmax(scores, dim=-1) @ self.v(h))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, T, D)).astype(np.float32)
    mask = (np.arange(T)[None, :] < rng.integers(3, T + 1, n)[:, None]).astype(np.float32)
    return x, mask


@pytest.fixture(scope="module")
def fidelity_task() -> Task:
    model = MaskedBlock().eval()
    (x, m), (xe, me) = _data(96, 0), _data(64, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(xe), torch.from_numpy(me)).numpy()
    return Task(model, (torch.from_numpy(x[:1]), torch.from_numpy(m[:1])), calibration=((x, m), None),
                evaluation=((xe, me), ref), metric=cosine, metric_name="cosine")


def _cos(graph, task: Task) -> float:
    out = run(make_session(graph), task.evaluation[0])[0]
    return cosine(torch.from_numpy(out), torch.from_numpy(task.evaluation[1]))


def test_linear_qat_trains_a_two_input_model_and_deploys_what_it_simulated(fidelity_task):
    config = QATConfig(op_types=("MatMul",),
                       fine_tune=FineTune(epochs=3, lr=1e-3, batch_size=16, progress=False), calibration_samples=96)
    art = qat_int8(ModelArtifact(fidelity_task.model), config, fidelity_task)
    notes = art.notes
    assert notes["qat_data"] == "calibration" and notes["qat_layers"] == 4  # q, k, v, out (the 2-D head is a Gemm)
    assert notes["parity_min_cosine"] > 0.9999 and notes["parity_max_abs_diff"] < 1e-3
    ops = [n.op_type for n in art.onnx.graph.node]
    assert ops.count("QuantizeLinear") == 2  # one per distinct Linear input: LayerNorm output, attention context
    # the residual Add reads the float LayerNorm output, not the quantized one
    ln_out = next(n for n in art.onnx.graph.node if n.op_type == "LayerNormalization").output[0]
    assert any(n.op_type == "Add" and ln_out in n.input for n in art.onnx.graph.node)
    assert _cos(art.onnx, fidelity_task) > 0.999


def test_linear_qat_layers_must_be_linear_and_need_data_with_labels():
    with pytest.raises(ConfigError, match="op_types: QAT of Linear layers supports MatMul only, got 'Gemm'"):
        QATConfig(op_types=("Gemm",))
    with pytest.raises(ConfigError, match="per_token: needs op_types"):
        QATConfig(per_token=("fc",))

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten(1)

    x = np.random.default_rng(0).normal(size=(8, 1, 6, 6)).astype(np.float32)
    y = np.zeros(8, dtype=np.int64)
    labelled = Task(Conv().eval(), (torch.from_numpy(x[:1]),), calibration=(x, y), evaluation=(x, y))
    with pytest.raises(ConfigError, match="QAT needs training data"):
        qat_int8(ModelArtifact(labelled.model), QATConfig(op_types=("MatMul",),
                                                          fine_tune=FineTune(progress=False)), labelled)
    unlabelled = Task(Conv().eval(), (torch.from_numpy(x[:1]),), calibration=(x, None), evaluation=(x, y))
    with pytest.raises(ModelError, match="no MatMul layer"):
        qat_int8(ModelArtifact(unlabelled.model), QATConfig(op_types=("MatMul",),
                                                            fine_tune=FineTune(progress=False)), unlabelled)


def test_linear_qat_with_labels_uses_cross_entropy_on_train(fidelity_task):
    (x, m), _ = fidelity_task.calibration
    with torch.no_grad():
        y = fidelity_task.model(torch.from_numpy(x), torch.from_numpy(m)).argmax(1).numpy()
    task = Task(fidelity_task.model, fidelity_task.example_inputs, calibration=((x, m), None),
                evaluation=((x, m), y), train=((x, m), y))
    art = qat_int8(ModelArtifact(task.model), QATConfig(op_types=("MatMul",),
                                                        fine_tune=FineTune(epochs=2, lr=1e-3, batch_size=16,
                                                                           progress=False)), task)
    assert art.notes["qat_data"] == "train"
    ptq = quantize_static(task.export(task.model), [(x, m)], PTQInt8Config(progress=False, op_types=("MatMul",)))
    acc = lambda g: float((run(make_session(g), (x, m))[0].argmax(1) == y).mean())  # noqa: E731
    assert acc(art.onnx) >= 0.9 and acc(ptq) >= 0.9
