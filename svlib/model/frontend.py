"""The W2V-BERT 2.0 front-end: a stock ``transformers.Wav2Vec2BertModel``, optionally with LoRA.

The encoder is always a plain HF model so that a pretrained folder (``config.json`` + ``model.safetensors``,
as ``facebook/w2v-bert-2.0`` ships) loads as is and a trained one can be handed back to HF tools.

* ``PRESETS``: ``w2v-bert-2.0`` (the published architecture, 580,492,096 parameters), ``small`` (the CPU
  demo model, trained from scratch) and ``tiny`` (tests).
* ``load_encoder(folder)`` is the one place an encoder folder becomes a model. Every build goes through
  ``encoder_from_config``, which between building the stock modules and loading weights resizes the layers
  to the per-layer widths a shrunk encoder's ``config.json`` records (``svlib.model.structure``: pruned
  folders load without ``svlib.pruning``) and runs the hooks registered with ``register_encoder_hook``. It
  then gives the relative_key attention modules the exact, leaner forward of ``svlib.model.attention`` (same modules and weights; ``SVLIB_ATTENTION=stock`` keeps HF's).
* SpecAugment masking and LayerDrop are switched off whatever the folder says: the speaker model never uses
  ``masked_spec_embed`` (the published parameter count excludes it) and LayerDrop would drop hidden states
  that the multi-layer back-ends consume.
* LoRA is injected in place with peft (the encoder stays a ``Wav2Vec2BertModel``); ``merge_lora`` folds it
  into plain weights and returns a new LoRA-free front-end.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

from svlib.config import ConfigError, check_relative
from svlib.files import save_tensors_atomic
from svlib.model.attention import default_implementation, set_attention
from svlib.model.structure import apply_recorded_widths

__all__ = [
    "PRESETS",
    "LoraConfig",
    "FrontendConfig",
    "Frontend",
    "EncoderError",
    "WeightsMismatchError",
    "encoder_config",
    "encoder_from_config",
    "encoder_with_weights",
    "build_encoder",
    "load_encoder",
    "save_encoder",
    "register_encoder_hook",
    "build_frontend",
    "add_lora",
    "merge_lora",
    "merged_state_dict",
    "freeze",
    "check_state_dict",
    "count_parameters",
]

# Overrides of the stock ``Wav2Vec2BertConfig`` defaults, which are the facebook/w2v-bert-2.0 architecture.
PRESETS: dict[str, dict[str, Any]] = {
    "w2v-bert-2.0": {},
    # ~2.3M parameters: small enough to train from scratch on two CPU cores in minutes, yet the same
    # conformer blocks (relative-key attention, depthwise kernel 31) as the full model.
    "small": {
        "hidden_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "output_hidden_size": 128,
        "conv_depthwise_kernel_size": 31,
    },
    # ~42k parameters, for unit tests.
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "output_hidden_size": 32,
        "conv_depthwise_kernel_size": 31,
    },
}

# Forced on every encoder config (see module docstring).
_FORCED = {"layerdrop": 0.0, "mask_time_prob": 0.0, "mask_feature_prob": 0.0, "apply_spec_augment": False}
# Checkpoint entries that exist only because of SpecAugment and are dropped on load.
IGNORED_KEYS = ("masked_spec_embed",)


class EncoderError(ValueError):
    """An encoder folder or config that cannot be used."""


class WeightsMismatchError(ValueError):
    """A state dict whose keys or shapes do not match the model it is loaded into."""


# --------------------------------------------------------------------------------------------- configs
@dataclass
class LoraConfig:
    """LoRA on the encoder's linear layers (the reference: r=64, alpha=128 on linear_q and linear_v)."""

    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["linear_q", "linear_v"])

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"lora.r: must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: must name at least one module")


@dataclass
class FrontendConfig:
    """Which encoder to build: a named preset (random init) or a HF folder (pretrained), plus LoRA/freezing."""

    preset: str | None = None
    folder: str | None = None  # relative to the repo (or the ``root`` given to ``build_frontend``)
    # ``Wav2Vec2BertConfig`` fields laid over the preset (e.g. ``{num_hidden_layers: 4}``): a recipe can size its
    # from-scratch encoder without a new preset. Presets only; a folder's architecture is its config.json.
    encoder: dict[str, Any] | None = None
    lora: LoraConfig | None = None
    freeze: bool = False  # freeze the encoder's own weights; LoRA weights stay trainable

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.folder is None):
            raise ConfigError(
                f"frontend: set exactly one of 'preset' (one of {sorted(PRESETS)}) or 'folder' "
                f"(got preset={self.preset!r}, folder={self.folder!r})"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(f"frontend.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        check_relative(self.folder, "frontend.folder")
        if self.encoder:
            if self.folder is not None:
                raise ConfigError("frontend.encoder: architecture overrides apply to a preset only; a folder's "
                                  "architecture is its config.json")
            known = Wav2Vec2BertConfig().to_dict()
            unknown = sorted(set(self.encoder) - set(known))
            if unknown:
                raise ConfigError(f"frontend.encoder: unknown Wav2Vec2BertConfig field(s) {unknown}")

    def encoder_config(self, root: str | os.PathLike | None = None) -> Wav2Vec2BertConfig:
        """The (prepared) HF config this front-end builds: the folder's, or the preset's with ``encoder`` over it."""
        if self.folder is not None:
            return encoder_config(Path(root or ".") / self.folder)
        config = encoder_config(self.preset)
        for key, value in (self.encoder or {}).items():
            setattr(config, key, value)
        return _prepare_config(config)


# --------------------------------------------------------------------------------------------- encoder
_ENCODER_HOOKS: list[Callable[[Wav2Vec2BertModel], None]] = []


def register_encoder_hook(hook: Callable[[Wav2Vec2BertModel], None]) -> Callable[[Wav2Vec2BertModel], None]:
    """Run ``hook(encoder)`` on every encoder built from a config, before weights are loaded.

    The hook reads what it needs from ``encoder.config`` (extra keys in ``config.json`` survive as config
    attributes) and edits modules in place; it must be a no-op for configs it does not recognise.
    Returns the hook so it can be used as a decorator.
    """
    if hook not in _ENCODER_HOOKS:
        _ENCODER_HOOKS.append(hook)
    return hook


def _prepare_config(config: Wav2Vec2BertConfig) -> Wav2Vec2BertConfig:
    config = copy.deepcopy(config)
    for key, value in _FORCED.items():
        setattr(config, key, value)
    if getattr(config, "add_adapter", False) or getattr(config, "use_intermediate_ffn_before_adapter", False):
        raise EncoderError(
            "encoder config has add_adapter/use_intermediate_ffn_before_adapter set: the speaker front-end "
            "uses the conformer hidden states only and does not support the length-reducing HF adapter"
        )
    if config.hidden_size % config.num_attention_heads:
        raise EncoderError(
            f"encoder config: hidden_size {config.hidden_size} is not divisible by "
            f"num_attention_heads {config.num_attention_heads}"
        )
    return config


def encoder_config(preset_or_folder: str | os.PathLike) -> Wav2Vec2BertConfig:
    """The (prepared) HF config of a preset name or of an encoder folder's ``config.json``."""
    if isinstance(preset_or_folder, str) and preset_or_folder in PRESETS:
        return _prepare_config(Wav2Vec2BertConfig(**PRESETS[preset_or_folder]))
    folder = Path(preset_or_folder)
    path = folder / "config.json"
    if not path.is_file():
        raise EncoderError(
            f"{folder}: not a preset ({sorted(PRESETS)}) and no config.json there; an encoder folder holds "
            "config.json + model.safetensors in Hugging Face format"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EncoderError(f"{path}: not valid JSON ({err})") from None
    if data.get("model_type") != "wav2vec2-bert":
        raise EncoderError(f"{path}: model_type is {data.get('model_type')!r}, expected 'wav2vec2-bert'")
    return _prepare_config(Wav2Vec2BertConfig.from_dict(data))


def encoder_from_config(config: Wav2Vec2BertConfig) -> Wav2Vec2BertModel:
    """A randomly initialised encoder for ``config`` (on the current default device), at the per-layer widths
    the config records (a shrunk encoder, ``svlib.model.structure``), hooks applied, with the attention
    implementation ``SVLIB_ATTENTION`` selects (default: the lean relative_key forward)."""
    encoder = Wav2Vec2BertModel(_prepare_config(config))
    apply_recorded_widths(encoder)
    for hook in _ENCODER_HOOKS:
        hook(encoder)
    return set_attention(encoder, default_implementation())


def build_encoder(preset_or_folder: str | os.PathLike) -> Wav2Vec2BertModel:
    """A preset name gives a randomly initialised encoder; anything else is an encoder folder to load."""
    if isinstance(preset_or_folder, str) and preset_or_folder in PRESETS:
        return encoder_from_config(encoder_config(preset_or_folder))
    return load_encoder(preset_or_folder)


def _read_weights(folder: Path) -> dict[str, Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single), device="cpu")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, Tensor] = {}
        for shard in shards:
            weights.update(load_file(str(folder / shard), device="cpu"))
        return weights
    raise EncoderError(f"{folder}: no model.safetensors (or model.safetensors.index.json) in the encoder folder")


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise ``WeightsMismatchError`` listing every missing, unexpected and wrongly shaped entry."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: model {tuple(expected[k].shape)} vs checkpoint {tuple(state[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if not (missing or unexpected or shapes):
        return

    def show(title: str, items: list[str]) -> str:
        head = items[:20]
        more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(head) + more

    msg = f"{what}: weights do not match the model"
    if missing:
        msg += show("missing keys", missing)
    if unexpected:
        msg += show("unexpected keys", unexpected)
    if shapes:
        msg += show("shape mismatches", shapes)
    raise WeightsMismatchError(msg)


def encoder_with_weights(config: Wav2Vec2BertConfig, state: Mapping[str, Tensor], what: str) -> Wav2Vec2BertModel:
    """Build the encoder for ``config`` holding exactly the tensors of ``state`` (checked first, all
    problems listed); tensors are cast to the model's dtype."""
    with torch.device("meta"):
        encoder = encoder_from_config(config)
    check_state_dict(encoder, state, what)
    reference = encoder.state_dict()
    state = {k: v.to(dtype=reference[k].dtype) for k, v in state.items()}
    # Non-persistent buffers (rotary/sinusoidal position tables) are not in a state dict, so a meta-built
    # model cannot get them by assignment: build those encoders for real.
    if set(dict(encoder.named_buffers())) - set(reference):
        encoder = encoder_from_config(config)
        encoder.load_state_dict(state, strict=True)
    else:
        # Meta construction + assignment: no random init of (and no second copy of) 600M parameters.
        encoder.load_state_dict(state, strict=True, assign=True)
    return encoder


def load_encoder(folder: str | os.PathLike) -> Wav2Vec2BertModel:
    """Load an encoder folder (``config.json`` + ``model.safetensors``), e.g. facebook/w2v-bert-2.0.

    Every parameter of the model must be in the checkpoint with its exact shape; ``masked_spec_embed`` is
    dropped. Problems raise ``WeightsMismatchError`` listing all of them.
    """
    folder = Path(folder)
    config = encoder_config(folder)
    weights = {k: v for k, v in _read_weights(folder).items() if k not in IGNORED_KEYS}
    return encoder_with_weights(config, weights, str(folder))


def save_encoder(encoder: Wav2Vec2BertModel, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (LoRA merged), loadable by ``load_encoder`` and by
    ``Wav2Vec2BertModel.from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.config.save_pretrained(folder)
    state = {k: v.detach().to("cpu").contiguous() for k, v in merged_state_dict(encoder).items()}
    save_tensors_atomic(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------- front-end
class Frontend(nn.Module):
    """Encoder returning all hidden states: the feature projection output and every conformer layer's."""

    def __init__(self, encoder: Wav2Vec2BertModel) -> None:
        super().__init__()
        if not isinstance(encoder, Wav2Vec2BertModel):
            raise TypeError(f"Frontend wraps a transformers Wav2Vec2BertModel, got {type(encoder).__name__}")
        self.encoder = encoder
        self.frozen = False

    @property
    def config(self) -> Wav2Vec2BertConfig:
        return self.encoder.config

    @property
    def num_states(self) -> int:
        return self.encoder.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def has_lora(self) -> bool:
        return any(_is_lora_layer(m) for m in self.encoder.modules())

    def forward(self, feats: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, ...]:
        """``feats`` [B, T, 160], ``attention_mask`` [B, T] (1 = real frame) -> ``num_states`` x [B, T, D].

        Frames past an utterance's end hold meaningless values: consumers must mask them out. Real frames do
        not depend on the padding (attention is masked and the conformer's depthwise convolution is causal,
        left-padded, with padded inputs zeroed).
        """
        expected = self.encoder.config.feature_projection_input_dim
        if feats.dim() != 3 or feats.shape[-1] != expected:
            raise ValueError(f"Frontend: feats must be [batch, frames, {expected}], got {tuple(feats.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(feats.shape[:2]):
            raise ValueError(
                f"Frontend: attention_mask {tuple(attention_mask.shape)} does not match feats {tuple(feats.shape[:2])}"
            )
        out = self.encoder(input_features=feats, attention_mask=attention_mask, output_hidden_states=True)
        return tuple(out.hidden_states)

    def train(self, mode: bool = True) -> "Frontend":
        super().train(mode)
        if mode and self.frozen:
            # Frozen parts behave as at inference (no conformer-conv dropout), as in the reference recipe;
            # only modules that own trainable weights (LoRA and its parents) train.
            for module in self.encoder.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self


def build_frontend(cfg: FrontendConfig, root: str | os.PathLike | None = None) -> Frontend:
    """Preset (random init) or folder (``root`` / folder, default: the working directory), then LoRA, freezing."""
    if cfg.folder is not None:
        encoder = load_encoder(Path(root or ".") / cfg.folder)
    else:
        encoder = encoder_from_config(cfg.encoder_config())
    frontend = Frontend(encoder)
    if cfg.lora is not None:
        add_lora(frontend, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    freeze(frontend, cfg.freeze)
    return frontend


# --------------------------------------------------------------------------------------------- LoRA
def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_lora_param(name: str) -> bool:
    return "lora_" in name


def add_lora(frontend: Frontend, r: int = 64, alpha: float = 128.0, dropout: float = 0.0,
             targets: list[str] | tuple[str, ...] = ("linear_q", "linear_v")) -> Frontend:
    """Inject LoRA adapters in place (peft); the encoder stays a ``Wav2Vec2BertModel``."""
    import peft

    if frontend.has_lora:
        raise ValueError("add_lora: the front-end already has LoRA adapters; merge them first")
    names = {name.rsplit(".", 1)[-1] for name, _ in frontend.encoder.named_modules()}
    unknown = sorted(set(targets) - names)
    if unknown:
        raise ValueError(f"add_lora: no module named {unknown} in the encoder (e.g. linear_q, linear_k, linear_v, "
                         "linear_out, intermediate_dense, output_dense)")
    lora_cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    peft.inject_adapter_in_model(lora_cfg, frontend.encoder)
    # peft freezes everything but the adapters on injection; trainability is freeze()'s decision.
    freeze(frontend, frontend.frozen)
    return frontend


def merged_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """The encoder's state dict with LoRA folded into the base weights, under the stock HF key names."""
    lora_layers = {name: m for name, m in encoder.named_modules() if _is_lora_layer(m)}
    state: dict[str, Tensor] = {}
    for key, value in encoder.state_dict().items():
        if _is_lora_param(key):
            continue
        owner = next((n for n in lora_layers if key.startswith(n + ".base_layer.")), None)
        if owner is None:
            state[key] = value
            continue
        leaf = key[len(owner) + len(".base_layer."):]
        layer = lora_layers[owner]
        if leaf == "weight":
            value = value.clone()
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                    value += layer.get_delta_weight(adapter).to(value.dtype)
        state[f"{owner}.{leaf}"] = value
    return state


def merge_lora(frontend: Frontend) -> Frontend:
    """A new front-end whose plain encoder has the LoRA updates folded in (the input is left unchanged)."""
    param = next(frontend.encoder.parameters())
    state = {k: v.detach().clone() for k, v in merged_state_dict(frontend.encoder).items()}
    encoder = encoder_with_weights(frontend.encoder.config, state, "merge_lora").to(device=param.device)
    merged = Frontend(encoder)
    freeze(merged, frontend.frozen)
    merged.train(frontend.training)
    return merged


def freeze(frontend: Frontend, frozen: bool = True) -> Frontend:
    """Freeze (or unfreeze) the encoder's own weights; LoRA weights always stay trainable."""
    for name, param in frontend.encoder.named_parameters():
        param.requires_grad = _is_lora_param(name) or not frozen
    frontend.frozen = frozen
    frontend.train(frontend.training)
    return frontend
