"""Learning-rate schedules as pure functions of the step.

A schedule here is ``lr_factor(cfg, step, total_steps) -> float``, a multiplier applied to each parameter
group's base learning rate (front-end and back-end have their own base lr; the shape of the schedule is
shared). Because the factor depends on nothing but the step, a resumed run sets exactly the learning rates
the uninterrupted run would have: there is no scheduler object whose internal counter has to be saved.

``step`` is the 0-based index of the update about to be made. Warm-up is linear and reaches the full
rate at update ``warmup_steps - 1`` (starting at ``1 / warmup_steps`` rather than 0, so no batch is
spent on a zero learning rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "step", "cosine"] = "cosine"
    warmup_steps: int = 0
    # step decay: factor gamma ** floor((step - warmup_steps) / step_size)
    step_size: int = 1000
    gamma: float = 0.5
    # cosine: from 1 after warm-up down to min_lr_ratio at decay_steps (then flat); None -> train steps
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int | None = None) -> float:
    """Multiplier of the base learning rates for update ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    if cfg.kind == "cosine":
        end = cfg.decay_steps if cfg.decay_steps is not None else total_steps
        if end is None:
            raise ValueError("cosine schedule needs decay_steps or total_steps")
        span = max(1, end - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")


def apply_lr(optimizer: torch.optim.Optimizer, factor: float) -> dict[str, float]:
    """Set every group's lr to ``base_lr * factor``; returns ``{group name: lr}``.

    Groups carry their own ``base_lr`` (set when the optimizer is built) so that the front-end and the
    back-end keep their separate rates under one schedule.
    """
    lrs = {}
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
        lrs[group.get("name", str(len(lrs)))] = group["lr"]
    return lrs
