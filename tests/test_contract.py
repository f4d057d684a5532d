"""Contract suite: every registered technique, on a tiny model, keeps the promises the pipeline relies on."""

import copy
import json

import numpy as np
import pytest
import torch

from edgeslim import registry
from edgeslim.pipeline import RuntimeConfig, compress
from edgeslim.runtime import make_session, run
from edgeslim.task import ModelArtifact, Task

from conftest import small_cnn


def _task(images: np.ndarray) -> Task:
    labels = np.arange(len(images)) % 10
    return Task(small_cnn(), (torch.from_numpy(images[:1]),), calibration=(images, labels), evaluation=(images, labels),
                train=(images, labels))


@pytest.mark.parametrize("tech", registry.list_techniques(), ids=lambda t: t.name)
def test_technique_contract(tech, images):
    if getattr(tech.config_type, "requires", None) == "transformer":
        pytest.skip(f"{tech.name} needs a BERT-style encoder; its contract test runs on a tiny BertModel")
    task = _task(images)
    before = copy.deepcopy(task.model.state_dict())
    config = tech.config_type()
    # config survives a JSON round trip through its recipe form
    data = json.loads(json.dumps(config.to_dict()))
    assert data.pop("technique") == tech.name
    assert tech.config_type.from_dict(data) == config
    out = tech.fn(ModelArtifact(task.model), config, task)
    assert isinstance(out, ModelArtifact)
    # the input model is not mutated
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the result runs on ONNX Runtime with the same output shape and tracks the float model
    graph = out.onnx if out.onnx is not None else None
    x = images[:8]
    ref = task.model(torch.from_numpy(x)).detach().numpy()
    if graph is not None:
        got = run(make_session(graph), x)[0]
    else:
        got = out.torch(torch.from_numpy(x)).detach().numpy()
    assert got.shape == ref.shape
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.75
    # deterministic: the same config on the same task gives the same graph
    again = tech.fn(ModelArtifact(task.model), config, task)
    if graph is not None:
        assert again.onnx.SerializeToString() == graph.SerializeToString()


def test_int8_is_faster_on_a_conv_net_with_a_dataloader(tmp_path):
    """The speedup sign, measured side by side: int8 kernels beat fp32 on a conv net (about 3x here)."""
    from edgeslim.models import build_model

    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    task = Task(build_model("vgg_small"), (x[:1],), calibration=loader, evaluation=loader)
    from edgeslim.quantize import PTQInt8Config

    result = compress(task, [PTQInt8Config(progress=False)], out_dir=tmp_path / "run",
                      runtime=RuntimeConfig(warmup=5, runs=60, rounds=3, measure_memory=False))
    q = result.stage("01_ptq_int8").metrics
    assert q["int8_op_fraction"] == 1.0
    assert q["speedup_vs_baseline"] > 1.0
    assert q["size_ratio_vs_baseline"] > 3.5
    assert q["peak_memory_bytes"] is None


class _TwoInputEncoder(torch.nn.Module):
    """Token ids and a mask in, one masked-mean vector out: the shape of a sentence encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.embed(ids)))  # (B, S, 16)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, 16)


def test_a_two_input_model_with_a_dynamic_sequence_runs_through_the_pipeline(tmp_path):
    from edgeslim.quantize import PTQInt8Config
    from edgeslim.task import METRICS

    torch.manual_seed(0)
    model = _TwoInputEncoder().eval()
    ids = torch.randint(0, 100, (32, 10))
    mask = torch.ones(32, 10, dtype=torch.int64)
    mask[:, 7:] = 0
    with torch.no_grad():
        targets = model(ids, mask)
    task = Task(model, (ids[:1], mask[:1]), calibration=((ids.numpy(), mask.numpy()), None),
                evaluation=((ids.numpy(), mask.numpy()), targets.numpy()), metric=METRICS["cosine"],
                metric_name="cosine", dynamic_dims=({1: "seq"}, {1: "seq"}))
    result = compress(task, [PTQInt8Config(op_types=("MatMul",), progress=False)], out_dir=tmp_path / "run",
                      runtime=RuntimeConfig(warmup=2, runs=20, rounds=2, measure_memory=True))
    fp32, q = (s.metrics for s in result.stages)
    assert fp32["macs"] == q["macs"] == 10 * 16 * 16  # the projection, at the example's 10 tokens
    assert q["int8_op_fraction"] == 1.0 and q["cosine"] > 0.99
    assert q["peak_memory_bytes"] > 0 and (tmp_path / "run" / "01_ptq_int8" / "parity.md").exists()
