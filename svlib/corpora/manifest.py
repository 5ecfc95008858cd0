"""sv-bench / sv-mini: train/val/test data directories and trials from the shared ``manifest.csv``.

    python -m svlib.corpora.prepare manifest --manifest ../shared/data/sv-bench/manifest.csv --out data/sv-bench [--seed 0]

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

The manifest reader and the pair builders are public: the demo split (``svlib.corpora.demo_data``) reads the same
manifests.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from svlib.corpora.common import check_first_decodes, csv_rows, cut_segments, inside_folder, pick, relative_path
from svlib.data.lists import DataDir, ListError, Trials, write_trials


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


def read_manifest(manifest: str | os.PathLike, relative_to: str | os.PathLike | None = None) -> list[ManifestRow]:
    """Rows of a ``path,speaker,source,licence,seconds,sample_rate`` manifest; errors name file and line."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ListError(f"{manifest}: manifest not found")
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for line, row in csv_rows(manifest, REQUIRED_COLUMNS):
        if None in row or any(row.get(c) is None for c in REQUIRED_COLUMNS):
            header_fields = len(row) - (None in row)
            raise ListError(f"{manifest}:{line}: expected {header_fields} comma-separated fields")
        rel, speaker = inside_folder(manifest, line, row["path"].strip()), row["speaker"].strip()
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
        rows.append(ManifestRow(line, utt, speaker, folder, relative_path(manifest.parent / rel, relative_to), seconds))
    if not rows:
        raise ListError(f"{manifest}: no rows")
    return rows


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
    val_long = pick(long_ok, val_long_speakers, seed, 1)
    val_word = pick(words, val_word_speakers, seed, 2)
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
            total = true_seconds(manifest, r, relative_to)
            for start, end in cut_segments(total, segment_seconds):
                seg = f"{r.utt}-{round(start * 1000):07d}-{round(end * 1000):07d}"
                wavs[seg], utt2spk[seg], segments[seg], utt2rec[seg] = r.path, spk, (start, end), r.utt
                durations[seg] = round(end - start, 3)
    num_pieces = len(wavs)
    unused = []
    for spk in val_word:
        # A stream per speaker name: changing how many speakers are held out keeps each one's words.
        chosen = set(pick([r.utt for r in by_speaker[spk]], val_words, seed, 16 + zlib.crc32(spk.encode())))
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


def true_seconds(manifest: Path, row: ManifestRow, relative_to) -> float:
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


# ---- command line (``python -m svlib.corpora.prepare manifest``) ----------------------------------------------
SUBCOMMANDS = ("manifest",)


def add_subcommands(sub) -> None:
    m = sub.add_parser("manifest", help="train/val/test dirs + trials from a manifest.csv")
    m.add_argument("--manifest", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--val-long-speakers", type=int, default=40, help="train-clean-100 speakers held out for val")
    m.add_argument("--val-word-speakers", type=int, default=6, help="Arabic speakers held out for val")
    m.add_argument("--val-words", type=int, default=10, help="words per held-out Arabic speaker")
    m.add_argument("--segment-seconds", type=float, default=3.0, help="minimum length of val pieces of long recordings")
    m.add_argument("--nontarget-ratio", type=float, default=10.0)


def run_subcommand(args) -> None:
    prepare_manifest(args.manifest, args.out, seed=args.seed, val_long_speakers=args.val_long_speakers,
                     val_word_speakers=args.val_word_speakers, val_words=args.val_words,
                     segment_seconds=args.segment_seconds, nontarget_ratio=args.nontarget_ratio,
                     relative_to=args.relative_to)
