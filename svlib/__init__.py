"""svlib: speaker verification with W2V-BERT 2.0 (Layer-Adapter MFA back-end, LoRA, structured pruning).

``svlib.load_model(folder)`` / ``svlib.save_model(model, folder, meta)`` read and write model folders
(dense or pruned). They are resolved on first use so that ``import svlib`` (and ``svlib --help``) stays
free of torch and transformers imports.
"""
from __future__ import annotations

__all__ = ["load_model", "save_model"]


def __getattr__(name: str):
    if name == "load_model":
        from svlib.package import load_model

        return load_model
    if name == "save_model":
        from svlib.model.speaker import save_model

        return save_model
    raise AttributeError(f"module 'svlib' has no attribute {name!r}")
