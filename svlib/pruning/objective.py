"""The objectives of KD-guided structured pruning, usable without ``experiments/`` (the stages run them).

Each pairs a "model" and a "head" for ``svlib.train.engine.train`` (one training loop for everything):

* ``DistillPair`` (waves -> student states, teacher states, frame mask; features computed once) with
  ``DistillObjective`` (``distill_loss`` [+ the Lagrangian on the sparsity], per-step metrics as extras);
* ``MaskedSpeakerModel`` with ``ClassifyObjective`` (task-loss pruning: AAM-softmax + the same Lagrangian).

``sparsity_constraint`` builds the Lagrangian and the target schedule (``TargetSchedule``) from a
``PruneConfig``; ``sparsity_penalty`` is their term at the objective's step. ``random_masks`` draws the
same-size random structure, the baseline that tells what distillation's choice of units is worth.
``DistillConfig`` / ``PruneConfig`` are the ``distill:`` / ``prune:`` sections of a pruning stage's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from svlib.config import ConfigError
from svlib.model.frontend import Frontend
from svlib.model.speaker import SpeakerModel
from svlib.model.structure import KINDS
from svlib.pruning.distill import Lagrangian, TargetSchedule, distill_loss
from svlib.pruning.masks import MaskConfig, MaskSet

__all__ = ["RANDOM_MATCH", "ClassifyObjective", "DistillConfig", "DistillObjective", "DistillPair",
           "MaskedSpeakerModel", "PruneConfig", "random_masks", "sparsity_constraint", "sparsity_penalty"]


# ------------------------------------------------------------------------------------------ configs

@dataclass
class DistillConfig:
    """Which hidden states are matched and how (``svlib.pruning.distill_loss``)."""

    layers: list[int] | None = None   # hidden-state indices (0 = feature projection); None: all of them
    l1_weight: float = 1.0
    cos_weight: float = 1.0
    cos_type: Literal["log_sigmoid", "raw"] = "raw"   # the reference: L1 - cosine
    # Average (not sum) over the distilled states: the reference takes L1 / cosine over the stacked states,
    # and it keeps one set of weights valid for 7 states (demo) and 25 (w2v-bert 2.0).
    layer_mean: bool = True

    def __post_init__(self) -> None:
        if self.l1_weight < 0 or self.cos_weight < 0 or self.l1_weight + self.cos_weight == 0:
            raise ConfigError(f"distill: l1_weight and cos_weight must be >= 0 and not both 0, got "
                              f"{self.l1_weight}, {self.cos_weight}")


@dataclass
class PruneConfig:
    """The sparsity constraint of prune1 (absent in prune2)."""

    target_sparsity: float = 0.8
    warmup_steps: int = 10000         # target ramps from 0 (see below) over these steps (a function of the step)
    lr_log_alpha: float = 2e-2
    lr_lambda: float = -2e-2          # negative: the multipliers ascend
    # Initial multipliers. lambda2 > 0 is a quadratic spring acting from the first step: the pull on the
    # gates is then proportional to the gap at once instead of waiting for the multipliers to build up
    # (which, with Adam moving them by ~lr per step whatever the gap, winds lambda1 up and overshoots).
    lambda1_init: float = 0.0
    lambda2_init: float = 0.0
    # Ramp the target from the gates' initial expected sparsity (a function of ``masks`` and the seed) instead
    # of from 0: with FFN gates starting at keep 0.5 the student starts ~10 % sparse, and a ramp from 0
    # first pulls the gates the wrong way.
    warmup_from_initial: bool = False
    warmup_shape: Literal["linear", "ease_out"] = "linear"   # svlib.pruning.TargetSchedule
    # What the Lagrangian constrains. "expected": the expected sparsity (the reference). "deterministic": a
    # straight-through estimate whose value is the sparsity of the deterministic masks (round(E[L0]) units
    # per group, what shrink keeps and achieved_sparsity reports) and whose gradient is the expected one.
    # Coarse units (a head of the demo encoder is 0.7 % of it) can sit at keep ~0.1 with the expectation
    # met by their fractional mass, while the rounding then removes them all (0.712 achieved at target 0.7).
    constrain: Literal["expected", "deterministic"] = "expected"
    masks: MaskConfig = field(default_factory=MaskConfig)
    # The curve from one run: the student (weights and gates) is saved each time the sparsity this run constrains
    # (``constrain``) first reaches one of these levels, under snapshots/<level>/ (``save_snapshot``), and each is then shrunk,
    # distilled, grafted and fine-tuned like a separately trained point. The run's target must be the highest
    # level: it ramps through all of them. A level the run never reaches is saved from its final state
    # (``reached: false`` in that snapshot's result.json).
    snapshots: list[float] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ConfigError(f"prune.target_sparsity: must be in [0, 1), got {self.target_sparsity}")
        if self.snapshots is not None:
            levels = sorted(float(v) for v in self.snapshots)
            if not levels or levels[0] <= 0.0 or len(set(levels)) != len(levels):
                raise ConfigError(f"prune.snapshots: expected distinct sparsities in (0, 1), got {self.snapshots}")
            if abs(levels[-1] - self.target_sparsity) > 1e-9:
                raise ConfigError(f"prune.snapshots: the highest snapshot ({levels[-1]}) must be the run's "
                                  f"target_sparsity ({self.target_sparsity}): the target ramps through every level")
            self.snapshots = levels
        if self.warmup_steps < 0:
            raise ConfigError(f"prune.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.lr_log_alpha < 0:
            raise ConfigError(f"prune.lr_log_alpha: must be >= 0, got {self.lr_log_alpha}")
        if self.lr_lambda > 0:
            raise ConfigError(f"prune.lr_lambda: must be <= 0 (gradient ascent), got {self.lr_lambda}")
        if self.lambda2_init < 0:
            raise ConfigError(f"prune.lambda2_init: must be >= 0, got {self.lambda2_init}")


# ------------------------------------------------------------------------------------------ modules

class DistillPair(nn.Module):
    """waves [B, N] + lengths -> (student states, teacher states, frame mask); features computed once.

    The teacher is held outside the module tree: it is frozen, never trained, and kept out of the state
    dict, so checkpoints do not carry a second copy of the encoder (2.3 GB for w2v-bert 2.0).
    """

    def __init__(self, student: Frontend, teacher: Frontend, mask_set: MaskSet | None = None, *,
                 features: nn.Module):
        super().__init__()
        # The teacher model's own features (its normalisation): the student learns on what the teacher saw.
        # Required, so no caller can fall back to a default the teacher was not trained on.
        self.features = features
        self.frontend = student
        self.masks = mask_set   # a submodule: the log-alphas are saved and restored with the student
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
        self._teacher = (teacher,)

    @property
    def teacher(self) -> Frontend:
        return self._teacher[0]

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor):
        feats, mask = self.features(waves, lengths)
        with torch.no_grad():
            teacher = self.teacher(feats, mask)
        return self.frontend(feats, mask), teacher, mask


def sparsity_constraint(prune: PruneConfig, mask_set: MaskSet) -> tuple[Lagrangian, TargetSchedule]:
    """The Lagrangian and target schedule of prune1, whatever its objective."""
    # the gates as built (before any checkpoint is loaded): the same start in a fresh and a resumed run
    start = float(mask_set.expected_sparsity().detach()) if prune.warmup_from_initial else 0.0
    return (Lagrangian(prune.lambda1_init, prune.lambda2_init),
            TargetSchedule(prune.target_sparsity, prune.warmup_steps, start=min(start, prune.target_sparsity),
                           shape=prune.warmup_shape))


def sparsity_penalty(objective: nn.Module, mask_set: MaskSet) -> tuple[torch.Tensor, dict]:
    """``objective``'s Lagrangian term at its step (advanced by training forwards only) and the extras to log.

    ``objective`` holds ``lagrangian``, ``schedule``, ``constrain`` and the ``step`` buffer (in its state dict,
    so the engine's checkpoints resume the target exactly; evaluation cannot move it). Nothing here reads a
    device value back to the host: the target and both parameter counts are computed on the device
    (``MaskSet.param_counts``)."""
    target = objective.schedule(objective.step)
    if objective.training:
        objective.step += 1
    expected_params, deterministic_params = mask_set.param_counts()
    params = expected_params
    if objective.constrain == "deterministic":  # straight-through: the rounded count, the expected gradient
        params = expected_params + (deterministic_params - expected_params.detach())
    sparsity = 1.0 - params / mask_set.dense_params
    extras = {"expected_sparsity": 1.0 - expected_params.detach() / mask_set.dense_params,
              "deterministic_sparsity": 1.0 - deterministic_params / mask_set.dense_params,
              "target_sparsity": target, "expected_params": expected_params.detach(),
              "lambda1": objective.lagrangian.lambda1.detach().clone(),
              "lambda2": objective.lagrangian.lambda2.detach().clone()}
    return objective.lagrangian(sparsity, target), extras


class DistillObjective(nn.Module):
    """The engine's "head": distillation loss [+ Lagrangian on the sparsity], extras to log.

    Nothing in ``forward`` reads a device value back to the host (no ``float()``/``int()``/``.item()``): the
    extras are 0-d device tensors that the engine sums on the device and reads once per log window.
    """

    def __init__(self, cfg: DistillConfig, num_states: int, prune: PruneConfig | None = None,
                 mask_set: MaskSet | None = None):
        super().__init__()
        if (prune is None) != (mask_set is None):
            raise ValueError("DistillObjective: a sparsity constraint needs both its config and the masks")
        self.cfg = cfg
        self.layers = cfg.layers if cfg.layers is not None else list(range(num_states))
        bad = [i for i in self.layers if not 0 <= i < num_states]
        if bad:
            raise ConfigError(f"distill.layers: {bad} out of range (the encoder has {num_states} hidden states)")
        self.scale = 1.0 / len(self.layers) if cfg.layer_mean else 1.0
        self.lagrangian = self.schedule = None
        self.constrain = prune.constrain if prune is not None else None
        if prune is not None:
            self.lagrangian, self.schedule = sparsity_constraint(prune, mask_set)
        self._masks = (mask_set,)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, outputs, labels):
        student, teacher, mask = outputs
        loss, parts = distill_loss(student, teacher, self.layers, mask, self.cfg.l1_weight * self.scale,
                                   self.cfg.cos_weight * self.scale, self.cfg.cos_type)
        extras = {"distill_l1": parts["l1"] * self.scale, "distill_cos": parts["cos"] * self.scale,
                  "distill_loss": loss.detach()}
        mask_set = self._masks[0]
        if mask_set is not None:
            penalty, constraint = sparsity_penalty(self, mask_set)
            loss = loss + penalty.to(loss.dtype)
            extras |= constraint
        return loss, loss.new_zeros(()), extras


class MaskedSpeakerModel(nn.Module):
    """waves + lengths -> embeddings of a speaker model whose encoder carries ``mask_set`` (classification).

    The masks are a submodule, so the log-alphas are trained, saved and restored with the model."""

    def __init__(self, speaker: SpeakerModel, mask_set: MaskSet):
        super().__init__()
        self.speaker = speaker
        self.masks = mask_set

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.speaker(waves, lengths)


class ClassifyObjective(nn.Module):
    """The engine's "head" for ``objective: classification``: AAM-softmax + the Lagrangian on the sparsity.

    The engine sets ``margin`` (a margin schedule) on it as on a plain AAM head."""

    def __init__(self, aam: nn.Module, prune: PruneConfig, mask_set: MaskSet):
        super().__init__()
        self.aam = aam
        self.constrain = prune.constrain
        self.lagrangian, self.schedule = sparsity_constraint(prune, mask_set)
        self._masks = (mask_set,)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def margin(self) -> float:
        return self.aam.margin

    @margin.setter
    def margin(self, value: float) -> None:
        self.aam.margin = value

    def forward(self, embeddings, labels):
        loss, accuracy = self.aam(embeddings, labels)[:2]
        penalty, extras = sparsity_penalty(self, self._masks[0])
        return loss + penalty.to(loss.dtype), accuracy, extras | {"aam_loss": loss.detach()}


# ------------------------------------------------------------------------------------------ random baseline

RANDOM_MATCH = ("kind", "layer")


def random_masks(dense: list[dict[str, int]], kept: list[dict[str, int]], seed: int,
                 match: Literal["kind", "layer"] = "kind") -> list[dict[str, torch.Tensor]]:
    """0/1 masks of a random structure the size of ``kept``.

    ``match="kind"``: per kind, as many units in total as ``kept``, placed uniformly at random over all layers
    (the structure is random too, not only which units within a layer). ``match="layer"``: ``kept``'s widths
    in every layer, the units within each layer drawn at random (only the choice of units is random).
    """
    if match not in RANDOM_MATCH:
        raise ValueError(f"match must be one of {RANDOM_MATCH}, got {match!r}")
    gen = torch.Generator().manual_seed(seed)
    masks = [{} for _ in dense]
    if match == "layer":
        for layer, widths, want in zip(masks, dense, kept):
            for kind in KINDS:
                if widths[kind] > 0:
                    layer[kind] = torch.zeros(widths[kind])
                    layer[kind][torch.randperm(widths[kind], generator=gen)[:want[kind]]] = 1.0
        return masks
    for kind in KINDS:
        widths = [d[kind] for d in dense]
        total = sum(widths)
        if total == 0:
            continue
        flat = torch.zeros(total)
        flat[torch.randperm(total, generator=gen)[:sum(k[kind] for k in kept)]] = 1.0
        for i, chunk in enumerate(torch.split(flat, widths)):
            if widths[i] > 0:
                masks[i][kind] = chunk
    return masks
