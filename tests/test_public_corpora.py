"""Shared-data folders rebuilt from (fake) public download layouts, then split by prepare demo."""
from __future__ import annotations

from pathlib import Path

import pytest

from svlib.corpora.demo_data import prepare_demo, prepare_esc10
from svlib.corpora.public_corpora import build_public, main
from svlib.data.lists import DataDir, ListError, read_trials
from tests.fake_corpora import write_layout


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return write_layout(tmp_path_factory.mktemp("downloads"))


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
