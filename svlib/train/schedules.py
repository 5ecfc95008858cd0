"""Learning-rate schedules as pure functions of the step.

A schedule here is ``lr_factor(cfg, step, total_steps) -> float``, a multiplier applied to each parameter
group's base learning rate (front-end and back-end have their own base lr; the shape of the schedule is
shared). Because the factor depends on nothing but the step, a resumed run sets exactly the learning rates
the uninterrupted run would have: there is no scheduler object whose internal counter has to be saved.

``step`` is the 0-based index of the update about to be made. Warm-up is linear and reaches the full
rate at update ``warmup_steps - 1`` (starting at ``1 / warmup_steps`` rather than 0, so no batch is
spent on a zero learning rate).

Lengths may be given in epochs instead (``warmup_epochs``, ``step_size_epochs``, ``decay_epochs``; one of
each pair): ``in_steps(steps_per_epoch)`` turns them into steps, ``round(epochs * steps_per_epoch)``, when
the stage starts and knows its data size and world size. ``lr_factor`` only takes a config in steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """``round(epochs * steps_per_epoch)``: the one rounding rule for every length given in epochs."""
    return int(round(epochs * steps_per_epoch))


@dataclass
class ScheduleConfig:
    kind: Literal["constant", "step", "cosine"] = "cosine"
    warmup_steps: int = 0
    warmup_epochs: float | None = None     # instead of warmup_steps
    # step decay: factor gamma ** floor((step - warmup_steps) / step_size); one of step_size / step_size_epochs
    step_size: int | None = None
    step_size_epochs: float | None = None
    gamma: float = 0.5
    # cosine: from 1 after warm-up down to min_lr_ratio at decay_steps (then flat); None -> train steps
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None
    decay_epochs: float | None = None      # instead of decay_steps

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for steps, epochs in (("warmup_steps", "warmup_epochs"), ("step_size", "step_size_epochs"),
                              ("decay_steps", "decay_epochs")):
            value = getattr(self, epochs)
            if value is not None and getattr(self, steps) not in (None, 0):
                raise ValueError(f"give {steps} or {epochs}, not both")
            if value is not None and (value < 0 or (value == 0 and epochs == "step_size_epochs")):
                raise ValueError(f"{epochs} must be {'> 0' if epochs == 'step_size_epochs' else '>= 0'}, got {value}")
        if self.kind == "step" and self.step_size is None and self.step_size_epochs is None:
            raise ValueError("a step schedule needs step_size or step_size_epochs")

    @property
    def in_epochs(self) -> bool:
        """Whether some length is still in epochs (``in_steps`` must be applied before ``lr_factor``)."""
        return any(v is not None for v in (self.warmup_epochs, self.step_size_epochs, self.decay_epochs))

    def in_steps(self, steps_per_epoch: int) -> "ScheduleConfig":
        """The same schedule with every length in steps (``epochs_to_steps``); a config in steps is returned as is."""
        if not self.in_epochs:
            return self
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 to convert epochs, got {steps_per_epoch}")
        out = {}
        if self.warmup_epochs is not None:
            out["warmup_steps"] = epochs_to_steps(self.warmup_epochs, steps_per_epoch)
        if self.step_size_epochs is not None:
            out["step_size"] = max(1, epochs_to_steps(self.step_size_epochs, steps_per_epoch))
        if self.decay_epochs is not None:
            out["decay_steps"] = epochs_to_steps(self.decay_epochs, steps_per_epoch)
        return replace(self, warmup_epochs=None, step_size_epochs=None, decay_epochs=None, **out)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int | None = None) -> float:
    """Multiplier of the base learning rates for update ``step``."""
    if cfg.in_epochs:
        raise ValueError("this schedule has lengths in epochs: convert it with cfg.in_steps(steps_per_epoch) first")
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
