"""The end of pruning: freeze the masks, shrink the encoder, save and reload the smaller folder.

The module surgery itself (``shrink_encoder``, ``shrink_to_sizes``, ``layer_sizes``, ``ConstantBlock``) is
the model layer's, ``svlib.model.structure``: ``load_encoder`` rebuilds a shrunk folder from the widths its
``config.json`` records without importing anything from here. The names are re-exported for pruning code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel

from svlib.model.structure import (CONFIG_KEY, KINDS, ConstantBlock, apply_recorded_widths, layer_sizes,
                                   shrink_encoder, shrink_to_sizes)

WEIGHTS_NAME = "model.safetensors"

__all__ = ["CONFIG_KEY", "KINDS", "ConstantBlock", "apply_recorded_widths", "layer_sizes", "load_pruned_encoder",
           "prune_model", "save_pruned_encoder", "shrink_encoder", "shrink_to_sizes"]



def prune_model(model: Wav2Vec2BertModel, mask_set) -> Wav2Vec2BertModel:
    """Freeze ``mask_set``'s deterministic masks, detach its hooks and shrink ``model`` accordingly."""
    masks = mask_set.deterministic_masks()
    mask_set.detach()
    return shrink_encoder(model, masks)


def save_pruned_encoder(model: Wav2Vec2BertModel, folder: str | Path) -> Path:
    from svlib.files import save_tensors_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    setattr(model.config, CONFIG_KEY, layer_sizes(model))
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_tensors_atomic(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def load_pruned_encoder(folder: str | Path, map_location: str | torch.device = "cpu") -> Wav2Vec2BertModel:
    """Rebuild the encoder saved by ``save_pruned_encoder`` (eval mode). A dense folder loads as dense."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = Wav2Vec2BertConfig.from_pretrained(folder)
    model = Wav2Vec2BertModel(config)
    sizes = getattr(config, CONFIG_KEY, None)
    if sizes is not None:
        shrink_to_sizes(model, sizes)
    state = load_file(str(folder / WEIGHTS_NAME), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()

