"""edgeslim.evaluate: the task metrics' home, the per-layer sensitivity scan and its table."""

from __future__ import annotations

import pytest
import torch

from edgeslim.errors import DataError
from edgeslim.evaluate import METRICS, accuracy, cosine, evaluate_onnx, scan, sensitivity_markdown


def test_metrics_keep_their_old_import_paths() -> None:
    import edgeslim
    from edgeslim.pipeline import evaluate_onnx as from_pipeline
    from edgeslim.task import METRICS as task_metrics
    from edgeslim.task import accuracy as task_accuracy

    assert task_accuracy is accuracy is edgeslim.accuracy and task_metrics is METRICS
    assert from_pipeline is evaluate_onnx
    assert sorted(METRICS) == ["accuracy", "agreement", "cosine", "top5"] and METRICS["cosine"] is cosine


def test_accuracy_is_the_top1_fraction() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(scores, torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(DataError, match="empty"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_scan_changes_one_layer_at_a_time_in_order() -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    seen = []

    def apply_one(layer: str) -> dict[str, float]:
        return {**weights, layer: 0.0}  # a changed copy: ``weights`` itself stays as it is

    rows = scan(weights, apply_one, lambda layer, model: {"layer": layer, "total": sum(model.values())},
                on_row=lambda i, row: seen.append((i, row["layer"])))
    assert rows == [{"layer": "a", "total": 5.0}, {"layer": "b", "total": 4.0}, {"layer": "c", "total": 3.0}]
    assert seen == [(0, "a"), (1, "b"), (2, "c")]
    assert weights == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert scan([], apply_one, lambda layer, model: {}) == []


def test_sensitivity_markdown_is_a_title_and_a_table() -> None:
    text = sensitivity_markdown(["# Title", "", "summary"], ["layer", "metric"], [["fc1", "0.9000"], ["fc2", "0.5000"]])
    assert text == "# Title\n\nsummary\n\n| layer | metric |\n|---|---|\n| fc1 | 0.9000 |\n| fc2 | 0.5000 |\n"
