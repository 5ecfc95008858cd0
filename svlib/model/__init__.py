"""Speaker model: W2V-BERT 2.0 front-end (HF model, LoRA), back-ends (Layer-Adapter MFA, MHFA), save/load, and the
encoder's per-layer widths (``structure``: shrinking, and rebuilding pruned folders when they load).

Not here: how pruning chooses what to remove (masks, distillation: ``svlib.pruning``, which builds on this
package; the model layer never imports it).
"""
from svlib.model.backends import MHFA, AdapterMFA, BackendConfig, build_backend
from svlib.model.frontend import (
    PRESETS,
    EncoderError,
    Frontend,
    FrontendConfig,
    LoraConfig,
    WeightsMismatchError,
    add_lora,
    build_encoder,
    build_frontend,
    freeze,
    load_encoder,
    merge_lora,
    register_encoder_hook,
    save_encoder,
)
from svlib.model.speaker import (
    ModelFormatError,
    SpeakerModel,
    SpeakerModelConfig,
    build_speaker_model,
    load_model,
    save_model,
)

__all__ = [
    "PRESETS", "EncoderError", "Frontend", "FrontendConfig", "LoraConfig", "WeightsMismatchError",
    "add_lora", "build_encoder", "build_frontend", "freeze", "load_encoder", "merge_lora",
    "register_encoder_hook", "save_encoder",
    "AdapterMFA", "MHFA", "BackendConfig", "build_backend",
    "ModelFormatError", "SpeakerModel", "SpeakerModelConfig", "build_speaker_model", "load_model", "save_model",
]
