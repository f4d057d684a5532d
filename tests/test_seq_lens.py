"""Latency at the sequence lengths users send: workloads of unpadded samples or stated lengths,
timed interleaved, and what metrics.json and report.md say about them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim import DynamicInt8Config, RuntimeConfig, Task, compress
from edgeslim.errors import RuntimeToolError
from edgeslim.evaluate.metrics import cosine
from edgeslim.runtime import compare_latency, export_onnx, fixed_lengths, own_lengths


def _tokens(n: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (0 = padding) and attention masks of random real lengths 3..seq//2."""
    rng = np.random.default_rng(seed)
    ids, mask = np.zeros((n, seq), np.int64), np.zeros((n, seq), np.int64)
    for i, length in enumerate(rng.integers(3, seq // 2, n)):
        ids[i, :length] = rng.integers(1, 50, length)
        mask[i, :length] = 1
    return ids, mask


class TokenEncoder(nn.Module):
    """Embedding -> Linear -> masked mean: (ids, mask) -> (B, 32); cost grows with the length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(50, 64), nn.Linear(64, 32)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).float()
        return (self.fc(self.emb(ids)) * m).sum(1) / m.sum(1).clamp(min=1)


def test_own_lengths_cuts_each_batch_to_its_longest_real_sample():
    ids, mask = _tokens(7, 32)
    real = mask.sum(1)
    one = own_lengths((ids, mask), (1, 1))
    assert one.seq_lens == tuple(real) and [f[0].shape for f in one.feeds] == [(1, n) for n in real]
    assert all((f[1] == 1).all() for f in one.feeds)  # unpadded: every position is a real token
    two = own_lengths((ids, mask), (1, 1), batch_size=2)
    assert two.seq_lens == tuple(int(real[i:i + 2].max()) for i in range(0, 7, 2))
    assert two.feeds[-1][0].shape == (1, real[-1])  # the last, short batch
    summary = one.summary()
    assert summary["p50"] == float(np.median(real)) and summary["max"] == real.max() and summary["lengths"] is None
    # A real token with id 0 inside the mask still counts: the mask is an input with the same axis.
    ids[0, real[0] - 1] = 0
    assert own_lengths((ids, mask), (1, 1)).seq_lens[0] == real[0]
    with pytest.raises(RuntimeToolError, match="sequence axis 2"):
        own_lengths((ids, mask), (2, None))


def test_fixed_lengths_pads_or_cuts_every_sample_to_each_length():
    ids, mask = _tokens(3, 32)
    load = fixed_lengths((ids, mask), (1, 1), (4, 40), limit=2)
    assert load.seq_lens == (4, 40, 4, 40) and load.by_length
    assert [f[0].shape[1] for f in load.feeds] == [4, 40, 4, 40]
    np.testing.assert_array_equal(load.feeds[0][0], ids[:1, :4])
    assert load.feeds[1][1][0, 32:].sum() == 0 and load.feeds[1][1][0, :32].sum() == mask[0].sum()  # zero padding
    assert load.summary()["lengths"] == [4, 40]


def test_compare_latency_times_each_length_and_longer_inputs_take_longer(tmp_path):
    model = TokenEncoder().eval()
    ids, mask = _tokens(4, 16)
    path = tmp_path / "m.onnx"
    path.write_bytes(export_onnx(model, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
                                 dynamic_dims=({1: "seq"}, {1: "seq"})).SerializeToString())
    load = fixed_lengths((ids, mask), (1, 1), (4, 2048), limit=4)
    stats = compare_latency({"a": path, "b": path}, load, warmup=2, runs=40, rounds=2)
    for s in stats.values():
        by = s.p50_ms_by_seq_len
        assert set(by) == {4, 2048} and by[2048] > 3 * by[4]
        assert s.runs == 40 and s.to_dict()["latency_ms_p50_by_seq_len"] == {"4": by[4], "2048": by[2048]}


@pytest.fixture(scope="module")
def token_task() -> Task:
    model = TokenEncoder().eval()
    ids, mask = _tokens(40, 48, seed=1)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return Task(model, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])), calibration=((ids, mask), None),
                evaluation=((ids, mask), ref), metric=cosine, metric_name="cosine",
                dynamic_dims=({1: "seq"}, {1: "seq"}), input_names=("input_ids", "attention_mask"))


@pytest.mark.parametrize("seq_lens", ["eval", (8, 48), "example"])
def test_metrics_json_says_at_which_lengths_latency_was_measured(token_task, tmp_path, seq_lens):
    run = RuntimeConfig(warmup=2, runs=20, rounds=2, measure_memory=False, seq_lens=seq_lens)
    compress(token_task, [DynamicInt8Config()], runtime=run, out_dir=tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    measured = metrics["runtime"]["measured_seq_lens"]
    report = (tmp_path / "run" / "report.md").read_text()
    real = token_task.evaluation[0][1][:20].sum(1)  # the first `runs` evaluation samples' real lengths
    if seq_lens == "eval":
        assert metrics["runtime"]["seq_lens"] == "eval" and measured["source"] == "eval"
        assert (measured["min"], measured["p50"], measured["max"]) == (real.min(), np.median(real), real.max())
        assert f"median {np.median(real):g}" in report
        assert all(s["latency_ms_p50_by_seq_len"] is None for s in metrics["stages"])
    elif seq_lens == "example":
        assert measured == {"source": "example", "feeds": 1, "min": 48, "p50": 48.0, "mean": 48.0, "max": 48,
                            "lengths": [48]}
        assert "sequence length 48" in report
    else:
        assert metrics["runtime"]["seq_lens"] == [8, 48] and measured["lengths"] == [8, 48]
        for stage in metrics["stages"]:
            assert set(stage["latency_ms_p50_by_seq_len"]) == {"8", "48"}
        assert "sequence lengths 8, 48" in report and "p50 ms by sequence length: 8:" in report
