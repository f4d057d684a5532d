"""Per-token dynamic int8: exact lowering, the accuracy it buys on outlier tokens, config errors,
mixed precision raising a layer to per-token, and the denormal-flush switch of the timers."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.errors import ConfigError
from edgeslim.evaluate.metrics import cosine, sqnr_db
from edgeslim.quantize import (DynamicInt8Config, MixedPrecisionConfig, PTQInt8Config, mixed_precision,
                               quantize_dynamic_graph, quantize_static)
from edgeslim.quantize.per_token import lower_per_token, match_layers
from edgeslim.runtime import benchmark_latency, denormals_flushed, export_onnx, make_session, run
from edgeslim.task import ModelArtifact, Task

T, D, H = 16, 24, 48


class TokenMLP(nn.Module):
    """(B, T, D) -> fc1 -> ReLU -> fc2 -> (B, T*D). fc1 turns feature 0 into massive activations on
    8 hidden units, so the token that carries it dominates fc2's input range, while fc2 gives those
    units tiny weights: every token's output has the usual scale (BERT's FFN-down in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)
        with torch.no_grad():
            self.fc1.weight[:, 0] = 0.0
            self.fc1.weight[:8, 0] = 20.0
            self.fc2.weight[:, :8] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).flatten(1)


def _tokens(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, T, D)).astype(np.float32)
    x[..., 0] = 0.0
    x[np.arange(n), rng.integers(0, T, n), 0] = 30.0  # one outlier token per sample
    return x


@pytest.fixture(scope="module")
def token_task() -> Task:
    model = TokenMLP().eval()
    x_eval = _tokens(64, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_eval)).numpy()
    return Task(model, (torch.from_numpy(x_eval[:1]),), calibration=(_tokens(64, 0), None),
                evaluation=(x_eval, ref), metric=cosine, metric_name="cosine")


def _out(graph: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run(make_session(graph), x)[0]


def test_lowering_matches_a_numpy_simulation_of_per_token_int8(token_task):
    fp32 = token_task.export(token_task.model)
    graph = lower_per_token(fp32, {"fc2"})
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") == 1 and "MatMul" in ops  # fc2 integer, fc1 still float
    x = token_task.evaluation[0][:8]
    m = token_task.model
    with torch.no_grad():
        h = torch.relu(m.fc1(torch.from_numpy(x))).numpy().reshape(-1, H)
    w = m.fc2.weight.detach().numpy().T  # (K, N)
    w_scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127
    w_q = np.clip(np.round(w / w_scale), -127, 127)
    s = np.maximum(np.abs(h).max(axis=1).astype(np.float32) * np.float32(1 / 127), np.float32(1e-8))
    h_q = np.clip(np.round(h / s[:, None]), -128, 127)  # QuantizeLinear rounds half to even, like np.round
    expected = (h_q @ w_q) * s[:, None] * w_scale[None, :] + m.fc2.bias.detach().numpy()
    np.testing.assert_allclose(_out(graph, x), expected.reshape(8, -1), rtol=1e-4, atol=1e-4)


def test_per_token_beats_one_scale_per_tensor_on_outlier_tokens(token_task):
    fp32 = token_task.export(token_task.model)
    x, ref = token_task.evaluation
    calib = [token_task.calibration[0]]
    static = quantize_static(fp32, calib, PTQInt8Config(progress=False, op_types=("MatMul",)))
    dynamic = quantize_dynamic_graph(fp32, DynamicInt8Config())
    per_token = quantize_static(fp32, calib, PTQInt8Config(progress=False, op_types=("MatMul",), per_token=("fc*",)))
    ops = [n.op_type for n in per_token.graph.node]
    assert ops.count("MatMulInteger") == 2 and "DequantizeLinear" not in ops  # both layers per token
    db = {name: sqnr_db(ref, _out(g, x)) for name, g in (("static", static), ("dynamic", dynamic),
                                                          ("per_token", per_token))}
    assert db["per_token"] > db["static"] + 10 and db["per_token"] > db["dynamic"] + 10, db


def test_dynamic_int8_runs_named_layers_per_token(token_task):
    """Dynamic int8 with ``per_token``: fc2 (outlier tokens) on per-token scales, fc1 on one scale
    per call, far closer to fp32 than one scale per tensor; the technique calibrates SmoothQuant
    from the task's calibration set when asked."""
    fp32 = token_task.export(token_task.model)
    x, ref = token_task.evaluation
    mixed = quantize_dynamic_graph(fp32, DynamicInt8Config(per_token=("fc2",)))
    ops = [n.op_type for n in mixed.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulInteger") == 2 and "ReduceMax" in ops
    plain = quantize_dynamic_graph(fp32, DynamicInt8Config())
    assert sqnr_db(ref, _out(mixed, x)) > sqnr_db(ref, _out(plain, x)) + 10
    with pytest.raises(ConfigError, match="per_token: 'fc9' matches no quantizable layer"):
        quantize_dynamic_graph(fp32, DynamicInt8Config(per_token=("fc9",)))
    with pytest.raises(ConfigError, match="smoothquant_alpha: SmoothQuant needs calibration inputs"):
        quantize_dynamic_graph(fp32, DynamicInt8Config(smoothquant_alpha=0.5))
    from edgeslim.quantize.dynamic_technique import dynamic_int8

    config = DynamicInt8Config(per_token=("fc*",), smoothquant_alpha=0.5)
    out = dynamic_int8(ModelArtifact(token_task.model), config, token_task)  # calibrates SmoothQuant on the task
    direct = quantize_dynamic_graph(fp32, config, [token_task.calibration[0]])
    np.testing.assert_array_equal(_out(out.onnx, x), _out(direct, x))
    assert sqnr_db(ref, _out(out.onnx, x)) > sqnr_db(ref, _out(plain, x)) + 10


def test_per_token_names_unknown_layers_and_rejects_non_linear_ones(token_task):
    assert match_layers(["a.fc1", "a.fc2", "b.out"], ["*.fc?"]) == {"a.fc1", "a.fc2"}
    with pytest.raises(ConfigError, match="per_token: 'fc9' matches no quantizable layer"):
        match_layers(["fc1", "fc2"], ["fc9"])
    fp32 = token_task.export(token_task.model)
    with pytest.raises(ConfigError, match="per_token: 'fc9' matches no quantizable layer"):
        quantize_static(fp32, [token_task.calibration[0]], PTQInt8Config(progress=False, per_token=("fc9",)))
    with pytest.raises(ConfigError, match="layer 'conv' is not a float MatMul/Gemm"):
        lower_per_token(fp32, {"conv"})


def test_mixed_precision_raises_the_outlier_layer_to_per_token(token_task):
    fp32 = token_task.export(token_task.model)
    static = quantize_static(fp32, [token_task.calibration[0]], PTQInt8Config(progress=False, op_types=("MatMul",)))
    x, ref = token_task.evaluation
    static_cos = cosine(torch.from_numpy(_out(static, x)), torch.from_numpy(ref))
    assert static_cos < 0.9  # the budget below is out of static int8's reach
    out = mixed_precision(ModelArtifact(token_task.model),
                          MixedPrecisionConfig(max_drop=0.05, high="per_token",
                                               ptq=PTQInt8Config(progress=False, op_types=("MatMul",))), token_task)
    assert out.notes["per_token_layers"] == ["fc2"] and out.notes["budget_met"]
    ops = [n.op_type for n in out.onnx.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("MatMul") == 1  # fc2 per token, fc1 static QDQ:
    assert "DequantizeLinear" in ops
    assert cosine(torch.from_numpy(_out(out.onnx, x)), torch.from_numpy(ref)) >= 1 - 0.05
    assert "| fc2 | MatMul |" in out.files["sensitivity.md"] and "| per_token |" in out.files["sensitivity.md"]


def test_denormals_flushed_only_inside_the_block():
    tiny = torch.tensor([1e-39])  # a float32 denormal
    with denormals_flushed():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() > 0.0  # IEEE behaviour restored
    model = export_onnx(nn.Linear(4, 2).eval(), (torch.zeros(1, 4),))
    stats = benchmark_latency(model, np.zeros((1, 4), np.float32), warmup=1, runs=3, flush_denormals=True)
    assert stats.flush_denormals and stats.to_dict()["flush_denormals"] is True
