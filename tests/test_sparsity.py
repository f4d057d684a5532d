"""Sparsity travels on the artifact: set by prune_magnitude, kept by every later step that trains,
carried or dropped by steps that reshape weights, and written as the stage's sparse file by the pipeline."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.errors import ConfigError, ModelError
from edgeslim.lowrank import LowRankConfig
from edgeslim.pipeline import RuntimeConfig, compress
from edgeslim.prune import PruneMagnitudeConfig, load_sparse
from edgeslim.prune.channels_technique import PruneChannelsConfig
from edgeslim.sparsity import Sparsity
from edgeslim.task import Task
from edgeslim.train import FineTune

FAST = RuntimeConfig(warmup=1, runs=4, rounds=1, measure_memory=False)
QUIET = FineTune(progress=False)


def _task() -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 128)
    x = rng.random((128, 1, 8, 8), dtype=np.float32)
    return Task(model, (torch.from_numpy(x[:1]),), calibration=(x, y), evaluation=(x, y), train=(x, y))


def test_restricted_to_keeps_the_masks_of_weights_left_in_shape():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    masks = {"0.weight": torch.ones(3, 4, dtype=torch.bool), "1.weight": torch.zeros(2, 3, dtype=torch.bool)}
    sparsity = Sparsity(masks, index_bits=7)
    model[0] = nn.Linear(4, 5)  # reshaped by a later step: its mask no longer applies
    kept = sparsity.restricted_to(model)
    assert sorted(kept.masks) == ["1.weight"] and kept.index_bits == 7
    assert sparsity.restricted_to(nn.Sequential(nn.Linear(9, 9))) is None
    with pytest.raises(ConfigError, match="^index_bits"):
        Sparsity(masks, index_bits=0)


def test_check_names_a_regrown_or_misfit_weight():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    mask = model[0].weight.detach() != 0
    Sparsity({"0.weight": mask}).check(model, "distill")  # zeros kept: fine
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0
    with pytest.raises(ModelError, match=r"^distill: 1 pruned weights of '0.weight' are nonzero"):
        Sparsity({"0.weight": mask}).check(model, "distill")
    with pytest.raises(ModelError, match=r"^lowrank: carries sparsity that does not fit its model"):
        Sparsity({"9.weight": mask}).check(model, "lowrank")


def test_lowrank_after_pruning_keeps_the_zeros_of_the_layers_it_leaves(tmp_path):
    """lowrank factorizes layer 1 (dense factors: its mask is dropped) and fine-tunes; layers 3 and 5
    keep exactly their zeros, and the pipeline writes the stage's sparse file from the carried masks."""
    steps = [PruneMagnitudeConfig(sparsity=0.7, fine_tune=QUIET),
             LowRankConfig(rank_by="fixed", rank=4, layers=("1",),
                           fine_tune=FineTune(epochs=1, lr=1e-2, batch_size=32, temperature=0.0, progress=False))]
    result = compress(_task(), steps, out_dir=tmp_path / "run", runtime=FAST)
    pruned = load_sparse(tmp_path / "run" / "01_prune_magnitude" / "weights.sparse")
    factored = tmp_path / "run" / "02_lowrank" / "weights.sparse"
    state = load_sparse(factored)
    assert "1.weight" not in state and "1.0.weight" in state  # factorized
    for name in ("3.weight", "5.weight"):
        assert torch.equal(state[name] == 0, pruned[name] == 0) and not torch.equal(state[name], pruned[name])
    assert result.stage("02_lowrank").metrics["size_bytes"] == factored.stat().st_size


def test_prune_channels_after_pruning_drops_the_masks_of_the_weights_it_cuts(tmp_path):
    steps = [PruneMagnitudeConfig(sparsity=0.7, fine_tune=QUIET),
             PruneChannelsConfig(ratio=0.5, overrides={"3": 0.0}, fine_tune=FineTune(epochs=1, batch_size=32, progress=False))]
    compress(_task(), steps, out_dir=tmp_path / "run", runtime=FAST)
    pruned = load_sparse(tmp_path / "run" / "01_prune_magnitude" / "weights.sparse")
    state = load_sparse(tmp_path / "run" / "02_prune_channels" / "weights.sparse")
    assert state["1.weight"].shape == (16, 64) and state["5.weight"].shape == pruned["5.weight"].shape
    # left whole: fine-tuned, with exactly its zeros
    assert torch.equal(state["5.weight"] == 0, pruned["5.weight"] == 0)
    assert not torch.equal(state["5.weight"], pruned["5.weight"])
