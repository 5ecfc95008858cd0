"""Per-layer widths of a stock ``Wav2Vec2BertModel``: read them, remove units, rebuild at recorded widths.

This is the model layer's half of structured pruning: how the encoder's modules change shape. Which units
go (hard-concrete masks, the distillation objective) is ``svlib.pruning``'s half, built on this one; the
model layer never imports it, so a shrunk encoder folder loads through ``load_encoder`` with nothing else.

The encoder stays made of the HF modules; only their weight shapes (and the few size attributes their
forward reads) change, so every layer can have its own widths. Given a per-layer mask (values in [0, 1],
0 = removed), the kept units' soft values are folded into the weights that read them:

* attention, kept heads H': rows ``h*hs .. h*hs+hs-1`` of linear_q/k/v (and linear_pos / pos_bias_u/v for
  'relative' position embeddings), the same columns of linear_out (times the head's mask value). The head
  size is unchanged, so the relative_key ``distance_embedding`` (shared by all heads) is kept as is.
* FFN (ffn1 and ffn2), kept units U': rows of intermediate_dense, columns of output_dense (times mask).
* conv module, kept channels C' of C: rows ``c`` and ``c + C`` of pointwise_conv1 (value and gate halves of
  the GLU, both at the same indices), depthwise_conv, depthwise_layer_norm, columns of pointwise_conv2
  (times mask). This equals the masked model because the masks in ``masks.py`` exclude masked channels
  from the depthwise LayerNorm statistics.

A block pruned to width 0 becomes a ``ConstantBlock`` holding the bias it still adds (the masked block
outputs exactly ``linear_out.bias`` / ``output_dense.bias``; the conv module has no output bias and adds
0); its pre-LayerNorm becomes ``nn.Identity``, and the relative distance table of a head-less layer goes.

A shrunk encoder saves as a folder: HF ``config.json`` (the dense config plus ``svlib_pruned_layers``, the
per-layer widths) and ``model.safetensors`` (``svlib.pruning.shrink.save_pruned_encoder``);
``apply_recorded_widths`` shrinks a stock model built from that config to the recorded widths before the
weights load.
"""

from __future__ import annotations


import torch
from torch import nn
from transformers import Wav2Vec2BertModel
from transformers import __version__ as TRANSFORMERS_VERSION

KINDS = ("heads", "ffn1", "ffn2", "conv")  # the unit kinds of a layer, in the order of every per-layer record
CONFIG_KEY = "svlib_pruned_layers"


class ConstantBlock(nn.Module):
    """Stands in for a block pruned to width 0: adds its remaining output bias (or nothing) everywhere."""

    def __init__(self, hidden_size: int, bias: torch.Tensor | None = None, returns_tuple: bool = False):
        super().__init__()
        self.hidden_size = hidden_size
        self.returns_tuple = returns_tuple
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states, *args, **kwargs):
        if self.bias is None:
            out = torch.zeros_like(hidden_states)
        else:
            # a fresh tensor, not a zero-stride view of the parameter: later in-place ops and tensor
            # subclasses (FlopCounterMode, autograd views) must not see the bias's storage
            out = self.bias.to(hidden_states.dtype).expand_as(hidden_states).contiguous()
        # the attention slot of the HF layer unpacks (output, attention weights)
        return (out, None) if self.returns_tuple else out


def layer_sizes(model: Wav2Vec2BertModel) -> list[dict[str, int]]:
    """Current per-layer widths ``{"heads", "ffn1", "ffn2", "conv"}`` read from the modules."""
    sizes = []
    for layer in model.encoder.layers:
        attn = layer.self_attn
        heads = 0 if isinstance(attn, ConstantBlock) else attn.linear_q.out_features // attn.head_size
        ffn = {}
        for name in ("ffn1", "ffn2"):
            block = getattr(layer, name)
            ffn[name] = 0 if isinstance(block, ConstantBlock) else block.intermediate_dense.out_features
        conv = layer.conv_module
        channels = 0 if isinstance(conv, ConstantBlock) else conv.depthwise_conv.out_channels
        sizes.append({"heads": heads, "ffn1": ffn["ffn1"], "ffn2": ffn["ffn2"], "conv": channels})
    return sizes


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _keep_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    lin.weight = _param(lin.weight[rows], lin.weight)
    if lin.bias is not None:
        lin.bias = _param(lin.bias[rows], lin.bias)
    lin.out_features = len(rows)


def _keep_cols(lin: nn.Linear, cols: torch.Tensor, scale: torch.Tensor) -> None:
    lin.weight = _param(lin.weight[:, cols] * scale.to(lin.weight.dtype), lin.weight)
    lin.in_features = len(cols)


def _split(mask: torch.Tensor):
    mask = mask.detach().reshape(-1)
    idx = torch.nonzero(mask, as_tuple=True)[0]
    return idx, mask[idx]


def _shrink_attention(layer, mask: torch.Tensor) -> None:
    attn = layer.self_attn
    if isinstance(attn, ConstantBlock):
        return
    idx, scale = _split(mask)
    hidden = attn.linear_out.out_features
    if len(idx) == 0:
        layer.self_attn = ConstantBlock(hidden, attn.linear_out.bias, returns_tuple=True)
        layer.self_attn_layer_norm = nn.Identity()
        return
    hs = attn.head_size
    idx = idx.to(attn.linear_q.weight.device)
    rows = (idx[:, None] * hs + torch.arange(hs, device=idx.device)).reshape(-1)
    for lin in (attn.linear_q, attn.linear_k, attn.linear_v):
        _keep_rows(lin, rows)
    _keep_cols(attn.linear_out, rows, scale.to(rows.device).repeat_interleave(hs)[None, :])
    if attn.position_embeddings_type == "relative":
        _keep_rows(attn.linear_pos, rows)
        attn.pos_bias_u = _param(attn.pos_bias_u[idx], attn.pos_bias_u)
        attn.pos_bias_v = _param(attn.pos_bias_v[idx], attn.pos_bias_v)
    if attn.position_embeddings_type != "rotary":
        # rotary splits the (unpruned) layer input into num_heads * head_size, so it keeps the original count
        attn.num_heads = len(idx)


def _require_transformers_5(what: str) -> None:
    if int(TRANSFORMERS_VERSION.split(".")[0]) < 5:
        raise RuntimeError(f"{what} needs transformers >= 5 (installed: {TRANSFORMERS_VERSION}); "
                           "pip install 'transformers>=5,<6'")


def _shrink_ffn(layer, name: str, mask: torch.Tensor) -> None:
    ffn = getattr(layer, name)
    if isinstance(ffn, ConstantBlock):
        return
    idx, scale = _split(mask)
    if len(idx) == 0:
        setattr(layer, name, ConstantBlock(ffn.output_dense.out_features, ffn.output_dense.bias))
        setattr(layer, f"{name}_layer_norm", nn.Identity())
        return
    idx = idx.to(ffn.intermediate_dense.weight.device)
    _keep_rows(ffn.intermediate_dense, idx)
    _keep_cols(ffn.output_dense, idx, scale.to(idx.device)[None, :])


def _shrink_conv(layer, mask: torch.Tensor) -> None:
    conv = layer.conv_module
    if isinstance(conv, ConstantBlock):
        return
    idx, scale = _split(mask)
    if len(idx) == 0:
        layer.conv_module = ConstantBlock(conv.pointwise_conv2.out_channels)
        return
    channels = conv.depthwise_conv.out_channels
    idx = idx.to(conv.depthwise_conv.weight.device)
    k = len(idx)
    pw1 = conv.pointwise_conv1
    # GLU: output channel c = value row c * sigmoid(gate row c + C); both halves keep the same channels
    both = torch.cat([idx, idx + channels])
    pw1.weight = _param(pw1.weight[both], pw1.weight)
    if pw1.bias is not None:
        pw1.bias = _param(pw1.bias[both], pw1.bias)
    pw1.out_channels = 2 * k
    dw = conv.depthwise_conv
    dw.weight = _param(dw.weight[idx], dw.weight)
    if dw.bias is not None:
        dw.bias = _param(dw.bias[idx], dw.bias)
    dw.in_channels = dw.out_channels = dw.groups = k
    ln = conv.depthwise_layer_norm
    ln.weight = _param(ln.weight[idx], ln.weight)
    ln.bias = _param(ln.bias[idx], ln.bias)
    ln.normalized_shape = (k,)
    pw2 = conv.pointwise_conv2
    pw2.weight = _param(pw2.weight[:, idx] * scale.to(idx.device, pw2.weight.dtype)[None, :, None], pw2.weight)
    pw2.in_channels = k


@torch.no_grad()
def shrink_encoder(model: Wav2Vec2BertModel, masks: list[dict[str, torch.Tensor]]) -> Wav2Vec2BertModel:
    """Remove every unit whose mask value is 0 and fold the other values into the weights (in place).

    ``masks[i]`` maps some of ``heads``, ``ffn1``, ``ffn2``, ``conv`` to a 1-D mask over layer i's current
    units; a kind left out stays as it is. Detach any ``MaskSet`` first (its hooks expect the old sizes).
    """
    if getattr(model, "_svlib_masked", False):
        raise RuntimeError("detach the MaskSet (mask_set.detach()) before shrinking the model")
    layers = model.encoder.layers
    if len(masks) != len(layers):
        raise ValueError(f"got masks for {len(masks)} layers, the encoder has {len(layers)}")
    current = layer_sizes(model)
    if model.config.position_embeddings_type == "rotary" and any(
            0 < int((m["heads"] != 0).sum()) < m["heads"].numel() for m in masks if "heads" in m):
        # checked before anything changes. Rotary attention keeps num_heads (see _shrink_attention):
        # transformers 5 shapes q/k/v with -1 heads, 4.x with num_heads, which would be wrong then.
        _require_transformers_5("shrinking rotary attention heads")
    for i, (layer, layer_masks) in enumerate(zip(layers, masks)):
        for kind, mask in layer_masks.items():
            if kind not in KINDS:
                raise ValueError(f"layer {i}: unknown mask kind {kind!r} (expected one of {KINDS})")
            if mask.numel() != current[i][kind]:
                raise ValueError(f"layer {i} {kind}: mask has {mask.numel()} entries, layer has {current[i][kind]}")
            if kind == "heads":
                _shrink_attention(layer, mask)
            elif kind == "conv":
                _shrink_conv(layer, mask)
            else:
                _shrink_ffn(layer, kind, mask)
    setattr(model.config, CONFIG_KEY, layer_sizes(model))
    return model


def shrink_to_sizes(model: Wav2Vec2BertModel, sizes: list[dict[str, int]]) -> Wav2Vec2BertModel:
    """Keep the first ``sizes[i][kind]`` units of every block (used to rebuild a saved pruned encoder)."""
    current = layer_sizes(model)
    masks = []
    for have, want in zip(current, sizes):
        layer_masks = {}
        for kind in KINDS:
            n = int(want[kind])
            if not 0 <= n <= have[kind]:
                raise ValueError(f"{kind}: cannot shrink {have[kind]} units to {n}")
            if have[kind] > 0:
                # a real (CPU) tensor even when the model is being built on the meta device
                m = torch.zeros(have[kind], device="cpu")
                m[:n] = 1.0
                layer_masks[kind] = m
        masks.append(layer_masks)
    return shrink_encoder(model, masks)


# ------------------------------------------------------------------------------------------ loading

def apply_recorded_widths(encoder: Wav2Vec2BertModel) -> None:
    """Resize a freshly built stock encoder to the per-layer widths its config records (``CONFIG_KEY``).

    ``svlib.model.frontend.encoder_from_config`` calls this between building the modules and loading the
    weights, so every encoder folder, dense or shrunk, loads through ``load_encoder`` alone: loading needs
    the widths, not the pruning that chose them. A config without recorded widths is left as it is.
    """
    sizes = getattr(encoder.config, CONFIG_KEY, None)
    if not sizes or layer_sizes(encoder) == [{k: int(s[k]) for k in KINDS} for s in sizes]:
        return
    # the encoder may be built on the meta device; the 0/1 masks that pick the units must be real tensors
    with torch.device("cpu"):
        shrink_to_sizes(encoder, sizes)
