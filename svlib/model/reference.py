"""Import the released checkpoints of the reference recipe (arXiv 2510.04213), e.g. ``model_lmft_0.14.pth``.

Their layout (``torch.save`` of a dict)::

    {"modules": {"spk_model": state_dict, "classifier": {"weight": [classes, 256]}}, "epoch_idx": ...}

with ``spk_model`` keys ``front.encoder.<stock Wav2Vec2BertModel name>`` (LoRA merged, no masked_spec_embed)
and, for the Layer-Adapter MFA back-end, ``adapter_layers.{i}.{0,1,3}.*``, ``pooling.attention.{0,2,3}.*``
(2 is the BatchNorm) and ``bottleneck.{weight,bias}``. ``AdapterMFA`` uses these very names, so the import
is a prefix change plus strict checks. Checkpoints saved before the reference's LoRA merge (keys
``front.encoder.base_model.model.*`` with ``lora_A``/``lora_B``) are merged here, with ``alpha`` from the
front-end config's ``lora`` (the rank comes from the tensors).

The reference computes embeddings one utterance at a time without a mask; ``SpeakerModel`` gives the
same numbers for a single utterance and masks padding in batches.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from svlib.model.backends import AdapterMFA
from svlib.model.frontend import (
    IGNORED_KEYS,
    Frontend,
    FrontendConfig,
    WeightsMismatchError,
    check_state_dict,
    encoder_config,
    encoder_with_weights,
)
from svlib.model.speaker import SpeakerModel

__all__ = ["ReferenceCheckpointError", "import_reference_checkpoint", "split_reference_state"]

ENCODER_PREFIX = "front.encoder."
PEFT_PREFIX = "base_model.model."
BACKEND_PREFIXES = ("adapter_layers.", "pooling.", "bottleneck.")


class ReferenceCheckpointError(ValueError):
    """A file that is not a reference checkpoint in the expected layout."""


def _merge_peft_keys(state: dict[str, Tensor], alpha: float | None, where: str) -> dict[str, Tensor]:
    """Fold unmerged peft LoRA entries (``X.base_layer.weight``, ``X.lora_A.<name>.weight``, ...) into ``X.weight``."""
    state = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in state.items()}
    lora_a = {k: v for k, v in state.items() if ".lora_A." in k}
    if not lora_a and not any(".base_layer." in k for k in state):
        return state
    if lora_a and alpha is None:
        raise ReferenceCheckpointError(
            f"{where}: the checkpoint holds unmerged LoRA weights; set frontend.lora (its alpha scales them)"
        )
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for key_a, weight_a in lora_a.items():
        owner, adapter = key_a.split(".lora_A.")
        key_b = f"{owner}.lora_B.{adapter}"
        if key_b not in state:
            raise ReferenceCheckpointError(f"{where}: {key_a} has no matching {key_b}")
        target = f"{owner}.weight"
        if target not in out:
            raise ReferenceCheckpointError(f"{where}: LoRA weights for {owner} but no base weight")
        rank = weight_a.shape[0]
        delta = (state[key_b].float() @ weight_a.float()) * (alpha / rank)
        out[target] = (out[target].float() + delta).to(out[target].dtype)
    return out


def split_reference_state(spk_model: dict[str, Tensor], alpha: float | None = None,
                          where: str = "checkpoint") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``spk_model`` state dict -> (encoder state with HF names, back-end state with ``AdapterMFA`` names)."""
    encoder: dict[str, Tensor] = {}
    backend: dict[str, Tensor] = {}
    stray: list[str] = []
    for key, value in spk_model.items():
        if key.startswith(ENCODER_PREFIX):
            encoder[key[len(ENCODER_PREFIX):]] = value
        elif key.startswith(BACKEND_PREFIXES):
            backend[key] = value
        else:
            stray.append(key)
    if stray:
        raise WeightsMismatchError(
            f"{where}: unexpected keys (neither {ENCODER_PREFIX}* nor a Layer-Adapter MFA back-end): {sorted(stray)[:20]}"
            + (f" ... and {len(stray) - 20} more" if len(stray) > 20 else "")
        )
    encoder = _merge_peft_keys(encoder, alpha, where)
    encoder = {k: v for k, v in encoder.items() if k not in IGNORED_KEYS}
    return encoder, backend


def _load(path: Path, trusted: bool) -> Any:
    if not path.is_file():
        raise ReferenceCheckpointError(f"{path}: file not found")
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive (legacy: a pickle, protocol 2 starts with 0x80 0x02); anything else
    # (a text file, an HTML error page saved as .pth) makes the unpickler fail with e.g. a bare KeyError: 101
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise ReferenceCheckpointError(f"{path}: not a torch checkpoint (neither a torch.save zip archive nor a "
                                       f"pickle; starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise ReferenceCheckpointError(
            f"{path}: holds objects other than tensors and containers ({err}); if you trust the file, "
            "pass trusted=True"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError) as err:
        raise ReferenceCheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from None


def import_reference_checkpoint(
    path: str | os.PathLike,
    frontend_config: FrontendConfig | str = "w2v-bert-2.0",
    *,
    root: str | os.PathLike | None = None,
    trusted: bool = False,
) -> tuple[SpeakerModel, Tensor | None]:
    """Build a ``SpeakerModel`` (eval mode, plain encoder) from a reference checkpoint.

    ``frontend_config`` gives the encoder architecture (a preset name or a ``FrontendConfig``; only the
    config of a folder is read, the weights come from the checkpoint). Back-end widths are read from the
    tensors. Returns the model and the AAM classifier weight [classes, embed_dim] (None if absent).
    Missing, unexpected or mis-shaped entries raise ``WeightsMismatchError`` listing all of them.
    """
    path = Path(path)
    if isinstance(frontend_config, str):
        frontend_config = FrontendConfig(preset=frontend_config)
    config = frontend_config.encoder_config(root)

    ckpt = _load(path, trusted)
    modules = ckpt.get("modules") if isinstance(ckpt, dict) else None
    if not isinstance(modules, dict) or not isinstance(modules.get("spk_model"), dict):
        raise ReferenceCheckpointError(f"{path}: expected a dict with ['modules']['spk_model'] (the reference layout)")
    alpha = frontend_config.lora.alpha if frontend_config.lora is not None else None
    encoder_state, backend_state = split_reference_state(modules["spk_model"], alpha, str(path))

    num_states = config.num_hidden_layers + 1
    try:
        adapter_dim = backend_state["adapter_layers.0.0.weight"].shape[0]
        embed_dim = backend_state["bottleneck.weight"].shape[0]
    except KeyError as err:
        raise WeightsMismatchError(f"{path}: back-end key {err} missing; not a Layer-Adapter MFA checkpoint") from None
    backend = AdapterMFA(num_states, config.hidden_size, adapter_dim=adapter_dim, embed_dim=embed_dim)

    # Check both halves before failing so that one error lists every problem.
    problems = []
    try:
        encoder = encoder_with_weights(config, encoder_state, f"{path} (encoder, front.encoder.*)")
    except WeightsMismatchError as err:
        problems.append(str(err))
    try:
        check_state_dict(backend, backend_state, f"{path} (back-end)")
    except WeightsMismatchError as err:
        problems.append(str(err))
    if problems:
        raise WeightsMismatchError("\n".join(problems))
    backend.load_state_dict(backend_state, strict=True)

    classifier = modules.get("classifier")
    weight = classifier.get("weight") if isinstance(classifier, dict) else None
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != embed_dim):
        raise WeightsMismatchError(
            f"{path}: classifier weight has shape {tuple(weight.shape)}, expected [classes, {embed_dim}]"
        )
    epoch = ckpt.get("epoch_idx")
    if isinstance(epoch, Tensor):
        epoch = epoch.item()
    if not isinstance(epoch, (int, float, str, type(None))):
        epoch = str(epoch)  # meta must stay JSON-serialisable for save_model
    model = SpeakerModel(Frontend(encoder), backend)
    model.meta = {"source": "reference", "checkpoint": path.name, "epoch_idx": epoch}
    return model.eval(), weight
