"""Measuring models: task metrics (accuracy, top-5, agreement, cosine, SQNR, rank correlation), the metric of a
deployable ONNX graph on ONNX Runtime, and per-layer sensitivity scans."""

from edgeslim.evaluate.metrics import (METRICS, VS_BASELINE, accuracy, agreement, cosine, cosine_min, pair_scores,
                                       row_cosines, spearman, sqnr_db, top5)
from edgeslim.evaluate.onnx_eval import evaluate_onnx, metric_value, onnx_outputs
from edgeslim.evaluate.sensitivity import scan, sensitivity_markdown

__all__ = ["METRICS", "VS_BASELINE", "accuracy", "agreement", "cosine", "cosine_min", "evaluate_onnx", "metric_value",
           "onnx_outputs", "pair_scores", "row_cosines", "scan", "sensitivity_markdown", "spearman", "sqnr_db", "top5"]
