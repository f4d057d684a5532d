"""Tests for edgeslim.runtime: export, ORT sessions, benchmarks, graph stats and inspection."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeslim.errors import ExportError, ModelError, RuntimeToolError
from edgeslim.runtime import (
    benchmark_latency,
    compare_latency,
    count_macs,
    count_params,
    export_onnx,
    inspect_optimized,
    make_session,
    op_histogram,
    peak_memory_bytes,
    predict,
    run,
    validate_outputs,
)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


class TinyConvLinear(nn.Module):
    """Conv 3->4 k3 pad1 on 8x8 (8*8*4*3*9 = 6912 MACs) + Linear 256->10 (2560 MACs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class NeedsBatchOf4(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.ones(4, 2)


@pytest.fixture(scope="module")
def cnn() -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    model = SmallCNN()
    bn = model.features[1]
    bn.running_mean.uniform_(-1, 1)  # non-trivial BN so folding is actually exercised
    bn.running_var.uniform_(0.5, 2.0)
    proto = export_onnx(model, (torch.randn(1, 1, 28, 28),))
    return model.eval(), proto


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(fp32 path, QDQ per-channel int8 path) of TinyConvLinear."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    fp32, qdq = root / "tiny.onnx", root / "tiny_qdq.onnx"
    export_onnx(TinyConvLinear(), (torch.randn(1, 3, 8, 8),), fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):  # noqa: ANN201 - ORT's interface
            return next(self.batches, None)

    quantize_static(str(fp32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return str(fp32), str(qdq)


def test_export_cnn_dynamic_batch_and_matches_torch(cnn, tmp_path) -> None:
    model, _ = cnn
    path = tmp_path / "sub" / "cnn.onnx"
    proto = export_onnx(model, (torch.randn(1, 1, 28, 28),), path)
    loaded = onnx.load(str(path))
    assert max(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dim0 = loaded.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")
    assert [i.name for i in loaded.graph.input] == ["input"] and loaded.graph.output[0].name == "output"
    assert "features.0.weight" in {t.name for t in proto.graph.initializer}
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))  # atomic write left nothing behind

    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).numpy()
    got = run(make_session(path), x.numpy())[0]
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(predict(make_session(proto), x.numpy().astype(np.float64), batch_size=2), ref, atol=1e-4)


def test_forward_failure_names_shape() -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ torch.ones(5, 2)

    with pytest.raises(ModelError, match=r"\(1, 1, 28, 28\)"):
        export_onnx(Broken(), (torch.randn(1, 1, 28, 28),))


def test_hardcoded_batch_is_export_error() -> None:
    with pytest.raises(ExportError, match="NeedsBatchOf4.*'input'"):
        export_onnx(NeedsBatchOf4(), (torch.randn(4, 2),))
    proto = export_onnx(NeedsBatchOf4(), (torch.randn(4, 2),), dynamic_batch=False)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


def test_validate_outputs_wrong_reference_names_output(cnn) -> None:
    model, proto = cnn
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = model(x).numpy()
    assert validate_outputs(proto, (x.numpy(),), [ref], atol=1e-4, rtol=1e-3) < 1e-4
    bad = ref.copy()
    bad[1, 7] += 1.0
    with pytest.raises(ExportError, match=r"output 'output' differs.*index \(1, 7\)"):
        validate_outputs(proto, {"input": x.numpy()}, [bad], atol=1e-4, rtol=1e-3)


def test_benchmark_and_compare(tiny) -> None:
    fp32, qdq = tiny
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    stats = benchmark_latency(fp32, x, warmup=3, runs=30)
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.runs == 30 and stats.batch_size == 2 and stats.threads == 1
    assert set(stats.to_dict()) >= {"latency_ms_p50", "latency_ms_p99", "runs", "batch_size"}

    both = compare_latency({"fp32": fp32, "int8": qdq}, x, warmup=2, runs=20, rounds=4)
    assert set(both) == {"fp32", "int8"}
    assert all(s.runs == 20 and s.p50_ms > 0 for s in both.values())


def test_count_macs_exact_fp32_and_qdq(tiny) -> None:
    fp32, qdq = tiny
    expected = 8 * 8 * 4 * 3 * 9 + 256 * 10
    assert count_macs(onnx.load(fp32)) == expected
    assert count_macs(onnx.load(qdq)) == expected
    assert count_macs(onnx.load(fp32), {"input": [2, 3, 8, 8]}) == 2 * expected


def test_count_params_fp32_and_qdq(cnn, tiny) -> None:
    model, proto = cnn
    bn_free = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("features.1."))
    assert count_params(proto) == bn_free  # BN folded into the conv; Reshape shape not counted

    fp32, qdq = tiny
    torch_params = 4 * 3 * 9 + 4 + 256 * 10 + 10
    assert count_params(onnx.load(fp32)) == torch_params
    qdq_model = onnx.load(qdq)
    assert "DequantizeLinear" in op_histogram(qdq_model)
    assert count_params(qdq_model) == torch_params  # scales / zero points excluded


def test_count_params_hand_built_qdq() -> None:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.int8), "w_q")
    scale = numpy_helper.from_array(np.full(4, 0.1, dtype=np.float32), "w_scale")
    zp = numpy_helper.from_array(np.zeros(4, dtype=np.int8), "w_zp")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
         helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, scale, zp],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert count_params(model) == 4 * 3 * 9
    assert count_macs(model) == 8 * 8 * 4 * 3 * 9


def test_inspect_optimized_fp32_vs_qdq(tiny) -> None:
    fp32, qdq = tiny
    rep = inspect_optimized(fp32)
    assert rep.compute_ops == 2 and rep.int8_op_fraction == 0.0 and len(rep.fp_compute_nodes) == 2

    rep_q = inspect_optimized(qdq)
    assert rep_q.int8_op_fraction == 1.0 and rep_q.fp_compute_nodes == []
    # ORT runs QDQ Conv/Gemm as contrib ops in NHWC: keys are "com.microsoft:QLinearConv"/":QGemm".
    assert {k.split(":")[-1] for k in rep_q.op_histogram} >= {"QLinearConv", "QGemm"}
    assert rep_q.to_dict()["int_compute_ops"] == 2


def test_peak_memory_grows_with_initializer(tmp_path) -> None:
    def save(n: int, name: str) -> str:
        w = numpy_helper.from_array(np.random.default_rng(0).random(n, dtype=np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [w],
        )
        path = tmp_path / name
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
        return str(path)

    small = peak_memory_bytes(save(16, "small.onnx"))
    big = peak_memory_bytes(save(4 * 1024 * 1024, "big.onnx"))  # 16 MB of float32
    assert small > 0
    assert big > small + 8 * 1024 * 1024


def test_make_session_bad_files(tmp_path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(RuntimeToolError, match="nope.onnx"):
        make_session(missing)
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a protobuf")
    with pytest.raises(RuntimeToolError, match="junk.onnx"):
        make_session(junk)
    with pytest.raises(RuntimeToolError, match="optimization"):
        make_session(missing, optimization="max")


def test_probe_session_reads_intermediate_tensors_without_touching_the_model(tiny) -> None:
    from edgeslim.runtime.probe import probe_session

    model = onnx.load(tiny[0])
    inner = [n.output[0] for n in model.graph.node][:2]
    final = model.graph.output[0].name
    session, names = probe_session(model, [inner[1], inner[0], inner[1], final], threads=1)
    assert names == [inner[1], inner[0], final]  # deduplicated, in the order asked
    assert [o.name for o in model.graph.output] == [final]  # the caller's model is unchanged
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    values = dict(zip(names, session.run(names, {"input": x})))
    np.testing.assert_allclose(values[final], run(make_session(model), x)[0], rtol=1e-5, atol=1e-5)
    assert values[inner[0]].shape[0] == 2
    fused, _ = probe_session(onnx.load(tiny[1]), [], optimization="all")  # no extra outputs: a plain session
    assert len(fused.get_outputs()) == 1


def test_machine_info_names_the_machine_and_versions() -> None:
    from edgeslim.pipeline import machine_info as from_pipeline  # the old import path still works
    from edgeslim.runtime import machine_info

    info = machine_info()
    assert from_pipeline is machine_info
    assert set(info) == {"platform", "cpu", "cpu_count", "python", "torch", "onnx", "onnxruntime"}
    assert info["onnxruntime"] == __import__("onnxruntime").__version__ and info["cpu_count"] >= 1


def test_replace_nodes_rewrites_a_copy_with_fresh_names_and_drops_unread_weights() -> None:
    from edgeslim.runtime.graph_edit import find_linear_sites, replace_nodes

    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), helper.make_node("Relu", ["y"], ["z"], name="y/Scale")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (site,) = find_linear_sites(model)
    np.testing.assert_array_equal(site.weight, numpy_helper.to_array(w))

    def halve(index, node, edit) -> bool:  # y = x @ (W / 2) * 2, under fresh names
        if index != site.index:
            return False
        half = edit.fresh("y")  # "y" is taken: y_1
        edit.add("MatMul", [node.input[0], edit.const("W", site.weight / 2)], [half], "mm")
        edit.add("Mul", [half, edit.const("two", np.array(2.0, np.float32))], [node.output[0]], "y/Scale")
        return True

    out = replace_nodes(model, halve)
    assert [n.name for n in out.graph.node] == ["mm_1", "y/Scale_1", "y/Scale"]
    assert [i.name for i in out.graph.initializer] == ["W_1", "two"]  # the old W is read no more
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Relu"]  # the input model is unchanged
    x = np.array([[1.0, -2.0]], np.float32)
    np.testing.assert_allclose(run(make_session(out), x)[0], run(make_session(model), x)[0])
