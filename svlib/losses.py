"""Speaker-classification loss: additive angular margin softmax (ArcFace / AAM-softmax).

For an embedding x and class weights W (both L2-normalised) the logits are s * cos(theta_j), except for the
target class y, whose logit becomes s * cos(theta_y + m). Adding the margin inside the angle forces every
class to be separated by at least m radians, which is what makes the embeddings usable with plain cosine
scoring at test time.

cos(theta + m) is only a monotone (decreasing) function of theta while theta + m <= pi. Past that point a
larger angle (a *worse* embedding) would get a *larger* target logit and gradient descent would push it
the wrong way. Following the InsightFace/WeSpeaker convention, when theta > pi - m (equivalently
cos(theta) < cos(pi - m)) the target logit uses cos(theta) - m * sin(m) instead: still decreasing in theta,
and the margin penalty stays about the size it has near the boundary. ``easy_margin=True`` is the other
common variant: apply the margin only where cos(theta) > 0 and leave the logit untouched elsewhere.

The margin is usually warmed up from 0 (a large margin on a random network stalls training);
``MarginSchedule`` gives it as a pure function of the step so that a resumed run gets the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AAMSoftmax(nn.Module):
    """AAM-softmax head: ``forward(emb, labels) -> (loss, accuracy)``.

    ``accuracy`` is the top-1 accuracy of the margin-free cosine logits (what the embedding actually
    achieves), so it does not drop artificially while the margin warms up.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 32.0, margin: float = 0.2,
                 easy_margin: bool = False):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.scale = float(scale)
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_normal_(self.weight)
        self.margin = margin

    @property
    def margin(self) -> float:
        return self._margin

    @margin.setter
    def margin(self, value: float) -> None:
        # The trigonometric constants depend only on m; recompute them once here rather than every step.
        m = float(value)
        self._margin = m
        self._cos_m = math.cos(m)
        self._sin_m = math.sin(m)
        self._threshold = math.cos(math.pi - m)
        self._fallback = math.sin(math.pi - m) * m  # = m * sin(m)

    def forward(self, emb: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        # Angles near 0 or pi are where bf16/fp16 rounding hurts most; the head is tiny, so keep it float32.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            cosine = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
            # A floor > 0 keeps d sqrt / dx finite when cos = +-1 exactly (0 * inf would give NaN grads).
            sine = (1.0 - cosine * cosine).clamp(min=1e-9, max=1.0).sqrt()
            phi = cosine * self._cos_m - sine * self._sin_m
            if self.easy_margin:
                phi = torch.where(cosine > 0, phi, cosine)
            else:
                phi = torch.where(cosine > self._threshold, phi, cosine - self._fallback)
            target = F.one_hot(labels, self.num_classes).bool()
            logits = torch.where(target, phi, cosine) * self.scale
            loss = F.cross_entropy(logits, labels)
            accuracy = (cosine.argmax(dim=1) == labels).float().mean()
        return loss, accuracy

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_classes={self.num_classes}, scale={self.scale}, "
                f"margin={self.margin}, easy_margin={self.easy_margin}")


@dataclass(frozen=True)
class MarginSchedule:
    """Margin as a pure function of the step (WeSpeaker's margin scheduler, counted in steps).

    ``initial_margin`` before ``start_step``, ``final_margin`` from ``end_step`` on, and in between either a
    linear ramp or WeSpeaker's "exp" ramp ``ratio = 1 - 1e-3 ** (t / T)``, which raises the margin quickly at
    first and then levels off (it reaches 99.9 % of the way at ``end_step``, then snaps to the final value).
    """

    final_margin: float = 0.2
    start_step: int = 0
    end_step: int = 0
    initial_margin: float = 0.0
    kind: Literal["exp", "linear"] = "exp"

    def __post_init__(self) -> None:
        if self.final_margin < 0 or self.initial_margin < 0:
            raise ValueError(f"margins must be >= 0, got initial {self.initial_margin}, final {self.final_margin}")
        if self.start_step < 0 or self.end_step < self.start_step:
            raise ValueError(f"margin schedule needs 0 <= start_step <= end_step, "
                             f"got {self.start_step}, {self.end_step}")

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return self.final_margin
        if step < self.start_step:
            return self.initial_margin
        t = (step - self.start_step) / (self.end_step - self.start_step)
        if self.kind == "exp":
            ratio = 1.0 - math.exp(t * math.log(1e-3 / (1.0 + 1e-6)))
        else:
            ratio = t
        return self.initial_margin + (self.final_margin - self.initial_margin) * ratio


def keep_classes(weight: Tensor, num_speakers: int) -> Tensor:
    """Class-weight rows to keep when a speed-perturbed head (k * N classes) continues without perturbation.

    Speed perturbation turns each speaker into k pseudo-speakers (original, slowed, sped up), stored as k
    blocks of N rows with block 0 the original speed. Stage 3 trains on N real speakers only, so it
    starts from block 0: those rows already point at the right speakers, the others are different classes.
    """
    rows = weight.shape[0]
    if num_speakers <= 0 or rows % num_speakers != 0:
        raise ValueError(f"keep_classes: {rows} weight rows are not a multiple of {num_speakers} speakers")
    return weight[:num_speakers].detach().clone()
