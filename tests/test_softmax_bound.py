"""The bounded softmax rewrite keeps float32 outputs and is what export_onnx emits."""

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from edgeslim.runtime import bound_softmax_inputs, export_onnx, make_session, run


def _softmax_graph(opset: int, axis: int = -1) -> onnx.ModelProto:
    node = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _masked_logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 3, 8, 8)) * 4).astype(np.float32)
    x[..., 5:] = np.finfo(np.float32).min  # padded keys, as BERT's additive mask makes them
    x[0, 0, 0, 1] = x[0, 0, 0].max() - 85.0  # a real logit just past the floor
    x[1, 2, 3, 4] = x[1, 2, 3].max() - 79.0  # and one inside it: must be untouched
    return x


def test_bounded_softmax_matches_plain_softmax_to_float32_precision():
    for opset, axis in ((13, -1), (18, -1), (18, 3)):
        plain = _softmax_graph(opset, axis)
        bounded = bound_softmax_inputs(plain)
        ops = [n.op_type for n in bounded.graph.node]
        assert ops == ["ReduceMax", "Sub", "Max", "Softmax"], ops
        x = _masked_logits()
        want, got = run(make_session(plain), x)[0], run(make_session(bounded), x)[0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-35)
        assert got[..., 5:].max() <= 2e-35 and np.all(got[..., 5:] > 0)  # masked: ~exp(-80), never denormal
        assert got[1, 2, 3, 4] == want[1, 2, 3, 4]  # within 80 of the max: the exact same float


def test_old_opsets_and_graphs_without_softmax_are_left_alone():
    old = _softmax_graph(11)
    assert [n.op_type for n in bound_softmax_inputs(old).graph.node] == ["Softmax"]
    relu = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 18)])
    assert bound_softmax_inputs(relu) == relu


class MaskedAttention(nn.Module):
    def forward(self, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = q @ q.transpose(-1, -2) + (1.0 - mask[:, None, :]) * torch.finfo(torch.float32).min
        return torch.softmax(scores, dim=-1) @ q


def test_export_bounds_softmax_by_default_and_validates_against_torch():
    q = torch.randn(1, 6, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    bounded = export_onnx(MaskedAttention(), (q, mask))  # validate=True compares ORT with torch
    plain = export_onnx(MaskedAttention(), (q, mask), bound_softmax=False)
    softmax = next(n for n in bounded.graph.node if n.op_type == "Softmax")
    producer = next(n for n in bounded.graph.node if softmax.input[0] in n.output)
    assert producer.op_type == "Max" and not any(n.op_type == "Max" for n in plain.graph.node)
    feed = (q.numpy(), mask.numpy())
    np.testing.assert_array_equal(run(make_session(bounded), feed)[0], run(make_session(plain), feed)[0])
