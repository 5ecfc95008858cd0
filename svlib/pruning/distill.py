"""Distillation of a masked student encoder towards a frozen teacher, with a Lagrangian sparsity constraint.

Loss, summed over the distilled layers l and averaged over the valid (non-padded) frames::

    L_distill = sum_l [ w_l1 * mean_t |s_l,t - t_l,t|_1 / D  +  w_cos * mean_t c(cos(s_l,t, t_l,t)) ]

with ``c(x) = -log(sigmoid(x))`` (``cos_type="log_sigmoid"``, DPHuBERT's choice: the penalty keeps a
gradient as the cosine approaches 1, and is bounded as it approaches -1) or ``c(x) = -x`` (``"raw"``).
Layers are summed, not averaged, as in DPHuBERT; scale the weights when distilling many layers.

Sparsity constraint (Wang et al. 2020; DPHuBERT), s = expected sparsity, t = target at this step::

    L_reg = lambda1 * (s - t) + lambda2 * (s - t)^2

The model and gates minimise L_distill + L_reg; lambda1 and lambda2 maximise it (gradient ascent), which
``param_groups`` gets from a negative learning rate in their group. At a saddle point s = t.

``TargetSchedule`` ramps t from 0 (or a given start) to the target over ``warmup_steps``, linearly or easing
out; it is a pure function of the training step, so evaluation cannot advance it (the reference advances it
on every validation). The reference starts both multipliers at 0; ``Lagrangian(lambda2_init=...)`` starts
with a quadratic spring instead, which matters when training is short: with Adam the multipliers move by
about their lr per step whatever the gap, so from 0 the constraint has no pull for many steps, lambda1 winds
up meanwhile, and the gates then shoot past the target.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _pairs(num_states: int, layers) -> list[tuple[int, int]]:
    if layers is None:
        return [(i, i) for i in range(num_states)]
    return [(x, x) if isinstance(x, int) else (int(x[0]), int(x[1])) for x in layers]


def distill_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    layers: Iterable[int | tuple[int, int]] | None = None,
    attention_mask: torch.Tensor | None = None,
    l1_weight: float = 1.0,
    cos_weight: float = 1.0,
    cos_type: str = "log_sigmoid",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation loss between hidden-state tuples ``[B, T, D]``.

    ``layers``: state indices (student i -> teacher i) or ``(student, teacher)`` pairs; default all states.
    ``attention_mask [B, T]``: 1 for real frames; padded frames do not count. Returns ``(loss, parts)``
    where ``parts`` holds the detached ``l1`` and ``cos`` terms (unweighted, summed over layers) as 0-d
    tensors on the states' device (reading them as floats would wait for the device on every step).
    """
    if cos_type not in ("log_sigmoid", "raw"):
        raise ValueError(f"cos_type must be 'log_sigmoid' or 'raw', got {cos_type!r}")
    pairs = _pairs(len(student), layers)
    if not pairs:
        raise ValueError("no layers to distill")
    ref = student[pairs[0][0]]
    if attention_mask is None:
        weights = torch.ones(ref.shape[:2], device=ref.device, dtype=torch.float32)
    else:
        weights = attention_mask.to(device=ref.device, dtype=torch.float32)
    weights = weights / weights.sum().clamp_min(1.0)
    l1_total = ref.new_zeros((), dtype=torch.float32)
    cos_total = ref.new_zeros((), dtype=torch.float32)
    for si, ti in pairs:
        s, t = student[si].float(), teacher[ti].detach().float()
        if s.shape != t.shape:
            raise ValueError(f"student state {si} {tuple(s.shape)} vs teacher state {ti} {tuple(t.shape)}")
        l1_total = l1_total + ((s - t).abs().mean(-1) * weights).sum()
        cos = F.cosine_similarity(s, t, dim=-1)
        penalty = -F.logsigmoid(cos) if cos_type == "log_sigmoid" else -cos
        cos_total = cos_total + (penalty * weights).sum()
    loss = l1_weight * l1_total + cos_weight * cos_total
    return loss, {"l1": l1_total.detach(), "cos": cos_total.detach()}


class Lagrangian(nn.Module):
    """``lambda1 * (s - t) + lambda2 * (s - t)^2``; its two multipliers are trained by gradient ascent."""

    def __init__(self, lambda1_init: float = 0.0, lambda2_init: float = 0.0):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.tensor(float(lambda1_init)))
        self.lambda2 = nn.Parameter(torch.tensor(float(lambda2_init)))

    def forward(self, expected_sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected_sparsity - target
        return self.lambda1 * gap + self.lambda2 * gap * gap


class TargetSchedule:
    """Target sparsity at a training step: from ``start`` (default 0) to ``target`` over ``warmup_steps``,
    then flat (the settling phase).

    ``shape="linear"`` (the reference) ramps at a constant rate; ``"ease_out"`` (``1 - (1 - u)^2``) starts at
    twice that rate, while pruning is cheap, and arrives with zero slope, so the gates are not still moving
    at the ramp's speed when the target stops (which, through Adam's momentum, overshoots it).
    """

    SHAPES = ("linear", "ease_out")

    def __init__(self, target: float, warmup_steps: int, start: float = 0.0, shape: str = "linear"):
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if shape not in self.SHAPES:
            raise ValueError(f"shape must be one of {self.SHAPES}, got {shape!r}")
        self.target = float(target)
        self.warmup_steps = int(warmup_steps)
        self.start = float(start)
        self.shape = shape

    def __call__(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """The target at ``step``: a float for an int step; a float64 tensor on its device for a tensor step
        (a training loop's step counter buffer, read without a host sync)."""
        if torch.is_tensor(step):
            if self.warmup_steps == 0:
                return torch.full((), self.target, dtype=torch.float64, device=step.device)
            u = (step.to(torch.float64) / self.warmup_steps).clamp(0.0, 1.0)
            ramp = self.start + (self.target - self.start) * self._shaped(u)
            return torch.where(step >= self.warmup_steps, torch.full_like(ramp, self.target), ramp)
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.target
        return self.start + (self.target - self.start) * self._shaped(max(step, 0) / self.warmup_steps)

    def _shaped(self, u):
        return 1.0 - (1.0 - u) ** 2 if self.shape == "ease_out" else u


def param_groups(
    weights: Iterable[nn.Parameter],
    log_alphas: Iterable[nn.Parameter],
    lagrangian: Lagrangian,
    lr_weights: float = 2e-4,
    lr_log_alpha: float = 2e-2,
    lr_lambda: float = -2e-2,
) -> list[dict]:
    """Optimizer groups: model weights, gate log-alphas, and the multipliers with a negative lr (ascent).

    Weight decay is 0 everywhere: decaying log-alphas or multipliers would bias the constraint.
    """
    if lr_lambda > 0:
        raise ValueError("lr_lambda must be <= 0: the multipliers maximise the Lagrangian")
    weights = [p for p in weights if p.requires_grad]
    return [
        {"params": weights, "lr": lr_weights, "weight_decay": 0.0, "name": "weights"},
        {"params": list(log_alphas), "lr": lr_log_alpha, "weight_decay": 0.0, "name": "log_alpha"},
        {"params": list(lagrangian.parameters()), "lr": lr_lambda, "weight_decay": 0.0, "name": "lambdas"},
    ]
