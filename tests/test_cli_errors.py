"""Every way the user's side can go wrong, in one table: the input, exit code 2 and the expected first
(and only) line of stderr. Nothing here may print a traceback, and the cheap checks (device, output path,
calibration, thresholds) must fire before a model is loaded: cases built on a model folder with corrupt
weights prove it, since loading those weights would fail with a different message."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from experiments import pipeline
from svlib.cli import main
from svlib.model.speaker import SpeakerModel, save_model
from svlib.scoring.calibration import Calibration
from svlib.scoring.metrics import save_embeddings

from test_files import READ_ONLY_BITES, full_disk
from test_speaker import tiny_model

SR = 16000
REPO = Path(__file__).resolve().parents[1]


def _wav(path: Path, seconds: float, amplitude: float = 0.1, seed: int = 0) -> Path:
    wave = amplitude * np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32)
    sf.write(path, wave, SR)
    return path


def _flac_without_samples(path: Path, tmp: Path) -> Path:
    """A FLAC of only its STREAMINFO block, total_samples 0 ("unknown" in the FLAC format): libsndfile reports
    2**63 - 1 frames for it, and reading it asked NumPy for an array of that size."""
    sf.write(tmp / "one_second.flac", np.zeros(SR, dtype=np.float32), SR)
    head = bytearray((tmp / "one_second.flac").read_bytes()[:42])  # b"fLaC" + block header + 34-byte STREAMINFO
    head[4] |= 0x80                                                  # the last metadata block
    head[8 + 13] &= 0xF0                                             # total_samples: its 36 bits zeroed
    head[8 + 14:8 + 18] = b"\0\0\0\0"
    path.write_bytes(bytes(head))
    return path


def _calibration(path: Path, meta: dict) -> Path:
    Calibration(["score"], [5.0], -1.0, 0.5, meta).save(path)
    return path


def _model_calibration(folder: Path, bayes: dict, name: str) -> Path:
    """A copy of ``folder`` (weights truncated, so loading them would fail) with a calibration.json."""
    out = folder.parent / name
    shutil.copytree(folder, out)
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:64])
    cal = {"features": ["score"], "weights": [4.0], "bias": -1.0, "p_target": 0.5,
           "meta": {"thresholds": {"bayes": bayes, "eer": {"score": 0.3, "eer_pct": 10.0}, "trials": "t.txt"}}}
    # json.dumps writes NaN for float('nan') and json.loads reads it back: exactly what a user's file can hold
    (out / "calibration.json").write_text(json.dumps(cal))
    return out


def _unwritable_model(folder: Path, name: str, how: str) -> Path:
    """A copy of ``folder`` whose calibration.json cannot be written: a folder in its place
    (``how="dir"``) or a read-only model folder (``how="read-only"``)."""
    out = folder.parent / name
    if not out.exists():
        shutil.copytree(folder, out)
        if how == "dir":
            (out / "calibration.json").mkdir()
        else:
            out.chmod(0o555)
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clierr")
    save_model(tiny_model(), tmp / "model", {})
    broken = tmp / "broken_model"  # valid manifest, unreadable weights: any case that loads it fails differently
    shutil.copytree(tmp / "model", broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:64])
    _wav(tmp / "a.wav", 1.0)
    _wav(tmp / "b.wav", 1.2, seed=1)
    _wav(tmp / "long.wav", 3.0, seed=2)
    sf.write(tmp / "zeros.wav", np.zeros(SR, dtype=np.float32), SR)
    (tmp / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (tmp / "empty.flac").write_bytes(b"")
    sf.write(tmp / "header_only.wav", np.zeros(0, dtype=np.float32), SR)
    _flac_without_samples(tmp / "no_samples.flac", tmp)
    noise = 0.1 * np.random.default_rng(3).standard_normal(SR).astype(np.float32)
    sf.write(tmp / "rate8k.wav", soxr.resample(noise, SR, 8000), 8000)  # an 8 kHz file
    # stored at 16 kHz, but nothing above 4 kHz
    sf.write(tmp / "upsampled8k.wav", soxr.resample(soxr.resample(noise, SR, 8000), 8000, SR), SR)
    (tmp / "bad.scp").write_text(f"a {tmp / 'a.wav'}\ncorrupt {tmp / 'corrupt.wav'}\n")
    (tmp / "pipe.scp").write_text(f"a {tmp / 'a.wav'}\nb sox {tmp / 'b.wav'} -t wav - |\n")
    (tmp / "ref.pth").write_text("this is not a checkpoint\n")
    (tmp / "outdir.npz").mkdir()

    rng = np.random.default_rng(0)
    utts = [f"s{i // 3}-u{i % 3}" for i in range(12)]
    save_embeddings(tmp / "emb.npz", utts, rng.normal(size=(12, 8)))
    save_embeddings(tmp / "cohort.npz", [f"c{i}" for i in range(20)], rng.normal(size=(20, 8)))
    trials = [f"{int(a[:2] == b[:2])} {a} {b}" for i, a in enumerate(utts) for b in utts[i + 1:]]
    (tmp / "trials.txt").write_text("\n".join(trials) + "\n")
    pairs = [line.split()[1:] for line in trials]
    score_lines = [f"{a} {b} {0.1 * k:.3f}" for k, (a, b) in enumerate(pairs)]
    (tmp / "scores.txt").write_text("\n".join(score_lines) + "\n")
    (tmp / "scores_short.txt").write_text("\n".join(score_lines[:-1]) + "\n")
    (tmp / "scores_extra.txt").write_text("\n".join(score_lines + ["s0-u0 c9 0.5"]) + "\n")
    (tmp / "scores_twice.txt").write_text("\n".join(score_lines + score_lines[:1]) + "\n")
    (tmp / "scores_nan.txt").write_text("\n".join(score_lines[:1] + [f"{pairs[1][0]} {pairs[1][1]} nan"]) + "\n")
    (tmp / "scores_label.txt").write_text(f"{pairs[0][0]} {pairs[0][1]} 0.5 nontarget\n")
    (tmp / "utt2spk_short").write_text("s0-u0 s0\n")
    (tmp / "enroll_trials.txt").write_text("1 spk0 s0-u2\n0 spk0 s1-u2\n1 nobody s1-u1\n")
    (tmp / "enroll.lst").write_text("spk0 s0-u0 s0-u1\n")
    _calibration(tmp / "raw_cal.json", {"asnorm": None})
    _calibration(tmp / "asn_cal.json", {"asnorm": {"top_n": 10, "cohort": "cohort.npz"}})
    np.save(tmp / "array.npy", np.zeros((3, 8)))
    shutil.move(tmp / "array.npy", tmp / "array.npz")
    (tmp / "pickled.npz").write_bytes(pickle.dumps({"utts": ["a"], "embeddings": [[1.0]]}))
    whole = (tmp / "emb.npz").read_bytes()
    (tmp / "truncated.npz").write_bytes(whole[:len(whole) // 2])  # a copy cut short: zip magic, no directory

    # pipeline configs: one train stage whose YAML is empty, one with a NaN learning rate, one with a negative
    # one, one that gives a key twice
    s1 = (REPO / "experiments" / "configs" / "smoke" / "s1.yaml").read_text()
    stages = (("empty", "# nothing here yet\n"), ("nan", s1.replace("lr_frontend: 1.0e-3", "lr_frontend: .nan")),
              ("neglr", s1.replace("lr_backend: 1.0e-3", "lr_backend: -1.0e-3")), ("dup", s1 + "device: cpu\ndevice: cuda\n"))
    for name, stage in stages:
        d = tmp / f"cfg_{name}"
        d.mkdir()
        (d / "s1.yaml").write_text(stage)
        (d / "pipeline.yaml").write_text(
            "name: t\nout_dir: exp/t\ndata: {train: d/train, val: d/val, val_trials: d/v.txt, test: d/test, "
            "test_trials: {test: d/t.txt}}\nstages:\n  - {name: s1, kind: train, config: s1.yaml}\n")
    assert "lr_frontend: .nan" in (tmp / "cfg_nan" / "s1.yaml").read_text()
    assert "lr_backend: -1.0e-3" in (tmp / "cfg_neglr" / "s1.yaml").read_text()
    # a pipeline whose data paths are misspelled (its one stage is a finished folder: nothing to train first)
    (tmp / "done").mkdir()
    (tmp / "done" / "result.json").write_text("{}\n")
    here = os.path.relpath(tmp)  # configs hold relative paths only
    (tmp / "cfg_paths.yaml").write_text(
        f"name: t\nout_dir: {here}/exp_paths\nbaselines: false\n"
        "data: {test: data/no-such-test, test_trials: {O: data/no-such-trials.txt}}\n"
        f"stages:\n  - {{name: a, kind: use, path: {here}/done}}\n")
    return tmp


def _raise(exc: BaseException) -> Callable:
    def patch(monkeypatch):
        def forward(self, waves, lengths):
            raise exc
        monkeypatch.setattr(SpeakerModel, "forward", forward)
    return patch


def _embed_before_the_model(name: str) -> Callable[[Path], list]:
    """``svlib embed`` of one fixture file with the unloadable model: the file's error must come first."""
    return lambda t: ["embed", "--model", t / "broken_model", "--wav", t / name, "--out", t / "x.npz"]


class Case(NamedTuple):
    argv: Callable[[Path], list]
    first_line: str                      # expected start of the one stderr line; {t} is the fixture folder,
                                         # '*' stands for any text (library messages, versions)
    patch: Callable | None = None        # monkeypatch applied before running
    runner: Callable = main              # svlib.cli.main, or the pipeline's main for config files
    skip: str | None = None


CUDA = torch.cuda.is_available()

CASES: dict[str, Case] = {
    # --- devices, checked before anything loads
    "device foo": Case(
        lambda t: ["embed", "--model", t / "broken_model", "--wav", t / "a.wav", "--out", t / "x.npz", "--device", "foo"],
        "svlib embed: error: --device 'foo': not a torch device (use cpu, cuda, cuda:N or mps)"),
    "device cuda on a CPU build": Case(
        lambda t: ["verify", "--model", t / "broken_model", t / "a.wav", t / "b.wav", "--threshold", "0.5",
                   "--device", "cuda"],
        "svlib verify: error: --device 'cuda': CUDA is not available (", skip="CUDA present" if CUDA else None),
    "device cuda:7 with fewer devices": Case(
        lambda t: ["embed", "--model", t / "model", "--wav", t / "a.wav", "--out", t / "x.npz", "--device", "cuda:7"],
        "svlib embed: error: --device 'cuda:7': ", skip="needs fewer than 8 GPUs" if CUDA and torch.cuda.device_count() > 7 else None),
    # --- the model failing on a file: OOM (torch's and Python's) and other runtime errors name the file
    "out of memory on a long file": Case(
        lambda t: ["embed", "--model", t / "model", "--wav", t / "long.wav", "--out", t / "x.npz", "--no-progress"],
        "svlib embed: error: {t}/long.wav: out of memory while embedding '{t}/long.wav' (3.0 s); lower --max-seconds "
        "or --max-batch-seconds (CUDA out of memory. Tried to allocate 20.00 GiB)",
        patch=_raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))),
    "MemoryError in verify": Case(
        lambda t: ["verify", "--model", t / "model", t / "long.wav", t / "a.wav", "--threshold", "0.5"],
        "svlib verify: error: {t}/long.wav: out of memory while embedding 'enroll' (3.0 s, in a batch of 2 padded "
        "to 3.0 s); lower --max-seconds or --max-batch-seconds", patch=_raise(MemoryError())),
    "RuntimeError in the model": Case(
        lambda t: ["embed", "--model", t / "model", "--wav", t / "a.wav", "--out", t / "x.npz", "--no-progress"],
        "svlib embed: error: {t}/a.wav: RuntimeError while embedding '{t}/a.wav' (1.0 s) (mat1 and mat2 shapes "
        "cannot be multiplied)", patch=_raise(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))),
    # --- reference checkpoints
    "reference checkpoint is a text file": Case(
        lambda t: ["convert-reference", t / "ref.pth", "--frontend", "tiny", "--out", t / "conv"],
        "svlib convert-reference: error: {t}/ref.pth: not a torch checkpoint (neither a torch.save zip archive nor a "
        "pickle; starts with b'this')"),
    # --- calibration fitted on other scores than requested
    "raw-cosine calibration on AS-norm scores": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "emb.npz", "--asnorm", t / "cohort.npz",
                   "--top-n", "10", "--calibration", t / "raw_cal.json"],
        "svlib score: error: {t}/raw_cal.json: calibration was fitted on raw cosine scores, but this run computes "
        "AS-norm top-10 (cohort cohort.npz) scores; refit it with `svlib calibrate` and the same --asnorm/--top-n, "
        "or drop --calibration"),
    "AS-norm calibration on raw scores": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "emb.npz", "--calibration",
                   t / "asn_cal.json"],
        "svlib score: error: {t}/asn_cal.json: calibration was fitted on AS-norm top-10 (cohort cohort.npz) scores, "
        "but this run computes raw cosine scores"),
    "AS-norm calibration with another top-n": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "emb.npz", "--asnorm", t / "cohort.npz",
                   "--top-n", "5", "--calibration", t / "asn_cal.json"],
        "svlib score: error: {t}/asn_cal.json: calibration was fitted on AS-norm top-10 (cohort cohort.npz) scores, "
        "but this run computes AS-norm top-5 (cohort cohort.npz) scores"),
    # --- embed: outputs validated first, a bad file in a list says how to go on
    "embed --out is a directory": Case(
        lambda t: ["embed", "--model", t / "broken_model", "--wav", t / "a.wav", "--out", t / "outdir.npz"],
        "svlib embed: error: --out {t}/outdir.npz: is a directory"),
    "embed --out is not .npz": Case(
        lambda t: ["embed", "--model", t / "broken_model", "--wav", t / "a.wav", "--out", t / "emb.txt"],
        "svlib embed: error: --out {t}/emb.txt: expected a .npz file name"),
    "embed --out under a file": Case(
        lambda t: ["embed", "--model", t / "broken_model", "--wav", t / "a.wav", "--out", t / "a.wav" / "x.npz"],
        "svlib embed: error: --out {t}/a.wav/x.npz: cannot create its folder"),
    "bad file in a wav.scp": Case(
        lambda t: ["embed", "--model", t / "broken_model", "--scp", t / "bad.scp", "--out", t / "x.npz"],
        "svlib embed: error: {t}/corrupt.wav: not a readable audio file (*); --skip-bad embeds the other files"),
    "pipe in --scp": Case(
        lambda t: ["embed", "--model", t / "model", "--scp", t / "pipe.scp", "--out", t / "x.npz"],
        "svlib embed: error: {t}/pipe.scp:2: 'b' is a command pipe ('sox {t}/b.wav -t wav - |'); pipes are not "
        "supported, give a plain audio file path"),
    # --- degenerate audio files: named, never a ZeroDivisionError or a NumPy allocation error
    "embed a 0-byte .flac": Case(
        _embed_before_the_model("empty.flac"),
        "svlib embed: error: {t}/empty.flac: empty file (0 bytes)"),
    "embed a WAV header without samples": Case(
        _embed_before_the_model("header_only.wav"),
        "svlib embed: error: {t}/header_only.wav: empty audio (a header without samples)"),
    "embed a FLAC header of 0 samples": Case(
        _embed_before_the_model("no_samples.flac"),
        "svlib embed: error: {t}/no_samples.flac: empty audio (a header without samples)"),
    # --- narrow-band input: verify refuses a decision, before the model loads
    "verify an 8 kHz file with --threshold": Case(
        lambda t: ["verify", "--model", t / "broken_model", t / "rate8k.wav", t / "a.wav", "--threshold", "0.5"],
        "svlib verify: error: {t}/rate8k.wav: narrow-band audio (recorded below 16 kHz or no energy above 4.25 kHz): "
        "its embeddings match across speakers; refusing a decision: --threshold was not chosen on narrow-band trials "
        "(calibrate the model on narrow-band trials with `svlib calibrate-model`, or pass --allow-narrowband)"),
    "verify upsampled 8 kHz audio with a wide-band calibration": Case(
        lambda t: ["verify", "--model", _model_calibration(t / "model", {"score": 0.4, "llr": 0.0, "prior": 0.5},
                                                          "wide_cal"), t / "a.wav", t / "upsampled8k.wav"],
        "svlib verify: error: {t}/upsampled8k.wav: narrow-band audio (recorded below 16 kHz or no energy above "
        "4.25 kHz): its embeddings match across speakers; refusing a decision: {t}/wide_cal/calibration.json was "
        "fitted on wide-band trials"),
    # --- near-silent audio
    "embed all-zero audio": Case(
        lambda t: ["embed", "--model", t / "model", "--wav", t / "zeros.wav", "--out", t / "x.npz", "--no-progress"],
        "svlib embed: error: {t}/zeros.wav: near-silent audio (RMS -inf dBFS, below the -60 dBFS threshold); "
        "refusing to embed '{t}/zeros.wav'"),
    "verify zeros.wav zeros.wav": Case(
        lambda t: ["verify", "--model", t / "model", t / "zeros.wav", t / "zeros.wav", "--threshold", "0.5"],
        "svlib verify: error: {t}/zeros.wav: near-silent audio (RMS -inf dBFS, below the -60 dBFS threshold); "
        "refusing to embed 'enroll'"),
    "quiet audio under a raised threshold": Case(
        lambda t: ["verify", "--model", t / "model", t / "a.wav", t / "b.wav", "--threshold", "0.5",
                   "--min-dbfs", "-10"],
        "svlib verify: error: {t}/b.wav: near-silent audio (RMS -20.1 dBFS, below the -10 dBFS threshold); refusing to embed 'test'"),
    "--min-dbfs nan": Case(
        lambda t: ["embed", "--model", t / "broken_model", "--wav", t / "a.wav", "--out", t / "x.npz",
                   "--min-dbfs", "nan"],
        "svlib embed: error: --min-dbfs must be a number of dB or -inf (no check), got nan"),
    # --- verify: thresholds and calibration before the model
    "verify --threshold nan": Case(
        lambda t: ["verify", "--model", t / "broken_model", t / "a.wav", t / "b.wav", "--threshold", "nan"],
        "svlib verify: error: --threshold must be a finite number, got nan"),
    "verify --threshold inf": Case(
        lambda t: ["verify", "--model", t / "broken_model", t / "a.wav", t / "b.wav", "--threshold", "inf"],
        "svlib verify: error: --threshold must be a finite number, got inf"),
    "verify without calibration, before the model loads": Case(
        lambda t: ["verify", "--model", t / "broken_model", t / "a.wav", t / "b.wav"],
        "svlib verify: error: {t}/broken_model/calibration.json: no calibration in the model folder"),
    "calibration without 'score'": Case(
        lambda t: ["verify", "--model", _model_calibration(t / "model", {"llr": 0.0, "prior": 0.5}, "no_score"),
                   t / "a.wav", t / "b.wav"],
        "svlib verify: error: {t}/no_score/calibration.json: missing key 'score' in meta.thresholds.bayes"),
    "non-finite threshold in calibration.json": Case(
        lambda t: ["verify", "--model", _model_calibration(t / "model", {"score": 0.4, "llr": math.nan, "prior": 0.5},
                                                          "nan_llr"), t / "a.wav", t / "b.wav"],
        "svlib verify: error: {t}/nan_llr/calibration.json: meta.thresholds.bayes.llr must be a finite number, got nan"),
    # --- embeddings files that are not .npz
    "a .npy given as embeddings": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "array.npz"],
        "svlib score: error: {t}/array.npz: not an .npz embeddings file (a NumPy .npy array); write one with "
        "`svlib embed` or svlib.scoring.save_embeddings"),
    "a pickle given as embeddings": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "pickled.npz"],
        "svlib score: error: {t}/pickled.npz: not an .npz embeddings file (not a zip archive)"),
    "a truncated .npz": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "truncated.npz"],
        "svlib score: error: {t}/truncated.npz: truncated or corrupt .npz file (File is not a zip file); write it "
        "again"),
    "a truncated AS-norm cohort": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "emb.npz", "--asnorm",
                   t / "truncated.npz", "--top-n", "10"],
        "svlib score: error: {t}/truncated.npz: truncated or corrupt .npz file (File is not a zip file); write it "
        "again"),
    # --- outputs that cannot be written name the file asked for (not the temporary file beside it)
    "score --scores-out on a full disk": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "emb.npz", "--scores-out",
                   t / "full" / "scores.txt"],
        "svlib score: error: {t}/full/scores.txt: cannot write (No space left on device)", patch=full_disk),
    # --- calibrate-model writes into the model folder: checked before the model loads or anything is embedded
    "calibrate-model: calibration.json is a folder": Case(
        lambda t: ["calibrate-model", "--model", _unwritable_model(t / "broken_model", "caldir_model", "dir"),
                   "--data", t / "no_data", "--trials", t / "trials.txt"],
        "svlib calibrate-model: error: --model {t}/caldir_model/calibration.json: is a directory"),
    "calibrate-model: read-only model folder": Case(
        lambda t: ["calibrate-model", "--model", _unwritable_model(t / "broken_model", "ro_model", "read-only"),
                   "--data", t / "no_data", "--trials", t / "trials.txt"],
        "svlib calibrate-model: error: --model {t}/ro_model/calibration.json: folder {t}/ro_model is not writable",
        skip=None if READ_ONLY_BITES else "this user writes into read-only folders (root)"),
    # --- enrolment lists
    "trial enrolment id without a model": Case(
        lambda t: ["score", "--trials", t / "enroll_trials.txt", "--embeddings", t / "emb.npz", "--enroll",
                   t / "enroll.lst"],
        "svlib score: error: trial enrolment id 'nobody' is not in the enrolment list {t}/enroll.lst (1 unknown)"),
    # --- compare: the two score files must hold exactly the trial list's trials
    "compare: a trial missing from B": Case(
        lambda t: ["compare", t / "scores.txt", t / "scores_short.txt", "--trials", t / "trials.txt"],
        "svlib compare: error: {t}/scores_short.txt: no score for trial 's3-u1 s3-u2' of {t}/trials.txt "
        "(1 of 66 trials missing)"),
    "compare: B scores a pair that is not a trial": Case(
        lambda t: ["compare", t / "scores.txt", t / "scores_extra.txt", "--trials", t / "trials.txt"],
        "svlib compare: error: {t}/scores_extra.txt: 1 score line(s) are not trials of {t}/trials.txt (first: "
        "'s0-u0 c9'); the score files must hold the same trial set"),
    "compare: a trial scored twice": Case(
        lambda t: ["compare", t / "scores_twice.txt", t / "scores.txt", "--trials", t / "trials.txt"],
        "svlib compare: error: {t}/scores_twice.txt:67: trial 's0-u0 s0-u1' repeats line 1"),
    "compare: a NaN score": Case(
        lambda t: ["compare", t / "scores.txt", t / "scores_nan.txt", "--trials", t / "trials.txt"],
        "svlib compare: error: {t}/scores_nan.txt:2: score 'nan' is not finite"),
    "compare: a label that contradicts the trial list": Case(
        lambda t: ["compare", t / "scores_label.txt", t / "scores.txt", "--trials", t / "trials.txt"],
        "svlib compare: error: {t}/scores_label.txt:1: trial 's0-u0 s0-u1' is labelled nontarget here but not in "
        "{t}/trials.txt"),
    "compare: a score file that does not exist": Case(
        lambda t: ["compare", t / "scores.txt", t / "nothing.txt", "--trials", t / "trials.txt"],
        "svlib compare: error: {t}/nothing.txt: score file not found"),
    "compare: --replicates 0": Case(
        lambda t: ["compare", t / "scores.txt", t / "scores.txt", "--trials", t / "trials.txt", "--replicates", "0"],
        "svlib compare: error: --replicates must be a positive number, got 0"),
    "score --ci with an utt2spk that lacks a trial utterance": Case(
        lambda t: ["score", "--trials", t / "trials.txt", "--embeddings", t / "emb.npz", "--ci", "--utt2spk",
                   t / "utt2spk_short"],
        "svlib score: error: {t}/utt2spk_short: utterance 's0-u1' has no speaker in utt2spk"),
    # --- config files (the pipeline's exit 2 and its one line)
    "empty stage YAML": Case(
        lambda t: ["--config", t / "cfg_empty" / "pipeline.yaml", "--no-tracking"],
        "error: {t}/cfg_empty/s1.yaml: empty config file (no keys); write the settings, or '{{}}' for all defaults",
        runner=pipeline.main),
    ".nan learning rate": Case(
        lambda t: ["--config", t / "cfg_nan" / "pipeline.yaml", "--no-tracking"],
        "error: {t}/cfg_nan/s1.yaml: train.optim.lr_frontend: expected a finite number, got nan",
        runner=pipeline.main),
    "negative learning rate": Case(
        lambda t: ["--config", t / "cfg_neglr" / "pipeline.yaml", "--no-tracking"],
        "error: {t}/cfg_neglr/s1.yaml: train.optim: lr_backend must be >= 0, got -0.001", runner=pipeline.main),
    "a key given twice in a stage YAML": Case(
        lambda t: ["--config", t / "cfg_dup" / "pipeline.yaml", "--no-tracking"],
        "error: {t}/cfg_dup/s1.yaml: line 11: duplicate key 'device' (first given on line 10); a mapping may give "
        "each key once", runner=pipeline.main),
    "misspelled data paths, found before any stage runs": Case(
        lambda t: ["--config", t / "cfg_paths.yaml", "--no-tracking"],
        "error: data.test: data/no-such-test: no such data directory; data.test_trials.O: data/no-such-trials.txt: "
        "no such file", runner=pipeline.main),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2(env, capsys, monkeypatch, name):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    if case.patch is not None:
        case.patch(monkeypatch)
    code = case.runner([str(a) for a in case.argv(env)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("svlib: note:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    expected = case.first_line.replace("{t}", str(env)).replace("{{}}", "{}")
    pattern = ".*".join(re.escape(part) for part in expected.split("*"))
    assert re.match(pattern, lines[0]), f"\n got: {lines[0]}\nwant: {expected}"


def test_skip_bad_skips_degenerate_audio(env, capsys):
    """--skip-bad lists a 0-byte FLAC, a header-only WAV and a FLAC of 0 samples and embeds the good file."""
    bad = ["empty.flac", "header_only.wav", "no_samples.flac"]
    code = main(["embed", "--model", str(env / "model"), "--wav", str(env / "a.wav"), *[str(env / b) for b in bad],
                 "--out", str(env / "skip.npz"), "--skip-bad", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "wrote 1 embeddings of dimension 24" in captured.out and "(3 skipped)" in captured.out
    skipped = [line for line in captured.err.splitlines() if line.startswith("svlib embed: skipped")]
    assert skipped == [f"svlib embed: skipped {env / 'empty.flac'}: {env / 'empty.flac'}: empty file (0 bytes)",
                       f"svlib embed: skipped {env / 'header_only.wav'}: {env / 'header_only.wav'}: empty audio "
                       "(a header without samples)",
                       f"svlib embed: skipped {env / 'no_samples.flac'}: {env / 'no_samples.flac'}: empty audio "
                       "(a header without samples)"]
