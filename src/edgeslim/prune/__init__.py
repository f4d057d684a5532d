"""Pruning: unstructured masks with schedules, structured channel removal, sparse storage.

Unstructured API (stable; :mod:`edgeslim.cluster` builds on it): ``magnitude_masks``,
``nm_masks``, ``apply_masks``, ``mask_keeper`` (for ``train(..., after_step=...)``),
``sparsity_of``; :mod:`edgeslim.prune.sparse` holds Han et al.'s relative-index coding
(``encode_relative``) and the exact sparse file (``save_sparse`` / ``load_sparse``).
Techniques (registered by name): prune_magnitude.
"""

from edgeslim.prune.magnitude_technique import PruneMagnitudeConfig, prune_magnitude
from edgeslim.prune.schedule import GradualPruner, cubic_sparsity, iterative_prune
from edgeslim.prune.sparse import encode_relative, load_sparse, save_sparse
from edgeslim.prune.unstructured import (apply_masks, layer_sparsity, magnitude_masks, mask_keeper, masks_from_zeros,
                                         nm_masks, prunable_weights, sparsity_of)

__all__ = [
    "GradualPruner", "PruneMagnitudeConfig", "apply_masks", "cubic_sparsity", "encode_relative", "iterative_prune",
    "layer_sparsity", "load_sparse", "magnitude_masks", "mask_keeper", "masks_from_zeros", "nm_masks",
    "prunable_weights", "prune_magnitude", "save_sparse", "sparsity_of",
]

# Other pruning techniques register themselves by import below (one line each).
from edgeslim.prune.transformer_technique import PruneTransformerConfig, prune_transformer  # noqa: E402,F401
from edgeslim.prune.channels_technique import PruneChannelsConfig, prune_channels  # noqa: E402,F401
