"""Low-rank factorization: exact reconstructions, Eckart–Young, parameter counts, VBMF, errors, pipeline."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.errors import ConfigError
from edgeslim.lowrank import (
    LowRankConfig, apply_plan, energy_rank, evbmf, factorize_conv, factorize_conv_svd, factorize_linear,
    finish_rank, hosvd2, lowrank, plan_ranks, svd_factors, vbmf_rank,
)
from edgeslim.lowrank.rank import svd_params_rank, tucker2_params_ranks
from edgeslim.lowrank.svd import svd_params
from edgeslim.lowrank.tucker import tucker2_params
from edgeslim.runtime import export_onnx, make_session, op_histogram, run
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune

from conftest import small_cnn


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ SVD
def test_full_rank_svd_reconstructs_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12).double()
    x = torch.randn(7, 20, dtype=torch.float64)
    fact = factorize_linear(layer, 12)
    assert [type(m) for m in fact] == [nn.Linear, nn.Linear] and fact[0].bias is None
    torch.testing.assert_close(fact(x), layer(x), rtol=1e-10, atol=1e-10)


def test_truncation_error_is_the_discarded_energy():
    """Eckart–Young: ||W - W_r||_F² = sum of the discarded squared singular values, and sqrt(S) is split evenly."""
    torch.manual_seed(0)
    w = torch.randn(30, 50, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 7, 29):
        first, second = svd_factors(w, r)
        err = torch.linalg.matrix_norm(w - second @ first) ** 2
        assert float(err) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)
        # both factors carry sqrt(S): equal Frobenius norms (each = sqrt(sum s_i) over the kept i)
        assert float(first.norm()) == pytest.approx(float(second.norm()), rel=1e-9)
        assert float(first.norm() ** 2) == pytest.approx(float(s[:r].sum()), rel=1e-9)


def test_svd_of_a_strided_conv_at_full_rank_matches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    fact = factorize_conv_svd(conv, 8)  # full rank: min(8, 3*9)
    assert fact[0].kernel_size == (3, 3) and fact[1].kernel_size == (1, 1)
    torch.testing.assert_close(fact(x), conv(x), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------- Tucker-2
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_full_rank_tucker2_reconstructs_a_conv_with_bn(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2, bias=True, padding_mode=padding_mode)
    net = nn.Sequential(conv, nn.BatchNorm2d(10)).double().eval()
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64)
    ref = net(x)
    net[0] = factorize_conv(conv, (10, 6))
    first, middle, last = net[0]
    assert (first.kernel_size, middle.kernel_size, last.kernel_size) == ((1, 1), (3, 3), (1, 1))
    assert middle.stride == (2, 2) and middle.dilation == (2, 2) and last.bias is not None
    assert isinstance(net[1], nn.BatchNorm2d)  # the BN now follows the last 1x1
    torch.testing.assert_close(net(x), ref, rtol=1e-10, atol=1e-10)


def test_hosvd_factors_are_orthonormal_and_truncation_matches_projection():
    torch.manual_seed(0)
    k = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    core, u_out, u_in = hosvd2(k, (5, 4))
    assert core.shape == (5, 4, 3, 3) and u_out.shape == (12, 5) and u_in.shape == (8, 4)
    torch.testing.assert_close(u_out.T @ u_out, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(u_in.T @ u_in, torch.eye(4, dtype=torch.float64))
    approx = torch.einsum("rshw,or,is->oihw", core, u_out, u_in)
    # the approximation is K projected onto the two leading subspaces
    proj = torch.einsum("oihw,op,iq->pqhw", k, u_out @ u_out.T, u_in @ u_in.T)
    torch.testing.assert_close(approx, proj)
    assert float((k - approx).norm()) < float(k.norm())


def test_parameter_counts_are_exact():
    lin = factorize_linear(nn.Linear(100, 50), 10)
    assert _n_params(lin) == svd_params(50, 100, 10, True) == 10 * 150 + 50
    conv = factorize_conv(nn.Conv2d(32, 64, 3, bias=False), (16, 8))
    assert _n_params(conv) == tucker2_params(64, 32, 9, (16, 8), False) == 32 * 8 + 16 * 8 * 9 + 16 * 64
    plans = plan_ranks(small_cnn(), LowRankConfig(rank_by="fixed", rank=4, exclude=("0",),
                                                  fine_tune=FineTune(progress=False)))
    model = apply_plan(small_cnn(), plans)
    by = {p.name: p for p in plans}
    assert by["4"].params_after == _n_params(model[4]) == 8 * 4 + 4 * 4 * 9 + 4 * 16 + 16
    assert by["7"].params_after == _n_params(model[7]) == 4 * (256 + 10) + 10


# ---------------------------------------------------------------------------------------- ranks
def test_energy_rank_and_budgets():
    s = torch.tensor([3.0, 2.0, 1.0])  # cumulative energy 9/14, 13/14, 1
    assert [energy_rank(s, f) for f in (0.5, 9 / 14, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3]
    assert svd_params_rank(50, 100, 0.5) == 16  # floor(2500 / 150)
    for c_out, c_in, k, f in ((64, 32, 9, 0.25), (256, 256, 9, 0.1), (128, 64, 1, 0.5)):
        r_out, r_in = tucker2_params_ranks(c_out, c_in, k, f)
        assert tucker2_params(c_out, c_in, k, (r_out, r_in), False) <= f * c_out * c_in * k
        # tight: one more of each rank breaks the budget
        assert tucker2_params(c_out, c_in, k, (r_out + 2, r_in + 2), False) > f * c_out * c_in * k
    assert finish_rank(5, 64, round_to=8) == 8
    assert finish_rank(61, 64, round_to=8) == 64
    assert finish_rank(0, 64, min_rank=3) == 3


def test_tucker2_energy_ranks_are_the_cheapest_that_keep_the_energy():
    from edgeslim.lowrank.rank import tucker2_energy_ranks
    from edgeslim.lowrank.tucker import captured_energy

    torch.manual_seed(0)
    k = torch.randn(12, 8, 3, 3, dtype=torch.float64) * torch.linspace(2, 0.1, 12, dtype=torch.float64)[:, None, None, None]
    table = captured_energy(k)
    for fraction in (0.5, 0.8, 0.95):
        r_out, r_in = tucker2_energy_ranks(table, fraction, 9)
        core, u_out, u_in = hosvd2(k, (r_out, r_in))
        kept = float((torch.einsum("rshw,or,is->oihw", core, u_out, u_in) ** 2).sum() / (k**2).sum())
        assert kept == pytest.approx(table[r_out - 1, r_in - 1], rel=1e-9) and kept >= fraction
        cost = tucker2_params(12, 8, 9, (r_out, r_in), False)
        cheaper = [(a, b) for a in range(1, 13) for b in range(1, 9)
                   if table[a - 1, b - 1] >= fraction and tucker2_params(12, 8, 9, (a, b), False) < cost]
        assert cheaper == []


@pytest.mark.parametrize("shape,rank,sigma", [((60, 100), 5, 0.1), ((120, 40), 8, 0.5), ((64, 576), 12, 0.02)])
def test_vbmf_recovers_a_planted_rank_and_the_noise(shape, rank, sigma):
    g = torch.Generator().manual_seed(1)
    low = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, shape[1], generator=g, dtype=torch.float64)
    noisy = low + sigma * torch.randn(*shape, generator=g, dtype=torch.float64)
    assert vbmf_rank(noisy) == rank
    result = evbmf(torch.linalg.svdvals(noisy), shape)
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.1)
    assert vbmf_rank(sigma * torch.randn(*shape, generator=g, dtype=torch.float64)) == 0  # pure noise


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,field", [
    ({"energy": 0.0}, "energy:"), ({"energy": 1.5}, "energy:"), ({"params_fraction": 0.0}, "params_fraction:"),
    ({"params_fraction": 2.0}, "params_fraction:"), ({"rank_by": "fixed"}, "rank:"), ({"rank": 4}, "rank:"),
    ({"round_to": 0}, "round_to:"), ({"latency_energies": (0.5, 1.5)}, "latency_energies:"),
    ({"fine_tune": {"temperature": -1.0}}, "fine_tune.temperature:"), ({"fine_tune": {"epochs": -1}}, "fine_tune.epochs:"),
    ({"target_speedup": 0.0}, "target_speedup:"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}") as err:
        LowRankConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_recipe_form_errors_and_round_trip():
    with pytest.raises(ConfigError, match=r"^step\.energy: must be in \(0, 1\]"):
        LowRankConfig.from_dict({"energy": 1.2})
    cfg = LowRankConfig(rank_by="vbmf", layers=("features",), exclude=("features.0",), round_to=8)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data.pop("technique") == "lowrank" and LowRankConfig.from_dict(data) == cfg


def test_bad_layers_and_ranks_are_named(images):
    task = _task(images)
    cases = [
        (LowRankConfig(layers=("nope", "7"), fine_tune=FineTune(progress=False)), r"^layers: no module named 'nope'"),
        (LowRankConfig(exclude=("gone",), fine_tune=FineTune(progress=False)), r"^exclude: no module named 'gone'"),
        (LowRankConfig(layers=("2",), fine_tune=FineTune(progress=False)), r"^layers: '2' is a ReLU"),
        (LowRankConfig(rank_by="fixed", rank=11, layers=("7",),
                       fine_tune=FineTune(progress=False)), r"full rank 10 of layer '7'"),
        (LowRankConfig(rank_by="fixed", rank=2, fine_tune=FineTune(progress=False)), r"layer '0'.*Cin 1"),
        (LowRankConfig(energy=1.0, fine_tune=FineTune(progress=False)), r"^lowrank: no layer would shrink"),
        (LowRankConfig(fine_tune=FineTune(epochs=1, progress=False)), r"^fine_tune.epochs: .*training data"),
    ]
    no_train = Task(task.model, task.example_inputs, task.calibration, task.evaluation)
    for config, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            lowrank(ModelArtifact(task.model), config, no_train if config.fine_tune.epochs else task)
        assert "\n" not in str(err.value)


def test_layers_that_cannot_shrink_or_are_grouped_are_kept_with_a_reason():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    plans = {p.name: p for p in plan_ranks(model, LowRankConfig(energy=0.999, fine_tune=FineTune(progress=False)))}
    assert plans["0"].kind == "kept" and "not fewer than 80" in plans["0"].reason  # Cin = 1: R_in = 1, R_out = 8
    assert plans["1"].kind == "kept" and "groups=4" in plans["1"].reason
    assert plans["3"].kind == "kept" and plans["3"].ranks == (4,) and "needs 532 weights" in plans["3"].reason
    assert all(p.params_after == p.params_before for p in plans.values())
    plans = {p.name: p for p in plan_ranks(model, LowRankConfig(rank_by="fixed", rank=1, layers=("3",),
                                                                fine_tune=FineTune(progress=False)))}
    assert list(plans) == ["3"] and plans["3"].kind == "svd" and plans["3"].params_after == 128 + 4 + 4


def test_method_picks_the_factorization_per_layer_type():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 32)).eval()
    x = torch.randn(2, 16, 6, 6)
    fixed = {"rank_by": "fixed", "rank": 4, "fine_tune": FineTune(progress=False)}
    kinds = {m: [p.kind for p in plan_ranks(model, LowRankConfig(method=m, **fixed))] for m in ("auto", "svd", "tucker2")}
    assert kinds == {"auto": ["svd", "tucker2", "svd"], "svd": ["svd", "svd", "svd"],
                     "tucker2": ["tucker2", "tucker2", "kept"]}
    out = apply_plan(model, plan_ranks(model, LowRankConfig(method="svd", **fixed)))
    assert [m.kernel_size for m in out[1]] == [(3, 3), (1, 1)] and out[1][0].out_channels == 4
    assert out(x).shape == model(x).shape


# ---------------------------------------------------------------------------- ONNX and pipeline
def _task(images: np.ndarray, model: nn.Module | None = None, labels: np.ndarray | None = None) -> Task:
    labels = np.arange(len(images)) % 10 if labels is None else labels
    return Task(model or small_cnn(), (torch.from_numpy(images[:1]),), calibration=(images, labels),
                evaluation=(images, labels), train=(images, labels))


def test_exported_onnx_matches_torch(images):
    config = LowRankConfig(rank_by="fixed", rank=4, exclude=("0",), fine_tune=FineTune(progress=False))
    out = lowrank(ModelArtifact(small_cnn()), config, _task(images))
    graph = export_onnx(out.torch, (torch.from_numpy(images[:1]),))  # validates ORT vs torch itself
    x = images[:16]
    got = run(make_session(graph), x)[0]
    np.testing.assert_allclose(got, out.torch(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)
    ops = op_histogram(graph)
    assert ops["Conv"] == 1 + 3 and ops["Gemm"] + ops.get("MatMul", 0) == 2  # Tucker-2 conv, SVD'd Linear


def test_technique_in_the_pipeline_with_kd_fine_tune(tmp_path):
    """A model trained on a learnable toy task keeps its accuracy through factorize + KD fine-tune."""
    from edgeslim.pipeline import RuntimeConfig, compress
    from edgeslim.train import train

    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 8, 8), dtype=np.float32)
    y = np.arange(256) % 2
    x[y == 1, :, :4] += 0.3  # class 1: the top half is brighter
    model = train(small_cnn(), x, y, epochs=6, lr=3e-3, batch_size=32, progress=False)
    task = _task(x, model, y)
    config = LowRankConfig(rank_by="params", params_fraction=0.3,
                           fine_tune=FineTune(epochs=3, lr=1e-3, batch_size=32, progress=False))
    result = compress(task, [config], out_dir=tmp_path / "run",
                      runtime=RuntimeConfig(warmup=2, runs=10, rounds=2, measure_memory=False))
    base, low = (s.metrics for s in result.stages)
    assert base["accuracy"] > 0.95
    assert low["accuracy"] >= base["accuracy"] - 0.02
    assert low["params"] < base["params"]
    note = low["note_lowrank"]
    assert note["layers"]["7"]["kind"] == "svd" and note["params_after"] < note["params_before"]
    assert (tmp_path / "run" / "01_lowrank" / "model.onnx").is_file()


def test_latency_mode_picks_ranks_by_measured_speedup():
    """Planted rank-16 weights in a 512-wide MLP: factorizing buys a real, measured speedup."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    with torch.no_grad():
        for i in (0, 2):
            low = torch.randn(512, 16, generator=g) @ torch.randn(16, 512, generator=g) / 16
            model[i].weight.copy_(low + 1e-3 * torch.randn(512, 512, generator=g))
    x = torch.randn(32, 512, generator=g)
    task = Task(model, (x[:1],), calibration=(x, None), evaluation=(x, model(x).detach()))
    levels = {"rank_by": "latency", "latency_energies": (0.999, 0.9),  # two exports, not 13
              "fine_tune": FineTune(progress=False)}
    out = lowrank(ModelArtifact(model), LowRankConfig(target_speedup=1.5, **levels), task)
    note = out.notes["lowrank"]["latency"]
    assert note["measured_speedup"] >= 1.5 and note["energy"] == max(float(e) for e, v in note["speedups"].items()
                                                                     if v >= 1.5)
    assert all(v["kind"] == "svd" for v in out.notes["lowrank"]["layers"].values())
    with pytest.raises(ConfigError, match=r"^target_speedup: 1000.0x is out of reach \(best measured"):
        lowrank(ModelArtifact(model), LowRankConfig(target_speedup=1000.0, **{**levels, "latency_energies": (0.9,)}), task)
    with pytest.raises(ConfigError, match=r"^rank_by: 'latency'"):
        plan_ranks(model, LowRankConfig(rank_by="latency"))
