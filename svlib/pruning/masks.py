"""Hard-concrete masks on a stock ``transformers.Wav2Vec2BertModel``, attached with hooks (no forked HF code).

Where each mask acts (per encoder layer), chosen so that ``shrink.py``'s physical removal is exact:

* heads: on the per-head context ``(B, T, H*hs)`` entering ``self_attn.linear_out`` (forward pre-hook).
* ffn1 / ffn2 units: on the activations entering ``output_dense`` (after act + dropout; pre-hook).
* conv channels: on the activations entering ``pointwise_conv2`` (pre-hook), AND the depthwise LayerNorm,
  which normalises over channels, takes its mean and variance over the channels with a non-zero mask only
  (forward hook replacing its output). Channels are independent from the GLU to the depthwise conv, so a
  channel's gate only matters where channels mix: the LayerNorm statistics and pointwise_conv2. Zeroing a
  channel before the depthwise conv instead would leave it in the LayerNorm statistics (mean and variance
  over C, not C'), which no smaller model reproduces. The statistics use the 0/1 support of the mask (no
  gradient flows through which channels are counted); gradients reach the gates through the
  pointwise_conv2 input.

One sample of all masks is drawn per encoder forward (a pre-hook on ``model.encoder``), in the mode of the
encoder: ``model.train()`` samples, ``model.eval()`` uses the deterministic masks (round(E[L0]) kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Wav2Vec2BertModel

from . import counting
from .hardconcrete import HardConcrete
from .shrink import layer_sizes


@dataclass
class MaskConfig:
    heads: bool = True
    ffn: bool = True
    conv: bool = True
    head_init_keep: float = 0.99
    ffn_init_keep: float = 0.5
    conv_init_keep: float = 0.99
    temperature: float = 2.0 / 3.0
    stretch_low: float = -0.1
    stretch_high: float = 1.1


def _masked_layer_norm(ln: nn.LayerNorm, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = keep.to(torch.float32)
    xf = x.float()
    n = w.sum().clamp_min(1.0)
    mean = (xf * w).sum(-1, keepdim=True) / n
    var = ((xf - mean).square() * w).sum(-1, keepdim=True) / n
    y = (xf - mean) * torch.rsqrt(var + ln.eps)
    if ln.weight is not None:
        y = y * ln.weight.float() + ln.bias.float()
    return y


class MaskSet(nn.Module):
    """The gates of one encoder plus the hooks that apply them. Its parameters are the log-alphas."""

    def __init__(self, model: Wav2Vec2BertModel, cfg: MaskConfig | None = None):
        super().__init__()
        cfg = cfg or MaskConfig()
        if getattr(model, "_svlib_masked", False):
            raise RuntimeError("this model already has a MaskSet attached")
        self.cfg = cfg
        # the config is read, never the model itself: keeping the model as a submodule would make its
        # weights part of this module's parameters
        self.config = model.config
        self._sizes = layer_sizes(model)
        self.head_size = counting.head_size(model.config)
        gate_args = {"temperature": cfg.temperature, "stretch": (cfg.stretch_low, cfg.stretch_high)}
        wanted = {"heads": (cfg.heads, cfg.head_init_keep), "ffn1": (cfg.ffn, cfg.ffn_init_keep),
                  "ffn2": (cfg.ffn, cfg.ffn_init_keep), "conv": (cfg.conv, cfg.conv_init_keep)}
        self.gates = nn.ModuleList()
        for sizes in self._sizes:
            layer_gates = nn.ModuleDict()
            for kind, (enabled, keep) in wanted.items():
                if enabled and sizes[kind] > 0:
                    layer_gates[kind] = HardConcrete(sizes[kind], init_keep_prob=keep, **gate_args)
            self.gates.append(layer_gates)
        self._current: list[dict[str, torch.Tensor]] | None = None
        self._handles = []
        self._attach(model)
        self._model_ref = [model]  # a list, so nn.Module does not register the model as a child
        model._svlib_masked = True

    # ---- hooks -------------------------------------------------------------------------------------
    def _attach(self, model: Wav2Vec2BertModel) -> None:
        encoder = model.encoder
        self._handles.append(encoder.register_forward_pre_hook(lambda mod, args: self.refresh(mod.training)))
        for i, layer in enumerate(encoder.layers):
            gates = self.gates[i]
            if "heads" in gates:
                self._handles.append(layer.self_attn.linear_out.register_forward_pre_hook(self._heads_hook(i)))
            for name in ("ffn1", "ffn2"):
                if name in gates:
                    dense = getattr(layer, name).output_dense
                    self._handles.append(dense.register_forward_pre_hook(self._units_hook(i, name)))
            if "conv" in gates:
                conv = layer.conv_module
                self._handles.append(conv.depthwise_layer_norm.register_forward_hook(self._conv_norm_hook(i)))
                self._handles.append(conv.pointwise_conv2.register_forward_pre_hook(self._conv_hook(i)))

    def _mask(self, i: int, kind: str, training: bool) -> torch.Tensor:
        if self._current is None:  # a layer called outside the encoder's forward
            self.refresh(training)
        return self._current[i][kind]

    def _heads_hook(self, i):
        def hook(mod, args):
            x = args[0]
            z = self._mask(i, "heads", mod.training).to(x.dtype)
            heads = z.numel()
            y = x.reshape(*x.shape[:-1], heads, -1) * z[:, None]
            return (y.reshape(x.shape),) + tuple(args[1:])
        return hook

    def _units_hook(self, i, kind):
        def hook(mod, args):
            x = args[0]
            return (x * self._mask(i, kind, mod.training).to(x.dtype),) + tuple(args[1:])
        return hook

    def _conv_hook(self, i):
        def hook(mod, args):
            x = args[0]  # (B, C, T)
            return (x * self._mask(i, "conv", mod.training).to(x.dtype)[:, None],) + tuple(args[1:])
        return hook

    def _conv_norm_hook(self, i):
        def hook(mod, args, output):
            # Always recomputed, also when every channel is kept: asking whether they all are would read the
            # mask back to the host (a device sync per layer and step); with all kept this is the plain norm.
            keep = self._mask(i, "conv", mod.training) != 0
            return _masked_layer_norm(mod, args[0], keep).to(output.dtype)
        return hook

    # ---- masks ---------------------------------------------------------------------------------------
    def refresh(self, training: bool) -> None:
        """Draw the masks used by the next forward: a sample when training, the deterministic ones if not."""
        self.train(training)
        self._current = [{kind: gate() for kind, gate in layer.items()} for layer in self.gates]

    def deterministic_masks(self) -> list[dict[str, torch.Tensor]]:
        """Per-layer evaluation masks (soft values, zeros for removed units), ready for ``shrink_encoder``."""
        return [{kind: gate.deterministic() for kind, gate in layer.items()} for layer in self.gates]

    def sizes(self) -> list[dict[str, int]]:
        """Per-layer widths the deterministic masks keep (unmasked kinds at their current width)."""
        out = []
        for base, layer in zip(self._sizes, self.deterministic_masks()):
            s = dict(base)
            s.update({kind: int((m != 0).sum()) for kind, m in layer.items()})
            out.append(s)
        return out

    def log_alphas(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def keep_probs(self) -> list[dict[str, torch.Tensor]]:
        return [{kind: gate.keep_probs() for kind, gate in layer.items()} for layer in self.gates]

    @property
    def dense_params(self) -> int:
        """Parameters of the encoder before masking (the denominator of the sparsity)."""
        return counting.count_params(self.config, self._sizes)

    def expected_params(self) -> torch.Tensor:
        """Expected parameter count under the gate distribution (float64, differentiable)."""
        return counting.expected_params(self.config, self.keep_probs(), sizes=self._sizes)

    def expected_sparsity(self) -> torch.Tensor:
        return 1.0 - self.expected_params() / self.dense_params

    def deterministic_params(self) -> int:
        """Exact parameter count of the model shrunk with ``deterministic_masks()`` (reads the gates back to the
        host: for reports, not for every training step; see ``param_counts``)."""
        return counting.count_params(self.config, self.sizes())

    def param_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expected, deterministic)`` parameter counts as float64 device tensors from one evaluation of the
        keep probabilities; the first is differentiable, the second equals ``deterministic_params()``. Nothing
        is read back to the host, so a training step calls this without waiting for the device."""
        probs = self.keep_probs()
        return (counting.expected_params(self.config, probs, sizes=self._sizes),
                counting.rounded_params(self.config, probs, sizes=self._sizes))

    def detach(self) -> None:
        """Remove the hooks; the model runs unmasked again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None
        if self._model_ref:
            model = self._model_ref.pop()
            model._svlib_masked = False


def attach_masks(model: Wav2Vec2BertModel, cfg: MaskConfig | None = None) -> MaskSet:
    """Attach hard-concrete masks to every encoder layer of ``model``; returns the ``MaskSet`` (on its device)."""
    mask_set = MaskSet(model, cfg)
    return mask_set.to(next(model.parameters()).device)
