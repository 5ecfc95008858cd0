"""Demo data (svlib.corpora.demo_data): speaker-disjoint splits with speechocean762, ESC-10 fold lists, simulated RIRs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from svlib.audio import load_audio, write_audio
from svlib.corpora.demo_data import (RirSimConfig, prepare_demo, prepare_esc10, simulate_one, simulate_rirs,
                                     split_table, stratified_pick)
from svlib.corpora.manifest import prepare_manifest
from svlib.corpora.prepare import main
from svlib.data.augment import AugmentConfig, Augmenter, read_noise_list, read_rir_list
from svlib.data.lists import DataDir, ListError, read_trials

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RATE = 16000


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    """A fake sv-bench (3 test-other x 3, 6 train-clean-100 x one 6.5 s recording, 4 Arabic x 3 words) and a fake
    speechocean762-train (16 speakers x 4 Ogg/Opus utterances: 8 children, 8 adults, both genders)."""
    root = tmp_path_factory.mktemp("corpora")
    bench = root / "sv-bench"
    rows = ["path,speaker,source,licence,seconds,sample_rate"]
    n = 0
    for folder, prefix, speakers, utts, seconds, suffix in (("librispeech_test-other", "lt", 3, 3, 0.6, ".flac"),
                                                            ("librispeech_train-clean-100", "lc", 6, 1, 6.5, ".flac"),
                                                            ("arabic_sc", "ar", 4, 3, 0.3, ".wav")):
        for s in range(speakers):
            spk = f"{prefix}{s:02d}"
            for u in range(utts):
                rel = f"{folder}/{spk}/{spk}-{u:04d}{suffix}"
                (bench / rel).parent.mkdir(parents=True, exist_ok=True)
                write_audio(bench / rel, _tone(seconds, n))
                n += 1
                rows.append(f"{rel},{spk},fake,CC-BY-4.0,{seconds},{RATE}")
    (bench / "manifest.csv").write_text("\n".join(rows) + "\n")

    ocean = root / "speechocean762-train"
    rows = ["path,speaker,source,licence,seconds,sample_rate"]
    ages, genders = [], []
    for s in range(16):
        spk = f"so762-{s:04d}"
        ages.append(f"{spk} {7 + s if s < 8 else 20 + s}")      # 8 children (7-14), 8 adults
        genders.append(f"{spk} {'mf'[s % 2]}")
        for u in range(4):
            rel = f"audio/{s:04d}/{s:04d}{u:05d}.ogg"
            (ocean / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(ocean / rel), _tone(0.5, 1000 + 4 * s + u), RATE, format="OGG", subtype="OPUS")
            rows.append(f"{rel},{spk},speechocean762,free,0.5,{RATE}")
    (ocean / "manifest.csv").write_text("\n".join(rows) + "\n")
    (ocean / "spk2age").write_text("\n".join(ages) + "\n")
    (ocean / "spk2gender").write_text("\n".join(genders) + "\n")
    return {"bench": bench / "manifest.csv", "ocean": ocean, "root": root}


def _demo(corpora, out, seed=0, **kw):
    kw = {"so762_test_speakers": 4, "so762_val_speakers": 4, "val_long_speakers": 2, **kw}
    return prepare_demo(corpora["bench"], corpora["ocean"], out, seed=seed, relative_to=REPO, verbose=False, **kw)


def _load(out: Path) -> dict[str, DataDir]:
    return {s: DataDir.load(out / s, check_files=True, root=REPO) for s in ("train", "val", "test")}


def test_splits_are_disjoint_counted_and_stratified(corpora, tmp_path):
    summary = _demo(corpora, tmp_path / "demo")
    d = _load(tmp_path / "demo")
    spk = {k: set(v.speakers) for k, v in d.items()}
    assert not spk["train"] & spk["val"] and not spk["train"] & spk["test"] and not spk["val"] & spk["test"]
    so = {k: sorted(s for s in v if s.startswith("so762")) for k, v in spk.items()}
    assert [len(so[k]) for k in ("train", "val", "test")] == [8, 4, 4]
    # Strata of 4 (child/adult x m/f): each gives one speaker to test and one to val, two stay in training.
    assert summary["so762_strata"] == {"train": {"adult-f": 2, "adult-m": 2, "child-f": 2, "child-m": 2},
                                       "val": {"adult-f": 1, "adult-m": 1, "child-f": 1, "child-m": 1},
                                       "test": {"adult-f": 1, "adult-m": 1, "child-f": 1, "child-m": 1}}
    assert sorted(s for s in spk["test"] if not s.startswith("so762")) == ["lt00", "lt01", "lt02"]
    assert sum(s.startswith("ar") for s in spk["train"]) == 4 and not any(s.startswith("ar") for s in spk["val"])
    assert sum(s.startswith("lc") for s in spk["val"]) == 2 and sum(s.startswith("lc") for s in spk["train"]) == 4
    assert len(d["test"]) == 3 * 3 + 4 * 4 and len(d["train"]) == 4 + 12 + 8 * 4
    assert len(d["val"]) == 2 * 2 + 4 * 4  # 6.5 s recordings -> two 3.25 s pieces each
    test = read_trials(tmp_path / "demo" / "test_trials.txt")
    assert (len(test), test.num_target) == (25 * 24 // 2, 3 * 3 + 4 * 6)  # all pairs
    ls10 = read_trials(tmp_path / "demo" / "test_ls10_trials.txt")
    so = read_trials(tmp_path / "demo" / "test_so762_trials.txt")
    assert (len(ls10), ls10.num_target, len(so), so.num_target) == (36, 9, 120, 24)
    val = read_trials(tmp_path / "demo" / "val_trials.txt")
    assert val.num_target == 2 + 4 * 6 and val.utterances <= set(d["val"].utts)
    assert summary["trials"]["test"] == {"trials": 300, "target": 33, "nontarget": 267}
    assert summary["splits"]["test"]["speakers"] == 7 and summary["splits"]["test_ls10"]["utterances"] == 9
    # Ogg/Opus goes through the loader: a speechocean762 test utterance decodes to its 0.5 s at 16 kHz.
    utt = next(u for u in d["test"].utts if u.startswith("so762"))
    assert abs(len(d["test"].load_wave(utt)) - RATE // 2) <= 320


def test_old_list_is_kept_exactly(corpora, tmp_path):
    _demo(corpora, tmp_path / "demo")
    prepare_manifest(corpora["bench"], tmp_path / "old", val_long_speakers=2, val_word_speakers=1, val_words=2,
                     relative_to=REPO, verbose=False)
    old = (tmp_path / "old" / "test_trials.txt").read_text()
    assert (tmp_path / "demo" / "test_ls10_trials.txt").read_text() == old


def test_deterministic_from_the_seed(corpora, tmp_path):
    a, b, c = (_demo(corpora, tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 5)))
    for name in ("train/wav.scp", "val/segments", "test/utt2spk", "val_trials.txt", "test_trials.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a == b
    test_a = set(DataDir.load(tmp_path / "a" / "test").speakers)
    test_c = set(DataDir.load(tmp_path / "c" / "test").speakers)
    assert test_a != test_c and c["so762_strata"]["test"] == a["so762_strata"]["test"]


def test_stratified_pick_is_proportional():
    strata = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(30)], "c": [f"c{i}" for i in range(20)]}
    picked = stratified_pick(strata, 10, seed=0, stream=1)
    assert [sum(p.startswith(k) for p in picked) for k in "abc"] == [5, 3, 2]
    picked = stratified_pick(strata, 7, seed=0, stream=1)   # quotas 3.5, 2.1, 1.4: remainders give a and c one each
    assert [sum(p.startswith(k) for p in picked) for k in "abc"] == [4, 2, 1]
    assert stratified_pick(strata, 7, seed=0, stream=1) == picked and stratified_pick(strata, 7, 1, 1) != picked
    with pytest.raises(ListError, match="cannot hold out 101"):
        stratified_pick(strata, 101, 0, 1)


def test_bad_speaker_tables_fail_in_one_line(corpora, tmp_path):
    bad = tmp_path / "ocean"
    bad.mkdir()
    (bad / "audio").symlink_to(corpora["ocean"] / "audio")
    (bad / "manifest.csv").write_text((corpora["ocean"] / "manifest.csv").read_text())
    (bad / "spk2gender").write_text((corpora["ocean"] / "spk2gender").read_text())
    (bad / "spk2age").write_text("\n".join((corpora["ocean"] / "spk2age").read_text().splitlines()[1:]) + "\n")
    with pytest.raises(ListError, match=r"spk2age: no age for speaker\(s\) \['so762-0000'\]"):
        prepare_demo(corpora["bench"], bad, tmp_path / "x", relative_to=REPO, verbose=False)
    (bad / "spk2age").write_text((corpora["ocean"] / "spk2age").read_text())
    (bad / "spk2gender").write_text((corpora["ocean"] / "spk2gender").read_text().replace(" f\n", " x\n", 1))
    with pytest.raises(ListError, match="gender must be 'm' or 'f', got 'x'"):
        prepare_demo(corpora["bench"], bad, tmp_path / "x", relative_to=REPO, verbose=False)


def test_split_table_and_cli(corpora, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--relative-to", str(REPO), "demo", "--sv-bench", str(corpora["bench"]), "--so762",
                 str(corpora["ocean"]), "--out", str(out), "--so762-test-speakers", "4", "--so762-val-speakers", "4",
                 "--val-long-speakers", "2", "--rir-cache", "-"]) == 0
    capsys.readouterr()
    assert main(["demo-table", "--summary", str(out / "split_summary.json")]) == 0
    table = capsys.readouterr().out
    assert table == split_table(json.loads((out / "split_summary.json").read_text())) + "\n"
    assert "| test (all pairs) | 7 | 25 | 0.2 | 300 (33 / 267) | test-other 3; speechocean762 4 " in table
    assert main(["demo", "--sv-bench", str(corpora["bench"]), "--so762", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere/manifest.csv: manifest not found" in err


# ---- ESC-10 ------------------------------------------------------------------------------------------
def _fake_esc10(root: Path) -> Path:
    rows = ["path,class,fold,freesound_clip,licence,seconds,sample_rate"]
    for k, label in enumerate(("dog_bark", "rain")):
        for fold in range(1, 6):
            for clip in "AB":
                rel = f"audio/{label}/{fold}-{100 + k}-{clip}.ogg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(root / rel), _tone(0.3, fold), RATE, format="OGG", subtype="OPUS")
                rows.append(f"{rel},{label},{fold},{100 + k},CC BY 3.0,0.3,{RATE}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def test_esc10_lists_split_by_fold(tmp_path, monkeypatch):
    manifest = _fake_esc10(tmp_path / "esc")
    counts = prepare_esc10(manifest, tmp_path / "lists", relative_to=REPO)
    assert counts == {"train": {"clips": 16, "folds": [1, 2, 3, 4], "classes": 2},
                      "heldout": {"clips": 4, "folds": [5], "classes": 2}}
    monkeypatch.chdir(REPO)  # list paths are relative to the repo root
    train, held = (read_noise_list(tmp_path / "lists" / f"noise_{p}.list") for p in ("train", "heldout"))
    assert {c for _, c in train} == {"noise"} and len(train) == 16 and len(held) == 4
    assert all("/5-" in p for p, _ in held) and not any("/5-" in p for p, _ in train)
    assert abs(len(load_audio(train[0][0])) - int(0.3 * RATE)) <= 320   # Opus through the loader
    counts = prepare_esc10(manifest, tmp_path / "lists2", train_folds=(1, 2, 3), relative_to=REPO)
    assert counts["heldout"] == {"clips": 8, "folds": [4, 5], "classes": 2}
    bad = tmp_path / "bad.csv"
    bad.write_text(manifest.read_text().replace(",rain,5,", ",rain,five,", 1))
    with pytest.raises(ListError, match=r"bad.csv:\d+: fold must be an integer, got 'five'"):
        prepare_esc10(bad, tmp_path / "x")


@pytest.mark.skipif(not (DATA / "esc10-noise" / "manifest.csv").is_file(), reason="shared data absent")
def test_esc10_real_folds(tmp_path):
    counts = prepare_esc10(DATA / "esc10-noise" / "manifest.csv", tmp_path, relative_to=REPO)
    assert counts == {"train": {"clips": 320, "folds": [1, 2, 3, 4], "classes": 10},
                      "heldout": {"clips": 80, "folds": [5], "classes": 10}}


# ---- simulated RIRs ----------------------------------------------------------------------------------
SMALL = dict(num=4, max_order=8, max_seconds=0.3, rt60=(0.2, 0.4), room_max=(5.0, 4.0, 3.0))


def test_rirs_are_simulated_once_and_reused(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "rirs"
    cfg = RirSimConfig(**SMALL)
    first = simulate_rirs(cache, cfg, relative_to=REPO)
    assert first["reused"] is False and first["library"] == "pyroomacoustics" and len(first["rirs"]) == 4
    assert first["sample_rate"] == RATE and first["config"]["seed"] == 0
    for r in first["rirs"]:
        assert 0.2 <= r["rt60_target"] <= 0.4 and r["max_order"] <= 8 and 0 < r["absorption"] < 1
        assert all(0.5 - 1e-9 <= x <= side - 0.5 + 1e-9 for x, side in zip(r["mic"], r["room"]))
        assert r["distance"] >= 0.5 and r["samples"] <= int(0.3 * RATE)
        wave, rate = sf.read(cache / "wav" / f"{r['name']}.wav")
        assert rate == RATE and len(wave) == r["samples"] and int(np.abs(wave).argmax()) == r["peak"]
        # The direct path arrives after distance / c seconds (c = 343 m/s), plus pyroomacoustics' filter delay.
        assert r["peak"] >= int(r["distance"] / 343.0 * RATE)
    monkeypatch.chdir(REPO)
    paths = read_rir_list(cache / "rir.list")
    assert len(paths) == 4 and all(Path(p).is_file() for p in paths)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    capsys.readouterr()
    again = simulate_rirs(cache, cfg, relative_to=REPO)
    assert again["reused"] is True and "reused" in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes and again["rirs"] == first["rirs"]
    # A different configuration, or a damaged file, simulates again.
    (cache / "wav" / "sim00002.wav").write_bytes(b"")
    assert simulate_rirs(cache, cfg, relative_to=REPO)["reused"] is False
    other = simulate_rirs(cache, RirSimConfig(**{**SMALL, "seed": 1}), relative_to=REPO)
    assert other["reused"] is False and other["rirs"][0]["room"] != first["rirs"][0]["room"]
    # Each RIR has its own seed stream: the first two of num=2 are those of num=4.
    two = simulate_rirs(tmp_path / "two", RirSimConfig(**{**SMALL, "num": 2}), relative_to=REPO)
    assert two["rirs"] == first["rirs"][:2]
    # And the list drives the augmenter's reverberation.
    aug = Augmenter.from_lists(AugmentConfig(reverb_prob=1.0), rir_list_path=cache / "rir.list")
    x = torch.randn(2, RATE) * 0.1
    y = aug(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.allclose(x, y)


def test_rir_config_is_validated():
    with pytest.raises(ValueError, match="rt60"):
        RirSimConfig(rt60=(0.5, 0.2))
    with pytest.raises(ValueError, match="room_min"):
        RirSimConfig(room_min=(0.8, 3.0, 2.4))
    tight = RirSimConfig(room_min=(1.05, 1.05, 1.05), room_max=(1.1, 1.1, 1.1))
    with pytest.raises(ValueError, match="no two points 0.5 m apart"):
        simulate_one(tight, 0)


@pytest.mark.skipif(not (DATA / "speechocean762-train" / "manifest.csv").is_file(), reason="shared data absent")
def test_real_demo_split(tmp_path):
    summary = prepare_demo(DATA / "sv-bench" / "manifest.csv", DATA / "speechocean762-train", tmp_path,
                           relative_to=REPO, verbose=False)
    counts = {k: (v["speakers"], v["utterances"]) for k, v in summary["splits"].items()}
    assert counts == {"train": (341, 4891), "val": (33, 344), "test": (42, 740), "test_ls10": (10, 100),
                      "test_so762": (32, 640)}
    assert summary["trials"]["test"] == {"trials": 273430, "target": 6530, "nontarget": 266900}
    assert summary["trials"]["test_ls10"] == {"trials": 4950, "target": 450, "nontarget": 4500}
    for part in ("train", "val", "test"):  # children and adults of both genders everywhere
        assert set(summary["so762_strata"][part]) == {"adult-f", "adult-m", "child-f", "child-m"}
    assert sum(summary["so762_strata"]["test"].values()) == 32 >= 30
    # docs/data.md's table is this function's output for this split (regenerate it with `prepare demo-table`).
    assert split_table(summary) in (REPO / "docs" / "data.md").read_text()
