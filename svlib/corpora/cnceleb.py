"""CN-Celeb1/2 -> svlib data directories, an enrolment list and the evaluation trials.

The corpus layout (``CN-Celeb_flac`` v2 and ``CN-Celeb2_flac``, OpenSLR 82)::

    CN-Celeb_flac/data/<spk>/<genre>-<session>-<n>.flac     all 1,000 speakers
    CN-Celeb_flac/dev/dev.lst                               the 800 training speakers, one per line
    CN-Celeb_flac/eval/enroll/<spk>-enroll.flac             one concatenated enrolment file per speaker
    CN-Celeb_flac/eval/test/<spk>-<genre>-<session>-<n>.flac
    CN-Celeb_flac/eval/lists/enroll.lst    <spk>-enroll enroll/<spk>-enroll.flac
    CN-Celeb_flac/eval/lists/enroll.map    <spk>-enroll <spk>/<file> [<spk>/<file> ...]   (files under data/)
    CN-Celeb_flac/eval/lists/trials.lst    <spk>-enroll test/<file> 0|1
    CN-Celeb2_flac/data/<spk>/*.flac, CN-Celeb2_flac/spk.lst (training speakers)

Written under ``out``:

* ``train/``: CN-Celeb1 dev speakers + CN-Celeb2, utterance ids ``<spk>/<file>`` (WeSpeaker's convention).
* ``eval/``: the test files (ids ``test/<file>``, as trials.lst names them) and the enrolment utterances.
  ``enroll="map"`` (default; WeSpeaker's CNC-Eval-Avg) takes each model's utterances from ``enroll.map``
  (ids ``<spk>/<file>`` under ``data/``), so a model is the mean of several utterance embeddings;
  ``enroll="lst"`` (CNC-Eval-Concat) takes the one concatenated file of ``enroll.lst`` (id ``enroll/<file>``).
* ``eval/enroll.lst``: ``<enroll-id> <utt> [<utt> ...]`` for ``svlib score --enroll``.
* ``eval/trials.txt``: ``<enroll-id> <test-utt> target|nontarget`` (Kaldi form).

Then: ``svlib embed --scp out/eval/wav.scp --out eval.npz`` and
``svlib score --trials out/eval/trials.txt --embeddings eval.npz --enroll out/eval/enroll.lst``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from svlib.corpora.common import relative_path
from svlib.data.lists import DataDir, ListError, Trials, read_fields, write_trials

__all__ = ["prepare_cnceleb", "AUDIO_EXTENSIONS"]

AUDIO_EXTENSIONS = (".flac", ".wav")
ENROLL_MODES = ("map", "lst")


def _speaker_list(path: Path) -> list[str]:
    speakers = [fields[0] for _, fields in read_fields(path)]
    if not speakers:
        raise ListError(f"{path}: no speakers listed")
    return speakers


def _speaker_files(data: Path, speakers, rel, wavs: dict, utt2spk: dict, origin: dict) -> None:
    """``data/<spk>/<file>`` -> utt ``<spk>/<file>`` for each listed speaker (a listed speaker must exist)."""
    for spk in speakers:
        folder = data / spk
        if not folder.is_dir():
            raise ListError(f"{folder}: speaker folder of '{spk}' not found")
        for f in sorted(folder.iterdir()):
            if not f.is_file() or f.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            utt = f"{spk}/{f.name}"
            if any(c.isspace() for c in utt):
                raise ListError(f"{f}: whitespace in speaker/file name, unusable as a Kaldi id")
            if utt in wavs:
                raise ListError(f"{f}: utterance '{utt}' also found in {origin[utt]}")
            wavs[utt], utt2spk[utt], origin[utt] = rel(f), spk, data


def _train_dir(cn1: Path, cn2: Path | None, rel) -> DataDir:
    wavs: dict[str, str] = {}
    utt2spk: dict[str, str] = {}
    origin: dict[str, Path] = {}
    _speaker_files(cn1 / "data", _speaker_list(cn1 / "dev" / "dev.lst"), rel, wavs, utt2spk, origin)
    if cn2 is not None:
        spk_list = cn2 / "spk.lst"
        speakers = _speaker_list(spk_list) if spk_list.is_file() else \
            sorted(p.name for p in (cn2 / "data").iterdir() if p.is_dir())
        _speaker_files(cn2 / "data", speakers, rel, wavs, utt2spk, origin)
    if not wavs:
        raise ListError(f"{cn1}: no training audio under data/<spk>/ for the speakers of dev/dev.lst")
    return DataDir(wavs=wavs, utt2spk=utt2spk)


def _speaker_of(name: str) -> str:
    """``id00800-singing-01-002.flac`` / ``id00800-enroll`` -> ``id00800``."""
    return Path(name).name.split("-", 1)[0]


def _enrolment(cn1: Path, mode: str, rel) -> tuple[dict[str, list[str]], dict[str, str], dict[str, str]]:
    """Enrolment models and the eval-dir entries (utt -> path, utt -> speaker) of their utterances."""
    lists = cn1 / "eval" / "lists"
    path = lists / ("enroll.map" if mode == "map" else "enroll.lst")
    base = cn1 / "data" if mode == "map" else cn1 / "eval"
    models: dict[str, list[str]] = {}
    wavs: dict[str, str] = {}
    utt2spk: dict[str, str] = {}
    for number, fields in read_fields(path):
        if len(fields) < 2 or (mode == "lst" and len(fields) != 2):
            raise ListError(f"{path}:{number}: expected '<enroll-id> <file>{' [<file> ...]' if mode == 'map' else ''}'")
        model, files = fields[0], fields[1:]
        if model in models:
            raise ListError(f"{path}:{number}: enrolment id '{model}' repeated")
        models[model] = []
        for name in files:
            audio = base / name
            if not audio.is_file():
                raise ListError(f"{path}:{number}: enrolment file {audio} not found")
            utt = name if mode == "map" else f"enroll/{Path(name).name}"
            wavs[utt], utt2spk[utt] = rel(audio), _speaker_of(model)
            models[model].append(utt)
    if not models:
        raise ListError(f"{path}: no enrolment models")
    return models, wavs, utt2spk


def _trials(cn1: Path, models: dict[str, list[str]], rel) -> tuple[Trials, dict[str, str], dict[str, str]]:
    """trials.lst -> Trials (enroll id, ``test/<file>``) and the eval-dir entries of the test files."""
    path = cn1 / "eval" / "lists" / "trials.lst"
    enroll, test, labels = [], [], []
    wavs: dict[str, str] = {}
    for number, fields in read_fields(path):
        if len(fields) != 3 or fields[2] not in ("0", "1"):
            raise ListError(f"{path}:{number}: expected '<enroll-id> test/<file> 0|1', got {' '.join(fields)!r}")
        model, name, label = fields
        if model not in models:
            raise ListError(f"{path}:{number}: enrolment id '{model}' is not in the enrolment list")
        if name not in wavs:
            audio = cn1 / "eval" / name
            if not audio.is_file():
                raise ListError(f"{path}:{number}: test file {audio} not found")
            wavs[name] = rel(audio)
        enroll.append(model)
        test.append(name)
        labels.append(int(label))
    if not labels:
        raise ListError(f"{path}: no trials")
    return Trials(enroll, test, np.asarray(labels, dtype=np.int8)), wavs, {u: _speaker_of(u) for u in wavs}


def prepare_cnceleb(root: str | os.PathLike, out: str | os.PathLike, root2: str | os.PathLike | None = None,
                    enroll: str = "map", relative_to: str | os.PathLike | None = None) -> dict:
    """Write ``out/train``, ``out/eval`` (+ ``enroll.lst``, ``trials.txt``); returns a summary of counts.

    ``root`` is CN-Celeb1 (``CN-Celeb_flac`` or its parent), ``root2`` optionally CN-Celeb2 for training.
    """
    from svlib.scoring.enroll import write_enroll_list

    if enroll not in ENROLL_MODES:
        raise ListError(f"enroll must be one of {ENROLL_MODES}, got {enroll!r}")
    cn1 = Path(root)
    if (cn1 / "CN-Celeb_flac").is_dir():
        cn1 = cn1 / "CN-Celeb_flac"
    if not (cn1 / "eval" / "lists").is_dir():
        raise ListError(f"{root}: not a CN-Celeb1 folder (no eval/lists/)")
    cn2 = None
    if root2 is not None:
        cn2 = Path(root2)
        if (cn2 / "CN-Celeb2_flac").is_dir():
            cn2 = cn2 / "CN-Celeb2_flac"
        if not (cn2 / "data").is_dir():
            raise ListError(f"{root2}: not a CN-Celeb2 folder (no data/)")

    def rel(path: Path) -> str:
        return relative_path(path, relative_to)

    out = Path(out)
    train = _train_dir(cn1, cn2, rel)
    models, enroll_wavs, enroll_spk = _enrolment(cn1, enroll, rel)
    trials, test_wavs, test_spk = _trials(cn1, models, rel)
    clash = sorted(set(enroll_wavs) & set(test_wavs))
    if clash:
        raise ListError(f"{cn1}: '{clash[0]}' is both an enrolment and a test utterance")
    eval_dir = DataDir(wavs={**enroll_wavs, **test_wavs}, utt2spk={**enroll_spk, **test_spk})
    overlap = sorted(set(train.speakers) & set(eval_dir.speakers))
    if overlap:
        raise ListError(f"{cn1}: speaker '{overlap[0]}' is in dev/dev.lst (training) and in the evaluation lists")
    train.write(out / "train")
    eval_dir.write(out / "eval")
    write_enroll_list(out / "eval" / "enroll.lst", models)
    write_trials(out / "eval" / "trials.txt", trials, form="kaldi")
    return {"train_speakers": len(train.speakers), "train_utterances": len(train),
            "enroll_models": len(models), "enroll_utterances": len(enroll_wavs),
            "test_utterances": len(test_wavs), "trials": len(trials), "target_trials": trials.num_target}


# ---- command line (``python -m svlib.corpora.prepare cnceleb``) -----------------------------------------------
SUBCOMMANDS = ("cnceleb",)


def add_subcommands(sub) -> None:
    c = sub.add_parser("cnceleb", help="train/eval dirs, enrolment list and trials from CN-Celeb1 (+ CN-Celeb2)")
    c.add_argument("--root", required=True, help="CN-Celeb1 (CN-Celeb_flac)")
    c.add_argument("--root2", help="CN-Celeb2 (CN-Celeb2_flac), added to training")
    c.add_argument("--enroll", choices=("map", "lst"), default="map",
                   help="enrolment utterances from enroll.map (several per model, default) or enroll.lst (one)")
    c.add_argument("--out", required=True)


def run_subcommand(args) -> None:
    counts = prepare_cnceleb(args.root, args.out, args.root2, args.enroll, args.relative_to)
    print(f"{args.out}: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items()))
