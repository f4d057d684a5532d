"""Structured channel pruning: dependency groups, importance, physical removal, the technique."""

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.errors import ConfigError, ModelError
from edgeslim.models import build_model
from edgeslim.prune.channels_technique import (
    PruneChannelsConfig,
    prune_channels,
    prune_model,
)
from edgeslim.prune.graph import build_graph
from edgeslim.prune.importance import compute_importance
from edgeslim.prune.structured import PrunePlan, plan_keep, remove_channels
from edgeslim.runtime import count_macs, export_onnx, make_session, run
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune

ZOO = ["lenet300", "lenet5", "vgg_small", "resnet20", "mobilenetv2_small"]


def _model(name: str, size: int = 16) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, input_size=size)
    for m in model.modules():  # non-trivial BN statistics and shifts: removed channels must not leak
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _zero_channels(model: nn.Module, graph, channels: dict[str, torch.Tensor]) -> None:
    """Zero every weight slice coupled to the given group channels (their importance becomes 0)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for g in graph.groups:
            dead = set(channels[g.name].tolist())
            for m in g.members:
                if m.kind == "bn":
                    continue
                pos = torch.tensor([p for p, c in enumerate(m.index) if c in dead], dtype=torch.long)
                if len(pos) == 0:
                    continue
                mod = modules[m.module]
                mod.weight.index_fill_(m.dim, pos, 0.0)
                if m.kind != "in" and mod.bias is not None:
                    mod.bias.index_fill_(0, pos, 0.0)


class _Cat(nn.Module):
    """Two conv branches concatenated on channels, then a conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 6, 3, padding=1)
        self.mix = nn.Conv2d(10, 8, 1)
        self.head = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)  # (B, 10, 8, 8)
        return self.head(self.mix(y).flatten(1))


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


class _Sorted(nn.Module):
    """An op the graph does not understand (sort over channels) between two prunable convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.sort(self.c1(x), dim=1).values)


@pytest.mark.parametrize("name", ZOO)
def test_removing_zero_importance_channels_keeps_outputs_and_exports(name):
    model, x = _model(name), torch.randn(4, 1, 16, 16)
    graph = build_graph(model, x[:1])
    counts = {k: len(v) for k, v in plan_keep(graph, compute_importance(graph, "l1"), PrunePlan(ratio=0.3)).items()}
    gen = torch.Generator().manual_seed(1)
    dead = {g.name: torch.randperm(g.size, generator=gen)[: g.size - counts[g.name]] for g in graph.groups}
    _zero_channels(model, graph, dead)
    with torch.no_grad():
        ref = model(x)
    keep = plan_keep(graph, compute_importance(graph, "l1"), PrunePlan(ratio=0.3))
    for g in graph.groups:  # exactly the zeroed channels go
        assert set(keep[g.name].tolist()) == set(range(g.size)) - set(dead[g.name].tolist())
    pruned = remove_channels(model, graph, keep, x[:1])
    with torch.no_grad():
        got = pruned(x)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # ONNX: the export (validated in ORT) runs the smaller graph; its MACs match our shape-propagated count
    onx = export_onnx(pruned, (x[:1],))
    np.testing.assert_allclose(run(make_session(onx), x.numpy())[0], got.numpy(), atol=1e-4)
    macs = sum(build_graph(pruned, x[:1]).macs.values())
    assert count_macs(onx) == macs < 0.75 * sum(graph.macs.values())


def test_flatten_linear_mapping_gives_exact_param_count():
    """LeNet-5 at 28x28: conv2's 50 -> 25 channels drop 25 * 4 * 4 inputs of the first Linear."""
    model, x = _model("lenet5", 28), torch.randn(2, 1, 28, 28)
    graph = build_graph(model, x[:1])
    keep = plan_keep(graph, compute_importance(graph, "l2"), PrunePlan(ratio=0.5))
    pruned = remove_channels(model, graph, keep, x[:1])
    expected = (10 * 25 + 10) + (25 * 10 * 25 + 25) + (250 * 25 * 16 + 250) + (10 * 250 + 10)
    assert sum(p.numel() for p in pruned.parameters()) == expected
    assert pruned[5].in_features == 400 and pruned[7].out_features == 10  # the classifier keeps its outputs


def test_residual_convs_share_one_group_and_stay_consistent():
    model, x = _model("resnet20"), torch.randn(2, 1, 16, 16)
    graph = build_graph(model, x[:1])
    stem = graph.group_of("stem.0")
    assert set(stem.producers) == {"stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    stage2 = graph.group_of("layer2.0.conv2")
    assert "layer2.0.shortcut.0" in stage2.producers and graph.group_of("layer2.1.conv2") is stage2
    assert graph.group_of("fc") is None  # the logits are never pruned
    pruned = remove_channels(model, graph, plan_keep(graph, compute_importance(graph, "bn"), PrunePlan(0.5)), x[:1])
    assert pruned.stem[0].out_channels == pruned.layer1[2].conv2.out_channels == 8
    assert pruned.layer2[0].conv1.in_channels == pruned.layer2[0].shortcut[0].in_channels == 8
    assert pruned.fc.in_features == 32 and pruned.fc.out_features == 10


def test_depthwise_conv_follows_its_input_channels():
    model, x = _model("mobilenetv2_small"), torch.randn(2, 1, 16, 16)
    graph = build_graph(model, x[:1])
    group = graph.group_of("features.4.block.0")  # the 1x1 expansion feeding a depthwise conv
    assert ("features.4.block.3", "dw") in {(m.module, m.kind) for m in group.members}
    pruned = remove_channels(model, graph, plan_keep(graph, compute_importance(graph, "l1"), PrunePlan(0.5)), x[:1])
    block = pruned.features[4].block
    assert block[0].out_channels == block[3].in_channels == block[3].out_channels == block[3].groups == 32
    assert block[4].num_features == 32 and block[6].in_channels == 32


def test_concat_offsets_map_to_each_branch():
    torch.manual_seed(0)
    model, x = _Cat().eval(), torch.randn(3, 1, 8, 8)
    graph = build_graph(model, x[:1])
    assert graph.group_of("a").size == 4 and graph.group_of("b").size == 6
    mix_in = next(m for m in graph.group_of("b").members if m.module == "mix")
    assert mix_in.index == (-1, -1, -1, -1, 0, 1, 2, 3, 4, 5)  # b's channels sit after a's 4
    dead = {"a": torch.tensor([1]), "b": torch.tensor([0, 5]), "mix": torch.tensor([2, 7])}
    _zero_channels(model, graph, dead)
    with torch.no_grad():
        ref = model(x)
    keep = plan_keep(graph, compute_importance(graph, "taylor", model, [(x.numpy(), np.array([0, 1, 2]))]),
                     PrunePlan(ratio=0.3))
    pruned = remove_channels(model, graph, keep, x[:1])
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.mix.in_channels) == (3, 4, 7)
    assert pruned.head.in_features == 6 * 64
    assert torch.allclose(pruned(x), ref, atol=1e-5)


def test_round_to_and_global_versus_uniform():
    model, x = _model("vgg_small"), torch.randn(1, 1, 16, 16)
    graph = build_graph(model, x)
    keep = plan_keep(graph, compute_importance(graph, "l1"), PrunePlan(ratio=0.3, round_to=8))
    assert all(len(k) % 8 == 0 for k in keep.values()) and len(keep["features.0"]) == 48
    # LeNet-300-100 with half of the first hidden layer's units made tiny: a global ranking takes all
    # 100 removed units (25% of 400) from that layer, a uniform one 25% from each.
    lenet = _model("lenet300")
    with torch.no_grad():
        lenet[1].weight[:150] *= 0.01
        lenet[3].weight[:, :150] *= 0.01
    graph = build_graph(lenet, x)
    scores = compute_importance(graph, "l1")
    glob = plan_keep(graph, scores, PrunePlan(ratio=0.25, scope="global"))
    uni = plan_keep(graph, scores, PrunePlan(ratio=0.25, scope="uniform"))
    assert (len(glob["1"]), len(glob["3"])) == (200, 100) and (len(uni["1"]), len(uni["3"])) == (225, 75)
    assert set(range(150, 300)) <= set(glob["1"].tolist())  # every full-size unit survives


def test_bad_inputs_give_one_line_errors_naming_the_culprit():
    model, x = _model("vgg_small"), torch.randn(1, 1, 16, 16)
    graph = build_graph(model, x)
    scores = compute_importance(graph, "l1")
    cases = [
        (lambda: PruneChannelsConfig(ratio=1.0), ConfigError, "ratio"),
        (lambda: PruneChannelsConfig(overrides={"features.0": -0.1}), ConfigError, "overrides.features.0"),
        (lambda: PruneChannelsConfig(importance="l3"), ConfigError, "importance"),
        (lambda: plan_keep(graph, scores, PrunePlan(overrides={"features.99": 0.5})), ConfigError, "features.99"),
        (lambda: plan_keep(graph, scores, PrunePlan(overrides={"classifier": 0.5})), ConfigError, "classifier"),
        (lambda: plan_keep(graph, scores, PrunePlan(exclude=("nope",))), ConfigError, "nope"),
        (lambda: build_graph(_Branchy(), torch.randn(1, 1, 8, 8)), ModelError, "_Branchy"),
        (lambda: build_graph(_Sorted(), torch.randn(1, 1, 8, 8)), ModelError, "sort"),
    ]
    for fn, err, needle in cases:
        with pytest.raises(err) as info:
            fn()
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, msg


def test_exclude_and_overrides_change_only_their_groups():
    model, x = _model("vgg_small"), torch.randn(1, 1, 16, 16)
    graph = build_graph(model, x)
    plan = PrunePlan(ratio=0.5, overrides={"features.3": 0.25}, exclude=("features.14",))  # whole: in and out
    keep = plan_keep(graph, compute_importance(graph, "l1"), plan)
    assert [len(keep[g.name]) for g in graph.groups] == [32, 48, 64, 128, 256, 128]


def _task(n: int = 64, with_train: bool = True) -> Task:
    torch.manual_seed(0)
    x = torch.randn(n, 1, 16, 16)
    y = np.arange(n) % 10
    model = _model("lenet5")
    return Task(model, (x[:1],), calibration=(x.numpy(), y), evaluation=(x.numpy(), y),
                train=(x.numpy(), y) if with_train else None)


def test_technique_fine_tunes_with_kd_and_reports_channels_and_macs():
    task = _task()
    config = PruneChannelsConfig(ratio=0.5, importance="taylor", round_to=8,
                                 fine_tune=FineTune(epochs=1, batch_size=32, temperature=4.0, progress=False))
    out = prune_channels(ModelArtifact(task.model), config, task)
    notes = out.notes["prune_channels"]
    assert notes["channels"] == {"0": [20, 8], "2": [50, 24], "5": [500, 248]}  # halved, rounded to 8
    assert notes["macs_after"] < 0.3 * notes["macs_before"] and notes["params_after"] < 0.3 * notes["params_before"]
    assert (out.torch[0].out_channels, out.torch[2].in_channels, out.torch[5].in_features) == (8, 8, 24)
    # fine-tuning moved the weights away from the plain pruned copy
    plain, _, _ = prune_model(task.model, task.example_inputs[0], config, task)
    assert plain[0].weight.shape == out.torch[0].weight.shape
    assert not torch.equal(plain[0].weight, out.torch[0].weight)


def test_fine_tune_without_train_data_is_a_config_error():
    task = _task(with_train=False)
    with pytest.raises(ConfigError, match="epochs"):
        prune_channels(ModelArtifact(task.model), PruneChannelsConfig(fine_tune=FineTune(epochs=1, progress=False)), task)


def test_a_model_with_nothing_to_prune_is_an_error_not_a_silent_copy():
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((8, 1, 4, 4), dtype=np.float32)
    y = np.arange(8) % 2
    head_only = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()  # its outputs are the logits
    task = Task(head_only, (torch.from_numpy(x[:1]),), calibration=(x, y), evaluation=(x, y))
    with pytest.raises(ModelError, match="no prunable channel group"):
        prune_channels(ModelArtifact(head_only), PruneChannelsConfig(fine_tune=FineTune(progress=False)), task)
