"""MUSAN and RIRS_NOISES: the ``name category path`` noise and impulse-response lists augmentation reads.

    python -m svlib.corpora.prepare musan --root <musan> --out data/musan.list
    python -m svlib.corpora.prepare rirs  --root <RIRS_NOISES> --out data/rirs.list
"""
from __future__ import annotations

import os
from pathlib import Path

from svlib.corpora.common import check_first_decodes, relative_path, subdirs
from svlib.data.lists import AudioEntry, ListError, write_audio_list


def write_checked_list(entries: list[AudioEntry], out: str | os.PathLike | None, relative_to) -> list[AudioEntry]:
    """``entries`` sorted; written to ``out`` (when given) once its first file is known to decode."""
    entries = sorted(entries)
    if out is not None:
        check_first_decodes(out, entries[0].path, relative_to)
        write_audio_list(out, entries)
    return entries


def prepare_musan(root: str | os.PathLike, out: str | os.PathLike | None = None, relative_to=None) -> list[AudioEntry]:
    """``musan/{noise,music,speech}/<sub>/*.wav`` -> ``name category path`` list (category noise|music|speech)."""
    root = Path(root)
    if (root / "musan").is_dir():
        root = root / "musan"
    entries, seen = [], {}
    for category in ("noise", "music", "speech"):
        if not (root / category).is_dir():
            continue
        for sub in subdirs(root / category):
            for f in sorted(sub.glob("*.wav")):
                name = f.stem
                if name in seen:
                    raise ListError(f"{f}: name '{name}' also used by {seen[name]}")
                seen[name] = f
                entries.append(AudioEntry(name, category, relative_path(f, relative_to)))
    if not entries:
        raise ListError(f"{root}: no MUSAN files in {{noise,music,speech}}/<sub>/*.wav")
    return write_checked_list(entries, out, relative_to)


def prepare_rirs(root: str | os.PathLike, out: str | os.PathLike | None = None, relative_to=None) -> list[AudioEntry]:
    """RIRS_NOISES -> ``name category path`` list of impulse responses (category smallroom|mediumroom|largeroom|real).

    ``real_rirs_isotropic_noises`` mixes RIRs with recorded noises; the noises (file names containing
    "noise") are left out because convolving speech with a noise is not reverberation.
    """
    root = Path(root)
    if (root / "RIRS_NOISES").is_dir():
        root = root / "RIRS_NOISES"
    entries = []
    for size in ("smallroom", "mediumroom", "largeroom"):
        base = root / "simulated_rirs" / size
        if not base.is_dir():
            continue
        for room in subdirs(base):
            if not room.name.lower().startswith("room"):
                continue
            for f in sorted(room.glob("*.wav")):
                entries.append(AudioEntry(f"{size}-{room.name}-{f.stem}", size, relative_path(f, relative_to)))
    real = root / "real_rirs_isotropic_noises"
    if real.is_dir():
        for f in sorted(real.glob("*.wav")):
            if "noise" not in f.name.lower():
                entries.append(AudioEntry(f"real-{f.stem}", "real", relative_path(f, relative_to)))
    if not entries:
        raise ListError(f"{root}: no RIRs in simulated_rirs/*room/Room*/*.wav or real_rirs_isotropic_noises/*.wav")
    return write_checked_list(entries, out, relative_to)


# ---- command line (``python -m svlib.corpora.prepare musan | rirs``) ------------------------------------------
SUBCOMMANDS = ("musan", "rirs")


def add_subcommands(sub) -> None:
    for name, what in (("musan", "noise list from MUSAN"), ("rirs", "RIR list from RIRS_NOISES")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--root", required=True)
        p.add_argument("--out", required=True, help="list file to write")


def run_subcommand(args) -> None:
    fn = prepare_musan if args.command == "musan" else prepare_rirs
    entries = fn(args.root, args.out, args.relative_to)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.category] = counts.get(e.category, 0) + 1
    print(f"{args.out}: {len(entries)} files " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
