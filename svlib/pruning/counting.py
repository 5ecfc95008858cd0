"""Exact parameter and MAC counts of a (pruned) W2V-BERT encoder as functions of its per-layer widths.

A layer's widths are ``{"heads": h, "ffn1": f1, "ffn2": f2, "conv": c}``. With hidden size D, head size
hs, conv kernel K and P = left_max + right_max + 1 relative distances, the parameters of one layer are

    attention   h * (4*D*hs + 3*hs)  [+ h * (D*hs + 2*hs) for 'relative']   per head: q/k/v rows + biases, out cols
                + [h > 0] * (2*D [LayerNorm] + P*hs [distance table, 'relative_key'])
                + D                                                            linear_out bias, always
    FFN (x2)    f * (2*D + 1) + [f > 0] * 2*D + D                              rows/cols + bias, LayerNorm, out bias
    conv        c * (2*D + K + 2 + D) + [c > 0] * 2*D                          pw1 rows c and c+C, depthwise, its
                                                                               LayerNorm, pw2 cols; module LayerNorm
    final LN    2*D

A block of width 0 is removed by ``shrink``: only the bias it would still add remains (attention and FFN
output biases: a fully masked block outputs exactly that bias; the conv module has no output bias and
outputs zeros), and its now unused LayerNorm goes. This is why the ``[n > 0]`` terms exist.
Note pointwise_conv1 feeds a GLU, so each kept channel costs 2*D weights there (the reference counts D).

For training, ``expected_params`` takes per-unit keep probabilities p_i = P(z_i != 0) and uses
E[n] = sum p_i and P(n > 0) = 1 - prod(1 - p_i) (gates are independent), which is the exact expectation of
the count above and reduces to it for 0/1 probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svlib.model.structure import KINDS

FRAMES_PER_SECOND = 50  # 10 ms fbank hop, two frames stacked by the W2V-BERT feature extractor


@dataclass(frozen=True)
class LayerCosts:
    """Parameter cost of one layer: per unit, once if the block is non-empty, and always."""

    per_head: int
    attn_alive: int
    attn_always: int
    per_ffn_unit: int
    ffn_alive: int
    ffn_always: int
    per_channel: int
    conv_alive: int
    conv_always: int
    layer_always: int


def head_size(config) -> int:
    return config.hidden_size // config.num_attention_heads


def layer_costs(config) -> LayerCosts:
    d, hs = config.hidden_size, head_size(config)
    per_head = 4 * d * hs + 3 * hs
    attn_alive = 2 * d
    pos_type = config.position_embeddings_type
    if pos_type == "relative_key":
        attn_alive += (config.left_max_position_embeddings + config.right_max_position_embeddings + 1) * hs
    elif pos_type == "relative":
        per_head += d * hs + 2 * hs
    return LayerCosts(
        per_head=per_head,
        attn_alive=attn_alive,
        attn_always=d,
        per_ffn_unit=2 * d + 1,
        ffn_alive=2 * d,
        ffn_always=d,
        per_channel=3 * d + config.conv_depthwise_kernel_size + 2,
        conv_alive=2 * d,
        conv_always=0,
        layer_always=2 * d,
    )


def dense_sizes(config) -> list[dict[str, int]]:
    full = {
        "heads": config.num_attention_heads,
        "ffn1": config.intermediate_size,
        "ffn2": config.intermediate_size,
        "conv": config.hidden_size,
    }
    return [dict(full) for _ in range(config.num_hidden_layers)]


def base_params(config) -> int:
    """Parameters outside the encoder layers (never pruned)."""
    d, f = config.hidden_size, config.feature_projection_input_dim
    total = 2 * f + f * d + d
    if config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0:
        total += d  # masked_spec_embed
    if config.use_intermediate_ffn_before_adapter:
        total += 2 * d * config.intermediate_size + config.intermediate_size + d
    if config.add_adapter:
        from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import Wav2Vec2BertAdapter

        total += sum(p.numel() for p in Wav2Vec2BertAdapter(config).parameters())
    return total


def _layer_params(costs: LayerCosts, n: dict, alive: dict):
    return (
        costs.per_head * n["heads"] + costs.attn_alive * alive["heads"] + costs.attn_always
        + costs.per_ffn_unit * (n["ffn1"] + n["ffn2"]) + costs.ffn_alive * (alive["ffn1"] + alive["ffn2"])
        + 2 * costs.ffn_always
        + costs.per_channel * n["conv"] + costs.conv_alive * alive["conv"] + costs.conv_always
        + costs.layer_always
    )


def count_params(config, sizes: list[dict[str, int]]) -> int:
    """Exact parameter count of the encoder shrunk to ``sizes`` (equals ``sum(p.numel())`` after shrink)."""
    if len(sizes) != config.num_hidden_layers:
        raise ValueError(f"expected {config.num_hidden_layers} layer sizes, got {len(sizes)}")
    costs = layer_costs(config)
    total = base_params(config)
    for s in sizes:
        n = {k: int(s[k]) for k in KINDS}
        total += _layer_params(costs, n, {k: int(n[k] > 0) for k in KINDS})
    return total


def _expected_count(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[n] = sum p_i and P(n > 0) = 1 - prod(1 - p_i) of independent gates."""
    p = p.to(torch.float64)
    return p.sum(), 1.0 - torch.prod(1.0 - p)


def _rounded_count(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n = round(E[L0]) and [n > 0]: what ``HardConcrete.deterministic`` keeps (the same float32 sum, and
    torch.round rounds half to even like Python's round)."""
    n = torch.round(p.detach().sum()).to(torch.float64)
    return n, (n > 0).to(torch.float64)


def _gate_params(config, keep_probs, sizes, count) -> torch.Tensor:
    if len(keep_probs) != config.num_hidden_layers:
        raise ValueError(f"expected {config.num_hidden_layers} layers of probabilities, got {len(keep_probs)}")
    costs = layer_costs(config)
    sizes = sizes or dense_sizes(config)
    total = float(base_params(config))
    for probs, fixed in zip(keep_probs, sizes):
        n, alive = {}, {}
        for k in KINDS:
            if k in probs:
                n[k], alive[k] = count(probs[k])
            else:
                n[k], alive[k] = int(fixed[k]), int(fixed[k] > 0)
        total = total + _layer_params(costs, n, alive)
    return torch.as_tensor(total, dtype=torch.float64)


def expected_params(
    config, keep_probs: list[dict[str, torch.Tensor]], sizes: list[dict[str, int]] | None = None
) -> torch.Tensor:
    """Expected parameter count (float64, differentiable) from per-unit keep probabilities per layer.

    A kind missing from a layer's dict is not pruned and counts at its width in ``sizes`` (default dense).
    """
    return _gate_params(config, keep_probs, sizes, _expected_count)


def rounded_params(
    config, keep_probs: list[dict[str, torch.Tensor]], sizes: list[dict[str, int]] | None = None
) -> torch.Tensor:
    """Exact parameter count of the deterministic masks (``round(E[L0])`` units kept per gate group), as a
    float64 tensor on the gates' device: equal to ``count_params(config, mask_set.sizes())`` without reading
    anything back to the host (no sync; a training step can afford it). Not differentiable."""
    return _gate_params(config, keep_probs, sizes, _rounded_count)


def count_macs(config, sizes: list[dict[str, int]], seconds: float = 1.0, attention: str = "stock") -> int:
    """Multiply-accumulates of one forward pass over ``seconds`` of audio (one utterance, no padding).

    Counts the weight matmuls and convolutions plus the attention score, context and relative-position
    products; ignores normalisation, activations and softmax (a few percent at most). The adapter (not
    used by W2V-BERT 2.0) is not counted. ``attention``: which relative_key forward runs, HF's ("stock":
    the position term is a T x T x hs contraction per head) or ``svlib.model.attention``'s ("lean": q against
    the P = left + right + 1 distance embeddings, T x P x hs, then a gather).
    """
    if attention not in ("stock", "lean"):
        raise ValueError(f"attention must be 'stock' or 'lean', got {attention!r}")
    t = max(1, int(round(seconds * FRAMES_PER_SECOND)))
    d, hs, k = config.hidden_size, head_size(config), config.conv_depthwise_kernel_size
    pos_type = config.position_embeddings_type
    total = t * config.feature_projection_input_dim * d
    for s in sizes:
        h = int(s["heads"])
        attn = 4 * t * d * h * hs + 2 * h * t * t * hs
        if pos_type == "relative_key":
            positions = config.left_max_position_embeddings + config.right_max_position_embeddings + 1
            attn += h * t * (positions if attention == "lean" else t) * hs
        elif pos_type == "relative":
            attn += (2 * t - 1) * d * h * hs + h * t * (2 * t - 1) * hs
        ffn = 2 * t * d * (int(s["ffn1"]) + int(s["ffn2"]))
        c = int(s["conv"])
        conv = t * d * 2 * c + t * c * k + t * c * d
        total += attn + ffn + conv
    if config.use_intermediate_ffn_before_adapter:
        total += 2 * t * d * config.intermediate_size
    return total


def macs_per_second(config, sizes: list[dict[str, int]], seconds: float = 3.0) -> float:
    """MACs per second of audio, measured on utterances of ``seconds`` (attention makes it length dependent)."""
    return count_macs(config, sizes, seconds) / seconds
