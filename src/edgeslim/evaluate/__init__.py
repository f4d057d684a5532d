"""Measuring models: task metrics (accuracy, cosine, SQNR, rank correlation), the metric of a
deployable ONNX graph on ONNX Runtime, and per-layer sensitivity scans."""

from edgeslim.evaluate.metrics import (METRICS, accuracy, cosine, cosine_min, pair_scores, row_cosines, spearman,
                                       sqnr_db)
from edgeslim.evaluate.onnx_eval import evaluate_onnx
from edgeslim.evaluate.sensitivity import scan, sensitivity_markdown

__all__ = ["METRICS", "accuracy", "cosine", "cosine_min", "evaluate_onnx", "pair_scores", "row_cosines", "scan",
           "sensitivity_markdown", "spearman", "sqnr_db"]
