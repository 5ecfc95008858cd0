"""An exact, leaner ``relative_key`` self-attention for W2V-BERT 2.0, same modules and weights as HF's.

HF's ``Wav2Vec2BertSelfAttention`` with ``position_embeddings_type="relative_key"`` computes, per layer,

    scores[b, h, l, r] = (q_l . k_r + q_l . E[c(r - l)]) / sqrt(d) + mask[b, l, r],
    c(x) = clamp(x, -L, R) + L          (W2V-BERT 2.0: L = 64 left, R = 8 right, so L + R + 1 = 73 rows in E)

by first gathering ``E[c(r - l)]`` into a (T, T, d) tensor (T = 1500 frames at 30 s: 576 MB in float32,
9.2 GB at 120 s) and contracting it with q in an extra B x H x T x T x d einsum. Only L + R + 1 distinct
rows of E exist, so the same term is

    P = q E^T / sqrt(d)                  (B, H, T, L + R + 1)   -- a T x 73 x d matmul, not T x T x d
    bias[b, h, l, r] = P[b, h, l, c(r - l)]                     -- one gather by the distance index

and ``bias`` (+ the padding mask) goes to ``torch.nn.functional.scaled_dot_product_attention`` as its
additive ``attn_mask`` with ``scale = 1 / sqrt(d)``: softmax(q k^T / sqrt(d) + bias) v, the same function
(HF scales the position scores by 1 / sqrt(d) too; on CUDA the memory-efficient kernel takes the additive
bias, so no B x H x T x T probabilities are stored). Queries are processed in row blocks so that the bias and
index held at once are at most ``bias_budget_elements()`` entries (softmax is per query row, so blocks are
exact); under tracing/export one block is used so the graph stays valid for every length. Training keeps
what autograd saves (per block, the bias), as HF does.

The replacement is a subclass installed by swapping ``__class__`` on the existing modules
(``install_lean_attention``): parameters, state-dict keys, ``isinstance`` checks, peft LoRA injection, the
pruning hooks on ``linear_out`` and per-layer shrunk head counts all stay as they are. It is the default for
every encoder ``svlib.model.frontend`` builds; ``SVLIB_ATTENTION=stock`` (or ``set_attention(model, "stock")``)
keeps HF's own forward for parity tests and benchmarks.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import Wav2Vec2BertSelfAttention

__all__ = [
    "ATTENTION_ENV",
    "IMPLEMENTATIONS",
    "LeanRelativeKeyAttention",
    "attention_implementation",
    "bias_budget_elements",
    "default_implementation",
    "install_lean_attention",
    "relative_key_bias",
    "set_attention",
    "uninstall_lean_attention",
]

ATTENTION_ENV = "SVLIB_ATTENTION"
IMPLEMENTATIONS = ("lean", "stock")
BUDGET_ENV = "SVLIB_ATTENTION_BIAS_ELEMENTS"
# 2^25 entries = 128 MiB in float32: one block for 8 x 3 s (B H T^2 = 2.9M), 2 blocks at 30 s.
_DEFAULT_BUDGET = 1 << 25


def default_implementation() -> str:
    """``lean`` unless the environment variable ``SVLIB_ATTENTION`` says ``stock``."""
    value = os.environ.get(ATTENTION_ENV, "lean").strip().lower() or "lean"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{ATTENTION_ENV}={value!r}: expected one of {IMPLEMENTATIONS}")
    return value


def bias_budget_elements() -> int:
    """Most 4-byte entries a query block builds at once: the (B, H, rows, T) bias plus its (rows, T) int64
    distance index; ``SVLIB_ATTENTION_BIAS_ELEMENTS`` overrides 2^25."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None:
        return _DEFAULT_BUDGET
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a positive integer") from None
    if value <= 0:
        raise ValueError(f"{BUDGET_ENV}={raw!r}: expected a positive integer")
    return value


def relative_distance_index(query_length: int, key_length: int, left: int, right: int, device,
                            first_query: int = 0) -> Tensor:
    """``c(r - l) = clamp(r - l, -left, right) + left`` for queries l = first_query .. first_query +
    query_length - 1 and keys r = 0 .. key_length - 1, as a (query_length, key_length) int64 index."""
    rows = torch.arange(first_query, first_query + query_length, dtype=torch.long, device=device).view(-1, 1)
    cols = torch.arange(key_length, dtype=torch.long, device=device).view(1, -1)
    # in place: one (rows, keys) int64 tensor, not three
    return (cols - rows).clamp_(-left, right).add_(left)


def relative_key_bias(query: Tensor, table: Tensor, index: Tensor, scaling: float) -> Tensor:
    """``bias[b, h, l, r] = (q_l . table[index[l, r]]) * scaling`` without a (T, T, d) tensor.

    ``query`` (B, H, Tq, d), ``table`` (K, d) the distance embeddings, ``index`` (Tq, Tk) rows of ``table``.
    Returns a contiguous (B, H, Tq, Tk) tensor in ``query``'s dtype.
    """
    scores = torch.matmul(query, table.to(query.dtype).transpose(0, 1)) * scaling  # (B, H, Tq, K)
    expanded = index.expand(*scores.shape[:-1], index.shape[-1])
    return torch.gather(scores, -1, expanded)


def _add_padding_mask(bias: Tensor, mask: Tensor | None) -> Tensor:
    """Fold HF's attention mask into ``bias`` in place: boolean (True = attend) or additive float."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        # the value HF's sdpa path uses for masked entries (create_position_bias_mask)
        return bias.masked_fill_(~mask, torch.finfo(bias.dtype).min)
    return bias.add_(mask.to(bias.dtype))


def _is_tracing() -> bool:
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


class LeanRelativeKeyAttention(Wav2Vec2BertSelfAttention):
    """``Wav2Vec2BertSelfAttention`` whose relative_key forward never builds the (T, T, d) tensor.

    Never constructed directly: ``install_lean_attention`` swaps the class of existing modules, so it has no
    state of its own. Heads are read from ``linear_q`` (``shrink`` removes heads per layer). Anything other
    than relative_key, attention weights requested, or a non-tensor mask (flex attention) runs HF's forward.
    """

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                relative_position_embeddings: Tensor | None = None, **kwargs):
        if (self.position_embeddings_type != "relative_key" or kwargs.get("output_attentions")
                or not (attention_mask is None or isinstance(attention_mask, Tensor))):
            return super().forward(hidden_states, attention_mask, relative_position_embeddings, **kwargs)
        batch, length = hidden_states.shape[:2]
        shape = (batch, length, -1, self.head_size)
        query = self.linear_q(hidden_states).view(shape).transpose(1, 2)
        key = self.linear_k(hidden_states).view(shape).transpose(1, 2)
        value = self.linear_v(hidden_states).view(shape).transpose(1, 2)
        context = self._attend(query, key, value, attention_mask)
        context = context.transpose(1, 2).reshape(batch, length, -1)
        return self.linear_out(context), None

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T * scaling + bias + mask) v over query row blocks of at most the bias budget (the
        distance index is built per block too: a whole (T, T) int64 index is 1.8 GB at T = 15,000)."""
        batch, heads, length = query.shape[:3]
        keys = key.shape[2]
        dropout = self.dropout.p if self.training else 0.0
        # per query row: batch x heads bias entries, plus the int64 distance index (two float32 entries' worth)
        rows = length if _is_tracing() else max(1, bias_budget_elements() // ((batch * heads + 2) * keys))
        table = self.distance_embedding.weight
        outputs = []
        for start in range(0, length, rows):
            stop = min(start + rows, length)
            q = query[:, :, start:stop] if rows < length else query
            index = relative_distance_index(stop - start, keys, self.left_max_position_embeddings,
                                            self.right_max_position_embeddings, query.device, first_query=start)
            bias = relative_key_bias(q, table, index, self.scaling)
            block_mask = mask
            if mask is not None and mask.shape[-2] != 1 and rows < length:
                block_mask = mask[..., start:stop, :]
            bias = _add_padding_mask(bias, block_mask)
            outputs.append(nn.functional.scaled_dot_product_attention(
                q, key, value, attn_mask=bias, dropout_p=dropout, scale=self.scaling))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _relative_key_attentions(model: nn.Module):
    for module in model.modules():
        if isinstance(module, Wav2Vec2BertSelfAttention) and module.position_embeddings_type == "relative_key":
            yield module


def _swap_forward(model: nn.Module, old: type, new: type) -> int:
    """Every relative_key attention module of class exactly ``old`` becomes ``new`` (same parameters, buffers
    and hooks: only the forward changes); returns how many relative_key modules ``model`` has."""
    count = 0
    for module in _relative_key_attentions(model):
        if type(module) is old:
            module.__class__ = new
        count += 1
    return count


def install_lean_attention(model: nn.Module) -> int:
    """Give every relative_key attention module of ``model`` the lean forward; returns how many there are."""
    return _swap_forward(model, Wav2Vec2BertSelfAttention, LeanRelativeKeyAttention)


def uninstall_lean_attention(model: nn.Module) -> int:
    """Back to HF's own forward on every relative_key attention module; returns how many there are."""
    return _swap_forward(model, LeanRelativeKeyAttention, Wav2Vec2BertSelfAttention)


def set_attention(model: nn.Module, implementation: str) -> nn.Module:
    """``"lean"`` or ``"stock"`` relative_key attention on ``model`` (in place); returns ``model``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    (install_lean_attention if implementation == "lean" else uninstall_lean_attention)(model)
    return model


def attention_implementation(model: nn.Module) -> str | None:
    """``"lean"``, ``"stock"``, ``"mixed"``, or None when ``model`` has no relative_key attention."""
    kinds = {"lean" if type(m) is LeanRelativeKeyAttention else "stock" for m in _relative_key_attentions(model)}
    if not kinds:
        return None
    return kinds.pop() if len(kinds) == 1 else "mixed"
