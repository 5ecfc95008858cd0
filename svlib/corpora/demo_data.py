"""Data for the demo beyond sv-bench: speechocean762 speakers, ESC-10 noise lists and simulated room responses.

    python -m svlib.corpora.prepare demo     --sv-bench ../shared/data/sv-bench/manifest.csv \\
        --so762 ../shared/data/speechocean762-train --esc10 ../shared/data/esc10-noise/manifest.csv --out data/demo
    python -m svlib.corpora.prepare esc10    --manifest ../shared/data/esc10-noise/manifest.csv --out data/esc10
    python -m svlib.corpora.prepare simrirs  --out data/rirs-sim [--num 200 --seed 0]
    python -m svlib.corpora.prepare demo-table --summary data/demo/split_summary.json   # docs/data.md's split table

**Splits** (``prepare_demo``), speakers disjoint across train / val / test, deterministic from ``seed``:

- test: the 10 LibriSpeech test-other speakers (10 utterances, several chapters each) and ``so762_test_speakers``
  held-out speechocean762 speakers (20 utterances each), all pairs (``test_trials.txt``); the same test folder
  also carries ``test_ls10_trials.txt``, the old 10-speaker list (identical to ``prepare manifest``'s), and
  ``test_so762_trials.txt``, the speechocean762 part alone.
- val (model selection only): ``so762_val_speakers`` held-out speechocean762 speakers plus ``val_long_speakers``
  held-out train-clean-100 speakers whose one recording is cut into ``segment_seconds`` pieces (Kaldi
  ``segments``); all target pairs and ``nontarget_ratio`` x as many sampled non-target pairs.
- train: the other train-clean-100 speakers, all Arabic Speech Commands speakers, the other speechocean762 speakers.

speechocean762 speakers are chosen per stratum (child <= ``CHILD_MAX_AGE`` years / adult, x gender from
``spk2gender``) with the number of each stratum proportional to its size (largest remainders), so children and
adults of both genders are in train, val and test. Within a stratum a speaker is picked by a seeded permutation
of the sorted names: the seed alone decides. speechocean762 same-speaker pairs share one sitting (the corpus
recorded each speaker once), so they are easier than LibriSpeech's cross-chapter pairs.

**Noise** (``prepare_esc10``): ESC-10 clips split by fold, never by clip (a fold keeps one Freesound source's
clips together): ``noise_train.list`` (``train_folds``, default 1-4) for training, ``noise_heldout.list`` (fold 5)
for testing robustness; ``name noise path`` lines, as ``svlib.data.augment.read_noise_list`` reads.

**Room impulse responses** (``simulate_rirs``): pyroomacoustics' image-source method in random shoebox rooms.
Per RIR ``i`` a generator seeded ``[seed, i]`` draws the room ``L ~ U(room_min, room_max)`` (m), a target
``RT60 ~ U(rt60)``, and source and microphone positions uniform at least ``min_distance`` from the walls and
from each other; Sabine's formula inverted (``pyroomacoustics.inverse_sabine``: ``RT60 = 0.161 V / (S a)``)
gives the wall energy absorption ``a`` and the image order, which is capped at ``max_order`` for speed.
Each RIR is cut to ``max_seconds``, peak-normalised (``Augmenter`` rescales it to unit energy anyway), and
written as 16-bit WAV under ``cache/wav/``; ``cache/manifest.json`` records the library version, the
configuration and every RIR's parameters (room, positions, absorption, order, target and measured RT60), and
``cache/rir.list`` is the ``name category path`` list (category small/medium/large room by volume) that
``read_rir_list`` reads. A rerun with the same configuration finds the manifest, checks every file, and
simulates nothing; a different configuration rebuilds the cache. Because each RIR has its own seed stream,
the first ``n`` RIRs of ``num = 2n`` equal those of ``num = n``.
"""
from __future__ import annotations

import math
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from svlib.audio import SAMPLE_RATE, audio_info, write_audio
from svlib.corpora.common import check_first_decodes, csv_rows, cut_segments, inside_folder, pick, relative_path
from svlib.corpora.manifest import (LONG_FOLDERS, TEST_FOLDERS, WORD_FOLDERS, ManifestRow, all_pairs, read_manifest,
                                    sampled_pairs, true_seconds)
from svlib.data.lists import AudioEntry, DataDir, ListError, Trials, write_audio_list, write_trials
from svlib.files import write_json

__all__ = ["CHILD_MAX_AGE", "RirSimConfig", "prepare_demo", "prepare_esc10", "read_speaker_table",
           "simulate_rirs", "split_table", "stratified_pick"]

CHILD_MAX_AGE = 15  # speechocean762's children are 6-15, its adults 19 and older
ESC10_COLUMNS = ("path", "class", "fold")


# ---- ESC-10 noise lists ------------------------------------------------------------------------------
def prepare_esc10(manifest: str | os.PathLike, out: str | os.PathLike, train_folds=(1, 2, 3, 4),
                  relative_to: str | os.PathLike | None = None) -> dict:
    """``out/noise_train.list`` (clips of ``train_folds``) and ``out/noise_heldout.list`` (the other folds).

    Returns ``{"train": {"clips", "folds", "classes"}, "heldout": {...}}``.
    """
    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise ListError(f"{manifest}: ESC-10 manifest not found")
    train_folds = {int(f) for f in train_folds}
    parts: dict[str, list[AudioEntry]] = {"train": [], "heldout": []}
    folds: dict[str, set] = {"train": set(), "heldout": set()}
    classes: dict[str, set] = {"train": set(), "heldout": set()}
    for line, row in csv_rows(manifest, ESC10_COLUMNS):
        rel = inside_folder(manifest, line, (row.get("path") or "").strip())
        label = (row.get("class") or "").strip()
        if not label or any(c.isspace() for c in label):
            raise ListError(f"{manifest}:{line}: class {label!r} is empty or contains whitespace")
        try:
            fold = int(row.get("fold") or "")
        except ValueError:
            raise ListError(f"{manifest}:{line}: fold must be an integer, got {row.get('fold')!r}") from None
        part = "train" if fold in train_folds else "heldout"
        parts[part].append(AudioEntry(f"esc10-{label}-{Path(rel).stem}", "noise",
                                      relative_path(manifest.parent / rel, relative_to)))
        folds[part].add(fold)
        classes[part].add(label)
    if not parts["train"]:
        raise ListError(f"{manifest}: no clip in the training folds {sorted(train_folds)}")
    for part, entries in parts.items():
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ListError(f"{manifest}: clip name '{dup}' repeats (class + file stem must be unique)")
        if entries:
            check_first_decodes(out / f"noise_{part}.list", sorted(entries)[0].path, relative_to)
    for part, entries in parts.items():
        if entries:
            write_audio_list(out / f"noise_{part}.list", entries)
    return {part: {"clips": len(parts[part]), "folds": sorted(folds[part]), "classes": len(classes[part])}
            for part in parts}


# ---- simulated room impulse responses --------------------------------------------------------------------
@dataclass(frozen=True)
class RirSimConfig:
    """Random shoebox rooms for the image-source method (module docstring); lengths in metres."""

    num: int = 200
    seed: int = 0
    sample_rate: int = SAMPLE_RATE
    rt60: tuple[float, float] = (0.2, 0.8)
    room_min: tuple[float, float, float] = (3.0, 3.0, 2.4)
    room_max: tuple[float, float, float] = (10.0, 8.0, 3.5)
    min_distance: float = 0.5
    max_order: int = 25
    max_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"num must be >= 1, got {self.num}")
        if not 0 < self.rt60[0] <= self.rt60[1]:
            raise ValueError(f"rt60 must be (low, high) seconds with 0 < low <= high, got {self.rt60}")
        if not all(2 * self.min_distance < lo <= hi for lo, hi in zip(self.room_min, self.room_max)):
            raise ValueError(f"room_min <= room_max, each side > 2 min_distance, got {self.room_min}, {self.room_max}")
        if self.max_order < 0 or self.max_seconds <= 0:
            raise ValueError(f"max_order must be >= 0 and max_seconds > 0, got {self.max_order}, {self.max_seconds}")

    def as_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _room_category(volume: float) -> str:
    return "smallroom" if volume < 60 else "mediumroom" if volume < 150 else "largeroom"


def _positions(rng: np.random.Generator, room: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Source and microphone uniform in the room ``margin`` from the walls and from each other."""
    for _ in range(1000):  # the rejection rate is tiny for rooms of metres and margins of half a metre
        source, mic = rng.uniform(margin, room - margin, size=(2, 3))
        if np.linalg.norm(source - mic) >= margin:
            return source, mic
    raise ValueError(f"room {np.round(room, 2).tolist()} m has no two points {margin} m apart and from the walls; "
                     "raise room_min or lower min_distance")


def simulate_one(cfg: RirSimConfig, index: int) -> tuple[np.ndarray, dict]:
    """RIR ``index`` of ``cfg`` (its own generator ``[seed, index]``) and its parameters."""
    import pyroomacoustics as pra

    rng = np.random.default_rng([cfg.seed, index])
    room = rng.uniform(cfg.room_min, cfg.room_max)
    rt60 = float(rng.uniform(*cfg.rt60))
    source, mic = _positions(rng, room, cfg.min_distance)
    absorption, order = pra.inverse_sabine(rt60, room)
    order = min(int(order), cfg.max_order)
    shoebox = pra.ShoeBox(room, fs=cfg.sample_rate, materials=pra.Material(absorption), max_order=order)
    shoebox.add_source(source)
    shoebox.add_microphone(mic)
    shoebox.compute_rir()
    rir = np.asarray(shoebox.rir[0][0], dtype=np.float64)
    measured = float(shoebox.measure_rt60()[0][0])
    rir = rir[: int(cfg.max_seconds * cfg.sample_rate)]
    rir = (0.9 * rir / np.abs(rir).max()).astype(np.float32)
    volume = float(np.prod(room))
    params = {"name": f"sim{index:05d}", "category": _room_category(volume), "room": np.round(room, 4).tolist(),
              "volume": round(volume, 3), "source": np.round(source, 4).tolist(), "mic": np.round(mic, 4).tolist(),
              "distance": round(float(np.linalg.norm(source - mic)), 4), "rt60_target": round(rt60, 4),
              "rt60_measured": round(measured, 4), "absorption": round(float(absorption), 5), "max_order": order,
              "samples": len(rir), "peak": int(np.abs(rir).argmax())}
    return rir, params


def _cache_is_valid(cache: Path, manifest: dict, cfg: RirSimConfig) -> str | None:
    """None when ``manifest`` describes ``cfg`` and every file is there with its length; else why not."""
    if manifest.get("config") != cfg.as_json():
        return "its configuration differs"
    rirs = manifest.get("rirs")
    if not isinstance(rirs, list) or len(rirs) != cfg.num:
        return "it lists a different number of RIRs"
    for r in rirs:
        path = cache / "wav" / f"{r['name']}.wav"
        try:
            info = audio_info(path)
        except Exception:  # noqa: BLE001 - any unreadable file means: simulate again
            return f"{path} is missing or unreadable"
        if info.frames != r["samples"] or info.sample_rate != cfg.sample_rate:
            return f"{path} does not have the {r['samples']} samples at {cfg.sample_rate} Hz its manifest says"
    return None


def simulate_rirs(cache: str | os.PathLike, cfg: RirSimConfig = RirSimConfig(), relative_to=None,
                  verbose: bool = True) -> dict:
    """Fill (or reuse) the RIR cache folder; write ``cache/rir.list``; return the manifest (module docstring)."""
    import json

    import pyroomacoustics as pra

    cache = Path(cache)
    manifest_path = cache / "manifest.json"
    manifest, why = None, "there is no manifest"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            why = _cache_is_valid(cache, manifest, cfg)
        except (json.JSONDecodeError, KeyError, TypeError):
            why = f"{manifest_path} is not a valid RIR manifest"
    if why is None:
        manifest["reused"] = True
        if verbose:
            print(f"{cache}: {cfg.num} simulated RIRs reused (manifest matches)")
    else:
        if verbose:
            print(f"{cache}: simulating {cfg.num} RIRs ({why})")
        (cache / "wav").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        rirs = []
        for index in range(cfg.num):
            rir, params = simulate_one(cfg, index)
            path = cache / "wav" / f"{params['name']}.wav"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.wav")
            write_audio(tmp, rir, cfg.sample_rate)
            os.replace(tmp, path)  # a killed run leaves whole files only; the manifest comes last
            rirs.append(params)
        seconds = time.perf_counter() - start
        measured = np.asarray([r["rt60_measured"] for r in rirs])
        target = np.asarray([r["rt60_target"] for r in rirs])
        manifest = {"library": "pyroomacoustics", "library_version": pra.__version__,
                    "method": "image source (ShoeBox)",
                    "sample_rate": cfg.sample_rate, "config": cfg.as_json(), "simulation_seconds": round(seconds, 2),
                    "rt60_measured_over_target_median": round(float(np.median(measured / target)), 3),
                    "rirs": rirs}
        write_json(manifest_path, manifest)
        manifest["reused"] = False
        if verbose:
            print(f"{cache}: {cfg.num} RIRs in {seconds:.1f} s; measured/target RT60 median "
                  f"{manifest['rt60_measured_over_target_median']}")
    entries = [AudioEntry(r["name"], r["category"], relative_path(cache / "wav" / f"{r['name']}.wav", relative_to))
               for r in manifest["rirs"]]
    write_audio_list(cache / "rir.list", entries)
    return manifest


# ---- speaker-disjoint demo splits -------------------------------------------------------------------------
def read_speaker_table(path: str | os.PathLike, speakers, what: str) -> dict[str, str]:
    """Kaldi ``speaker value`` lines (spk2age, spk2gender) for every one of ``speakers``; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise ListError(f"{path}: {what} file not found")
    table: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ListError(f"{path}:{number}: expected '<speaker> <{what}>', got {len(fields)} field(s)")
        table[fields[0]] = fields[1]
    missing = sorted(set(speakers) - set(table))
    if missing:
        raise ListError(f"{path}: no {what} for speaker(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return table


def stratified_pick(strata: dict[str, list[str]], n: int, seed: int, stream: int) -> list[str]:
    """``n`` speakers, ``n_s`` from stratum ``s`` with ``n_s`` proportional to its size (largest remainders,
    ties by stratum name), each chosen by ``pick`` with its own stream (so one stratum's size does not move
    another's choice)."""
    total = sum(len(v) for v in strata.values())
    if n > total:
        raise ListError(f"cannot hold out {n} speakers from {total}")
    names = sorted(strata)
    quota = {s: n * len(strata[s]) / total for s in names}
    counts = {s: int(math.floor(quota[s])) for s in names}
    by_remainder = sorted(names, key=lambda s: (-(quota[s] - counts[s]), s))
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    return sorted(u for s in names for u in pick(strata[s], counts[s], seed, stream + zlib.crc32(s.encode())))


def _stratum(age: str, gender: str, where: str) -> str:
    try:
        years = int(age)
    except ValueError:
        raise ListError(f"{where}: age must be an integer, got {age!r}") from None
    if gender not in ("m", "f"):
        raise ListError(f"{where}: gender must be 'm' or 'f', got {gender!r}")
    return f"{'child' if years <= CHILD_MAX_AGE else 'adult'}-{gender}"


def _plain_dir(rows: list[ManifestRow]) -> DataDir:
    return DataDir(wavs={r.utt: r.path for r in rows}, utt2spk={r.utt: r.speaker for r in rows},
                   durations={r.utt: r.seconds for r in rows})


def _stats(d: DataDir) -> dict:
    return {"speakers": len(d.speakers), "utterances": len(d), "seconds": round(sum(d.seconds(u) for u in d.wavs), 2)}


def _tstats(t: Trials) -> dict:
    return {"trials": len(t), "target": t.num_target, "nontarget": t.num_nontarget}


def prepare_demo(sv_bench_manifest: str | os.PathLike, so762_dir: str | os.PathLike, out: str | os.PathLike,
                 seed: int = 0, so762_test_speakers: int = 32, so762_val_speakers: int = 13,
                 val_long_speakers: int = 20, segment_seconds: float = 3.0, nontarget_ratio: float = 10.0,
                 relative_to: str | os.PathLike | None = None, verbose: bool = True) -> dict:
    """Write ``out/{train,val,test}``, ``out/{val,test,test_ls10,test_so762}_trials.txt`` and
    ``out/split_summary.json`` (module docstring); return the summary."""
    so762_dir, out = Path(so762_dir), Path(out)
    bench = read_manifest(sv_bench_manifest, relative_to)
    ocean = read_manifest(so762_dir / "manifest.csv", relative_to)
    by_speaker: dict[str, list[ManifestRow]] = {}
    for r in bench:
        by_speaker.setdefault(r.speaker, []).append(r)
    ocean_speakers: dict[str, list[ManifestRow]] = {}
    for r in ocean:
        if r.speaker in by_speaker:
            raise ListError(f"{so762_dir / 'manifest.csv'}:{r.line}: speaker '{r.speaker}' also in {sv_bench_manifest}")
        ocean_speakers.setdefault(r.speaker, []).append(r)
    folder_of = {s: {r.folder for r in rs} for s, rs in by_speaker.items()}
    known = set(TEST_FOLDERS) | set(LONG_FOLDERS) | set(WORD_FOLDERS)
    for s, folders in folder_of.items():
        if len(folders) != 1 or not folders <= known:
            raise ListError(f"{sv_bench_manifest}:{by_speaker[s][0].line}: speaker '{s}' is in folder(s) "
                            f"{sorted(folders)}; expected exactly one of {sorted(known)}")
    folder_of = {s: next(iter(f)) for s, f in folder_of.items()}
    ls_test = sorted(s for s, f in folder_of.items() if f in TEST_FOLDERS)
    if not ls_test:
        raise ListError(f"{sv_bench_manifest}: no speakers under {list(TEST_FOLDERS)}")

    ages = read_speaker_table(so762_dir / "spk2age", ocean_speakers, "age")
    genders = read_speaker_table(so762_dir / "spk2gender", ocean_speakers, "gender")
    stratum_of = {s: _stratum(ages[s], genders[s], f"{so762_dir}: speaker '{s}'") for s in ocean_speakers}
    strata: dict[str, list[str]] = {}
    for s, k in stratum_of.items():
        strata.setdefault(k, []).append(s)
    so_test = stratified_pick(strata, so762_test_speakers, seed, 101)
    rest = {k: [s for s in v if s not in set(so_test)] for k, v in strata.items()}
    so_val = stratified_pick(rest, so762_val_speakers, seed, 202)
    so_train = sorted(set(ocean_speakers) - set(so_test) - set(so_val))

    long_ok = sorted(s for s, f in folder_of.items() if f in LONG_FOLDERS
                     and any(r.seconds >= 2 * segment_seconds for r in by_speaker[s]))
    val_long = pick(long_ok, val_long_speakers, seed, 1)
    bench_train = sorted(s for s, f in folder_of.items() if f not in TEST_FOLDERS and s not in set(val_long))
    if not so_train or not bench_train:
        raise ListError("no speechocean762 or sv-bench speakers left for training; hold fewer out")

    all_rows = {**by_speaker, **ocean_speakers}
    train = _plain_dir([r for s in bench_train + so_train for r in all_rows[s]])
    test = _plain_dir([r for s in ls_test + so_test for r in all_rows[s]])
    val = _val_dir(Path(sv_bench_manifest), {s: by_speaker[s] for s in val_long},
                   [r for s in so_val for r in ocean_speakers[s]], segment_seconds, relative_to)

    ls_utts = [u for u in test.utts if test.utt2spk[u] in set(ls_test)]
    so_utts = [u for u in test.utts if test.utt2spk[u] in set(so_test)]
    trials = {"val": sampled_pairs(val.utts, val.utt2spk, nontarget_ratio, seed),
              "test": all_pairs(test.utts, test.utt2spk),
              "test_ls10": all_pairs(ls_utts, test.utt2spk),
              "test_so762": all_pairs(so_utts, test.utt2spk)}

    out.mkdir(parents=True, exist_ok=True)
    for name, d in (("train", train), ("val", val), ("test", test)):
        check_first_decodes(out / name / "wav.scp", d.wavs[d.utts[0]], relative_to)
    # One Opus file through the loader: a libsndfile without Opus fails here, not at the first batch.
    check_first_decodes(so762_dir / "manifest.csv", ocean[0].path, relative_to)
    for name, d in (("train", train), ("val", val), ("test", test)):
        d.write(out / name)
    for name, t in trials.items():
        write_trials(out / f"{name}_trials.txt", t)

    def strata_of(speakers) -> dict:
        counts: dict[str, int] = {}
        for s in speakers:
            counts[stratum_of[s]] = counts.get(stratum_of[s], 0) + 1
        return dict(sorted(counts.items()))

    def sources(speakers) -> dict:
        counts: dict[str, int] = {}
        for s in speakers:
            key = folder_of.get(s, "speechocean762")
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    summary = {
        "sv_bench_manifest": relative_path(Path(sv_bench_manifest), relative_to), "so762": relative_path(so762_dir, relative_to),
        "seed": seed,
        "params": {"so762_test_speakers": so762_test_speakers, "so762_val_speakers": so762_val_speakers,
                   "val_long_speakers": val_long_speakers, "segment_seconds": segment_seconds,
                   "nontarget_ratio": nontarget_ratio, "child_max_age": CHILD_MAX_AGE},
        "splits": {"train": _stats(train), "val": _stats(val), "test": _stats(test),
                   "test_ls10": _stats(test.subset(ls_utts)), "test_so762": _stats(test.subset(so_utts))},
        "trials": {name: _tstats(t) for name, t in trials.items()},
        "sources": {"train": sources(bench_train + so_train), "val": sources(val_long + so_val),
                    "test": sources(ls_test + so_test)},
        "so762_strata": {"train": strata_of(so_train), "val": strata_of(so_val), "test": strata_of(so_test)},
        "notes": "val ranks checkpoints (its LibriSpeech pairs share one recording, its speechocean762 pairs one "
                 "sitting); report test. test_ls10 is the old 10-speaker list.",
    }
    write_json(out / "split_summary.json", summary)
    if verbose:
        print(split_table(summary))
    return summary


def _val_dir(manifest: Path, long_rows: dict[str, list[ManifestRow]], plain_rows: list[ManifestRow],
             segment_seconds: float, relative_to) -> DataDir:
    """Held-out long recordings cut into pieces (Kaldi segments) plus whole held-out utterances."""
    wavs, utt2spk, segments, utt2rec, durations = {}, {}, {}, {}, {}
    for spk, rows in long_rows.items():
        for r in rows:
            for start, end in cut_segments(true_seconds(manifest, r, relative_to), segment_seconds):
                seg = f"{r.utt}-{round(start * 1000):07d}-{round(end * 1000):07d}"
                wavs[seg], utt2spk[seg], segments[seg], utt2rec[seg] = r.path, spk, (start, end), r.utt
                durations[seg] = round(end - start, 3)
    for r in plain_rows:
        wavs[r.utt], utt2spk[r.utt], segments[r.utt], utt2rec[r.utt] = r.path, r.speaker, (0.0, r.seconds), r.utt
        durations[r.utt] = r.seconds
    return DataDir(wavs=wavs, utt2spk=utt2spk, segments=segments or None, utt2rec=utt2rec or None,
                   durations=durations)


SET_LABELS = {"train": "train", "val": "val", "test": "test (all pairs)",
              "test_ls10": "test_ls10 (old list: LibriSpeech test-other)", "test_so762": "test_so762 (part of test)"}


def split_table(summary: dict) -> str:
    """docs/data.md's markdown table of a ``prepare demo`` summary: speakers / utts / minutes / trials per set,
    and where the speakers come from (speechocean762 strata in brackets)."""
    short = {"librispeech_train-clean-100": "train-clean-100", "librispeech_test-other": "test-other",
             "arabic_sc": "Arabic SC", "speechocean762": "speechocean762"}
    lines = ["| set | speakers | utts | minutes | trials (target / non-target) | speakers from |",
             "|---|---|---|---|---|---|"]
    for name, label in SET_LABELS.items():
        s = summary["splits"][name]
        t = summary["trials"].get(name)
        trials = f"{t['trials']:,} ({t['target']:,} / {t['nontarget']:,})" if t else "–"
        src = summary["sources"].get(name)
        where = "; ".join(f"{short.get(k, k)} {v}" for k, v in src.items()) if src else "–"
        strata = summary["so762_strata"].get(name)
        if strata:
            where += " (" + ", ".join(f"{k} {v}" for k, v in strata.items()) + ")"
        lines.append(f"| {label} | {s['speakers']:,} | {s['utterances']:,} | {s['seconds'] / 60:,.1f} | {trials} | "
                     f"{where} |")
    return "\n".join(lines)


# ---- command line (``python -m svlib.corpora.prepare demo | esc10 | simrirs | demo-table``) ----------------------
SUBCOMMANDS = ("demo", "esc10", "simrirs", "demo-table")


def _add_rir_arguments(p) -> None:
    default = RirSimConfig()
    p.add_argument("--num", type=int, default=default.num, help="number of simulated RIRs")
    p.add_argument("--rir-seed", type=int, default=default.seed)
    p.add_argument("--rt60", type=float, nargs=2, default=default.rt60, metavar=("LOW", "HIGH"))
    p.add_argument("--max-order", type=int, default=default.max_order, help="cap of the image-source order")


def add_subcommands(sub) -> None:
    d = sub.add_parser("demo", help="speaker-disjoint demo splits (sv-bench + speechocean762), ESC-10 lists, RIRs")
    d.add_argument("--sv-bench", required=True, help="sv-bench manifest.csv")
    d.add_argument("--so762", required=True, help="speechocean762-train folder (manifest.csv, spk2age, spk2gender)")
    d.add_argument("--esc10", default=None, help="esc10-noise manifest.csv: writes OUT/noise_{train,heldout}.list")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--so762-test-speakers", type=int, default=32)
    d.add_argument("--so762-val-speakers", type=int, default=13)
    d.add_argument("--val-long-speakers", type=int, default=20, help="train-clean-100 speakers held out for val")
    d.add_argument("--rir-cache", default=None, help="simulated RIR cache (default OUT/rirs; '-' to skip)")
    _add_rir_arguments(d)
    e = sub.add_parser("esc10", help="ESC-10 noise lists split by fold")
    e.add_argument("--manifest", required=True)
    e.add_argument("--out", required=True, help="folder for noise_train.list and noise_heldout.list")
    e.add_argument("--train-folds", type=int, nargs="+", default=[1, 2, 3, 4])
    r = sub.add_parser("simrirs", help="simulate room impulse responses (pyroomacoustics) into a cache folder")
    r.add_argument("--out", required=True, help="cache folder (wav/, manifest.json, rir.list)")
    _add_rir_arguments(r)
    t = sub.add_parser("demo-table", help="print the README's markdown split table of a demo split_summary.json")
    t.add_argument("--summary", required=True)


def _rir_config(args) -> RirSimConfig:
    return RirSimConfig(num=args.num, seed=args.rir_seed, rt60=tuple(args.rt60), max_order=args.max_order)


def _simulate(cache, args) -> None:
    try:
        import pyroomacoustics  # noqa: F401
    except ImportError:
        raise ListError("simulating RIRs needs pyroomacoustics: pip install pyroomacoustics") from None
    manifest = simulate_rirs(cache, _rir_config(args), args.relative_to)
    print(f"{Path(cache) / 'rir.list'}: {len(manifest['rirs'])} RIRs")


def run_subcommand(args) -> None:
    """Dispatch one of ``SUBCOMMANDS``; bad values become one-line ``ListError`` s."""
    import json

    try:
        if args.command == "demo":
            prepare_demo(args.sv_bench, args.so762, args.out, seed=args.seed,
                         so762_test_speakers=args.so762_test_speakers, so762_val_speakers=args.so762_val_speakers,
                         val_long_speakers=args.val_long_speakers, relative_to=args.relative_to)
            if args.esc10:
                counts = prepare_esc10(args.esc10, args.out, relative_to=args.relative_to)
                print(f"{args.out}/noise_*.list: " + ", ".join(f"{k} {v['clips']} clips (folds {v['folds']})"
                                                             for k, v in counts.items()))
            if args.rir_cache != "-":
                _simulate(args.rir_cache or Path(args.out) / "rirs", args)
        elif args.command == "esc10":
            counts = prepare_esc10(args.manifest, args.out, args.train_folds, args.relative_to)
            print(f"{args.out}: " + ", ".join(f"noise_{k}.list {v['clips']} clips, folds {v['folds']}"
                                              for k, v in counts.items()))
        elif args.command == "simrirs":
            _simulate(args.out, args)
        else:
            path = Path(args.summary)
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ListError(f"{path}: cannot read the split summary ({err})") from None
            print(split_table(summary))
    except ValueError as err:
        if isinstance(err, ListError):
            raise
        raise ListError(str(err)) from None
