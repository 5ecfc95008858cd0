"""Back-ends: all hidden states of the front-end -> one speaker embedding.

* ``AdapterMFA``: the Layer-Adapter multi-layer feature aggregation of arXiv 2510.04213 (same module and
  parameter names as its reference code, so released checkpoints load by prefix only): a small adapter
  per hidden state, concatenation, attentive statistics pooling, a linear bottleneck.
* ``MHFA``: multi-head factorised attentive pooling (Peng et al., SLT 2022): two learned softmax layer
  weightings (keys, values), both compressed, attention heads from the keys pool the values.

Both take ``attention_mask`` [B, T] (1 = real frame) and ignore padded frames exactly, so an utterance's
embedding does not depend on what it was batched with (in eval mode).

``states`` (default: all, as the reference) lists the hidden states the back-end reads, 0 being the feature
projection. Why a recipe would leave some out: state 0 is a linear map of the input features, and every
conformer layer adds to a residual path, so a back-end that reads state 0 can score speakers without any
encoder block at all (measured on the demo: the encoder pruned away entirely was no worse than the teacher).
Reading only later states makes the back-end depend on what the blocks compute.

``embed_norm`` (off by default, and in the reference) adds a ``BatchNorm1d`` on the embedding, as ECAPA-TDNN and
WeSpeaker's pooling heads have. Why it matters from scratch: the pooled standard deviations are positive and
nearly equal across utterances, so a randomly initialised encoder gives embeddings that are one shared vector
plus a tiny speaker-dependent part (measured on the demo's 4 x 64 encoder after s1: mean cosine 0.9999 between
different utterances). The AAM loss then starts at chance with almost no signal to separate classes. The
normalisation removes the shared part, e = gamma (x - mu_batch) / sigma_batch + beta, with running statistics
at inference. A pretrained encoder (the reference) does not need it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from svlib.config import ConfigError

__all__ = ["BackendConfig", "AdapterMFA", "MHFA", "AttentiveStatsPool", "build_backend"]


@dataclass
class BackendConfig:
    type: Literal["mfa", "mhfa"] = "mfa"
    adapter_dim: int = 128  # MFA: adapter width; MHFA: compression width of keys and values
    embed_dim: int = 256
    heads: int = 64  # MHFA only
    embed_norm: bool = False  # BatchNorm1d on the embedding (module docstring); the reference has none
    states: list[int] | None = None  # hidden states read (0 = feature projection); None: all (module docstring)

    def __post_init__(self) -> None:
        if self.type not in ("mfa", "mhfa"):
            raise ConfigError(f"backend.type: expected 'mfa' or 'mhfa', got {self.type!r}")
        for name in ("adapter_dim", "embed_dim", "heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"backend.{name}: must be positive, got {getattr(self, name)}")
        if self.states is not None:
            if not self.states or any(i < 0 for i in self.states) or len(set(self.states)) != len(self.states):
                raise ConfigError(f"backend.states: expected distinct non-negative state indices, got {self.states}")
            self.states = sorted(self.states)


def read_states(states: Sequence[int] | None, num_states: int, who: str) -> list[int]:
    """The indices a back-end reads out of ``num_states`` (all of them for ``None``), sorted (the order the
    adapters are saved in, whatever order they were given in), checked distinct and in range."""
    chosen = list(range(num_states)) if states is None else sorted(int(i) for i in states)
    if not chosen or len(set(chosen)) != len(chosen) or any(not 0 <= i < num_states for i in chosen):
        raise ConfigError(f"{who}: backend.states {list(states or [])}: expected distinct indices in [0, {num_states}) "
                          f"(the front-end has {num_states} hidden states)")
    return chosen


def _check_inputs(hidden_states: Sequence[Tensor], attention_mask: Tensor | None, num_states: int,
                  hidden_size: int, who: str) -> Tensor:
    """Validate the states and return a boolean mask [B, T]."""
    if len(hidden_states) != num_states:
        raise ValueError(f"{who}: expected {num_states} hidden states, got {len(hidden_states)}")
    first = hidden_states[0]
    if first.dim() != 3 or first.shape[-1] != hidden_size:
        raise ValueError(f"{who}: hidden states must be [batch, frames, {hidden_size}], got {tuple(first.shape)}")
    batch, frames = first.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, frames, dtype=torch.bool, device=first.device)
    if tuple(attention_mask.shape) != (batch, frames):
        raise ValueError(f"{who}: attention_mask {tuple(attention_mask.shape)} does not match states {(batch, frames)}")
    mask = attention_mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{who}: every utterance needs at least one unmasked frame")
    return mask


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling with per-channel attention (ECAPA style), masked over time.

    ``attention`` keeps the reference layout Sequential(Conv1d, ReLU, BatchNorm1d, Conv1d) (keys 0, 2, 3);
    the softmax is applied outside it because padded frames must be set to -inf first.
    """

    expansion = 2

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.Conv1d(input_dim, hidden_dim, kernel_size=1),
            nn.ReLU(),
            nn.BatchNorm1d(hidden_dim),
            nn.Conv1d(hidden_dim, input_dim, kernel_size=1),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x`` [B, T, C], ``mask`` [B, T] bool -> [B, 2C] (weighted mean, weighted std)."""
        conv1, relu, norm, conv2 = self.attention
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = relu(conv1(x.transpose(1, 2)))  # [B, H, T]
        # Batch statistics over real frames only: padding must not shift the normalisation in training.
        # Without padding this is exactly BatchNorm1d over (batch, time).
        h = h.transpose(1, 2)
        normed = torch.zeros_like(h)
        normed[mask] = norm(h[mask]).to(normed.dtype)
        logits = conv2(normed.transpose(1, 2))  # [B, C, T]
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(logits, dim=2).transpose(1, 2)  # [B, T, C]
        mu = (x * weights).sum(dim=1)
        var = ((x * x) * weights).sum(dim=1) - mu * mu
        sigma = var.clamp(min=1e-5).sqrt()
        return torch.cat([mu, sigma], dim=1)


class AdapterMFA(nn.Module):
    """Layer-Adapter MFA: adapter per hidden state -> concat -> attentive stats pooling -> bottleneck."""

    def __init__(self, num_states: int, hidden_size: int, adapter_dim: int = 128, embed_dim: int = 256,
                 embed_norm: bool = False, states: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_states, self.hidden_size = num_states, hidden_size
        self.adapter_dim, self.embed_dim = adapter_dim, embed_dim
        self.states = read_states(states, num_states, "AdapterMFA")
        self._all_states = states is None
        self.adapter_layers = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_size, adapter_dim),
                nn.LayerNorm(adapter_dim),
                nn.ReLU(),
                nn.Linear(adapter_dim, adapter_dim),
            )
            for _ in self.states
        )
        feat_dim = adapter_dim * len(self.states)
        self.pooling = AttentiveStatsPool(feat_dim, adapter_dim)
        self.bottleneck = nn.Linear(feat_dim * AttentiveStatsPool.expansion, embed_dim)
        self.embed_norm = nn.BatchNorm1d(embed_dim) if embed_norm else nn.Identity()

    def to_config(self) -> BackendConfig:
        return BackendConfig(type="mfa", adapter_dim=self.adapter_dim, embed_dim=self.embed_dim,
                             embed_norm=isinstance(self.embed_norm, nn.BatchNorm1d),
                             states=None if self._all_states else list(self.states))

    def forward(self, hidden_states: Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
        mask = _check_inputs(hidden_states, attention_mask, self.num_states, self.hidden_size, "AdapterMFA")
        x = torch.cat([adapter(hidden_states[i]) for adapter, i in zip(self.adapter_layers, self.states)], dim=-1)
        return self.embed_norm(self.bottleneck(self.pooling(x, mask)))


class MHFA(nn.Module):
    """Multi-head factorised attentive pooling (Peng et al., SLT 2022).

    Keys and values are two different softmax-weighted sums of the hidden states, each compressed to
    ``compression_dim``; ``heads`` attention maps over frames are computed from the keys, each pools the
    values, and the concatenated heads are projected to the embedding.
    """

    def __init__(self, num_states: int, hidden_size: int, compression_dim: int = 128, heads: int = 64,
                 embed_dim: int = 256, embed_norm: bool = False, states: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_states, self.hidden_size = num_states, hidden_size
        self.compression_dim, self.heads, self.embed_dim = compression_dim, heads, embed_dim
        self.states = read_states(states, num_states, "MHFA")
        self._all_states = states is None
        # Zeros: every layer starts with the same weight, the learning decides which layers matter.
        self.weights_k = nn.Parameter(torch.zeros(len(self.states)))
        self.weights_v = nn.Parameter(torch.zeros(len(self.states)))
        self.cmp_linear_k = nn.Linear(hidden_size, compression_dim)
        self.cmp_linear_v = nn.Linear(hidden_size, compression_dim)
        self.att_head = nn.Linear(compression_dim, heads)
        self.pooling_fc = nn.Linear(heads * compression_dim, embed_dim)
        self.embed_norm = nn.BatchNorm1d(embed_dim) if embed_norm else nn.Identity()

    def to_config(self) -> BackendConfig:
        return BackendConfig(type="mhfa", adapter_dim=self.compression_dim, embed_dim=self.embed_dim, heads=self.heads,
                             embed_norm=isinstance(self.embed_norm, nn.BatchNorm1d),
                             states=None if self._all_states else list(self.states))

    @staticmethod
    def _layer_sum(hidden_states: Sequence[Tensor], logits: Tensor) -> Tensor:
        # Accumulate instead of stacking: 25 x [B, T, 1024] stacked would double the activation memory.
        weights = torch.softmax(logits, dim=0)
        out = hidden_states[0] * weights[0]
        for w, h in zip(weights[1:], hidden_states[1:]):
            out = out + w * h
        return out

    def forward(self, hidden_states: Sequence[Tensor], attention_mask: Tensor | None = None) -> Tensor:
        mask = _check_inputs(hidden_states, attention_mask, self.num_states, self.hidden_size, "MHFA")
        hidden_states = [hidden_states[i] for i in self.states]
        keys = self.cmp_linear_k(self._layer_sum(hidden_states, self.weights_k))  # [B, T, C]
        values = self.cmp_linear_v(self._layer_sum(hidden_states, self.weights_v))  # [B, T, C]
        values = values.masked_fill(~mask.unsqueeze(-1), 0.0)
        logits = self.att_head(keys).masked_fill(~mask.unsqueeze(-1), float("-inf"))  # [B, T, H]
        attn = torch.softmax(logits, dim=1)
        pooled = torch.einsum("bth,btc->bhc", attn, values)  # [B, H, C]
        return self.embed_norm(self.pooling_fc(pooled.flatten(1)))


def build_backend(cfg: BackendConfig, num_states: int, hidden_size: int) -> nn.Module:
    if cfg.type == "mfa":
        return AdapterMFA(num_states, hidden_size, adapter_dim=cfg.adapter_dim, embed_dim=cfg.embed_dim,
                          embed_norm=cfg.embed_norm, states=cfg.states)
    if cfg.type == "mhfa":
        return MHFA(num_states, hidden_size, compression_dim=cfg.adapter_dim, heads=cfg.heads, embed_dim=cfg.embed_dim,
                    embed_norm=cfg.embed_norm, states=cfg.states)
    raise ConfigError(f"backend.type: expected 'mfa' or 'mhfa', got {cfg.type!r}")
