"""Data lists (Kaldi data dirs, trials, noise/RIR lists), preparation, sampling and augmentation."""
from svlib.data.lists import (
    AudioEntry,
    DataDir,
    ListError,
    Trials,
    read_audio_list,
    read_segment,
    read_trials,
    write_audio_list,
    write_trials,
)

__all__ = [
    "AudioEntry",
    "DataDir",
    "ListError",
    "Trials",
    "read_audio_list",
    "read_segment",
    "read_trials",
    "write_audio_list",
    "write_trials",
]
