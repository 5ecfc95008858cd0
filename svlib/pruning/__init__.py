"""KD-guided structured pruning of the W2V-BERT encoder (DPHuBERT-style hard-concrete masks), without recipes.

Here: the gates (``hardconcrete``, ``masks``), exact parameter/MAC counts (``counting``), the distillation loss,
Lagrangian and target schedule (``distill``), the engine objectives, their configs and the random-structure
baseline (``objective``), and the end of pruning (``shrink``: freeze masks, shrink, save). Not here: the module
surgery that changes layer widths (``svlib.model.structure``, so the model layer loads shrunk folders without
this package) and the stages that run all this (``experiments/prune.py``).

Flow: ``mask_set = attach_masks(model)`` -> train ``DistillPair`` + ``DistillObjective`` (``distill_loss`` +
``Lagrangian`` on ``mask_set.expected_sparsity()``) -> ``prune_model(model, mask_set)`` -> ``save_pruned_encoder``
-> ``svlib.model.load_encoder`` (or ``load_pruned_encoder``).
"""

from .counting import base_params, count_macs, count_params, dense_sizes, expected_params, macs_per_second
from .distill import Lagrangian, TargetSchedule, distill_loss, param_groups
from .hardconcrete import HardConcrete
from .masks import MaskConfig, MaskSet, attach_masks
from .objective import (ClassifyObjective, DistillConfig, DistillObjective, DistillPair, MaskedSpeakerModel,
                        PruneConfig, random_masks)
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
    "ClassifyObjective", "ConstantBlock", "DistillConfig", "DistillObjective", "DistillPair", "HardConcrete",
    "Lagrangian", "MaskConfig", "MaskSet", "MaskedSpeakerModel", "PruneConfig", "TargetSchedule", "attach_masks",
    "base_params", "count_macs", "count_params", "dense_sizes", "distill_loss", "expected_params",
    "layer_sizes", "load_pruned_encoder", "macs_per_second", "param_groups", "prune_model", "random_masks",
    "save_pruned_encoder", "shrink_encoder", "shrink_to_sizes",
]
