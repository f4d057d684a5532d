"""Metrics for vector-output models: embedding fidelity (cosine, SQNR) and rank correlation."""

from edgeslim.evaluate.metrics import cosine, cosine_min, pair_scores, row_cosines, spearman, sqnr_db

__all__ = ["cosine", "cosine_min", "pair_scores", "row_cosines", "spearman", "sqnr_db"]
