"""Kaldi data dirs, trial lists and noise/RIR lists."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from svlib.audio import AudioError
from svlib.data.lists import (
    AudioEntry,
    DataDir,
    ListError,
    Trials,
    read_audio_list,
    read_scp,
    read_segment,
    read_trials,
    write_audio_list,
    write_trials,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VERI_TEST2 = DATA / "voxceleb-trials" / "veri_test2.txt"


def _tone(path: Path, seconds: float, rate: int = 16000) -> np.ndarray:
    """A ramp, so that a slice's first sample tells where it was cut."""
    n = int(round(seconds * rate))
    wave = (np.arange(n) / n * 0.9 - 0.45).astype(np.float32)
    sf.write(str(path), wave, rate, subtype="FLOAT")
    return wave


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


@pytest.fixture
def wav_dir(tmp_path):
    """Four files of two speakers; paths absolute so the tests do not depend on the cwd."""
    audio = tmp_path / "audio"
    audio.mkdir()
    lens = {"a-1": 1.0, "a-2": 0.5, "b-1": 0.75, "b-2": 2.0}
    for utt, sec in lens.items():
        _tone(audio / f"{utt}.wav", sec)
    return audio, lens


# ---- trials ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not VERI_TEST2.is_file(), reason=f"shared data absent: {VERI_TEST2}")
def test_read_scp_keeps_paths_with_spaces_and_names_bad_lines(tmp_path):
    scp = tmp_path / "wav.scp"
    scp.write_text("a /data/my corpus/a.wav\r\n\nb b.flac\n")
    assert read_scp(scp) == {"a": "/data/my corpus/a.wav", "b": "b.flac"}
    scp.write_text("a a.wav\na b.wav\n")
    with pytest.raises(ListError, match=r"wav.scp:2: duplicate key 'a' \(first on line 1\)"):
        read_scp(scp)
    scp.write_text("a a.wav\nlonely\n")
    with pytest.raises(ListError, match=r"wav.scp:2: expected '<utt> <path>'"):
        read_scp(scp)


def test_veri_test2_counts():
    trials = read_trials(VERI_TEST2)
    assert len(trials) == 37611
    assert trials.num_target == 18802 and trials.num_nontarget == 18809
    assert trials.labels.dtype == np.int8
    assert trials.enroll[0] == "id10270/x6uYqmx31kE/00001.wav"
    assert trials.test[0] == "id10270/8jEAjG6SegY/00008.wav"  # no "\r" left from the CRLF ending
    assert all(not u.endswith("\r") for u in trials.utterances)
    assert len(trials.utterances) == 4708


def test_kaldi_form_and_round_trip(tmp_path):
    path = _write(tmp_path / "trials", "u1 u2 target\nu1 u3 nontarget\n\nu2 u3 nontarget\n")
    trials = read_trials(path)
    assert trials.enroll == ["u1", "u1", "u2"] and trials.test == ["u2", "u3", "u3"]
    assert trials.labels.tolist() == [1, 0, 0]
    assert (trials.num_target, trials.num_nontarget) == (1, 2)
    assert trials.utterances == {"u1", "u2", "u3"}
    for form, first in (("voxceleb", "1 u1 u2"), ("kaldi", "u1 u2 target")):
        out = write_trials(tmp_path / f"out.{form}", trials, form=form)
        assert out.read_text().splitlines()[0] == first
        again = read_trials(out)
        assert again.enroll == trials.enroll and again.test == trials.test
        np.testing.assert_array_equal(again.labels, trials.labels)


def test_kaldi_enroll_named_one_is_kaldi_form(tmp_path):
    trials = read_trials(_write(tmp_path / "t", "1 2 target\n0 2 nontarget\n"))
    assert trials.enroll == ["1", "0"] and trials.labels.tolist() == [1, 0]


def test_crlf_and_blank_lines(tmp_path):
    path = _write(tmp_path / "t.txt", "1 a b\r\n\r\n0 a c\r\n   \r\n1 c d\r\n")
    trials = read_trials(path)
    assert trials.test == ["b", "c", "d"] and trials.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize("text,line,what", [
    ("1 a b\n0 a c\n1 a\n", 3, "expected 3 fields"),
    ("1 a b\n2 a c\n", 2, "label must be 0 or 1"),
    ("a b target\na c maybe\n", 2, "'target' or 'nontarget'"),
    ("a b target\n1 a c\n", 2, "'target' or 'nontarget'"),
    ("x a b\n", 1, "neither"),
])
def test_malformed_trial_line_names_file_and_line(tmp_path, text, line, what):
    path = _write(tmp_path / "bad_trials.txt", text)
    with pytest.raises(ListError) as err:
        read_trials(path)
    assert f"{path}:{line}:" in str(err.value) and what in str(err.value)


def test_trials_validate_shapes():
    with pytest.raises(ListError, match="lengths differ"):
        Trials(["a"], ["b", "c"], np.array([1, 0]))
    with pytest.raises(ListError, match="0 or 1"):
        Trials(["a"], ["b"], np.array([2]))


# ---- data dirs -------------------------------------------------------------------------------------
def test_datadir_round_trip(tmp_path, wav_dir):
    audio, lens = wav_dir
    d = DataDir(wavs={u: str(audio / f"{u}.wav") for u in lens}, utt2spk={u: u[0] for u in lens},
                durations=dict(lens))
    d.write(tmp_path / "dd")
    assert (tmp_path / "dd" / "spk2utt").read_text() == "a a-1 a-2\nb b-1 b-2\n"
    assert not (tmp_path / "dd" / "segments").exists()
    back = DataDir.load(tmp_path / "dd", check_files=True)
    assert back == d
    assert back.speakers == ["a", "b"] and back.spk2utt == {"a": ["a-1", "a-2"], "b": ["b-1", "b-2"]}
    assert back.seconds("b-1") == 0.75
    assert back.load_wave("b-2").shape == (32000,)
    assert back.load_wave("b-2", max_seconds=0.25).shape == (4000,)
    sub = back.subset(["a-2", "b-2"])
    assert sub.utts == ["a-2", "b-2"] and sub.durations == {"a-2": 0.5, "b-2": 2.0}
    with pytest.raises(ListError, match="unknown utterance 'zz'"):
        back.subset(["zz"])


def test_seconds_from_header_without_utt2dur(tmp_path, wav_dir):
    audio, lens = wav_dir
    d = DataDir(wavs={u: str(audio / f"{u}.wav") for u in lens}, utt2spk={u: u[0] for u in lens})
    assert [d.seconds(u) for u in sorted(lens)] == [1.0, 0.5, 0.75, 2.0]


def test_relative_paths_resolve_against_cwd_or_root(tmp_path, wav_dir, monkeypatch):
    audio, _ = wav_dir
    dd = tmp_path / "rel"
    dd.mkdir()
    _write(dd / "wav.scp", "a-1 audio/a-1.wav\n")
    _write(dd / "utt2spk", "a-1 a\n")
    assert DataDir.load(dd, check_files=True, root=tmp_path).load_wave("a-1").shape == (16000,)
    monkeypatch.chdir(tmp_path)
    assert DataDir.load(dd, check_files=True).wavs["a-1"] == "audio/a-1.wav"
    monkeypatch.chdir(audio)
    with pytest.raises(ListError) as err:
        DataDir.load(dd, check_files=True)
    assert f"{dd / 'wav.scp'}:1:" in str(err.value) and "not found" in str(err.value)


def test_segments_load_the_right_samples(tmp_path):
    rec = _tone(tmp_path / "long.wav", 4.0)
    low = _tone(tmp_path / "low.wav", 2.0, rate=8000)
    dd = tmp_path / "seg"
    dd.mkdir()
    _write(dd / "wav.scp", f"long {tmp_path / 'long.wav'}\nlow {tmp_path / 'low.wav'}\n")
    _write(dd / "segments", "s1 long 0.5 1.25\ns2 long 1.25 4.0\ns3 long 3.5 -1\ns4 low 1.0 1.5\n")
    _write(dd / "utt2spk", "s1 x\ns2 x\ns3 x\ns4 y\n")
    d = DataDir.load(dd, check_files=True)
    assert d.wavs["s1"] == d.wavs["s2"] == str(tmp_path / "long.wav")
    assert d.segments["s3"] == (3.5, None)
    s1 = d.load_wave("s1")
    assert s1.shape == (12000,)
    np.testing.assert_array_equal(s1, rec[8000:20000])
    assert d.load_wave("s2").shape == (44000,)
    assert d.load_wave("s2", max_seconds=1.0).shape == (16000,)
    np.testing.assert_array_equal(d.load_wave("s3"), rec[56000:])
    assert d.load_wave("s4").shape == (8000,)  # 0.5 s at 8 kHz -> 16 kHz
    assert [d.seconds(u) for u in ("s1", "s2", "s3", "s4")] == [0.75, 2.75, 0.5, 0.5]
    assert len(low) == 16000

    d.write(tmp_path / "seg2")
    assert (tmp_path / "seg2" / "wav.scp").read_text().splitlines()[0] == f"long {tmp_path / 'long.wav'}"
    assert (tmp_path / "seg2" / "segments").read_text().splitlines()[2] == "s3 long 3.500 -1"
    assert DataDir.load(tmp_path / "seg2") == d
    # Writing the unsegmented subset over it must not leave the old segments file behind.
    plain = DataDir(wavs={"u": str(tmp_path / "long.wav")}, utt2spk={"u": "x"})
    plain.write(tmp_path / "seg2")
    assert DataDir.load(tmp_path / "seg2") == plain


def test_segment_outside_recording(tmp_path):
    _tone(tmp_path / "short.wav", 1.0)
    with pytest.raises(AudioError, match="outside the recording"):
        read_segment(tmp_path / "short.wav", 0.5, 1.5)
    with pytest.raises(AudioError, match="outside the recording"):
        read_segment(tmp_path / "short.wav", 1.0, None)


def _dir(tmp_path: Path, **files: str) -> Path:
    dd = tmp_path / "d"
    dd.mkdir(exist_ok=True)
    for name, text in files.items():
        _write(dd / name, text)
    return dd


def test_missing_audio_file_names_scp_line(tmp_path, wav_dir):
    audio, _ = wav_dir
    dd = _dir(tmp_path, **{"wav.scp": f"a-1 {audio}/a-1.wav\na-9 {audio}/nope.wav\n", "utt2spk": "a-1 a\na-9 a\n"})
    assert len(DataDir.load(dd)) == 2  # existence is only checked on request
    with pytest.raises(ListError) as err:
        DataDir.load(dd, check_files=True)
    msg = str(err.value)
    assert f"{dd / 'wav.scp'}:2:" in msg and "'a-9'" in msg and "nope.wav" in msg


def test_utt_missing_from_utt2spk(tmp_path):
    dd = _dir(tmp_path, **{"wav.scp": "u1 x.wav\nu2 y.wav\nu3 z.wav\n", "utt2spk": "u1 s\nu3 s\n"})
    with pytest.raises(ListError) as err:
        DataDir.load(dd)
    msg = str(err.value)
    assert f"{dd / 'wav.scp'}:2:" in msg and "'u2'" in msg and "utt2spk" in msg


def test_utt_missing_from_wav_scp(tmp_path):
    dd = _dir(tmp_path, **{"wav.scp": "u1 x.wav\n", "utt2spk": "u1 s\nu2 s\n"})
    with pytest.raises(ListError) as err:
        DataDir.load(dd)
    assert f"{dd / 'utt2spk'}:2:" in str(err.value) and "'u2'" in str(err.value)


@pytest.mark.parametrize("name", ["wav.scp", "utt2spk"])
def test_duplicate_key_names_line(tmp_path, name):
    files = {"wav.scp": "u1 x.wav\nu2 y.wav\n", "utt2spk": "u1 s\nu2 s\n"}
    files[name] += "u1 again\n"
    dd = _dir(tmp_path, **files)
    with pytest.raises(ListError) as err:
        DataDir.load(dd)
    assert f"{dd / name}:3: duplicate key 'u1' (first on line 1)" in str(err.value)


@pytest.mark.parametrize("name,text,line", [
    ("wav.scp", "u1 x.wav\nu2\n", 2),
    ("utt2spk", "u1 s\nu2 s extra\n", 2),
    ("segments", "u1 r 0 1\nu2 r 1\n", 2),
    ("segments", "u1 r 0 abc\nu2 r 1 2\n", 1),
    ("segments", "u1 r 0 1\nu2 r 2 1\n", 2),
    ("segments", "u1 r 0 1\nu2 other 1 2\n", 2),
    ("utt2dur", "u1 1.0\nu2 -3\n", 2),
    ("spk2utt", "s u1\nt u2\n", 2),
])
def test_malformed_lines_name_file_and_line(tmp_path, name, text, line):
    files = {"wav.scp": "u1 x.wav\nu2 y.wav\n", "utt2spk": "u1 s\nu2 s\n"}
    if name == "segments":
        files["wav.scp"] = "r x.wav\n"
    files[name] = text
    dd = _dir(tmp_path, **files)
    with pytest.raises(ListError) as err:
        DataDir.load(dd)
    assert f"{dd / name}:{line}:" in str(err.value)


def test_wav_scp_path_may_contain_spaces_but_not_pipes(tmp_path):
    dd = _dir(tmp_path, **{"wav.scp": "u1 my audio/x y.wav\n", "utt2spk": "u1 s\n"})
    assert DataDir.load(dd).wavs["u1"] == "my audio/x y.wav"
    _write(dd / "wav.scp", "u1 sox x.wav -t wav - |\n")
    with pytest.raises(ListError, match=r"wav.scp:1: command pipes"):
        DataDir.load(dd)


def test_constructor_rejects_inconsistent_tables():
    with pytest.raises(ListError, match="'b'"):
        DataDir(wavs={"a": "a.wav", "b": "b.wav"}, utt2spk={"a": "s"})
    with pytest.raises(ListError, match="whitespace"):
        DataDir(wavs={"a b": "a.wav"}, utt2spk={"a b": "s"})
    with pytest.raises(ListError, match="two paths"):
        DataDir(wavs={"a": "1.wav", "b": "2.wav"}, utt2spk={"a": "s", "b": "s"},
                segments={"a": (0.0, 1.0), "b": (1.0, 2.0)}, utt2rec={"a": "r", "b": "r"})


# ---- noise / RIR lists -----------------------------------------------------------------------------
def test_audio_list_round_trip_and_errors(tmp_path):
    entries = [AudioEntry("n2", "music", "m/n2.wav"), AudioEntry("n1", "noise", "n/n1.wav")]
    path = write_audio_list(tmp_path / "noise.list", entries)
    assert path.read_text() == "n1 noise n/n1.wav\nn2 music m/n2.wav\n"
    assert read_audio_list(path) == sorted(entries)
    _write(path, "n1 noise a.wav\nn1 music b.wav\n")
    with pytest.raises(ListError, match=rf"{path}:2: duplicate name 'n1'"):
        read_audio_list(path)
    _write(path, "n1 noise\n")
    with pytest.raises(ListError, match=rf"{path}:1: expected 3 fields"):
        read_audio_list(path)
    _write(path, "n1 noise /no/such.wav\n")
    with pytest.raises(ListError, match=rf"{path}:1: audio file of 'n1' not found"):
        read_audio_list(path, check_files=True)


# ---- parsing speed: canonical lists take one split per file, others the line parser ---------------------
def test_canonical_lists_parse_without_the_line_parser(tmp_path, monkeypatch):
    """Lists as svlib/Kaldi write them (30k lines here; 1.1M in bench/scale.py) never reach the per-line
    parser, and give what it gives."""
    import svlib.data.lists as lists

    n = 30_000
    utts = [f"id{i // 50:05d}/vid{i % 7}/{i:05d}.m4a" for i in range(n)]
    d = DataDir(wavs={u: f"vox2/aac/{u}" for u in utts}, utt2spk={u: u.split("/")[0] for u in utts},
                durations={u: 1.0 + (i % 89) / 8 for i, u in enumerate(utts)})
    d.write(tmp_path / "big")
    slow = lists._read_table_by_line
    monkeypatch.setattr(lists, "_read_table_by_line", lambda *a: pytest.fail("line parser used on a canonical list"))
    fast = DataDir.load(tmp_path / "big")
    assert fast == d and fast.durations == d.durations
    # The line parser (blank lines, tabs, several spaces, trailing blanks) agrees on a non-canonical copy.
    monkeypatch.setattr(lists, "_read_table_by_line", slow)
    messy = tmp_path / "messy"
    messy.mkdir()
    for name in ("wav.scp", "utt2spk", "utt2dur"):
        lines = (tmp_path / "big" / name).read_text().splitlines()
        (messy / name).write_text("\n".join(f"{line.replace(' ', chr(9) + '  ', 1)} \n" for line in lines[:500]) + "\n\n")
    assert DataDir.load(messy) == d.subset(sorted(d.utts)[:500])


@pytest.mark.parametrize("text, error", [
    ("a x\nb y z\nc\n", r"utt2spk:2: expected 2 fields '<utt> <speaker>', got 3"),  # 3 + 1 fields: 2 per line on average
    ("a x\nb y\na z\n", r"utt2spk:3: duplicate key 'a' \(first on line 1\)"),
    ("a x\nb\ty w\n", r"utt2spk:2: expected 2 fields"),
])
def test_fast_path_still_names_the_bad_line(tmp_path, text, error):
    dd = _dir(tmp_path, **{"wav.scp": "a a.wav\nb b.wav\nc c.wav\n", "utt2spk": text})
    with pytest.raises(ListError, match=error):
        DataDir.load(dd)


def test_bad_durations_and_missing_utterances_name_their_line(tmp_path):
    dd = _dir(tmp_path, **{"wav.scp": "a a.wav\nb b.wav\n", "utt2spk": "a x\nb y\n", "utt2dur": "a 1.5\nb -2\n"})
    with pytest.raises(ListError, match=r"utt2dur:2: duration must be positive, got '-2'"):
        DataDir.load(dd)
    _write(dd / "utt2dur", "a 1.5\nb one\n")
    with pytest.raises(ListError, match=r"utt2dur:2: duration must be a number, got 'one'"):
        DataDir.load(dd)
    _write(dd / "utt2dur", "a 1.5\n")
    _write(dd / "utt2spk", "b y\na x\nc z\n")
    with pytest.raises(ListError, match=r"utt2spk:3: utterance 'c' is missing from .*wav.scp"):
        DataDir.load(dd)
    with pytest.raises(ListError, match="speaker of 'b' 'y z' is empty or contains whitespace"):
        DataDir(wavs={"a": "a.wav", "b": "b.wav"}, utt2spk={"a": "x", "b": "y z"})
