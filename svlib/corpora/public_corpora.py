"""The shared-data folders rebuilt from the public downloads (``svlib.corpora.download``), for machines without
``../shared/data``:

    python -m svlib.corpora.download librispeech-test-other librispeech-train-clean-100 speechocean762 esc50
    python -m svlib.corpora.public_corpora --downloads data/downloads --out data/public
    python -m svlib.corpora.prepare demo --sv-bench data/public/sv-bench/manifest.csv \\
        --so762 data/public/speechocean762-train --esc10 data/public/esc10-noise/manifest.csv --out data/demo

Each folder gets the ``manifest.csv`` (and speaker tables) that ``svlib.corpora.prepare`` / ``svlib.corpora.demo_data``
read, with symbolic links into the extracted archives (nothing is copied; paths stay inside the folder):

- ``sv-bench/``: LibriSpeech test-other, ``test_speakers`` speakers with at least two chapters, ``test_utts``
  utterances each taken round-robin over their chapters (the realistic cross-chapter list); train-clean-100,
  ``train_utts`` utterance(s) per speaker, the longest ones. All choices are by a seeded permutation of sorted
  names. The shared sv-bench's exact files came from another selection (Resemblyzer's sample data) and its
  Arabic Speech Commands speakers are not downloaded here, so numbers on this folder differ from the README's.
- ``speechocean762-train/``: the corpus's official train half (``train/wav.scp``, ``utt2spk``, ``spk2age``,
  ``spk2gender``, ``text``), speakers renamed ``so762-<id>`` as in the shared folder; 16 kHz WAV instead of Opus.
- ``esc10-noise/``: the ESC-50 clips whose ``esc10`` column is true, with their ``category`` as ``class`` and
  their ``fold``; 44.1 kHz WAV (the loader resamples).

Durations come from the file headers (``svlib.audio.audio_info``), so nothing is decoded.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from svlib.audio import AudioError, audio_info
from svlib.data.lists import ListError
from svlib.files import write_lines_atomic, write_text_atomic

__all__ = ["build_esc10", "build_public", "build_so762", "build_sv_bench"]

HEADER = "path,speaker,source,licence,seconds,sample_rate"


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (absolute), replacing an older link; the folder's paths stay relative to it."""
    if not target.is_dir():
        raise ListError(f"{target}: expected an extracted corpus folder here (run svlib.corpora.download first)")
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise ListError(f"{link}: exists and is not a link; remove it")
    link.symlink_to(target.resolve(), target_is_directory=True)


def _seconds(path: Path) -> tuple[float, int]:
    try:
        info = audio_info(path)
    except AudioError as err:
        raise ListError(str(err)) from None
    return info.seconds, info.sample_rate


def _order(items: list[str], seed: int, stream: int) -> list[str]:
    items = sorted(items)
    return [items[i] for i in np.random.default_rng([seed, stream]).permutation(len(items))]


def _find(root: Path, *candidates: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise ListError(f"{root}: none of {list(candidates)} found (is the archive extracted?)")


def build_sv_bench(downloads: Path, out: Path, test_speakers: int = 10, test_utts: int = 10, train_utts: int = 1,
                   seed: int = 0) -> dict:
    """``out/manifest.csv`` over linked LibriSpeech test-other and train-clean-100 (module docstring)."""
    licence = "CC-BY-4.0 (LibriSpeech)"
    rows, counts = [HEADER], {}
    for folder, name, subset in (("librispeech_test-other", "librispeech-test-other", "test-other"),
                                 ("librispeech_train-clean-100", "librispeech-train-clean-100", "train-clean-100")):
        source = _find(downloads / name, f"LibriSpeech/{subset}", subset)
        _link(source, out / folder)
        by_speaker: dict[str, dict[str, list[Path]]] = {}
        for f in sorted((out / folder).glob("*/*/*.flac")):
            spk, chapter = f.parent.parent.name, f.parent.name
            by_speaker.setdefault(spk, {}).setdefault(chapter, []).append(f)
        if not by_speaker:
            raise ListError(f"{source}: no <speaker>/<chapter>/*.flac files")
        chosen: dict[str, list[Path]] = {}
        if folder == "librispeech_test-other":
            several = [s for s, ch in by_speaker.items() if len(ch) >= 2 and sum(map(len, ch.values())) >= test_utts]
            for spk in sorted(_order(several, seed, 1)[:test_speakers]):
                queues = [_order([str(p) for p in by_speaker[spk][c]], seed, 2) for c in sorted(by_speaker[spk])]
                picked: list[str] = []
                while len(picked) < test_utts:  # round-robin over chapters: target pairs cross chapters
                    for q in queues:
                        if q and len(picked) < test_utts:
                            picked.append(q.pop(0))
                chosen[spk] = [Path(p) for p in sorted(picked)]
        else:
            for spk, chapters in by_speaker.items():
                files = [p for ps in chapters.values() for p in ps]
                chosen[spk] = sorted(sorted(files, key=lambda p: (-_seconds(p)[0], p.name))[:train_utts])
        for spk, files in sorted(chosen.items()):
            for f in files:
                seconds, rate = _seconds(f)
                rel = f.relative_to(out).as_posix()
                rows.append(f"{rel},ls{spk},openslr 12 {subset},{licence},{seconds:.3f},{rate}")
        counts[folder] = {"speakers": len(chosen), "utterances": sum(map(len, chosen.values()))}
    write_lines_atomic(out / "manifest.csv", rows)
    return counts


def _kaldi_table(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ListError(f"{path}: not found (speechocean762's train/ folder should have it)")
    table = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2:
            raise ListError(f"{path}:{number}: expected '<key> <value>'")
        table[fields[0]] = fields[1].strip()
    return table


def build_so762(downloads: Path, out: Path) -> dict:
    """``out/{manifest.csv, spk2age, spk2gender, text}`` + ``out/WAVE`` link from speechocean762's train half."""
    root = _find(downloads / "speechocean762", "speechocean762", ".")
    train = root / "train"
    wavs, utt2spk = _kaldi_table(train / "wav.scp"), _kaldi_table(train / "utt2spk")
    ages, genders, text = (_kaldi_table(train / n) for n in ("spk2age", "spk2gender", "text"))
    _link(root / "WAVE", out / "WAVE")
    licence = "CC BY 4.0 (openslr 101); free for commercial and non-commercial use (corpus README)"
    rows = [HEADER]
    for utt in sorted(wavs):
        if utt not in utt2spk:
            raise ListError(f"{train / 'utt2spk'}: no speaker for utterance '{utt}'")
        rel = Path(wavs[utt].split()[-1])
        if rel.parts[0] != "WAVE":
            raise ListError(f"{train / 'wav.scp'}: '{utt}' path {rel} is not under WAVE/")
        seconds, rate = _seconds(out / rel)
        rows.append(f"{rel.as_posix()},so762-{utt2spk[utt]},speechocean762,\"{licence}\",{seconds:.3f},{rate}")
    speakers = sorted(set(utt2spk[u] for u in wavs))
    write_lines_atomic(out / "manifest.csv", rows)
    for name, table in (("spk2age", ages), ("spk2gender", genders)):
        missing = [s for s in speakers if s not in table]
        if missing:
            raise ListError(f"{train / name}: no entry for speaker(s) {missing[:5]}")
        write_lines_atomic(out / name, (f"so762-{s} {table[s]}" for s in speakers))
    write_text_atomic(out / "text", "".join(f"{u}\t{text[u]}\n" for u in sorted(wavs) if u in text))
    return {"speakers": len(speakers), "utterances": len(wavs)}


def build_esc10(downloads: Path, out: Path) -> dict:
    """``out/manifest.csv`` (path,class,fold,...) + ``out/audio`` link from ESC-50's ``meta/esc50.csv``."""
    root = _find(downloads / "esc50", "ESC-50-master", ".")
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise ListError(f"{meta}: not found (ESC-50 archive layout)")
    _link(root / "audio", out / "audio")
    rows = ["path,class,fold,freesound_clip,licence,seconds,sample_rate"]
    with open(meta, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if row.get("esc10", "").strip().lower() != "true":
                continue
            rel = Path("audio") / row["filename"]
            seconds, rate = _seconds(out / rel)
            rows.append(f"{rel.as_posix()},{row['category']},{row['fold']},{row.get('src_file', '')},"
                        f"ESC-10 (CC BY 3.0),{seconds:.3f},{rate}")
    if len(rows) == 1:
        raise ListError(f"{meta}: no row with esc10 == True")
    write_lines_atomic(out / "manifest.csv", rows)
    return {"clips": len(rows) - 1}


def build_public(downloads: str | os.PathLike, out: str | os.PathLike, seed: int = 0, **sv_bench) -> dict:
    """The three folders under ``out`` (``sv_bench``: ``build_sv_bench``'s selection sizes)."""
    downloads, out = Path(downloads), Path(out)
    return {"sv-bench": build_sv_bench(downloads, out / "sv-bench", seed=seed, **sv_bench),
            "speechocean762-train": build_so762(downloads, out / "speechocean762-train"),
            "esc10-noise": build_esc10(downloads, out / "esc10-noise")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svlib.corpora.public_corpora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--downloads", default="data/downloads")
    parser.add_argument("--out", default="data/public")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = build_public(args.downloads, args.out, args.seed)
    except ListError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, c in counts.items():
        print(f"{args.out}/{name}: {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
