"""Low-rank factorization: truncated SVD for Linear, Tucker-2 for Conv2d, ranks by energy, parameter
budget, VBMF or a fixed value; registered as the ``lowrank`` technique."""

from edgeslim.lowrank.rank import VBMFResult, energy_rank, evbmf, finish_rank, vbmf_rank
from edgeslim.lowrank.svd import factorize_conv_svd, factorize_linear, svd_factors
from edgeslim.lowrank.technique import LayerPlan, LowRankConfig, apply_plan, lowrank, plan_ranks
from edgeslim.lowrank.tucker import factorize_conv, hosvd2

__all__ = [
    "LayerPlan",
    "LowRankConfig",
    "VBMFResult",
    "apply_plan",
    "energy_rank",
    "evbmf",
    "factorize_conv",
    "factorize_conv_svd",
    "factorize_linear",
    "finish_rank",
    "hosvd2",
    "lowrank",
    "plan_ranks",
    "svd_factors",
    "vbmf_rank",
]
