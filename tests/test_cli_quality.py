"""Input the CLI embeds but reports: narrow-band audio (``svlib.audio.is_narrowband``: noted by embed, score
and calibrate-model, flagged in the embeddings file, refused by verify unless the calibration was fitted on it
or ``--allow-narrowband``) and audio data cut short of its header (``AudioInfo.truncated``: warned about and
flagged). Real speech: the shared sv-mini files, as they are and resampled to 8 kHz with soxr."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from svlib.audio import (NARROWBAND_MAX_FRACTION, NARROWBAND_NOTE, audio_info, highband_fraction, is_narrowband,
                         load_audio)
from svlib.cli import main
from svlib.data.lists import DataDir, Trials, write_trials
from svlib.model.speaker import save_model
from svlib.package import calibrated_on_narrowband
from svlib.scoring.calibration import load_calibration
from svlib.scoring.enroll import with_enroll_models
from svlib.scoring.metrics import EmbeddingTable, load_embeddings, save_embeddings

from test_speaker import tiny_model

SR = 16000


def _via_8k(wave: np.ndarray) -> np.ndarray:
    """16 kHz speech resampled to 8 kHz and back with soxr: a telephone-band recording played at 16 kHz."""
    return soxr.resample(soxr.resample(wave, SR, 8000, quality="HQ"), 8000, SR, quality="HQ")


def _truncated_wav(path: Path, wave: np.ndarray, keep_seconds: float) -> Path:
    """A 16-bit WAV of ``wave`` whose bytes are cut after ``keep_seconds`` of data: the header still declares
    the whole length (what a cut download or copy leaves)."""
    sf.write(path, wave, SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[:44 + 2 * int(keep_seconds * SR)])  # 44-byte canonical header, 2 bytes a frame
    return path


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------ the measures


def test_narrowband_measure_on_sv_mini(sv_mini):
    """Every sv-mini FLAC (LibriSpeech, 16 kHz) is wide-band; the same file through 8 kHz is narrow-band,
    both with a wide margin to the threshold (the docstring of is_narrowband gives the wider survey)."""
    flacs = sorted(sv_mini.rglob("*.flac"))
    assert len(flacs) == 30
    wide, narrow = [], []
    for path in flacs:
        wave = load_audio(path)
        wide.append(highband_fraction(wave))
        narrow.append(highband_fraction(_via_8k(wave)))
        assert not is_narrowband(wave, SR), path
        assert is_narrowband(_via_8k(wave), SR), path
        assert is_narrowband(wave, 8000)  # a file stored at 8 kHz, whatever its content after upsampling
    assert min(wide) > 100 * NARROWBAND_MAX_FRACTION * 1000  # lowest 4.9e-3
    assert max(narrow) < NARROWBAND_MAX_FRACTION / 5         # highest 1.1e-9
    assert not is_narrowband(np.zeros(SR, dtype=np.float32), SR)  # silence carries no evidence either way


def test_truncated_wav_header_is_detected(tmp_path):
    wave = 0.1 * np.random.default_rng(0).standard_normal(int(2.8 * SR)).astype(np.float32)
    info = audio_info(_truncated_wav(tmp_path / "cut.wav", wave, 0.95))
    assert info.truncated and info.declared_seconds == pytest.approx(2.8) and info.seconds == pytest.approx(0.95)
    assert len(load_audio(tmp_path / "cut.wav")) == int(0.95 * SR)  # the frames present are read
    sf.write(tmp_path / "whole.wav", wave, SR, subtype="PCM_16")
    assert not audio_info(tmp_path / "whole.wav").truncated
    # a WAV streamed to a pipe declares 0xFFFFFFFF data bytes: an unknown length, not a cut file
    streamed = bytearray((tmp_path / "whole.wav").read_bytes())
    streamed[40:44] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    assert not audio_info(tmp_path / "streamed.wav").truncated


def test_flags_in_embeddings_files(tmp_path):
    """Flags survive save/load, pickling and enrolment models; files without them load as 'unknown'."""
    rng = np.random.default_rng(0)
    save_embeddings(tmp_path / "old.npz", ["a", "b"], rng.normal(size=(2, 4)))
    old = load_embeddings(tmp_path / "old.npz")
    assert old.flag("narrowband") is None and old.flagged("narrowband") == []
    save_embeddings(tmp_path / "new.npz", ["a", "b", "c"], rng.normal(size=(3, 4)),
                    flags={"narrowband": [False, True, False], "truncated": [True, False, False]})
    new = load_embeddings(tmp_path / "new.npz")
    assert new.flag("narrowband").tolist() == [False, True, False] and new.flagged("truncated") == ["a"]
    assert pickle.loads(pickle.dumps(new)).flagged("narrowband") == ["b"]
    trials = Trials(["m1", "m2"], ["c", "c"], np.array([1, 0], dtype=np.int8))
    table = with_enroll_models(new, {"m1": ["a", "b"], "m2": ["a"]}, trials)
    assert table.flagged("narrowband") == ["m1"] and table.flagged("truncated") == ["m1", "m2"]
    with pytest.raises(ValueError, match="flag 'loud' must be one of"):
        EmbeddingTable(["a"], np.ones((1, 4)), flags={"loud": [True]})


def test_calibrated_on_narrowband_needs_a_majority():
    assert not calibrated_on_narrowband({})
    assert not calibrated_on_narrowband({"narrowband": {"utterances": 1, "of": 3}})
    assert calibrated_on_narrowband({"narrowband": {"utterances": 2, "of": 3}})
    assert not calibrated_on_narrowband({"narrowband": {"utterances": True, "of": 0}})


# ------------------------------------------------------------------------------------ the commands


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sv_mini):
    """A tiny model; two LibriSpeech files; one of them through 8 kHz (as a 16 kHz FLAC); a WAV whose header
    declares 2.8 s of another file but holds 0.95 s."""
    tmp = tmp_path_factory.mktemp("cliquality")
    save_model(tiny_model(), tmp / "model", {})
    flacs = sorted(sv_mini.rglob("*.flac"))
    wide = [flacs[0], flacs[10]]
    sf.write(tmp / "narrow.flac", _via_8k(load_audio(flacs[0])), SR)
    cut = _truncated_wav(tmp / "cut.wav", load_audio(flacs[20])[: int(2.8 * SR)], 0.95)
    return tmp, {"wide0": str(wide[0]), "wide1": str(wide[1]), "narrow": str(tmp / "narrow.flac"), "cut": str(cut)}


def test_embed_and_score_report_narrowband_and_truncated(setup, capsys):
    tmp, files = setup
    (tmp / "wav.scp").write_text("".join(f"{u} {p}\n" for u, p in files.items()))
    out = tmp / "emb.npz"
    code, stdout, err = _run(["embed", "--model", tmp / "model", "--scp", tmp / "wav.scp", "--out", out,
                              "--no-progress"], capsys)
    assert code == 0 and "wrote 4 embeddings" in stdout, err
    assert err.splitlines() == [
        f"svlib: warning: {files['cut']}: truncated audio data: the header declares 2.80 s, the file holds 0.95 s; "
        "using the 0.95 s present",
        f"svlib: note: 1 of 4 input(s) are {NARROWBAND_NOTE}: {files['narrow']}; flagged 'narrowband' in {out}"]
    table = load_embeddings(out)
    assert table.flagged("narrowband") == ["narrow"] and table.flagged("truncated") == ["cut"]
    assert table.flag("narrowband").shape == (4,)
    assert table.durations[table.index["cut"]] == pytest.approx(0.95)

    # score names the narrow-band trial utterances
    (tmp / "trials.txt").write_text("1 wide0 narrow\n0 wide1 narrow\n0 wide0 wide1\n1 wide0 cut\n")
    code, _, err = _run(["score", "--trials", tmp / "trials.txt", "--embeddings", out], capsys)
    assert code == 0
    assert err.splitlines() == [f"svlib: note: 1 of 4 input(s) are {NARROWBAND_NOTE}: narrow (flagged in {out})"]

    # --windowed: a file is flagged when any of its windows is
    code, _, err = _run(["embed", "--model", tmp / "model", "--wav", files["narrow"], files["wide1"], "--out",
                         tmp / "win.npz", "--windowed", "--max-seconds", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert load_embeddings(tmp / "win.npz").flagged("narrowband") == [files["narrow"]]


def _calibrate(tmp: Path, files: dict[str, tuple[str, str]], name: str, capsys):
    data = DataDir(wavs={u: p for u, (_, p) in files.items()}, utt2spk={u: s for u, (s, _) in files.items()})
    data.write(tmp / f"data_{name}")
    utts = sorted(files)
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:]]
    write_trials(tmp / f"trials_{name}.txt", Trials([a for a, _ in pairs], [b for _, b in pairs],
                                                    np.array([files[a][0] == files[b][0] for a, b in pairs], np.int8)))
    save_model(tiny_model(), tmp / name, {})
    code, out, err = _run(["calibrate-model", "--model", tmp / name, "--data", tmp / f"data_{name}", "--trials",
                           tmp / f"trials_{name}.txt", "--no-progress"], capsys)
    assert code == 0, err
    return load_calibration(tmp / name / "calibration.json"), err


def test_verify_on_narrowband_input(setup, sv_mini, capsys):
    """Wide-band calibration: refused without --allow-narrowband, decided with it; a calibration fitted on
    8 kHz files records that, and verify then decides on narrow-band input without the flag."""
    tmp, files = setup
    speakers = sorted((sv_mini / "arabic_sc").iterdir())[:4]
    wide = {f"{s.name}-{w.stem}": (s.name, str(w)) for s in speakers for w in sorted(s.glob("*.wav"))[:3]}
    cal, err = _calibrate(tmp, wide, "wide_model", capsys)
    assert cal.meta["narrowband"] == {"utterances": 0, "of": 12} and err == ""

    argv = ["verify", "--model", tmp / "wide_model", files["wide0"], files["narrow"]]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == "" and "refusing a decision" in err
    code, out, err = _run([*argv, "--allow-narrowband"], capsys)
    assert code == 0 and "decision" in out
    assert err.splitlines() == [f"svlib: note: 1 of 2 input(s) are {NARROWBAND_NOTE}: {files['narrow']}; deciding "
                                "anyway (--allow-narrowband)"]

    # LibriSpeech speakers stored at 8 kHz (on which the tiny random model's scores still rise with the
    # speaker: a positive calibration slope): the calibration is fitted on narrow-band trials and says so
    narrow = {}
    for spk in sorted((sv_mini / "librispeech_test-other").iterdir())[:4]:
        for flac in sorted(spk.glob("*.flac"))[:3]:
            sf.write(tmp / f"{flac.stem}.wav", soxr.resample(load_audio(flac), SR, 8000), 8000)
            narrow[flac.stem] = (spk.name, str(tmp / f"{flac.stem}.wav"))
    cal, err = _calibrate(tmp, narrow, "narrow_model", capsys)
    assert cal.meta["narrowband"] == {"utterances": 12, "of": 12}
    names = ", ".join(sorted(narrow)[:5])
    assert err.splitlines() == [f"svlib: note: 12 of 12 input(s) are {NARROWBAND_NOTE}: {names} and 7 more "
                                f"(recorded in {tmp / 'narrow_model' / 'calibration.json'})"]
    a, b = narrow[sorted(narrow)[0]][1], narrow[sorted(narrow)[5]][1]
    code, out, err = _run(["verify", "--model", tmp / "narrow_model", a, b], capsys)
    assert code == 0 and "decision" in out
    assert err.splitlines() == [f"svlib: note: 2 of 2 input(s) are {NARROWBAND_NOTE}: {a}, {b}; deciding anyway "
                                "(the calibration was fitted on narrow-band trials)"]


def test_resumed_embed_keeps_the_flags(setup, capsys, monkeypatch):
    """Flags of the utterances embedded before an interruption come back from the partial checkpoint."""
    import torch

    from svlib.model.speaker import SpeakerModel

    tmp, files = setup
    out = tmp / "resumed.npz"
    # narrow.flac (= wide0 through 8 kHz, longest) is embedded first; the second file fails
    argv = ["embed", "--model", tmp / "model", "--wav", files["narrow"], files["cut"], "--out", out,
            "--checkpoint-every", "1", "--no-progress"]
    forward, calls = SpeakerModel.forward, []

    def dies_on_the_second(self, waves, lengths):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(self, waves, lengths)

    monkeypatch.setattr(SpeakerModel, "forward", dies_on_the_second)
    code, _, err = _run(argv, capsys)
    assert code == 2 and "1 embeddings kept in" in err
    assert load_embeddings(out.with_name(out.name + ".partial.npz")).flagged("narrowband") == [files["narrow"]]
    monkeypatch.setattr(SpeakerModel, "forward", forward)
    code, _, err = _run(argv, capsys)
    assert code == 0 and "1 of 2 utterances already embedded" in err
    table = load_embeddings(out)
    assert table.flagged("narrowband") == [files["narrow"]] and table.flagged("truncated") == [files["cut"]]
