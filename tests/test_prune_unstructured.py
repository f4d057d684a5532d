"""Unstructured and N:M pruning: exact counts, schedules, the exact sparse file, the technique, sensitivity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import small_cnn
from torch import nn

from edgeslim.errors import CheckpointError, ConfigError
from edgeslim.pipeline import RuntimeConfig, compress
from edgeslim.prune import (
    PruneMagnitudeConfig,
    apply_masks,
    cubic_sparsity,
    iterative_prune,
    layer_sparsity,
    magnitude_masks,
    mask_keeper,
    nm_masks,
    sparsity_of,
)
from edgeslim.prune.magnitude_technique import prune_magnitude
from edgeslim.prune.schedule import GradualPruner
from edgeslim.prune.sensitivity import (
    Sensitivity,
    analyze,
    plot_sensitivity,
    select_ratios,
    task_evaluator,
    write_table,
)
from edgeslim.prune.sparse import (
    decode_relative,
    decode_sparse,
    encode_relative,
    encode_sparse,
    load_sparse,
    save_sparse,
)
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune, train


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def _digits_like(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy set: the label is the brightest of 10 fixed pixel blocks (1x8x8 images)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.random((n, 1, 8, 8), dtype=np.float32) * 0.3
    for i, label in enumerate(y):
        x[i, 0, label % 8, (label // 8) * 4 : (label // 8) * 4 + 4] += 1.0
    return x, y.astype(np.int64)


# ------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layer_masks_hit_the_sparsity_exactly(sparsity):
    model = small_cnn()
    masks = magnitude_masks(model, sparsity)
    params = dict(model.named_parameters())
    assert sorted(masks) == ["0.weight", "4.weight", "7.weight"]  # convs and linear; no BN, no bias
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(sparsity * mask.numel())
        pruned, kept = params[name].abs()[~mask], params[name].abs()[mask]
        if pruned.numel() and kept.numel():
            assert pruned.max() <= kept.min()  # the smallest magnitudes go


def test_global_masks_rank_magnitudes_across_layers():
    model = _mlp()
    with torch.no_grad():
        model[1].weight.add_(model[1].weight.sign())  # |w| > 1 > every other |w|: global pruning spares it
    masks = magnitude_masks(model, 0.2, scope="global")  # 544 of 2720: fewer than the other layers' 672
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.2 * total)
    assert int((~masks["1.weight"]).sum()) == 0
    scores = torch.cat([p.abs().reshape(-1) for n, p in model.named_parameters() if n in masks])
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    assert scores[~kept].max() <= scores[kept].min()


def test_overrides_and_exclude_are_per_layer():
    model = _mlp()
    masks = magnitude_masks(model, 0.5, scope="global", overrides={"5": 0.2}, exclude=("1",))
    assert "1.weight" not in masks
    assert int((~masks["5.weight"]).sum()) == round(0.2 * 160)
    assert int((~masks["3.weight"]).sum()) == round(0.5 * 512)  # alone in the global pool


def test_nm_masks_keep_n_largest_of_every_group_of_m():
    model = small_cnn()
    masks = nm_masks(model, 2, 4)
    assert "0.weight" not in masks  # 1 input channel: not a multiple of 4, skipped
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        w = params[name].detach().abs().movedim(1, -1).reshape(-1, 4)
        g = mask.movedim(1, -1).reshape(-1, 4)
        assert bool((g.sum(1) == 2).all())
        assert bool((w[g].reshape(-1, 2).min(1).values >= w[~g].reshape(-1, 2).max(1).values).all())
    with pytest.raises(ConfigError, match="0.weight"):
        nm_masks(model, 2, 4, layers=["0"])


def test_unknown_layer_names_are_config_errors_naming_them():
    with pytest.raises(ConfigError, match="'nope'"):
        magnitude_masks(_mlp(), 0.5, exclude=("nope",))
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_masks(_mlp(), 1.0)


def test_masks_survive_fine_tuning():
    x, y = _digits_like(128)
    model = _mlp()
    masks = magnitude_masks(model, 0.8)
    apply_masks(model, masks)
    train(model, x, y, epochs=2, lr=1e-2, batch_size=32, progress=False, after_step=mask_keeper(masks))
    for name, p in model.named_parameters():
        if name in masks:
            assert bool((p[~masks[name]] == 0).all())
            assert int((p[masks[name]] != 0).sum()) == int(masks[name].sum())  # the kept ones trained
    assert sparsity_of(model) == pytest.approx(0.8, abs=1e-3)


# --------------------------------------------------------------------------------- schedules
def test_cubic_schedule_values():
    # Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with s_i=0, s_f=0.8, t0=10, n=4, dt=5
    assert cubic_sparsity(10, 0.0, 0.8, 10, 4, 5) == 0.0
    assert cubic_sparsity(20, 0.0, 0.8, 10, 4, 5) == pytest.approx(0.8 - 0.8 * 0.5**3)  # mid: 0.7
    assert cubic_sparsity(30, 0.0, 0.8, 10, 4, 5) == pytest.approx(0.8)
    assert cubic_sparsity(99, 0.0, 0.8, 10, 4, 5) == pytest.approx(0.8)  # held after the end
    assert cubic_sparsity(0, 0.1, 0.8, 10, 4, 5) == pytest.approx(0.1)  # before t0


def test_gradual_pruner_reaches_the_final_sparsity_during_training():
    x, y = _digits_like(128)
    model = _mlp()
    seen = []

    def mask_fn(m, ramp):
        seen.append(ramp)
        return magnitude_masks(m, 0.75 * ramp)

    pruner = GradualPruner.over(mask_fn, total_steps=2 * 4, n=3)  # 128/32 = 4 steps per epoch
    train(model, x, y, epochs=2, lr=1e-2, batch_size=32, progress=False, after_step=pruner)
    pruner.finish(model)
    assert pruner.updates == 3 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert seen[0] == pytest.approx(1 - (1 - 1 / 3) ** 3)
    assert sparsity_of(model) == pytest.approx(0.75, abs=1e-3)


def test_iterative_prune_reaches_the_final_sparsity_and_retrains():
    x, y = _digits_like(128)
    model = _mlp()
    rounds = []

    def retrain(m, keep):
        rounds.append(sparsity_of(m))
        return train(m, x, y, epochs=1, lr=1e-2, batch_size=32, progress=False, after_step=keep)

    masks = iterative_prune(model, lambda m, r: magnitude_masks(m, 0.9 * r), 3, retrain)
    assert rounds == sorted(rounds) and rounds[-1] == pytest.approx(0.9, abs=1e-3) and len(rounds) == 3
    assert sparsity_of(model) == pytest.approx(0.9, abs=1e-3)
    assert all(bool((p[~masks[n]] == 0).all()) for n, p in model.named_parameters() if n in masks)


# ------------------------------------------------------------------------------- sparse file
def test_relative_index_fillers_bridge_long_gaps():
    mask = np.zeros(40, dtype=bool)
    mask[[0, 3, 30]] = True  # gap 27 with 3-bit codes (largest gap 8): fillers at 11, 19, 27
    rel = encode_relative(mask, 3)
    assert rel.positions.tolist() == [0, 3, 11, 19, 27, 30]
    assert rel.filler.tolist() == [False, False, True, True, True, False]
    assert rel.gaps.max() <= 8 and decode_relative(rel.gaps).tolist() == rel.positions.tolist()


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_sparse_file_round_trips_bit_identically(bits, tmp_path):
    g = torch.Generator().manual_seed(bits)
    state = {
        "sparse": torch.randn(64, 50, generator=g) * (torch.rand(64, 50, generator=g) < 0.05),
        "very_sparse": torch.zeros(300, 300).index_put_((torch.tensor([7, 299]), torch.tensor([0, 299])),
                                                        torch.tensor([1.5, -2.0])),
        "empty": torch.zeros(8, 8),
        "dense": torch.randn(16, 9, generator=g),
        "bias": torch.randn(64, generator=g),
        "signed_zero": torch.tensor([[-0.0, 0.0], [1.0, float("nan")]]),
        "half": (torch.randn(32, 32, generator=g) * (torch.rand(32, 32, generator=g) < 0.1)).half(),
        "steps": torch.tensor(5),
    }
    size = save_sparse(state, tmp_path / "w.sparse", index_bits=bits)
    back = load_sparse(tmp_path / "w.sparse")
    assert size == (tmp_path / "w.sparse").stat().st_size and list(back) == list(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert back[k].reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), k
    header = json.loads((tmp_path / "w.sparse").read_bytes()[16:16 + int.from_bytes(
        (tmp_path / "w.sparse").read_bytes()[12:16], "little")])
    layouts = {t["name"]: t["layout"] for t in header["tensors"]}
    assert layouts["sparse"] == layouts["very_sparse"] == layouts["empty"] == "sparse"
    assert layouts["dense"] == layouts["bias"] == "dense"


def test_sparse_file_is_far_smaller_than_dense_at_90_percent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    apply_masks(model, magnitude_masks(model, 0.9))
    dense = sum(t.numel() * 4 for t in model.state_dict().values())
    data = encode_sparse(model, index_bits=5)
    assert len(data) < 0.15 * dense  # 10% of values at 4 B + 5-bit gaps (+ few fillers) + the header
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), decode_sparse(data).values()))


def test_a_corrupt_sparse_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.sparse"
    path.write_bytes(b"ESSPARSE" + b"\x01\x00\x00\x00" + b"\xff\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="bad.sparse"):
        load_sparse(path)


# -------------------------------------------------------------------------------- technique
@pytest.mark.parametrize("kwargs, field", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"overrides": {"1": 1.5}}, "overrides.1"),
    ({"m": 4, "n": 4}, "n"), ({"schedule": "gradual"}, "fine_tune.epochs"), ({"index_bits": 0}, "index_bits"),
    ({"fine_tune": {"augment_shift": -1}}, "fine_tune.augment_shift"), ({"final_epochs": -1}, "final_epochs"),
    ({"final_epochs": 2}, "final_epochs"), ({"fine_tune": {"epochs": 1}, "final_lr": 0.0}, "final_lr"),
])
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        PruneMagnitudeConfig(**kwargs)


def _task(train_data: bool = True) -> Task:
    x, y = _digits_like(128)
    return Task(_mlp(), (torch.from_numpy(x[:1]),), calibration=(x, y), evaluation=(x, y),
                train=(x, y) if train_data else None)


def test_technique_rejects_unknown_layers_and_missing_train_data():
    with pytest.raises(ConfigError, match="'fc9'"):
        prune_magnitude(ModelArtifact(_task().model), PruneMagnitudeConfig(overrides={"fc9": 0.5}), _task())
    with pytest.raises(ConfigError, match="^fine_tune.epochs"):
        task = _task(train_data=False)
        prune_magnitude(ModelArtifact(task.model), PruneMagnitudeConfig(fine_tune=FineTune(epochs=1)), task)


def test_function_matching_fine_tune_shifts_the_images_and_keeps_the_zeros():
    """augment_shift reaches the distillation fine-tune: the result differs from the unshifted one,
    and the pruned weights stay zero."""
    task = _task()
    outs = []
    for shift in (0, 1):
        config = PruneMagnitudeConfig(sparsity=0.8, schedule="iterative", rounds=2,
                                      fine_tune=FineTune(epochs=1, lr=1e-2, batch_size=32, temperature=4.0,
                                                         augment_shift=shift, progress=False))
        outs.append(prune_magnitude(ModelArtifact(task.model), config, task).torch)
    assert layer_sparsity(outs[1]) == pytest.approx(layer_sparsity(outs[0]), abs=1e-3)
    assert sparsity_of(outs[1]) == pytest.approx(0.8, abs=1e-3)
    assert not torch.equal(outs[0][1].weight, outs[1][1].weight)


def test_final_fine_tune_trains_the_finished_sparse_model_further():
    task = _task()
    common = dict(sparsity=0.8, schedule="iterative", rounds=2,
                  fine_tune=FineTune(epochs=1, lr=1e-2, batch_size=32, progress=False))
    before = prune_magnitude(ModelArtifact(task.model), PruneMagnitudeConfig(**common), task).torch
    after = prune_magnitude(ModelArtifact(task.model), PruneMagnitudeConfig(**common, final_epochs=3, final_lr=5e-3),
                            task).torch
    assert sparsity_of(after) == pytest.approx(0.8, abs=1e-3)
    assert torch.equal(after[1].weight == 0, before[1].weight == 0)  # same masks: the final fine-tune prunes nothing
    assert not torch.equal(after[1].weight, before[1].weight)
    x, y = task.train
    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        assert loss(after(torch.from_numpy(x)), torch.from_numpy(y)) < loss(before(torch.from_numpy(x)), torch.from_numpy(y))


def test_gradual_kd_technique_keeps_the_sparsity_and_learns():
    task = _task()
    config = PruneMagnitudeConfig(sparsity=0.8, schedule="gradual",
                                  fine_tune=FineTune(epochs=2, lr=1e-2, batch_size=32, temperature=2.0, progress=False),
                                  overrides={"5": 0.5})
    out = prune_magnitude(ModelArtifact(task.model), config, task)
    assert layer_sparsity(out.torch) == pytest.approx({"1.weight": 0.8, "3.weight": 0.8, "5.weight": 0.5}, abs=1e-3)
    assert out.notes["sparsity"] == pytest.approx(sparsity_of(out.torch))
    # the artifact carries the masks (the pipeline writes the sparse file from them, see below)
    assert out.sparsity.index_bits == 5 and sorted(out.sparsity.masks) == ["1.weight", "3.weight", "5.weight"]
    assert all(torch.equal(m, out.torch.state_dict()[k] != 0) for k, m in out.sparsity.masks.items())


def test_pipeline_reports_the_sparse_file_as_size_then_distill_keeps_the_zeros(tmp_path):
    from edgeslim.distill import DistillConfig

    task = _task()
    steps = [PruneMagnitudeConfig(sparsity=0.9, fine_tune=FineTune(progress=False)),
             DistillConfig(fine_tune=FineTune(epochs=1, lr=1e-3, batch_size=32, progress=False))]
    result = compress(task, steps, out_dir=tmp_path / "run",
                      runtime=RuntimeConfig(warmup=1, runs=5, rounds=1, measure_memory=False))
    base, pruned, distilled = (s.metrics for s in result.stages)
    folder = tmp_path / "run" / "01_prune_magnitude"
    assert pruned["size_bytes"] == (folder / "weights.sparse").stat().st_size < 0.25 * base["size_bytes"]
    assert pruned["note_sparsity"] == pytest.approx(0.9, abs=1e-3)
    # distill after pruning: the zeros stay, the stage's sparse file holds the new weights
    state = load_sparse(tmp_path / "run" / "02_distill" / "weights.sparse")
    for name in ("1.weight", "3.weight", "5.weight"):
        assert float((state[name] == 0).float().mean()) == pytest.approx(0.9, abs=1e-2)
        assert torch.equal(state[name] == 0, load_sparse(folder / "weights.sparse")[name] == 0)  # the same zeros
    assert distilled["size_bytes"] == (tmp_path / "run" / "02_distill" / "weights.sparse").stat().st_size
    assert not torch.equal(state["1.weight"], load_sparse(folder / "weights.sparse")["1.weight"])


# ------------------------------------------------------------------------------ sensitivity
def test_sensitivity_table_plot_and_budget(tmp_path):
    task = _task()
    model = train(_mlp(), *task.train, epochs=4, lr=1e-2, batch_size=32, progress=False)
    result = analyze(model, task_evaluator(task), [0.0, 0.5, 0.9, 0.99], progress=False)
    assert list(result.curves) == ["1", "3", "5"] and result.backend == "torch"
    assert all(v[0] == pytest.approx(result.baseline) for v in result.curves.values())  # ratio 0 changes nothing
    write_table(result, tmp_path / "s.md")
    plot_sensitivity(result, tmp_path / "s.png")
    assert "| `1` |" in (tmp_path / "s.md").read_text()
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    onnx_eval = task_evaluator(task, "onnx")
    assert onnx_eval(model) == pytest.approx(result.baseline, abs=1e-6)


def test_select_ratios_stops_at_the_first_ratio_over_budget():
    toy = Sensitivity("accuracy", 0.90, [0.25, 0.5, 0.75, 0.9],
                      {"a": [0.90, 0.89, 0.80, 0.5], "b": [0.88, 0.90, 0.90, 0.90], "c": [0.90, 0.90, 0.895, 0.87]})
    assert select_ratios(toy, 0.011) == {"a": 0.5, "b": 0.0, "c": 0.75}
    assert select_ratios(toy, 0.05) == {"a": 0.5, "b": 0.9, "c": 0.9}


def test_nm_technique_prunes_half_of_every_group_and_stores_it_exactly():
    task = _task()
    out = prune_magnitude(ModelArtifact(task.model), PruneMagnitudeConfig(n=2, m=4,
                                                                          fine_tune=FineTune(progress=False)), task)
    for name, p in out.torch.named_parameters():
        if name.endswith("weight"):
            assert bool(((p.reshape(-1, 4) != 0).sum(1) <= 2).all()), name
    assert out.notes["sparsity"] == pytest.approx(0.5, abs=1e-3)
    data = encode_sparse(out.torch, index_bits=out.sparsity.index_bits)
    assert all(torch.equal(a, b) for a, b in zip(out.torch.state_dict().values(), decode_sparse(data).values()))
