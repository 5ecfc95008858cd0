"""KD-guided structured pruning of the W2V-BERT encoder (DPHuBERT-style hard-concrete masks).

Flow: ``mask_set = attach_masks(model)`` -> train with ``distill_loss`` + ``Lagrangian`` on
``mask_set.expected_sparsity()`` -> ``prune_model(model, mask_set)`` -> ``save_pruned_encoder`` /
``load_pruned_encoder``.
"""

from .counting import base_params, count_macs, count_params, dense_sizes, expected_params, macs_per_second
from .distill import Lagrangian, TargetSchedule, distill_loss, param_groups
from .hardconcrete import HardConcrete
from .masks import MaskConfig, MaskSet, attach_masks
from .shrink import (
    ConstantBlock,
    layer_sizes,
    load_pruned_encoder,
    prune_model,
    save_pruned_encoder,
    shrink_encoder,
    shrink_to_sizes,
)

__all__ = [
    "ConstantBlock", "HardConcrete", "Lagrangian", "MaskConfig", "MaskSet", "TargetSchedule", "attach_masks",
    "base_params", "count_macs", "count_params", "dense_sizes", "distill_loss", "expected_params",
    "layer_sizes", "load_pruned_encoder", "macs_per_second", "param_groups", "prune_model",
    "save_pruned_encoder", "shrink_encoder", "shrink_to_sizes",
]
