"""Manifest splits on the shared data, and VoxCeleb / MUSAN / RIRS_NOISES layouts on fake trees."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from svlib.audio import audio_seconds, load_audio, write_audio
from svlib.corpora.manifest import prepare_manifest
from svlib.corpora.noise import prepare_musan, prepare_rirs
from svlib.corpora.prepare import main
from svlib.corpora.voxceleb import prepare_voxceleb
from svlib.data.lists import DataDir, ListError, read_audio_list, read_trials

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _need(name: str) -> Path:
    manifest = DATA / name / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"shared data absent: {manifest}")
    return manifest


def _load_split(out: Path) -> dict[str, DataDir]:
    # Paths are written relative to the repo root, so resolve them from there.
    return {s: DataDir.load(out / s, check_files=True, root=REPO) for s in ("train", "val", "test")}


def _check_common(out: Path, summary: dict, test_trials: int, test_target: int) -> dict[str, DataDir]:
    d = _load_split(out)
    spk = {s: set(x.speakers) for s, x in d.items()}
    assert not spk["train"] & spk["val"] and not spk["train"] & spk["test"] and not spk["val"] & spk["test"]
    assert all(s.startswith("ls") for s in spk["test"]) and len(spk["test"]) == 10

    test = read_trials(out / "test_trials.txt")
    assert (len(test), test.num_target) == (test_trials, test_target)
    assert test.utterances == set(d["test"].utts)
    val = read_trials(out / "val_trials.txt")
    assert val.utterances <= set(d["val"].utts)
    same = [d["val"].utt2spk[e] == d["val"].utt2spk[t] for e, t in zip(val.enroll, val.test)]
    assert np.array_equal(np.asarray(same, dtype=np.int8), val.labels)
    assert len(set(zip(val.enroll, val.test))) == len(val)

    on_disk = json.loads((out / "split_summary.json").read_text())
    assert on_disk == summary
    for s, x in d.items():
        assert summary["splits"][s]["speakers"] == len(x.speakers)
        assert summary["splits"][s]["utterances"] == len(x)
    assert summary["trials"]["test"] == {"trials": test_trials, "target": test_target,
                                         "nontarget": test_trials - test_target}
    assert summary["trials"]["val"]["trials"] == len(val)
    return d


def test_sv_mini_split(tmp_path):
    manifest = _need("sv-mini")
    summary = prepare_manifest(manifest, tmp_path / "mini", seed=0, relative_to=REPO, verbose=False)
    d = _check_common(tmp_path / "mini", summary, 435, 30)
    # No train-clean-100 in sv-mini: val is 6 Arabic speakers with all 4 words each, all pairs.
    assert len(d["val"].speakers) == 6 and len(d["val"]) == 24
    assert summary["trials"]["val"] == {"trials": 276, "target": 36, "nontarget": 240}
    assert (len(d["train"].speakers), len(d["train"])) == (24, 96)
    # Written relative to the repo root (portable), resolved against it on load.
    scp = (tmp_path / "mini" / "train" / "wav.scp").read_text().splitlines()
    assert len(scp) == 96 and all(line.split()[1].startswith("../shared/data/sv-mini/arabic_sc/") for line in scp)
    assert all(p.startswith(str(REPO)) for p in d["train"].wavs.values())
    assert summary["unused"]["utterances"] == 0


def test_sv_bench_split(tmp_path):
    manifest = _need("sv-bench")
    summary = prepare_manifest(manifest, tmp_path / "bench", seed=0, relative_to=REPO, verbose=False)
    d = _check_common(tmp_path / "bench", summary, 4950, 450)
    val, train = d["val"], d["train"]
    assert len(val.speakers) == 46 and summary["val_composition"]["long_speakers"] == 40
    assert len(train.speakers) == 235 and len(train) == 211 + 24 * 102
    vt = summary["trials"]["val"]
    assert vt["nontarget"] == 10 * vt["target"]
    assert summary["unused"]["utterances"] == 6 * (102 - 10)

    # Pieces of one recording: >= 3 s, non-overlapping, inside the file; loading reads exactly that span.
    by_rec: dict[str, list[tuple[float, float]]] = {}
    for utt, rec in val.utt2rec.items():
        by_rec.setdefault(rec, []).append(val.segments[utt])
    long_recs = [r for r in by_rec if r.startswith("ls")]
    assert len(long_recs) == 40
    for rec in long_recs:
        spans = sorted(by_rec[rec])
        assert len(spans) >= 2 and all(e - s >= 3.0 for s, e in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    utt = sorted(u for u in val.utts if u.startswith("ls"))[1]
    start, end = val.segments[utt]
    wave = val.load_wave(utt)
    assert len(wave) == round(end * 16000) - round(start * 16000)
    path = REPO / val.wavs[utt]
    full, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_array_equal(wave, full[round(start * 16000):round(end * 16000)])
    assert full.shape[0] / 16000 >= max(e for _, e in by_rec[val.utt2rec[utt]])


def test_split_is_deterministic_for_a_seed(tmp_path):
    manifest = _need("sv-bench")
    kw = dict(relative_to=REPO, verbose=False)
    prepare_manifest(manifest, tmp_path / "a", seed=3, **kw)
    prepare_manifest(manifest, tmp_path / "b", seed=3, **kw)
    prepare_manifest(manifest, tmp_path / "c", seed=4, **kw)
    for name in ("val/segments", "val_trials.txt", "train/utt2spk", "test_trials.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "val/utt2spk").read_bytes() != (tmp_path / "c" / "val/utt2spk").read_bytes()
    assert (tmp_path / "a" / "test_trials.txt").read_bytes() == (tmp_path / "c" / "test_trials.txt").read_bytes()


def test_manifest_errors_name_line(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,speaker,source,licence,seconds,sample_rate\n"
                        "librispeech_test-other/1/a.flac,ls1,x,y,2.0,16000\n"
                        "arabic_sc/2/b.wav,asc2,x,y,abc,16000\n")
    with pytest.raises(ListError, match=rf"{manifest}:3: seconds must be a number"):
        prepare_manifest(manifest, tmp_path / "out", verbose=False)
    manifest.write_text("path,speaker,seconds\nlibrispeech_test-other/1/a.flac,ls1,2\n/abs/b.wav,s,1\n")
    with pytest.raises(ListError, match=rf"{manifest}:3: path must be relative"):
        prepare_manifest(manifest, tmp_path / "out", verbose=False)
    manifest.write_text("path,speaker\na.wav,s\n")
    with pytest.raises(ListError, match=rf"{manifest}:1: header lacks column\(s\) \['seconds'\]"):
        prepare_manifest(manifest, tmp_path / "out", verbose=False)


def test_cli_manifest(tmp_path, capsys):
    manifest = _need("sv-mini")
    assert main(["--relative-to", str(REPO), "manifest", "--manifest", str(manifest), "--out", str(tmp_path / "m")]) == 0
    table = capsys.readouterr().out
    assert "test" in table and "435" in table
    assert main(["manifest", "--manifest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "m")]) == 2
    assert "manifest not found" in capsys.readouterr().err


# ---- corpus layouts on fake trees ------------------------------------------------------------------
def _tiny(path: Path, seconds: float = 0.1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.zeros(int(16000 * seconds), dtype=np.float32), 16000)


def test_voxceleb_layout(tmp_path):
    vox1 = tmp_path / "vox1" / "wav"
    for spk, video, n in (("id10270", "x6uYqmx31kE", 2), ("id10270", "8jEAjG6SegY", 1), ("id10300", "ize_eiCFEg0", 1)):
        for i in range(1, n + 1):
            _tiny(vox1 / spk / video / f"{i:05d}.wav")
    (vox1 / "readme.txt").write_text("not a speaker")
    (vox1 / "id10300" / "ize_eiCFEg0" / "notes.txt").write_text("skip me")
    vox2 = tmp_path / "vox2" / "aac" / "id00012" / "21Uxsk56VDQ"
    vox2.mkdir(parents=True)
    write_audio(vox2 / "00001.m4a", np.zeros(1600, dtype=np.float32))  # real AAC: decoded by the first-file check

    d = prepare_voxceleb([vox1, tmp_path / "vox2" / "aac"], tmp_path / "out", relative_to=tmp_path)
    assert d.utts == ["id00012/21Uxsk56VDQ/00001.m4a", "id10270/8jEAjG6SegY/00001.wav",
                      "id10270/x6uYqmx31kE/00001.wav", "id10270/x6uYqmx31kE/00002.wav",
                      "id10300/ize_eiCFEg0/00001.wav"]
    assert d.speakers == ["id00012", "id10270", "id10300"]
    assert d.wavs["id10270/x6uYqmx31kE/00002.wav"] == "vox1/wav/id10270/x6uYqmx31kE/00002.wav"
    back = DataDir.load(tmp_path / "out", check_files=True, root=tmp_path)
    assert back.spk2utt["id10270"] == d.spk2utt["id10270"]
    assert back.durations == pytest.approx({**{u: 0.1 for u in d.utts}, "id00012/21Uxsk56VDQ/00001.m4a": 0.164})
    assert back.load_wave("id10300/ize_eiCFEg0/00001.wav").shape == (1600,)
    with pytest.raises(ListError, match="no .wav"):
        prepare_voxceleb(tmp_path / "vox2" / "aac", extensions=(".wav",))
    with pytest.raises(ListError, match="also found under"):
        prepare_voxceleb([vox1, vox1])


def test_musan_layout(tmp_path):
    root = tmp_path / "musan"
    for rel in ("noise/free-sound/noise-free-sound-0000.wav", "noise/sound-bible/noise-sound-bible-0001.wav",
                "music/fma/music-fma-0003.wav", "speech/librivox/speech-librivox-0007.wav"):
        _tiny(root / rel)
    (root / "noise" / "free-sound" / "ANNOTATIONS").write_text("x")
    out = tmp_path / "lists" / "musan.list"
    assert main(["--relative-to", str(tmp_path), "musan", "--root", str(tmp_path), "--out", str(out)]) == 0
    entries = read_audio_list(out)
    assert [(e.name, e.category) for e in entries] == [
        ("music-fma-0003", "music"), ("noise-free-sound-0000", "noise"),
        ("noise-sound-bible-0001", "noise"), ("speech-librivox-0007", "speech")]
    assert entries[0].path == "musan/music/fma/music-fma-0003.wav"
    _tiny(root / "music" / "rfm" / "noise-free-sound-0000.wav")
    with pytest.raises(ListError, match="also used by"):
        prepare_musan(root)


def test_rirs_layout(tmp_path):
    root = tmp_path / "RIRS_NOISES"
    for rel in ("simulated_rirs/smallroom/Room001/Room001-00001.wav",
                "simulated_rirs/smallroom/Room001/Room001-00002.wav",
                "simulated_rirs/largeroom/Room200/Room200-00001.wav",
                "real_rirs_isotropic_noises/RVB2014_type1_rir_largeroom1_near_angla.wav",
                "real_rirs_isotropic_noises/air_type1_air_binaural_lecture_0_1.wav",
                "real_rirs_isotropic_noises/RVB2014_type1_noise_largeroom1_1.wav",
                "pointsource_noises/noise-free-sound-0001.wav"):
        _tiny(root / rel)
    (root / "simulated_rirs" / "smallroom" / "rir_list").write_text("not a room")
    entries = prepare_rirs(root, tmp_path / "rirs.list", relative_to=tmp_path)
    assert [(e.name, e.category) for e in entries] == [
        ("largeroom-Room200-Room200-00001", "largeroom"),
        ("real-RVB2014_type1_rir_largeroom1_near_angla", "real"),
        ("real-air_type1_air_binaural_lecture_0_1", "real"),
        ("smallroom-Room001-Room001-00001", "smallroom"),
        ("smallroom-Room001-Room001-00002", "smallroom")]
    assert read_audio_list(tmp_path / "rirs.list") == entries
    assert entries[0].path == "RIRS_NOISES/simulated_rirs/largeroom/Room200/Room200-00001.wav"
    with pytest.raises(ListError, match="no RIRs"):
        prepare_rirs(tmp_path / "empty")


# ---- VoxCeleb2 AAC, hold-out, first-file check ------------------------------------------------------------
@pytest.fixture(scope="module")
def speech_pieces() -> list[np.ndarray]:
    """Sixteen 1-s pieces of real speech (sv-mini, LibriSpeech test-other), to encode as AAC."""
    flacs = sorted((DATA / "sv-mini" / "librispeech_test-other").rglob("*.flac"))
    if not flacs:
        pytest.skip("sv-mini absent")
    pieces = []
    for flac in flacs:
        wave, _ = sf.read(str(flac), dtype="float32")
        pieces += [wave[i:i + 16000] for i in range(0, len(wave) - 16000, 16000)]
        if len(pieces) >= 16:
            return pieces[:16]
    pytest.skip("not enough sv-mini speech")


def _fake_vox2(root: Path, pieces: list[np.ndarray]) -> Path:
    """VoxCeleb2 dev layout: 8 speakers x 2 videos x 1-2 AAC .m4a files (id00012/<video>/00001.m4a)."""
    aac = root / "vox2" / "dev" / "aac"
    k = 0
    for s in range(8):
        for v in range(2):
            folder = aac / f"id{12 + s:05d}" / f"vid{s}{v}aBcD_e"
            folder.mkdir(parents=True)
            for i in range(1 + (s + v) % 2):
                write_audio(folder / f"{i + 1:05d}.m4a", pieces[k % len(pieces)] * (0.5 + 0.05 * i))
                k += 1
    return aac


def test_voxceleb2_aac_holdout_is_speaker_disjoint(tmp_path, speech_pieces):
    aac = _fake_vox2(tmp_path, speech_pieces)
    data = tmp_path / "data"
    code = main(["--relative-to", str(tmp_path), "voxceleb", "--root", str(aac), "--out", str(data / "vox2_dev"),
                 "--val-speakers", "3", "--val-out", str(data / "vox2_val"), "--val-trials", "12", "--seed", "4",
                 "--workers", "2"])
    assert code == 0  # the paths experiments/configs/w2vbert/pipeline.yaml reads
    train = DataDir.load(data / "vox2_dev", check_files=True, root=tmp_path)
    val = DataDir.load(data / "vox2_val", check_files=True, root=tmp_path)
    trials = read_trials(data / "vox2_val_trials.txt")
    assert (data / "vox2_val_trials.txt").read_text().splitlines()[0].split()[0] in ("0", "1")  # VoxCeleb form
    assert len(train.speakers) == 5 and len(set(val.speakers)) == 3
    assert not set(train.speakers) & set(val.speakers)  # no held-out speaker leaks into training
    files_of = {f"id{12 + s:05d}": sum(1 + (s + v) % 2 for v in range(2)) for s in range(8)}
    assert len(train) == sum(n for spk, n in files_of.items() if spk not in val.speakers)
    assert trials.utterances == set(val.utts)
    assert len(trials) == 12 and trials.num_target == 6
    for e, t, label in zip(trials.enroll, trials.test, trials.labels):
        assert label == (val.utt2spk[e] == val.utt2spk[t]) and e != t
        if label:  # each speaker has 2 videos: target pairs cross videos
            assert e.rsplit("/", 1)[0] != t.rsplit("/", 1)[0]
    # utt2dur from container metadata: 1 s + AAC priming, without decoding.
    for utt in train.utts:
        assert train.durations[utt] == pytest.approx(audio_seconds(tmp_path / train.wavs[utt]), abs=1e-4)
        assert 1.0 <= train.durations[utt] <= 1.1
    wave = train.load_wave(train.utts[0], max_seconds=0.5, offset=0.3)
    assert wave.shape == (8000,) and np.abs(wave).max() > 0.01  # AAC speech decodes through the data dir
    summary = json.loads((data / "vox2_val" / "split_summary.json").read_text())
    assert summary["val_speakers"] == 3 and summary["trials"] == {"trials": 12, "target": 6, "nontarget": 6}
    # The same seed gives the same hold-out; another seed another one.
    again = tmp_path / "again"
    prepare_voxceleb(aac, again, relative_to=tmp_path, val_speakers=3, val_trials=12, seed=4, workers=1, progress=False)
    assert Path(f"{again}_val_trials.txt").read_text() == (data / "vox2_val_trials.txt").read_text()
    other = prepare_voxceleb(aac, tmp_path / "other", relative_to=tmp_path, val_speakers=3, val_trials=12, seed=5,
                             workers=1, progress=False)
    assert other.speakers != train.speakers


def test_prepare_fails_at_once_when_the_first_file_cannot_be_decoded(tmp_path, capsys):
    root = tmp_path / "vox2"
    bad = root / "id00012" / "21Uxsk56VDQ" / "00001.m4a"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\0" * 64)
    code = main(["--relative-to", str(tmp_path), "voxceleb", "--root", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith(f"error: {tmp_path / 'out'}: its first file cannot be decoded") and "00001.m4a" in err
    assert not (tmp_path / "out").exists()  # nothing written
    musan = tmp_path / "musan" / "noise" / "free-sound"
    musan.mkdir(parents=True)
    (musan / "noise-free-sound-0000.wav").write_text("not audio")
    _tiny(musan / "noise-free-sound-0001.wav")
    with pytest.raises(ListError, match=r"musan.list: its first file cannot be decoded.*noise-free-sound-0000.wav: "
                                         r"not a readable audio file"):
        prepare_musan(tmp_path / "musan", tmp_path / "musan.list", relative_to=tmp_path)
    assert not (tmp_path / "musan.list").exists()


def test_utt2dur_names_a_broken_file_after_the_first(tmp_path):
    video = tmp_path / "vox2" / "id00012" / "21Uxsk56VDQ"
    video.mkdir(parents=True)
    write_audio(video / "00001.m4a", np.zeros(3200, dtype=np.float32))
    (video / "00002.m4a").write_bytes(b"\0" * 64)
    with pytest.raises(ListError, match=r"utt2dur of 'id00012/21Uxsk56VDQ/00002.m4a': .*00002.m4a: not a readable "
                                         r"audio file"):
        prepare_voxceleb(tmp_path / "vox2", tmp_path / "out", relative_to=tmp_path, workers=1, progress=False)


@pytest.mark.parametrize("module", ["svlib.corpora.prepare", "svlib.data.prepare"])
def test_prepare_command_under_its_new_and_old_module_paths(tmp_path, module):
    """``python -m svlib.data.prepare`` (what users' scripts call) still runs the command, which now lives in
    ``svlib.corpora.prepare``: same subcommands, same one-line error and exit code 2."""
    import subprocess
    import sys

    (tmp_path / "musan").mkdir()
    run = [sys.executable, "-m", module]
    out = subprocess.run(run + ["musan", "--root", str(tmp_path / "musan"), "--out", str(tmp_path / "m.list")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == f"error: {tmp_path / 'musan'}: no MUSAN files in {{noise,music,speech}}/<sub>/*.wav\n"
    listed = subprocess.run(run + ["-h"], capture_output=True, text=True, timeout=120, cwd=REPO).stdout
    assert "{manifest,voxceleb,cnceleb,musan,rirs,demo,esc10,simrirs,demo-table}" in listed
