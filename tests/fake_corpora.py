"""Fake public-corpus layouts (what the archives of ``svlib.corpora.download.SOURCES`` unpack to), tiny audio.

``write_layout(root)`` writes ``root/<source name>/...`` as ``svlib.corpora.download.fetch`` leaves it;
``write_archives(layout, out)`` packs each ``layout/<name>/`` into ``out/<the source's file name>``.
"""
from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

import numpy as np

from svlib.audio import write_audio
from svlib.corpora.download import SOURCES

RATE = 16000


def wave(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def write_layout(root: Path, utts_per_chapter: int = 3) -> Path:
    """LibriSpeech test-other: 4 speakers (3 with two chapters, 1 with one), ``utts_per_chapter`` utterances per
    chapter; train-clean-100: 3 speakers x 2 utterances; speechocean762: 8 speakers x 3 utterances (4 children,
    4 adults, both genders); ESC-50: 6 clips at 44.1 kHz, 4 of them in ESC-10."""
    n = 0
    for subset, speakers in (("test-other", {"11": 2, "12": 2, "13": 2, "14": 1}),
                             ("train-clean-100", {"21": 1, "22": 1, "23": 1})):
        for spk, chapters in speakers.items():
            for c in range(chapters):
                for u in range(utts_per_chapter if subset == "test-other" else 2):
                    f = root / f"librispeech-{subset}/LibriSpeech/{subset}/{spk}/{100 + c}/{spk}-{100 + c}-{u:04d}.flac"
                    f.parent.mkdir(parents=True, exist_ok=True)
                    write_audio(f, wave(0.4 + 0.1 * u, n))
                    n += 1
    so = root / "speechocean762" / "speechocean762"
    (so / "train").mkdir(parents=True)
    scp, u2s, ages, genders, text = [], [], [], [], []
    for s in range(1, 9):
        spk = f"{s:04d}"
        ages.append(f"{spk} {8 if s <= 4 else 30}")
        genders.append(f"{spk} {'mf'[s % 2]}")
        for u in range(3):
            utt = f"{s:05d}{u:04d}"
            f = so / "WAVE" / f"SPEAKER{spk}" / f"{utt}.WAV"
            f.parent.mkdir(parents=True, exist_ok=True)
            write_audio(f, wave(0.5, n))
            n += 1
            scp.append(f"{utt}\tWAVE/SPEAKER{spk}/{utt}.WAV")
            u2s.append(f"{utt} {spk}")
            text.append(f"{utt} HELLO WORLD")
    for name, lines in (("wav.scp", scp), ("utt2spk", u2s), ("spk2age", ages), ("spk2gender", genders), ("text", text)):
        (so / "train" / name).write_text("\n".join(lines) + "\n")
    esc = root / "esc50" / "ESC-50-master"
    (esc / "audio").mkdir(parents=True)
    (esc / "meta").mkdir()
    meta = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (fold, cat, ten) in enumerate(((1, "dog", True), (2, "rain", True), (5, "dog", True), (5, "rain", True),
                                          (1, "cow", False), (3, "cat", False))):
        name = f"{fold}-{1000 + i}-A-0.wav"
        write_audio(esc / "audio" / name, wave(0.3, n, 44100), 44100)
        n += 1
        meta.append(f"{name},{fold},0,{cat},{ten},{1000 + i},A")
    (esc / "meta" / "esc50.csv").write_text("\n".join(meta) + "\n")
    return root


def write_archives(layout: Path, out: Path) -> dict[str, Path]:
    """Source name -> ``out/<file name>``: a .tar.gz (a .zip for ESC-50) of ``layout/<name>/``'s contents."""
    out.mkdir(parents=True, exist_ok=True)
    archives = {}
    for name, source in SOURCES.items():
        folder, path = layout / name, out / source.filename
        members = sorted(p for p in folder.rglob("*") if p.is_file())
        if path.suffix == ".zip":
            with zipfile.ZipFile(path, "w") as z:
                for p in members:
                    z.write(p, p.relative_to(folder).as_posix())
        else:
            with tarfile.open(path, "w:gz") as t:
                for p in members:
                    t.add(p, p.relative_to(folder).as_posix())
        archives[name] = path
    return archives
