"""Audio loading: any soundfile-readable file -> mono float32 at 16 kHz.

Errors are ``AudioError`` and always name the file, because in a 1M-utterance list the question a user
asks first is *which* file is broken.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000


class AudioError(ValueError):
    """A file that cannot be used as speech audio."""


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Read ``path`` as mono float32 in [-1, 1] at ``sample_rate``; first ``max_seconds`` only when given."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
        frames = -1
        if max_seconds is not None:
            frames = int(round(max_seconds * info.samplerate))
        wave, rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not a readable audio file ({err})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (zero samples)")
    return to_mono(wave, rate, sample_rate, path)


def to_mono(wave: np.ndarray, rate: int, sample_rate: int, path: str | os.PathLike) -> np.ndarray:
    """[frames, channels] as read by soundfile -> checked mono float32 at ``sample_rate``."""
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32)


def audio_seconds(path: str | os.PathLike) -> float:
    """Duration without decoding (for batching by length)."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: not a readable audio file ({err})") from None
    return info.frames / info.samplerate


def fit_length(wave: np.ndarray, num_samples: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Crop to ``num_samples`` (random offset when ``rng`` is given, else from the start) or repeat-pad.

    Repeating rather than zero-padding keeps short files speech-like everywhere, as the reference does.
    """
    if len(wave) == 0:
        raise AudioError("cannot fit an empty waveform to length")
    if len(wave) < num_samples:
        reps = -(-num_samples // len(wave))
        wave = np.tile(wave, reps)
    if len(wave) > num_samples:
        start = int(rng.integers(0, len(wave) - num_samples + 1)) if rng is not None else 0
        wave = wave[start:start + num_samples]
    return wave
