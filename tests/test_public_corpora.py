"""Shared-data folders rebuilt from (fake) public download layouts, then split by prepare demo."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from svlib.audio import write_audio
from svlib.data.demo_data import prepare_demo, prepare_esc10
from svlib.data.lists import DataDir, ListError, read_trials
from svlib.data.public_corpora import build_public, main

RATE = 16000


def _wave(seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downloads")
    n = 0
    # LibriSpeech: test-other 4 speakers (3 with two chapters, 1 with one), train-clean-100 3 speakers x 2 utts.
    for subset, speakers in (("test-other", {"11": 2, "12": 2, "13": 2, "14": 1}),
                             ("train-clean-100", {"21": 1, "22": 1, "23": 1})):
        for spk, chapters in speakers.items():
            for c in range(chapters):
                for u in range(3 if subset == "test-other" else 2):
                    f = root / f"librispeech-{subset}/LibriSpeech/{subset}/{spk}/{100 + c}/{spk}-{100 + c}-{u:04d}.flac"
                    f.parent.mkdir(parents=True, exist_ok=True)
                    write_audio(f, _wave(0.4 + 0.1 * u, n))
                    n += 1
    # speechocean762: 8 speakers x 3 utterances, WAVE/SPEAKERxxxx/*.WAV + train/ Kaldi tables.
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
            write_audio(f, _wave(0.5, n))
            n += 1
            scp.append(f"{utt}\tWAVE/SPEAKER{spk}/{utt}.WAV")
            u2s.append(f"{utt} {spk}")
            text.append(f"{utt} HELLO WORLD")
    for name, lines in (("wav.scp", scp), ("utt2spk", u2s), ("spk2age", ages), ("spk2gender", genders), ("text", text)):
        (so / "train" / name).write_text("\n".join(lines) + "\n")
    # ESC-50: 6 clips at 44.1 kHz, 4 of them in ESC-10.
    esc = root / "esc50" / "ESC-50-master"
    (esc / "audio").mkdir(parents=True)
    (esc / "meta").mkdir()
    meta = ["filename,fold,target,category,esc10,src_file,take"]
    for i, (fold, cat, ten) in enumerate(((1, "dog", True), (2, "rain", True), (5, "dog", True), (5, "rain", True),
                                          (1, "cow", False), (3, "cat", False))):
        name = f"{fold}-{1000 + i}-A-0.wav"
        write_audio(esc / "audio" / name, _wave(0.3, n, 44100), 44100)
        n += 1
        meta.append(f"{name},{fold},0,{cat},{ten},{1000 + i},A")
    (esc / "meta" / "esc50.csv").write_text("\n".join(meta) + "\n")
    return root


def test_public_folders_feed_prepare_demo(downloads, tmp_path):
    counts = build_public(downloads, tmp_path / "public", test_speakers=3, test_utts=4)
    assert counts == {"sv-bench": {"librispeech_test-other": {"speakers": 3, "utterances": 12},
                                   "librispeech_train-clean-100": {"speakers": 3, "utterances": 3}},
                      "speechocean762-train": {"speakers": 8, "utterances": 24}, "esc10-noise": {"clips": 4}}
    pub = tmp_path / "public"
    lines = (pub / "sv-bench" / "manifest.csv").read_text().splitlines()
    test_rows = [l for l in lines if l.startswith("librispeech_test-other/")]
    assert not any("/14/" in l for l in test_rows)           # one chapter only: not a test speaker
    for spk in ("11", "12", "13"):                             # round-robin: both chapters of every test speaker
        assert {l.split("/")[2] for l in test_rows if l.split("/")[1] == spk} == {"100", "101"}
    train_rows = [l for l in lines if l.startswith("librispeech_train-clean-100/")]
    assert all(l.split(",")[0].endswith("-0001.flac") for l in train_rows)   # the longest utterance (0.5 s)
    assert (pub / "speechocean762-train" / "spk2age").read_text().startswith("so762-0001 8\n")

    summary = prepare_demo(pub / "sv-bench" / "manifest.csv", pub / "speechocean762-train", tmp_path / "demo",
                           so762_test_speakers=4, so762_val_speakers=2, val_long_speakers=0, relative_to=tmp_path,
                           verbose=False)
    assert summary["splits"]["test"]["speakers"] == 3 + 4 and summary["splits"]["train"]["speakers"] == 3 + 2
    assert summary["so762_strata"]["test"] == {"adult-f": 1, "adult-m": 1, "child-f": 1, "child-m": 1}
    test = DataDir.load(tmp_path / "demo" / "test", check_files=True, root=tmp_path)
    assert len(test.load_wave(test.utts[0])) > 0
    ls10 = read_trials(tmp_path / "demo" / "test_ls10_trials.txt")
    assert (len(ls10), ls10.num_target) == (66, 18)

    lists = prepare_esc10(pub / "esc10-noise" / "manifest.csv", tmp_path / "noise", relative_to=tmp_path)
    assert lists["train"]["clips"] == 2 and lists["heldout"]["clips"] == 2


def test_missing_downloads_fail_in_one_line(tmp_path, capsys):
    assert main(["--downloads", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the archive extracted?" in err
    with pytest.raises(ListError):
        build_public(tmp_path, tmp_path / "out")
