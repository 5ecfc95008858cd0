"""What training reads: Kaldi-style lists (``lists``: data dirs, trials, noise/RIR lists), batches (``sampling``),
augmentation (``augment``: noise, reverb) and the telephone channel (``channel``).

Not here: turning a corpus into those lists (``svlib.corpora``; ``svlib.data.prepare`` is only an alias of its
command). This package never imports ``svlib.corpora``.
"""
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
