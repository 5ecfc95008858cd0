"""Build data directories and lists from the shared manifests and from standard corpus layouts.

    python -m svlib.data.prepare manifest --manifest ../shared/data/sv-bench/manifest.csv --out data/sv-bench [--seed 0]
    python -m svlib.data.prepare voxceleb --root <vox1>/wav [--root <vox2>/dev/aac] --out data/vox
    python -m svlib.data.prepare voxceleb --root <vox2>/dev/aac --out data/vox2_dev --val-speakers 500 --val-out data/vox2_val
    python -m svlib.data.prepare cnceleb  --root <CN-Celeb_flac> [--root2 <CN-Celeb2_flac>] --out data/cnceleb
    python -m svlib.data.prepare musan    --root <musan> --out data/musan.list
    python -m svlib.data.prepare rirs     --root <RIRS_NOISES> --out data/rirs.list
    python -m svlib.data.prepare demo     --sv-bench <sv-bench>/manifest.csv --so762 <speechocean762-train> \
                                          --esc10 <esc10-noise>/manifest.csv --out data/demo   (svlib.data.demo_data)
    python -m svlib.data.prepare esc10 | simrirs | demo-table ...                         (svlib.data.demo_data)

Run from the repo root: audio paths are written relative to the working directory (``--relative-to``), which is
where ``DataDir.load`` resolves them (Kaldi convention), so lists stay portable between machines.

Manifest split (sv-bench, sv-mini):
- test: the LibriSpeech test-other speakers, all utterance pairs. Several chapters per speaker, so this is the
  realistic list (sv-bench 10 x 10 -> 4,950 trials / 450 target; sv-mini 10 x 3 -> 435 / 30).
- val (model selection; speakers disjoint from train and test): some train-clean-100 speakers, whose single long
  recording is cut by a Kaldi ``segments`` file into non-overlapping ~3 s pieces, plus some Arabic speakers with a
  few of their one-second words each. Same-speaker pairs from one recording share channel and session, so val EER is
  OPTIMISTIC compared with the test list: use it to rank checkpoints, not to report results. Trials: all target
  pairs plus ``nontarget_ratio`` x as many non-target pairs sampled with the seed (all pairs when that is fewer).
- train: all remaining speakers. The unselected words of val Arabic speakers are left out (speakers must stay
  disjoint) and counted as ``unused`` in ``split_summary.json``.

VoxCeleb (``prepare voxceleb``): every ``<root>/<speaker>/<video>/<file>`` (.wav, .flac, VoxCeleb2's AAC .m4a),
``utt2dur`` from the file headers / container metadata (no decoding; ``--workers`` processes with a progress
bar, ~1M files). ``--out`` is the training directory. ``--val-speakers N`` holds N speakers out of it (chosen
with ``--seed``) into ``--val-out`` (default ``<out>_val``) with ``<val-out>_trials.txt`` (VoxCeleb form
``1 enroll test``, ``--val-trials`` of them; half target pairs, from two different videos of one speaker where
it has several, half non-target): no held-out speaker's utterance reaches training. The validation directory
holds only the utterances the trials use, and ``split_summary.json``.

Every list written is checked by decoding its first file, so a missing decoder or an unreadable corpus fails
here, in one line, and not at the first training batch after the model has loaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from svlib.audio import AudioError, audio_seconds, load_audio
from svlib.data.lists import AudioEntry, DataDir, ListError, Trials, write_audio_list, write_trials
from svlib.files import write_json

TEST_FOLDERS = ("librispeech_test-other",)
LONG_FOLDERS = ("librispeech_train-clean-100",)
WORD_FOLDERS = ("arabic_sc",)
REQUIRED_COLUMNS = ("path", "speaker", "seconds")


@dataclass(frozen=True)
class ManifestRow:
    line: int
    utt: str
    speaker: str
    folder: str
    path: str  # as written to wav.scp (relative to ``relative_to``)
    seconds: float


def _rel(path: Path, relative_to: str | os.PathLike | None) -> str:
    base = os.path.abspath(relative_to if relative_to is not None else os.getcwd())
    rel = os.path.relpath(os.path.abspath(path), base)
    return rel.replace(os.sep, "/")


def read_manifest(manifest: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> list[ManifestRow]:
    """Rows of a ``path,speaker,source,licence,seconds,sample_rate`` manifest; errors name file and line."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ListError(f"{manifest}: manifest not found")
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ListError(f"{manifest}:1: header lacks column(s) {missing}; has {reader.fieldnames}")
        for row in reader:
            line = reader.line_num
            if None in row or any(row.get(c) is None for c in REQUIRED_COLUMNS):
                raise ListError(f"{manifest}:{line}: expected {len(reader.fieldnames)} comma-separated fields")
            rel, speaker = row["path"].strip(), row["speaker"].strip()
            if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
                raise ListError(f"{manifest}:{line}: path must be relative and inside the manifest's folder, got {rel!r}")
            if not speaker or any(c.isspace() for c in speaker):
                raise ListError(f"{manifest}:{line}: speaker {speaker!r} is empty or contains whitespace")
            try:
                seconds = float(row["seconds"])
            except ValueError:
                raise ListError(f"{manifest}:{line}: seconds must be a number, got {row['seconds']!r}") from None
            if not math.isfinite(seconds) or seconds <= 0:
                raise ListError(f"{manifest}:{line}: seconds must be positive, got {row['seconds']!r}")
            utt = f"{speaker}-{Path(rel).stem}"
            if any(c.isspace() for c in utt):
                raise ListError(f"{manifest}:{line}: file name {rel!r} contains whitespace, unusable as a Kaldi id")
            if utt in seen:
                raise ListError(f"{manifest}:{line}: utterance id '{utt}' (speaker-filestem) repeats line {seen[utt]}")
            seen[utt] = line
            folder = Path(rel).parts[0] if len(Path(rel).parts) > 1 else ""
            rows.append(ManifestRow(line, utt, speaker, folder, _rel(manifest.parent / rel, relative_to), seconds))
    if not rows:
        raise ListError(f"{manifest}: no rows")
    return rows


def _pick(items: list[str], n: int, seed: int, stream: int) -> list[str]:
    """``n`` of ``items`` (sorted first, so only the seed decides); separate streams keep choices independent."""
    items = sorted(items)
    rng = np.random.default_rng([seed, stream])
    order = rng.permutation(len(items))
    return sorted(items[i] for i in order[: min(n, len(items))])


def _cut(duration: float, segment_seconds: float) -> list[tuple[float, float]]:
    """Equal non-overlapping pieces of at least ``segment_seconds`` (as many as fit), times in whole ms."""
    n = max(1, int(duration // segment_seconds))
    edges = [math.floor(duration * i / n * 1000) / 1000 for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def all_pairs(utts: list[str], utt2spk: dict[str, str]) -> Trials:
    utts = sorted(utts)
    enroll, test, labels = [], [], []
    for i, a in enumerate(utts):
        for b in utts[i + 1:]:
            enroll.append(a); test.append(b); labels.append(utt2spk[a] == utt2spk[b])
    return Trials(enroll, test, np.asarray(labels, dtype=np.int8))


def sampled_pairs(utts: list[str], utt2spk: dict[str, str], nontarget_ratio: float, seed: int) -> Trials:
    """All target pairs plus ``nontarget_ratio`` x as many random non-target pairs (all pairs if fewer)."""
    utts = sorted(utts)
    spk = np.asarray([utt2spk[u] for u in utts])
    n = len(utts)
    i, j = np.triu_indices(n, k=1)
    same = spk[i] == spk[j]
    num_target = int(same.sum())
    want = int(round(nontarget_ratio * num_target))
    non = np.flatnonzero(~same)
    if len(non) > want:
        rng = np.random.default_rng([seed, 3])
        non = np.sort(rng.choice(non, size=want, replace=False))
    keep = np.sort(np.concatenate([np.flatnonzero(same), non]))
    return Trials([utts[k] for k in i[keep]], [utts[k] for k in j[keep]], same[keep].astype(np.int8))


def prepare_manifest(manifest: str | os.PathLike, out: str | os.PathLike, seed: int = 0, val_long_speakers: int = 40,
                     val_word_speakers: int = 6, val_words: int = 10, segment_seconds: float = 3.0,
                     nontarget_ratio: float = 10.0, relative_to: str | os.PathLike | None = None,
                     verbose: bool = True) -> dict:
    """Write ``out/{train,val,test}``, ``out/{val,test}_trials.txt`` and ``out/split_summary.json``; return the summary."""
    manifest, out = Path(manifest), Path(out)
    rows = read_manifest(manifest, relative_to)
    by_speaker: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_speaker.setdefault(r.speaker, []).append(r)
    folder_of: dict[str, str] = {}
    for spk, rs in by_speaker.items():
        folders = {r.folder for r in rs}
        if len(folders) > 1 and folders & set(TEST_FOLDERS):
            raise ListError(f"{manifest}:{rs[0].line}: speaker '{spk}' appears in test and other folders {sorted(folders)}; "
                            "test speakers must be disjoint from training")
        folder_of[spk] = sorted(folders)[0]

    test_spk = sorted(s for s, f in folder_of.items() if f in TEST_FOLDERS)
    if not test_spk:
        raise ListError(f"{manifest}: no speakers under {list(TEST_FOLDERS)}, nothing to test on")
    # A recording shorter than two pieces yields no same-speaker pair, so it could not help validation.
    long_ok = sorted(s for s, f in folder_of.items() if f in LONG_FOLDERS
                     and any(r.seconds >= 2 * segment_seconds for r in by_speaker[s]))
    words = sorted(s for s, f in folder_of.items() if f in WORD_FOLDERS and len(by_speaker[s]) >= 2)
    val_long = _pick(long_ok, val_long_speakers, seed, 1)
    val_word = _pick(words, val_word_speakers, seed, 2)
    held = set(test_spk) | set(val_long) | set(val_word)
    train_spk = sorted(s for s in by_speaker if s not in held)
    if not train_spk:
        raise ListError(f"{manifest}: no speakers left for training; lower the number of validation speakers")

    def plain_dir(speakers) -> DataDir:
        rs = [r for s in speakers for r in by_speaker[s]]
        return DataDir(wavs={r.utt: r.path for r in rs}, utt2spk={r.utt: r.speaker for r in rs},
                       durations={r.utt: r.seconds for r in rs})

    train, test = plain_dir(train_spk), plain_dir(test_spk)

    wavs, utt2spk, segments, utt2rec, durations = {}, {}, {}, {}, {}
    for spk in val_long:
        for r in by_speaker[spk]:
            total = _true_seconds(manifest, r, relative_to)
            for start, end in _cut(total, segment_seconds):
                seg = f"{r.utt}-{round(start * 1000):07d}-{round(end * 1000):07d}"
                wavs[seg], utt2spk[seg], segments[seg], utt2rec[seg] = r.path, spk, (start, end), r.utt
                durations[seg] = round(end - start, 3)
    num_pieces = len(wavs)
    unused = []
    for spk in val_word:
        # A stream per speaker name: changing how many speakers are held out keeps each one's words.
        chosen = set(_pick([r.utt for r in by_speaker[spk]], val_words, seed, 16 + zlib.crc32(spk.encode())))
        for r in by_speaker[spk]:
            if r.utt in chosen:
                wavs[r.utt], utt2spk[r.utt], segments[r.utt], utt2rec[r.utt] = r.path, spk, (0.0, r.seconds), r.utt
                durations[r.utt] = r.seconds
            else:
                unused.append(r)
    val = DataDir(wavs=wavs, utt2spk=utt2spk, segments=segments or None, utt2rec=utt2rec or None, durations=durations)

    val_trials = sampled_pairs(val.utts, val.utt2spk, nontarget_ratio, seed) if len(val) else Trials([], [], np.zeros(0))
    test_trials = all_pairs(test.utts, test.utt2spk)

    out.mkdir(parents=True, exist_ok=True)
    for name, d in (("train", train), ("val", val), ("test", test)):
        if len(d):
            check_first_decodes(out / name / "wav.scp", d.wavs[d.utts[0]], relative_to)
    for name, d in (("train", train), ("val", val), ("test", test)):
        d.write(out / name)
    write_trials(out / "val_trials.txt", val_trials)
    write_trials(out / "test_trials.txt", test_trials)

    def stats(d: DataDir) -> dict:
        return {"speakers": len(d.speakers), "utterances": len(d), "seconds": round(sum(d.seconds(u) for u in d.wavs), 2)}

    def tstats(t: Trials) -> dict:
        return {"trials": len(t), "target": t.num_target, "nontarget": t.num_nontarget}

    summary = {
        "manifest": str(manifest), "seed": seed,
        "params": {"val_long_speakers": val_long_speakers, "val_word_speakers": val_word_speakers,
                   "val_words": val_words, "segment_seconds": segment_seconds, "nontarget_ratio": nontarget_ratio},
        "splits": {"train": stats(train), "val": stats(val), "test": stats(test)},
        "val_composition": {"long_speakers": len(val_long), "long_segments": num_pieces,
                            "word_speakers": len(val_word), "words": len(val) - num_pieces},
        "trials": {"val": tstats(val_trials), "test": tstats(test_trials)},
        "unused": {"utterances": len(unused), "seconds": round(sum(r.seconds for r in unused), 2),
                   "why": "words of validation speakers beyond val_words (speakers stay disjoint across splits)"},
        "notes": "val same-speaker pairs come from one recording/session (optimistic); report test EER.",
    }
    (out / "split_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if verbose:
        print(format_summary(summary))
    return summary


def _true_seconds(manifest: Path, row: ManifestRow, relative_to) -> float:
    """Length from the file header; the manifest value is rounded and a segment past the end would fail to load."""
    base = os.path.abspath(relative_to if relative_to is not None else os.getcwd())
    path = os.path.join(base, row.path)
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as err:
        raise ListError(f"{manifest}:{row.line}: cannot read {path} ({err})") from None
    return info.frames / info.samplerate


def format_summary(summary: dict) -> str:
    lines = [f"{'split':<6} {'speakers':>8} {'utts':>6} {'minutes':>8} {'trials':>7} {'target':>7} {'nontarget':>9}"]
    for name, s in summary["splits"].items():
        t = summary["trials"].get(name, {})
        lines.append(f"{name:<6} {s['speakers']:>8} {s['utterances']:>6} {s['seconds'] / 60:>8.1f} "
                     f"{t.get('trials', '-'):>7} {t.get('target', '-'):>7} {t.get('nontarget', '-'):>9}")
    if summary["unused"]["utterances"]:
        lines.append(f"unused: {summary['unused']['utterances']} utterances ({summary['unused']['why']})")
    return "\n".join(lines)


# ---- standard corpus layouts -----------------------------------------------------------------------
def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _abs(path: str, relative_to) -> str:
    """A path as written to a list (relative to ``relative_to`` / the cwd) -> the file to open."""
    return path if os.path.isabs(path) else os.path.join(relative_to if relative_to is not None else os.getcwd(), path)


def check_first_decodes(list_path: str | os.PathLike, audio_path: str, relative_to=None) -> None:
    """Decode one second of the first file of a list, or fail with the list, the file and the decoder's reason."""
    try:
        load_audio(_abs(audio_path, relative_to), max_seconds=1.0)
    except AudioError as err:
        raise ListError(f"{list_path}: its first file cannot be decoded, so training would fail on it: {err}") from None


def _header_seconds(item: tuple[str, str]) -> tuple[str, float | str]:
    utt, path = item
    try:
        return utt, audio_seconds(path)
    except AudioError as err:  # returned, not raised: the parent reports it in one line
        return utt, str(err)


def read_durations(paths: dict[str, str], workers: int | None = None, progress: bool = True) -> dict[str, float]:
    """utt -> seconds from headers / container metadata, in ``workers`` processes (default: all CPUs)."""
    import multiprocessing

    from tqdm import tqdm

    items = list(paths.items())
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) // 8 or 1))  # tiny lists: no pool
    out: dict[str, float] = {}
    with (multiprocessing.Pool(workers) if workers > 1 else _Serial()) as pool:
        # The bar (and its monitor thread) only after the fork.
        with tqdm(total=len(items), desc="utt2dur", unit="file", disable=not progress, mininterval=1.0,
                  file=sys.stderr) as bar:
            for utt, seconds in pool.imap(_header_seconds, items, chunksize=min(256, -(-len(items) // workers))):
                if isinstance(seconds, str):
                    raise ListError(f"utt2dur of '{utt}': {seconds}")
                if not seconds > 0:
                    raise ListError(f"utt2dur of '{utt}': {paths[utt]} has no samples")
                out[utt] = seconds
                bar.update()
    return out


class _Serial:
    """``multiprocessing.Pool`` stand-in for one worker (no processes to start for small lists)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, items, chunksize=1):
        return map(fn, items)


def _video(utt: str) -> str:
    return utt.rsplit("/", 1)[0]


def holdout_trials(utts_by_speaker: dict[str, list[str]], num_trials: int, seed: int) -> Trials:
    """``num_trials`` distinct pairs over the held-out speakers: half target (two utterances of one speaker,
    from two different videos when it has several, so a pair is not one session), half non-target (two
    speakers); speakers uniform, so large speakers do not dominate. Fewer when the speakers cannot give that
    many distinct pairs."""
    speakers = sorted(s for s in utts_by_speaker if utts_by_speaker[s])
    if len(speakers) < 2:
        raise ListError(f"a validation hold-out needs at least 2 speakers, got {len(speakers)}")
    rng = np.random.default_rng([seed, 7])
    want_target = num_trials // 2
    pairs: dict[tuple[str, str], int] = {}
    multi = [s for s in speakers if len(utts_by_speaker[s]) >= 2]
    tries = 0
    while multi and sum(pairs.values()) < want_target and tries < 20 * num_trials:
        tries += 1
        utts = utts_by_speaker[multi[rng.integers(len(multi))]]
        a = utts[rng.integers(len(utts))]
        others = [u for u in utts if _video(u) != _video(a)] or [u for u in utts if u != a]
        b = others[rng.integers(len(others))]
        pairs.setdefault((min(a, b), max(a, b)), 1)
    while len(pairs) < num_trials and tries < 40 * num_trials:
        tries += 1
        i, j = rng.choice(len(speakers), size=2, replace=False)
        ua, ub = utts_by_speaker[speakers[i]], utts_by_speaker[speakers[j]]
        a, b = ua[rng.integers(len(ua))], ub[rng.integers(len(ub))]
        pairs.setdefault((min(a, b), max(a, b)), 0)
    order = sorted(pairs)
    return Trials([a for a, _ in order], [b for _, b in order], np.asarray([pairs[k] for k in order], dtype=np.int8))


def prepare_voxceleb(roots, out: str | os.PathLike | None = None, relative_to=None,
                     extensions: tuple[str, ...] = (".wav", ".m4a", ".flac"), durations: bool = True,
                     workers: int | None = None, val_speakers: int = 0, val_trials: int = 20000, seed: int = 0,
                     val_out: str | os.PathLike | None = None, progress: bool = True) -> DataDir:
    """``<root>/<speaker>/<video>/<file>`` -> DataDir with utt id ``speaker/video/file`` (as in VoxCeleb trial lists).

    Returns the training directory, written to ``out`` (the hold-out goes to ``val_out``: module docstring).
    """
    roots = [Path(roots)] if isinstance(roots, (str, os.PathLike)) else [Path(r) for r in roots]
    wavs, utt2spk, origin = {}, {}, {}
    for root in roots:
        if not root.is_dir():
            raise ListError(f"{root}: VoxCeleb root not found")
        for spk in _subdirs(root):
            for video in _subdirs(spk):
                # scandir: file types come from the directory entries, no stat per file (1M files).
                with os.scandir(video) as entries:
                    names = sorted(e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions)
                for name in names:
                    f = video / name
                    utt = f"{spk.name}/{video.name}/{name}"
                    if any(c.isspace() for c in utt):
                        raise ListError(f"{f}: whitespace in speaker/video/file name, unusable as a Kaldi id")
                    if utt in wavs:
                        raise ListError(f"{f}: utterance '{utt}' also found under {origin[utt]}")
                    wavs[utt], utt2spk[utt], origin[utt] = _rel(f, relative_to), spk.name, root
    if not wavs:
        raise ListError(f"{', '.join(map(str, roots))}: no {'/'.join(extensions)} files in <root>/<speaker>/<video>/")
    first = min(wavs)
    check_first_decodes(out if out is not None else origin[first], wavs[first], relative_to)  # before the header pass
    seconds = read_durations({u: _abs(p, relative_to) for u, p in wavs.items()}, workers, progress) if durations else None
    d = DataDir(wavs=wavs, utt2spk=utt2spk, durations=seconds)
    if val_speakers <= 0:
        if out is not None:
            d.write(out)
        return d
    speakers = d.speakers
    if val_speakers >= len(speakers):
        raise ListError(f"--val-speakers {val_speakers} leaves no training speaker (the roots have {len(speakers)})")
    held = set(_pick(speakers, val_speakers, seed, 5))
    spk2utt = d.spk2utt
    trials = holdout_trials({s: spk2utt[s] for s in held}, val_trials, seed)
    train = d.subset(u for u in d.utts if d.utt2spk[u] not in held)
    val = d.subset(trials.utterances)
    if out is not None:
        val_dir = Path(val_out) if val_out is not None else Path(f"{out}_val")
        train.write(out)
        val.write(val_dir)
        write_trials(Path(f"{val_dir}_trials.txt"), trials)
        summary = {"seed": seed, "val_speakers": len(held), "train_speakers": len(train.speakers),
                   "train_utterances": len(train), "val_utterances": len(val),
                   "held_out_unused_utterances": sum(len(spk2utt[s]) for s in held) - len(val),
                   "trials": {"trials": len(trials), "target": trials.num_target, "nontarget": trials.num_nontarget}}
        write_json(val_dir / "split_summary.json", summary)
    return train


def prepare_musan(root: str | os.PathLike, out: str | os.PathLike | None = None, relative_to=None) -> list[AudioEntry]:
    """``musan/{noise,music,speech}/<sub>/*.wav`` -> ``name category path`` list (category noise|music|speech)."""
    root = Path(root)
    if (root / "musan").is_dir():
        root = root / "musan"
    entries, seen = [], {}
    for category in ("noise", "music", "speech"):
        if not (root / category).is_dir():
            continue
        for sub in _subdirs(root / category):
            for f in sorted(sub.glob("*.wav")):
                name = f.stem
                if name in seen:
                    raise ListError(f"{f}: name '{name}' also used by {seen[name]}")
                seen[name] = f
                entries.append(AudioEntry(name, category, _rel(f, relative_to)))
    if not entries:
        raise ListError(f"{root}: no MUSAN files in {{noise,music,speech}}/<sub>/*.wav")
    entries = sorted(entries)
    if out is not None:
        check_first_decodes(out, entries[0].path, relative_to)
        write_audio_list(out, entries)
    return entries


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
        for room in _subdirs(base):
            if not room.name.lower().startswith("room"):
                continue
            for f in sorted(room.glob("*.wav")):
                entries.append(AudioEntry(f"{size}-{room.name}-{f.stem}", size, _rel(f, relative_to)))
    real = root / "real_rirs_isotropic_noises"
    if real.is_dir():
        for f in sorted(real.glob("*.wav")):
            if "noise" not in f.name.lower():
                entries.append(AudioEntry(f"real-{f.stem}", "real", _rel(f, relative_to)))
    if not entries:
        raise ListError(f"{root}: no RIRs in simulated_rirs/*room/Room*/*.wav or real_rirs_isotropic_noises/*.wav")
    entries = sorted(entries)
    if out is not None:
        check_first_decodes(out, entries[0].path, relative_to)
        write_audio_list(out, entries)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svlib.data.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relative-to", default=None,
                        help="write audio paths relative to this folder (default: the working directory, i.e. the repo root)")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="train/val/test dirs + trials from a manifest.csv")
    m.add_argument("--manifest", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--val-long-speakers", type=int, default=40, help="train-clean-100 speakers held out for val")
    m.add_argument("--val-word-speakers", type=int, default=6, help="Arabic speakers held out for val")
    m.add_argument("--val-words", type=int, default=10, help="words per held-out Arabic speaker")
    m.add_argument("--segment-seconds", type=float, default=3.0, help="minimum length of val pieces of long recordings")
    m.add_argument("--nontarget-ratio", type=float, default=10.0)
    v = sub.add_parser("voxceleb", help="data dir from <root>/<speaker>/<video>/<file>")
    v.add_argument("--root", action="append", required=True, help="repeatable (e.g. VoxCeleb2 dev + test)")
    v.add_argument("--out", required=True)
    v.add_argument("--val-speakers", type=int, default=0,
                   help="hold this many speakers out of OUT into VAL_OUT + VAL_OUT_trials.txt")
    v.add_argument("--val-out", default=None, help="validation directory (default: OUT_val)")
    v.add_argument("--val-trials", type=int, default=20000, help="trials of the hold-out (half target)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--workers", type=int, default=None, help="processes reading headers for utt2dur (default: all CPUs)")
    v.add_argument("--no-durations", action="store_true", help="skip utt2dur (samplers then open each file once)")
    c = sub.add_parser("cnceleb", help="train/eval dirs, enrolment list and trials from CN-Celeb1 (+ CN-Celeb2)")
    c.add_argument("--root", required=True, help="CN-Celeb1 (CN-Celeb_flac)")
    c.add_argument("--root2", help="CN-Celeb2 (CN-Celeb2_flac), added to training")
    c.add_argument("--enroll", choices=("map", "lst"), default="map",
                   help="enrolment utterances from enroll.map (several per model, default) or enroll.lst (one)")
    c.add_argument("--out", required=True)
    for name, what in (("musan", "noise list from MUSAN"), ("rirs", "RIR list from RIRS_NOISES")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--root", required=True)
        p.add_argument("--out", required=True, help="list file to write")
    from svlib.data import demo_data  # the demo's folders: speechocean762, ESC-10, simulated RIRs

    demo_data.add_subcommands(sub)
    args = parser.parse_args(argv)
    try:
        if args.command in demo_data.SUBCOMMANDS:
            demo_data.run_subcommand(args)
        elif args.command == "manifest":
            prepare_manifest(args.manifest, args.out, seed=args.seed, val_long_speakers=args.val_long_speakers,
                             val_word_speakers=args.val_word_speakers, val_words=args.val_words,
                             segment_seconds=args.segment_seconds, nontarget_ratio=args.nontarget_ratio,
                             relative_to=args.relative_to)
        elif args.command == "voxceleb":
            d = prepare_voxceleb(args.root, args.out, args.relative_to, durations=not args.no_durations,
                                 workers=args.workers, val_speakers=args.val_speakers, val_trials=args.val_trials,
                                 seed=args.seed, val_out=args.val_out)
            val_dir = args.val_out or f"{args.out}_val"
            print(f"{args.out}: {len(d.speakers)} speakers, {len(d)} utterances"
                  + (f"; {val_dir} + {val_dir}_trials.txt: {args.val_speakers} held-out speakers"
                     if args.val_speakers > 0 else ""))
        elif args.command == "cnceleb":
            from svlib.data.cnceleb import prepare_cnceleb  # its own module (svlib.data.cnceleb)

            counts = prepare_cnceleb(args.root, args.out, args.root2, args.enroll, args.relative_to)
            print(f"{args.out}: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items()))
        else:
            fn = prepare_musan if args.command == "musan" else prepare_rirs
            entries = fn(args.root, args.out, args.relative_to)
            counts: dict[str, int] = {}
            for e in entries:
                counts[e.category] = counts.get(e.category, 0) + 1
            print(f"{args.out}: {len(entries)} files " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    except ListError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
