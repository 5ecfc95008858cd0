"""Hard-concrete gates for L0-regularised structured pruning (Louizos et al., 2018).

One ``HardConcrete(n)`` holds ``n`` gate parameters ``log_alpha`` and produces a mask ``z`` in [0, 1]^n.

Training (a fresh sample on every call)::

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)            # stretch (l, r) = (-0.1, 1.1), then clamp

The stretch puts probability mass exactly on 0 and 1, so sampled masks switch units off for real while
``z`` stays differentiable in ``log_alpha`` wherever 0 < z < 1.

Expected L0 (the expected number of non-zero gates, differentiable)::

    P(z_i != 0) = sigmoid(log_alpha_i - beta * log(-l / r))
    E[L0]       = sum_i P(z_i != 0)

Evaluation (deterministic, as DPHuBERT / FLOP): keep ``k = round(E[L0])`` gates, those with the largest
``log_alpha``; the kept gates carry the soft value ``sigmoid(0.8 * log_alpha / beta)`` (the FLOP heuristic,
close to 1 for confident gates), the others are exactly 0. The soft values are folded into the next weight
matrix when the model is physically shrunk, so the pruned model reproduces the masked model exactly.

Initialisation: ``log_alpha ~ N(logit(init_keep_prob), init_std)``. The reference uses keep 0.5 for FFN
units and keep 0.99 (drop 0.01) for attention heads and convolution channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class HardConcrete(nn.Module):
    def __init__(
        self,
        n: int,
        init_keep_prob: float = 0.5,
        temperature: float = 2.0 / 3.0,
        stretch: tuple[float, float] = (-0.1, 1.1),
        init_std: float = 0.01,
        eps: float = 1e-6,
    ):
        super().__init__()
        if n < 1:
            raise ValueError(f"HardConcrete needs at least one gate, got n={n}")
        if not 0.0 < init_keep_prob < 1.0:
            raise ValueError(f"init_keep_prob must be in (0, 1), got {init_keep_prob}")
        low, high = stretch
        if not (low < 0.0 and high > 1.0):
            raise ValueError(f"stretch must satisfy l < 0 < 1 < r, got {stretch}")
        self.n = n
        self.beta = temperature
        self.low, self.high = low, high
        self.init_keep_prob = init_keep_prob
        self.init_std = init_std
        self.eps = eps
        # Shift that turns log_alpha into the logit of P(z != 0); see the module docstring.
        self.l0_shift = -temperature * math.log(-low / high)
        self.log_alpha = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        mean = math.log(self.init_keep_prob / (1.0 - self.init_keep_prob))
        with torch.no_grad():
            self.log_alpha.normal_(mean, self.init_std)

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta:.4g}, stretch=({self.low}, {self.high})"

    def keep_probs(self) -> torch.Tensor:
        """P(z_i != 0) for each gate (differentiable)."""
        return torch.sigmoid(self.log_alpha + self.l0_shift)

    def l0_norm(self) -> torch.Tensor:
        """Expected number of non-zero gates, E[L0]."""
        return self.keep_probs().sum()

    def sample(self) -> torch.Tensor:
        u = torch.empty_like(self.log_alpha).uniform_(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic(self) -> torch.Tensor:
        """The evaluation mask: round(E[L0]) gates with the largest log_alpha keep soft values, others are 0."""
        keep = int(round(self.l0_norm().item()))
        # clamp: a kept gate must stay non-zero even when its soft value underflows, because "non-zero" is
        # what shrinking and counting read as "kept".
        soft = torch.sigmoid(self.log_alpha * (0.8 / self.beta)).clamp_min(1e-12)
        mask = torch.zeros_like(soft)
        if keep > 0:
            top = torch.topk(self.log_alpha, k=keep).indices
            mask[top] = soft[top]
        return mask

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic()
