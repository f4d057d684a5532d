"""Dynamic int8 and weight-only (MatMulNBits) lowering: ORT runs them fused, outputs track fp32, files shrink."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeslim import registry
from edgeslim.errors import ConfigError
from edgeslim.pipeline import RuntimeConfig, compress
from edgeslim.quantize import DynamicInt8Config, WeightOnlyConfig
from edgeslim.quantize.dynamic import quantize_dynamic_graph
from edgeslim.quantize.weight_only import (
    NBitsWeight,
    dequantize,
    pack_bits,
    pack_weight,
    quantize_weight_only_graph,
    unpack_bits,
)
from edgeslim.runtime import export_onnx, inspect_optimized, make_session, run
from edgeslim.task import ModelArtifact, Task


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(20 * np.log10(np.linalg.norm(ref) / np.linalg.norm(ref - got)))


def ort_out(graph: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run(make_session(graph), x)[0]


class Block(nn.Module):
    """Single-head attention: q/k/v/o Linear projections with bias, q @ k^T, softmax, @ v."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / self.d**0.5, dim=-1)
        return self.o(att @ self.v(x))


@pytest.fixture(scope="module")
def mlp():
    """(module, inputs, fp32 graph): Linear(256,128)-ReLU-Linear(128,64), exported as two Gemms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(32, 256)
    return model, x.numpy(), export_onnx(model, (x[:1],))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    model = Block(32).eval()
    x = torch.randn(4, 16, 32)
    return model, x.numpy(), export_onnx(model, (x[:1],))


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --- dynamic int8 -----------------------------------------------------------------------------

def test_dynamic_mlp_runs_fused_integer_kernels(mlp):
    model, x, fp32 = mlp
    q = quantize_dynamic_graph(fp32, DynamicInt8Config())
    onnx.checker.check_model(q)  # standard ONNX ops only: any runtime can load it
    assert all(n.domain == "" for n in q.graph.node)
    report = inspect_optimized(q)
    assert report.int8_op_fraction == 1.0
    assert report.op_histogram.get("com.microsoft:DynamicQuantizeMatMul") == 2
    assert sqnr_db(reference(model, x), ort_out(q, x)) > 30
    # weights: int8 per output column, no float weight matrix left
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    w = [v for k, v in inits.items() if k.endswith("W_int8")]
    assert sorted(a.shape for a in w) == [(128, 64), (256, 128)] and all(a.dtype == np.int8 for a in w)
    assert sorted(v.shape for k, v in inits.items() if k.endswith("W_scale")) == [(64,), (128,)]
    assert not any(v.dtype == np.float32 and v.ndim == 2 for v in inits.values())


def test_dynamic_per_tensor_and_exclude(mlp):
    model, x, fp32 = mlp
    q = quantize_dynamic_graph(fp32, DynamicInt8Config(per_channel=False, exclude=("node_linear_1",)))
    scales = [i for i in q.graph.initializer if i.name.endswith("W_scale")]
    assert len(scales) == 1 and list(scales[0].dims) == []
    report = inspect_optimized(q)
    assert report.int_compute_ops == 1 and report.fp_compute_nodes == ["node_linear_1"]
    assert sqnr_db(reference(model, x), ort_out(q, x)) > 30
    with pytest.raises(ConfigError, match="exclude: no node named 'fc9'.*node_linear, node_linear_1"):
        quantize_dynamic_graph(fp32, DynamicInt8Config(exclude=("fc9",)))


def test_dynamic_transformer_block(block):
    model, x, fp32 = block
    ref = reference(model, x)
    q = quantize_dynamic_graph(fp32)
    report = inspect_optimized(q)
    hist = report.op_histogram
    # the four projections are integer (q/k/v share one quantized input); q@k^T and attn@v stay float
    assert hist.get("com.microsoft:MatMulIntegerToFloat", 0) + hist.get("com.microsoft:DynamicQuantizeMatMul", 0) == 4
    assert report.compute_ops - report.int_compute_ops == 2
    assert "Add" not in hist  # biases fused into the integer kernels
    assert sqnr_db(ref, ort_out(q, x)) > 30
    full = quantize_dynamic_graph(fp32, DynamicInt8Config(activation_matmuls=True))
    assert inspect_optimized(full).int8_op_fraction == 1.0
    assert sqnr_db(ref, ort_out(full, x)) > 30


def _gemm_graph(k: int, n: int, *, trans_b: int, alpha: float, beta: float, name: str = "fc1", op: str = "Gemm"):
    """A one-node Gemm/MatMul graph with a constant weight (and bias C for Gemm), plus its numpy reference."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    if op == "Gemm":
        node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name=name, transB=trans_b, alpha=alpha, beta=beta)
        inits.append(numpy_helper.from_array(c, "C"))
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name=name)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((8, k)).astype(np.float32)
    wk = w.T if trans_b else w
    y = alpha * (x @ wk) + beta * c if op == "Gemm" else x @ wk
    return model, x, y


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transb_alpha_beta_are_folded(trans_b):
    model, x, ref = _gemm_graph(64, 48, trans_b=trans_b, alpha=0.5, beta=2.0)
    assert sqnr_db(ref, ort_out(quantize_dynamic_graph(model), x)) > 30
    assert sqnr_db(ref, ort_out(quantize_weight_only_graph(model, WeightOnlyConfig(bits=8)), x)) > 35


# --- weight-only: packing and exact decode ----------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_bits_low_first_roundtrip(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=(3, 37), dtype=np.uint8)  # odd length: padded
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, int(np.ceil(37 * bits / 8)))
    assert np.array_equal(unpack_bits(packed, bits, 37), codes)
    assert pack_bits(np.array([1, 2], np.uint8), 4).tolist() == [0x21]  # element 0 in the low nibble


def test_pack_weight_layout():
    w = np.random.default_rng(0).standard_normal((96, 10)).astype(np.float32)  # 3 blocks of 32
    p = pack_weight(w, 4, 32, symmetric=False)
    assert p.b.shape == (10, 3, 16) and p.b.dtype == np.uint8
    assert p.scales.shape == (10, 3) and p.scales.dtype == np.float32
    assert p.zero_points.shape == (10, 2)  # ceil(3 blocks * 4 bits / 8): each row padded to whole bytes
    assert pack_weight(w, 4, 32, symmetric=True).zero_points is None


def _numpy_forward(graph: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run an MLP graph of MatMulNBits/Relu in numpy, with weights decoded by ``dequantize``."""
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    h = x
    for node in graph.graph.node:
        if node.op_type == "Relu":
            h = np.maximum(h, 0)
            continue
        assert node.op_type == "MatMulNBits", node.op_type
        a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        ins = list(node.input) + [""] * (6 - len(node.input))
        zp = inits[ins[3]] if ins[3] else None
        w = dequantize(NBitsWeight(inits[ins[1]], inits[ins[2]], zp, a["bits"], a["block_size"], a["K"], a["N"]))
        h = h @ w + (inits[ins[5]] if ins[5] else 0)
    return h


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, 64, False), (4, 128, False),
                                                       (4, 32, True), (8, 64, False)])
def test_weight_only_decode_is_exact_and_accurate(mlp, bits, group_size, symmetric):
    model, x, fp32 = mlp
    q = quantize_weight_only_graph(fp32, WeightOnlyConfig(bits=bits, group_size=group_size, symmetric=symmetric))
    assert "com.microsoft:MatMulNBits" in inspect_optimized(q).op_histogram
    got = ort_out(q, x)
    np.testing.assert_allclose(got, _numpy_forward(q, x), atol=1e-4, rtol=0)
    assert sqnr_db(reference(model, x), got) > (35 if bits == 8 else 15)


def test_weight_only_transformer_block_and_accuracy_level(block):
    model, x, fp32 = block
    q = quantize_weight_only_graph(fp32, WeightOnlyConfig(accuracy_level=4))
    hist = inspect_optimized(q).op_histogram
    assert hist.get("com.microsoft:MatMulNBits") == 4 and "Add" not in hist  # ORT folds the bias Adds in
    levels = [helper.get_attribute_value(a) for n in q.graph.node for a in n.attribute if a.name == "accuracy_level"]
    assert levels == [4, 4, 4, 4]
    assert sqnr_db(reference(model, x), ort_out(q, x)) > 15


def test_weight_only_file_is_small(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(512, 512) for _ in range(3))).eval()
    fp32 = export_onnx(model, (torch.randn(1, 512),))
    q = quantize_weight_only_graph(fp32, WeightOnlyConfig(bits=4, group_size=32))
    onnx.save(fp32, tmp_path / "fp32.onnx")
    onnx.save(q, tmp_path / "int4.onnx")
    ratio = (tmp_path / "int4.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert ratio < 0.30  # 0.16 measured: 0.5 B/weight + a 4 B scale and a nibble of zero point per 32


# --- bad configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 9}, "bits: must be in 2..8, got 9"),
    ({"bits": 1}, "bits: must be in 2..8, got 1"),
    ({"bits": 3}, "bits: ONNX Runtime's CPU MatMulNBits kernel runs 2, 4 or 8 bits, got 3"),
    ({"group_size": 48}, "group_size: must be a power of two >= 16 (MatMulNBits block_size), got 48"),
    ({"group_size": 8}, "group_size: must be a power of two >= 16 (MatMulNBits block_size), got 8"),
    ({"accuracy_level": 2}, "accuracy_level: must be 0 (fp32 compute) or 4 (int8 activations), got 2"),
])
def test_bad_weight_only_configs(kwargs, message):
    with pytest.raises(ConfigError) as err:
        WeightOnlyConfig(**kwargs)
    assert str(err.value) == message


def test_group_size_must_divide_in_features():
    model, _, _ = _gemm_graph(300, 16, trans_b=0, alpha=1.0, beta=1.0, name="fc1", op="MatMul")
    with pytest.raises(ConfigError) as err:
        quantize_weight_only_graph(model, WeightOnlyConfig(group_size=128))
    assert str(err.value) == "layer 'fc1' (MatMul) has 300 in-features, not divisible by group_size 128"


def test_bad_dynamic_configs():
    with pytest.raises(ConfigError, match="ops: 'Conv' is not supported"):
        DynamicInt8Config(ops=("MatMul", "Conv"))
    with pytest.raises(ConfigError, match="step.bits: must be in 2..8, got 9"):
        WeightOnlyConfig.from_dict({"bits": 9})


# --- registry and pipeline -------------------------------------------------------------------

def test_registry_and_pipeline(tmp_path):
    assert registry.get("weight_only").config_type is WeightOnlyConfig
    assert registry.get("dynamic_int8").config_type is DynamicInt8Config
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x = torch.randn(64, 256)
    y = model(x).argmax(1)
    task = Task(model, (x[:1],), calibration=(x, y), evaluation=(x, y))

    dyn = registry.get("dynamic_int8").fn(ModelArtifact(model), DynamicInt8Config(), task)
    assert inspect_optimized(dyn.onnx).int8_op_fraction == 1.0 and dyn.notes["quantized_layers"] == 2
    with pytest.raises(ConfigError, match="already lowered"):
        registry.get("weight_only").fn(dyn, WeightOnlyConfig(), task)

    compress(task, [WeightOnlyConfig()], out_dir=tmp_path / "run",
             runtime=RuntimeConfig(runs=20, warmup=2, rounds=2, measure_memory=False))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    stage = next(s for s in metrics["stages"] if s["technique"] == "weight_only")
    assert stage["size_ratio_vs_baseline"] > 3
    assert stage["int8_op_fraction"] == 1.0  # MatMulNBits counts as an integer-weight kernel
    assert stage["accuracy"] >= 0.75  # agreement with the fp32 argmax of an untrained net (small margins)


# --- scale search, per-layer widths and the accuracy budget ------------------------------------

def test_scale_search_lowers_the_weight_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    for symmetric in (False, True):
        errs = [np.sum((dequantize(pack_weight(w, 4, 32, symmetric, search)) - w) ** 2) for search in (False, True)]
        assert errs[1] < 0.97 * errs[0], errs


def test_layer_bits_sets_one_layer_width(mlp):
    _, x, fp32 = mlp
    names = [n.name for n in fp32.graph.node if n.op_type in ("Gemm", "MatMul")]
    q = quantize_weight_only_graph(fp32, WeightOnlyConfig(bits=4, layer_bits={names[1]: 8}))
    widths = [helper.get_attribute_value(a) for n in q.graph.node for a in n.attribute if a.name == "bits"]
    assert widths == [4, 8]
    with pytest.raises(ConfigError, match="layer_bits: no quantizable MatMul/Gemm named 'nope'"):
        quantize_weight_only_graph(fp32, WeightOnlyConfig(layer_bits={"nope": 8}))
    with pytest.raises(ConfigError, match="layer_bits.fc: ONNX Runtime's CPU MatMulNBits kernel runs 2, 4 or 8"):
        WeightOnlyConfig(layer_bits={"fc": 3})


def test_budget_promotes_the_fewest_layers_to_int8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(256, 64)
    with torch.no_grad():
        target = model(x)
    from edgeslim.task import METRICS

    task = Task(model, (x[:1],), calibration=(x, target), evaluation=(x.numpy(), target.numpy()),
                metric=METRICS["cosine"], metric_name="cosine")
    tech = registry.get("weight_only")
    plain = tech.fn(ModelArtifact(model), WeightOnlyConfig(bits=2, group_size=16, embeddings=False), task)
    fp32_cos = 1.0
    plain_cos = METRICS["cosine"](torch.from_numpy(ort_out(plain.onnx, x.numpy())), target)
    budget = (fp32_cos - plain_cos) / 2  # int2 everywhere misses it: some layers must go to int8
    out = tech.fn(ModelArtifact(model), WeightOnlyConfig(bits=2, group_size=16, max_drop=budget), task)
    got = METRICS["cosine"](torch.from_numpy(ort_out(out.onnx, x.numpy())), target)
    assert fp32_cos - got <= budget + 1e-6
    at = out.notes["layers_at_bits"]
    assert at.get("8", 0) >= 1 and at.get("2", 0) >= 1  # some promoted, not all
    table = out.files["sensitivity.md"]
    assert table.count("| int8 |") == at["8"] and table.count("| int2 |") == at["2"]
