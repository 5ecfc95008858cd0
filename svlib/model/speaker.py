"""The speaker model (features -> front-end -> back-end) and its folder format.

A model folder is what travels between stages::

    svlib_model.json     format name + version, back-end config, shapes, free-form ``meta``
    encoder/             the front-end as a Hugging Face folder (config.json + model.safetensors, LoRA merged)
    model.safetensors    the back-end weights (keys ``backend.*``)

The encoder lives in its own HF folder so it loads through ``load_encoder`` (where pruned, per-layer sized
encoders are handled) and can be used by HF tools directly.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from svlib.config import ConfigError, from_dict, to_dict
from svlib.features import FeatureConfig, W2VBertFbank
from svlib.files import save_tensors_atomic, write_text_atomic
from svlib.model.backends import BackendConfig, build_backend
from svlib.model.frontend import (
    Frontend,
    FrontendConfig,
    WeightsMismatchError,
    build_frontend,
    check_state_dict,
    load_encoder,
    save_encoder,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFormatError",
    "SpeakerModelConfig",
    "SpeakerModel",
    "build_speaker_model",
    "save_model",
    "load_model",
    "read_manifest",
]

FORMAT = "svlib-speaker-model"
FORMAT_VERSION = 1
MANIFEST = "svlib_model.json"
ENCODER_DIR = "encoder"
BACKEND_WEIGHTS = "model.safetensors"


class ModelFormatError(ValueError):
    """A model folder that is not (this version of) an svlib speaker model."""


@dataclass
class SpeakerModelConfig:
    frontend: FrontendConfig
    backend: BackendConfig
    features: FeatureConfig = field(default_factory=FeatureConfig)

    def __post_init__(self) -> None:
        if self.frontend.folder is not None and self.features.normalise != "utterance":
            # allowed (an experiment may want it), but almost always a copied demo config
            warnings.warn(f"features.normalise {self.features.normalise!r} with the pretrained encoder "
                          f"{self.frontend.folder}: its weights were trained on the extractor's per-utterance "
                          "normalised features (normalise: utterance)", stacklevel=3)


class SpeakerModel(nn.Module):
    """waves [B, N] + lengths [B] -> embeddings [B, E]; features are computed inside, on the model's device."""

    def __init__(self, frontend: Frontend, backend: nn.Module, features: nn.Module | None = None) -> None:
        super().__init__()
        self.features = features if features is not None else W2VBertFbank()
        self.frontend = frontend
        self.backend = backend
        self.meta: dict[str, Any] = {}

    @property
    def embed_dim(self) -> int:
        return self.backend.embed_dim

    def embed_features(self, feats: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.backend(self.frontend(feats, attention_mask), attention_mask)

    def forward(self, waves: Tensor, lengths: Tensor) -> Tensor:
        feats, mask = self.features(waves, lengths)
        return self.embed_features(feats, mask)


def build_speaker_model(cfg: SpeakerModelConfig, root: str | os.PathLike | None = None) -> SpeakerModel:
    frontend = build_frontend(cfg.frontend, root=root)
    backend = build_backend(cfg.backend, frontend.num_states, frontend.hidden_size)
    return SpeakerModel(frontend, backend, W2VBertFbank(normalise=cfg.features.normalise))


def save_model(model: SpeakerModel, folder: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write the model folder (LoRA merged into the encoder weights). ``meta`` must be JSON-serialisable."""
    folder = Path(folder)
    meta = dict(meta or {})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": ENCODER_DIR,
        "backend": to_dict(model.backend.to_config()),
        "features": to_dict(model.features.to_config()),
        "num_states": model.frontend.num_states,
        "hidden_size": model.frontend.hidden_size,
        "embed_dim": model.embed_dim,
        "meta": meta,
    }
    try:
        text = json.dumps(manifest, indent=2, sort_keys=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"save_model: meta is not JSON-serialisable ({err})") from None
    folder.mkdir(parents=True, exist_ok=True)
    # The manifest is written last and atomically: a folder with one is complete.
    (folder / MANIFEST).unlink(missing_ok=True)
    save_encoder(model.frontend.encoder, folder / ENCODER_DIR)
    backend_state = {f"backend.{k}": v.detach().to("cpu").contiguous() for k, v in model.backend.state_dict().items()}
    # atomic, with the umask's mode (safetensors alone creates 0600 files; shared models must be group-readable)
    save_tensors_atomic(backend_state, folder / BACKEND_WEIGHTS, metadata={"format": "pt"})
    write_text_atomic(folder / MANIFEST, text + "\n")
    return folder


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a model folder after the cheap checks (exists, JSON, format name and version)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ModelFormatError(f"{folder}: not an svlib model folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ModelFormatError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: format version {manifest.get('format_version')!r}; this svlib reads "
                               f"version {FORMAT_VERSION} only (re-save the model with a matching svlib)")
    return manifest


def load_model(folder: str | os.PathLike) -> SpeakerModel:
    """Load a model folder written by ``save_model``; returns the model in eval mode with ``.meta`` set."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = read_manifest(folder)
    required = ("encoder", "backend", "num_states", "hidden_size", "embed_dim", "meta")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ModelFormatError(f"{path}: missing key(s) {missing}")
    try:
        backend_cfg = from_dict(BackendConfig, manifest["backend"], "backend")
        # Folders written before the key existed were all per-utterance normalised: the default. An explicit
        # null is not "absent": from_dict would read it as {}.
        if manifest.get("features", {}) is None:
            raise ConfigError("features: expected a mapping, got null")
        features = from_dict(FeatureConfig, manifest.get("features", {}), "features")
    except ConfigError as err:
        raise ModelFormatError(f"{path}: {err}") from None

    frontend = Frontend(load_encoder(folder / manifest["encoder"]))
    if (frontend.num_states, frontend.hidden_size) != (manifest["num_states"], manifest["hidden_size"]):
        raise ModelFormatError(
            f"{path}: encoder has {frontend.num_states} states of size {frontend.hidden_size}, manifest says "
            f"{manifest['num_states']} of size {manifest['hidden_size']}"
        )
    backend = build_backend(backend_cfg, frontend.num_states, frontend.hidden_size)
    weights_path = folder / BACKEND_WEIGHTS
    if not weights_path.is_file():
        raise ModelFormatError(f"{folder}: missing {BACKEND_WEIGHTS} (back-end weights)")
    raw = load_file(str(weights_path), device="cpu")
    stray = sorted(k for k in raw if not k.startswith("backend."))
    state = {k[len("backend."):]: v for k, v in raw.items() if k.startswith("backend.")}
    if stray:
        raise WeightsMismatchError(f"{weights_path}: unexpected keys outside 'backend.': {stray[:20]}")
    check_state_dict(backend, state, str(weights_path))
    backend.load_state_dict(state, strict=True)

    model = SpeakerModel(frontend, backend, W2VBertFbank(normalise=features.normalise))
    model.meta = manifest["meta"]
    return model.eval()
