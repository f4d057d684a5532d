"""A float model given as an ONNX file: graph techniques run on it, the others refuse it early."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import edgeslim as es
from edgeslim.errors import ConfigError, ModelError, NumericalError

FAST = es.RuntimeConfig(warmup=1, runs=5, rounds=1, measure_memory=False)


class HardBatch(nn.Module):
    """Hard-codes batch 1 in a reshape, as some exporters do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.reshape(1, 64))


def _legacy_export(model: nn.Module, x: torch.Tensor, path) -> None:
    """Export as a third-party tool would: TorchScript exporter, batch axis fixed at 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False)


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = the float model's predictions: the metric is agreement
    return model, x.numpy(), y.numpy()


def _task(model, x, y) -> es.Task:
    return es.Task(model=model, example_inputs=(torch.from_numpy(x[:1]),), calibration=(x[:128], y[:128]),
                   evaluation=(x[128:], y[128:]))


def test_ptq_runs_on_an_onnx_file_without_the_module(convnet, tmp_path):
    model, x, y = convnet
    path = tmp_path / "float.onnx"
    _legacy_export(model, torch.from_numpy(x[:1]), path)
    task = _task(str(path), x, y)
    assert task.is_graph
    result = es.compress(task, [es.PTQInt8Config(progress=False)], runtime=FAST, progress=False)
    fp32, int8 = result.stages
    assert fp32.metrics["accuracy"] == 1.0  # the graph given is the baseline, unchanged
    assert int8.metrics["int8_op_fraction"] == 1.0  # every Conv/Gemm on an integer kernel
    assert int8.metrics["accuracy"] >= 0.9
    assert int8.metrics["size_bytes"] < 0.4 * fp32.metrics["size_bytes"]


def test_dynamic_int8_runs_on_a_model_proto(convnet, tmp_path):
    model, x, y = convnet
    path = tmp_path / "float.onnx"
    _legacy_export(model, torch.from_numpy(x[:1]), path)
    result = es.compress(_task(onnx.load(str(path)), x, y), [es.DynamicInt8Config()], runtime=FAST,
                         out_dir=tmp_path / "run", progress=False)
    ops = [n.op_type for n in onnx.load(str(result.stages[1].onnx_path)).graph.node]
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops


def test_a_technique_that_needs_the_module_is_refused_before_any_work(convnet, tmp_path):
    model, x, y = convnet
    path = tmp_path / "float.onnx"
    _legacy_export(model, torch.from_numpy(x[:1]), path)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"steps\[1\]: prune_channels needs the PyTorch module.*ptq_int8"):
        es.compress(_task(str(path), x, y), [es.PTQInt8Config(), es.PruneChannelsConfig(ratio=0.5)],
                    runtime=FAST, out_dir=out, progress=False)
    assert not out.exists()


def test_bad_onnx_files_fail_with_one_line(convnet, tmp_path):
    model, x, y = convnet
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="junk.onnx is not a valid ONNX model"):
        _task(str(junk), x, y)
    with pytest.raises(ModelError, match="file not found"):
        _task(str(tmp_path / "missing.onnx"), x, y)

    good = tmp_path / "float.onnx"
    _legacy_export(model, torch.from_numpy(x[:1]), good)
    proto = onnx.load(str(good))
    init = proto.graph.initializer[0]
    values = numpy_helper.to_array(init).copy()
    values.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    with pytest.raises(NumericalError, match=f"weight {init.name!r} holds NaN"):
        _task(proto, x, y)

    hard = tmp_path / "hard.onnx"
    _legacy_export(HardBatch(), torch.randn(1, 1, 8, 8), hard)
    with pytest.raises(ModelError, match="fixes its batch size"):
        _task(str(hard), x, y)

    with pytest.raises(ModelError, match="takes 1 inputs"):
        es.Task(model=str(good), example_inputs=(torch.from_numpy(x[:1]), torch.from_numpy(x[:1])),
                calibration=((x, x), y), evaluation=((x, x), y))
