"""VoxCeleb 1/2: a training data directory (+ an optional held-out validation set) from the corpus layout.

    python -m svlib.corpora.prepare voxceleb --root <vox1>/wav [--root <vox2>/dev/aac] --out data/vox
    python -m svlib.corpora.prepare voxceleb --root <vox2>/dev/aac --out data/vox2_dev --val-speakers 500 --val-out data/vox2_val

Every ``<root>/<speaker>/<video>/<file>`` (.wav, .flac, VoxCeleb2's AAC .m4a), ``utt2dur`` from the file headers /
container metadata (no decoding; ``--workers`` processes with a progress bar, ~1M files). ``--out`` is the training
directory. ``--val-speakers N`` holds N speakers out of it (chosen with ``--seed``) into ``--val-out`` (default
``<out>_val``) with ``<val-out>_trials.txt`` (VoxCeleb form ``1 enroll test``, ``--val-trials`` of them; half target
pairs, from two different videos of one speaker where it has several, half non-target): no held-out speaker's
utterance reaches training. The validation directory holds only the utterances the trials use, and
``split_summary.json``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from svlib.audio import AudioError, audio_seconds
from svlib.corpora.common import check_first_decodes, listed_file, pick, relative_path, subdirs
from svlib.data.lists import DataDir, ListError, Trials, write_trials
from svlib.files import write_json


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
        for spk in subdirs(root):
            for video in subdirs(spk):
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
                    wavs[utt], utt2spk[utt], origin[utt] = relative_path(f, relative_to), spk.name, root
    if not wavs:
        raise ListError(f"{', '.join(map(str, roots))}: no {'/'.join(extensions)} files in <root>/<speaker>/<video>/")
    first = min(wavs)
    check_first_decodes(out if out is not None else origin[first], wavs[first], relative_to)  # before the header pass
    seconds = read_durations({u: listed_file(p, relative_to) for u, p in wavs.items()}, workers, progress) if durations else None
    d = DataDir(wavs=wavs, utt2spk=utt2spk, durations=seconds)
    if val_speakers <= 0:
        if out is not None:
            d.write(out)
        return d
    speakers = d.speakers
    if val_speakers >= len(speakers):
        raise ListError(f"--val-speakers {val_speakers} leaves no training speaker (the roots have {len(speakers)})")
    held = set(pick(speakers, val_speakers, seed, 5))
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


# ---- command line (``python -m svlib.corpora.prepare voxceleb``) ----------------------------------------------
SUBCOMMANDS = ("voxceleb",)


def add_subcommands(sub) -> None:
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


def run_subcommand(args) -> None:
    d = prepare_voxceleb(args.root, args.out, args.relative_to, durations=not args.no_durations,
                         workers=args.workers, val_speakers=args.val_speakers, val_trials=args.val_trials,
                         seed=args.seed, val_out=args.val_out)
    val_dir = args.val_out or f"{args.out}_val"
    print(f"{args.out}: {len(d.speakers)} speakers, {len(d)} utterances"
          + (f"; {val_dir} + {val_dir}_trials.txt: {args.val_speakers} held-out speakers"
             if args.val_speakers > 0 else ""))
