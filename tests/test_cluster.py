"""Weight sharing (k-means codebooks, shared-gradient fine-tune), canonical Huffman coding and the
Deep Compression file: exact round trips, bit-identical reloads, sizes and one-line errors."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.cluster import huffman
from edgeslim.cluster.format import decode_state, encode_state, load_compressed, load_module, save_compressed
from edgeslim.cluster.kmeans import cluster_tensor, codebook, finalize, kmeans_1d, share_weights
from edgeslim.cluster.technique import FILE_NAME, ClusterConfig, cluster_step
from edgeslim.errors import CheckpointError, ConfigError, DataError
from edgeslim.prune import masks_from_zeros
from edgeslim.sparsity import Sparsity
from edgeslim.task import ModelArtifact, Task
from edgeslim.train import FineTune

from conftest import small_cnn


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


def _prune(model: nn.Module, keep: float) -> nn.Module:
    """Zero all but the largest ``keep`` fraction of each weight matrix (in place)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight
                cut = w.abs().flatten().kthvalue(int(round((1 - keep) * w.numel()))).values
                w.masked_fill_(w.abs() <= cut, 0.0)
    return model


def _distinct_nonzero(w: torch.Tensor) -> torch.Tensor:
    return torch.unique(w[w != 0])


# ------------------------------------------------------------------------------------- k-means
def test_kmeans_with_linear_init_converges_to_the_cluster_means():
    rng = np.random.default_rng(0)
    groups = [rng.normal(c, 0.05, n) for c, n in ((-1.0, 300), (0.5, 40), (2.0, 5))]
    values = np.concatenate(groups)
    centroids, labels = kmeans_1d(values, 3)
    np.testing.assert_allclose(centroids, [g.mean() for g in groups], rtol=0, atol=1e-12)
    assert np.array_equal(np.bincount(labels), [300, 40, 5])
    # linear init keeps the 5 rare large values as their own centroid (Han et al. 2016, 3.2)
    again = kmeans_1d(values, 3)
    assert np.array_equal(again[0], centroids) and np.array_equal(again[1], labels)


def test_clustered_layer_has_at_most_2_to_the_bits_values_and_keeps_its_zeros():
    model = _prune(_mlp(), keep=0.3)
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    share_weights(model, {"1": 3, "3": 2})
    finalize(model)
    assert isinstance(model[1].weight, nn.Parameter) and not hasattr(model[1], "parametrizations")
    for name, bits in (("1", 3), ("3", 2)):
        w = dict(model.named_modules())[name].weight
        assert torch.equal(w == 0, zeros[name])
        assert 1 < len(_distinct_nonzero(w)) <= 2**bits


def test_codebook_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(20, 7)
    clustered = cluster_tensor(layer.weight.detach(), 3)
    dense = nn.Linear(20, 7)
    with torch.no_grad():
        dense.weight.copy_(clustered.weight())
        dense.bias.copy_(layer.bias)
    share_weights(layer, {"": 3})
    x = torch.randn(5, 20)
    layer(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    grad = codebook(layer, "").grad  # (8,)
    # Han et al. 2016 eq. 3: dL/dC_k = sum over weights with index k of dL/dW
    expected = torch.zeros(8).index_add_(0, clustered.index.flatten(), dense.weight.grad.flatten())
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_shared_gradient_fine_tune_keeps_the_weights_on_the_codebook():
    from edgeslim.train import train

    model = _prune(_mlp(), keep=0.5)
    zeros = (model[1].weight == 0).clone()
    start = share_weights(model, {"1": 4})["1"].codebook
    x = torch.rand(64, 1, 8, 8)
    y = torch.arange(64) % 10
    train(model, x, y, epochs=2, lr=1e-2, batch_size=16, progress=False)
    book = codebook(model, "1").detach().clone()
    finalize(model)
    w = model[1].weight.detach()
    assert not torch.equal(book, start)  # the centroids did move
    assert model[1].weight.grad is None and model[1].weight.shape == (48, 64)
    assert torch.equal(w == 0, zeros)
    assert torch.isin(w[w != 0], book).all()


@pytest.mark.parametrize("bits", [0, 9, 2.5, True])
def test_bad_bits_is_a_one_line_config_error(bits):
    with pytest.raises(ConfigError, match=r"^conv_bits: (must be an integer in 1\.\.8|expected an integer)") as err:
        ClusterConfig(conv_bits=bits)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^layer_bits\.fc: must be an integer in 1\.\.8"):
        ClusterConfig(layer_bits={"fc": bits})
    with pytest.raises(ConfigError, match="bits: must be an integer in 1..8"):
        cluster_tensor(torch.ones(3, 3), bits)


# ------------------------------------------------------------------------------------- Huffman
@pytest.mark.parametrize("kind", ["random", "skewed", "single", "one", "empty"])
def test_huffman_round_trip_is_exact(kind):
    rng = np.random.default_rng(1)
    symbols = {
        "random": rng.integers(0, 40, 5000),
        "skewed": rng.geometric(0.3, 20000) - 1,
        "single": np.full(1000, 7),
        "one": np.array([3]),
        "empty": np.zeros(0, dtype=np.int64),
    }[kind]
    enc = huffman.encode(symbols)
    got = huffman.decode(enc.lengths, enc.payload, enc.count, enc.nbits)
    assert got.dtype == np.int64 and np.array_equal(got, symbols)
    assert len(enc.payload) == math.ceil(enc.nbits / 8)
    if kind in ("single", "one"):
        assert enc.nbits == len(symbols)  # one bit per symbol
    if kind in ("random", "skewed"):
        # an optimal prefix code: entropy <= mean code length < entropy + 1, and Kraft's sum is 1
        p = np.bincount(symbols) / len(symbols)
        entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
        assert entropy <= enc.nbits / len(symbols) < entropy + 1
        used = enc.lengths[enc.lengths > 0].astype(float)
        assert np.sum(2.0 ** -used) == pytest.approx(1.0)


def test_canonical_codes_are_prefix_free_and_ordered():
    lengths = huffman.code_lengths(np.array([5, 9, 12, 13, 16, 45]))
    codes = huffman.canonical_codes(lengths)
    words = [format(int(c), f"0{n}b") for c, n in zip(codes, lengths)]
    # lengths as in CLRS 16.3 (4, 4, 3, 3, 3, 1); codes assigned by (length, symbol) as in RFC 1951
    assert words == ["1110", "1111", "100", "101", "110", "0"]
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_corrupt_huffman_bits_are_a_data_error():
    enc = huffman.encode(np.array([0, 0, 0, 1]))  # lengths (1, 1)
    with pytest.raises(DataError, match="Huffman decode: stream ends after 4 of 9 symbols"):
        huffman.decode(enc.lengths, enc.payload, enc.count + 5, enc.nbits)


# ------------------------------------------------------------------------------------- file format
def _clustered_cnn() -> nn.Module:
    model = _prune(small_cnn(), keep=0.4)
    share_weights(model, {"0": 5, "4": 4, "7": 3})
    return finalize(model).eval()


def test_file_round_trip_is_exact_for_every_tensor(tmp_path):
    model = _clustered_cnn()
    model[7].weight.data[:, :200] = 0.0  # long zero runs: fillers with 2-bit relative indices
    path = tmp_path / "m.esdc"
    size = save_compressed(model, path, index_bits=2)
    assert size == path.stat().st_size
    state = load_compressed(path)
    ref = model.state_dict()
    assert list(state) == list(ref)
    for key in ref:
        assert state[key].dtype == ref[key].dtype and torch.equal(state[key], ref[key]), key
    header = json.loads(path.read_bytes()[9:9 + int.from_bytes(path.read_bytes()[5:9], "little")])
    layouts = {t["name"]: t for t in header["tensors"]}
    assert layouts["7.weight"]["layout"] == "shared" and layouts["7.weight"]["fillers"] > 0
    assert layouts["1.running_mean"]["layout"] == "raw" and layouts["1.num_batches_tracked"]["dtype"] == "int64"


def test_dense_codebook_tensor_and_column_order_round_trip():
    torch.manual_seed(0)
    w = torch.randint(-3, 4, (30, 50)).float() * 0.25  # no index needed where most entries are nonzero
    w[:, ::2] = 0.0  # zero columns: column-major runs
    state = {"w": w, "v": torch.linspace(-1, 1, 5), "flags": torch.tensor([True, False])}
    back = decode_state(encode_state(state, index_bits=3))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_automatic_index_width_gives_the_smallest_file_and_decodes_exactly():
    model = _prune(_mlp(), keep=0.1)
    share_weights(model, {"1": 4, "3": 4})
    finalize(model)
    auto = encode_state(model, index_bits=None)
    assert all(len(auto) <= len(encode_state(model, index_bits=b)) for b in range(1, 13))
    back = decode_state(auto)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    config = ClusterConfig(fc_index_bits=None)
    data = json.loads(json.dumps(config.to_dict()))
    data.pop("technique")
    assert ClusterConfig.from_dict(data) == config and config.fc_index_bits is None
    with pytest.raises(ConfigError, match="^conv_index_bits: must be an integer in 1..16"):
        ClusterConfig(conv_index_bits=0)


def test_reloaded_module_and_onnx_are_bit_identical(tmp_path, images):
    from edgeslim.runtime import export_onnx, make_session, run

    model = _clustered_cnn()
    save_compressed(model, tmp_path / "m.esdc")
    rebuilt = load_module(tmp_path / "m.esdc", small_cnn())
    x = torch.from_numpy(images)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    a = run(make_session(export_onnx(model, (x[:1],))), images)[0]
    b = run(make_session(export_onnx(rebuilt, (x[:1],))), images)[0]
    assert np.array_equal(a, b)


def test_file_is_much_smaller_than_the_dense_weights():
    torch.manual_seed(0)
    model = _prune(nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)), keep=0.1)
    share_weights(model, {"0": 5, "2": 5})
    finalize(model)
    dense = 4 * sum(p.numel() for p in model.parameters())
    size = len(encode_state(model, index_bits=5))
    # about 10% kept, each costing < 5 bits of value + ~4 bits of index: at least 15x smaller
    assert size * 15 < dense, (size, dense)


def test_bad_magic_and_truncated_file_are_one_line_errors(tmp_path):
    path = tmp_path / "m.esdc"
    save_compressed(_clustered_cnn(), path)
    data = path.read_bytes()
    (tmp_path / "bad.esdc").write_bytes(b"PK\x03\x04" + data[4:])
    (tmp_path / "cut.esdc").write_bytes(data[:-10])
    (tmp_path / "head.esdc").write_bytes(data[:20])
    for name, pattern in (("bad", "bad magic"), ("cut", "truncated"), ("head", "truncated")):
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_compressed(tmp_path / f"{name}.esdc")
        assert str(tmp_path / f"{name}.esdc") in str(err.value) and "\n" not in str(err.value)
    # a header whose entry count does not match the coded streams: the tensor is named
    i = data.index(b'"entries":', data.index(b'"name":"7.weight"')) + len(b'"entries":')
    first = data[i:i + 1]
    (tmp_path / "count.esdc").write_bytes(data[:i] + (b"9" if first != b"9" else b"8") + data[i + 1:])
    with pytest.raises(CheckpointError, match=r"count.esdc: tensor '7.weight' is corrupt \("):
        load_compressed(tmp_path / "count.esdc")
    with pytest.raises(CheckpointError, match="shape mismatch for '7.weight'"):
        load_module(path, nn.Sequential(*list(small_cnn())[:7], nn.Linear(256, 9)))


# ------------------------------------------------------------------------------------- technique
def _task(images: np.ndarray, model: nn.Module) -> Task:
    labels = np.arange(len(images)) % 10
    return Task(model, (torch.from_numpy(images[:1]),), calibration=(images, labels), evaluation=(images, labels),
                train=(images, labels))


def test_technique_file_decodes_to_the_returned_model_and_keeps_pruned_zeros(images):
    pruned = _prune(small_cnn(), keep=0.5)
    config = ClusterConfig(conv_bits=4, fc_bits=3, exclude=("0",),
                           fine_tune=FineTune(epochs=1, lr=1e-3, progress=False))
    sparsity = Sparsity(masks_from_zeros(pruned))  # what a prune_magnitude step would carry
    out = cluster_step(ModelArtifact(pruned, sparsity=sparsity), config, _task(images, pruned))
    assert out.size_file == FILE_NAME and out.sparsity is sparsity
    state = decode_state(out.files[FILE_NAME])
    assert all(torch.equal(state[k], v) for k, v in out.torch.state_dict().items())
    for name, bits in (("4", 4), ("7", 3)):
        w, before = dict(out.torch.named_modules())[name].weight, dict(pruned.named_modules())[name].weight
        assert torch.equal(w == 0, before == 0) and len(_distinct_nonzero(w)) <= 2**bits
    # the excluded, unclustered layer was fine-tuned but keeps its pruned zeros
    w0 = out.torch[0].weight
    assert torch.equal(w0 == 0, pruned[0].weight == 0) and len(_distinct_nonzero(w0)) > 16
    assert out.notes["cluster"]["bits"] == {"4": 4, "7": 3}
    _task(images, pruned).export(out.torch)  # the fine-tuned model exports (validated against ORT)


def test_technique_names_an_unknown_layer_and_missing_training_data(images):
    model = small_cnn()
    with pytest.raises(ConfigError, match="layers: .*'nope'"):
        cluster_step(ModelArtifact(model), ClusterConfig(layers=("nope",),
                                                         fine_tune=FineTune(progress=False)), _task(images, model))
    task = _task(images, model)
    task.train = None
    with pytest.raises(ConfigError, match="^fine_tune.epochs: .*training data"):
        cluster_step(ModelArtifact(model), ClusterConfig(fine_tune=FineTune(progress=False)), task)


def test_technique_with_distillation_tracks_the_teacher(images):
    model = small_cnn()
    out = cluster_step(ModelArtifact(model), ClusterConfig(fine_tune=FineTune(temperature=2.0, epochs=2, lr=1e-3,
                                                                              progress=False)),
                       _task(images, model))
    x = torch.from_numpy(images)
    with torch.no_grad():
        agree = (out.torch(x).argmax(1) == model(x).argmax(1)).float().mean()
    assert agree >= 0.9


def test_pipeline_reports_the_compact_file_as_the_stage_size(tmp_path, images):
    from edgeslim.pipeline import RuntimeConfig, compress

    model = _prune(small_cnn(), keep=0.3)
    result = compress(_task(images, model), [ClusterConfig(conv_bits=4, fc_bits=4,
                                                           fine_tune=FineTune(epochs=0, progress=False))],
                      out_dir=tmp_path / "run", runtime=RuntimeConfig(warmup=1, runs=4, rounds=1, measure_memory=False))
    stage = result.stage("01_cluster")
    written = tmp_path / "run" / "01_cluster" / FILE_NAME
    assert stage.metrics["size_bytes"] == written.stat().st_size
    assert stage.metrics["size_bytes"] * 4 < stage.metrics["onnx_size_bytes"]
    state = decode_state(written.read_bytes())
    assert list(state) == list(small_cnn().state_dict())  # the architecture's order, weight before bias
    assert torch.equal((state["4.weight"] == 0), (model[4].weight == 0))
