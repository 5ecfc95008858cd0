from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from svlib.audio import AudioError, fit_length, load_audio


def test_loads_real_file_mono_16k(sv_mini):
    path = sv_mini / "librispeech_test-other" / sorted(p.name for p in (sv_mini / "librispeech_test-other").iterdir())[0]
    flac = sorted(path.glob("*.flac"))[0]
    wave = load_audio(flac)
    info = sf.info(str(flac))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == info.frames
    assert np.abs(wave).max() <= 1.0


def test_resamples_and_downmixes(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    path = tmp_path / "stereo8k.wav"
    sf.write(path, stereo, 8000)
    wave = load_audio(path)
    assert len(wave) == 16000
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 2


def test_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "notaudio.wav"
    bad.write_text("this is text")
    with pytest.raises(AudioError, match="notaudio.wav: not a readable audio file"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: empty audio"):
        load_audio(empty)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2], dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: audio contains NaN"):
        load_audio(nan)


def test_fit_length_crop_and_repeat():
    wave = np.arange(10, dtype=np.float32)
    assert fit_length(wave, 25).tolist() == (list(range(10)) * 3)[:25]
    cropped = fit_length(wave, 4, np.random.default_rng(0))
    assert len(cropped) == 4 and cropped[1] - cropped[0] == 1
    assert fit_length(wave, 4).tolist() == [0, 1, 2, 3]


# ---- AAC (VoxCeleb2 .m4a) through PyAV, and partial reads -------------------------------------------
def _speech(sv_mini, seconds: float = 6.0) -> np.ndarray:
    parts = []
    for flac in sorted((sv_mini / "librispeech_test-other").rglob("*.flac")):
        wave, rate = sf.read(str(flac), dtype="float32")
        assert rate == 16000
        parts.append(wave)
        if sum(map(len, parts)) >= seconds * rate:
            break
    return np.concatenate(parts)[: int(seconds * 16000)]


def _best_lag(decoded: np.ndarray, source: np.ndarray, max_lag: int = 2200) -> tuple[int, float]:
    """Lag (in samples) at which ``decoded`` matches ``source`` best, and the correlation there."""
    n = len(source) - max_lag
    scores = [float(np.dot(decoded[k:k + n], source[:n]) / (np.linalg.norm(decoded[k:k + n]) * np.linalg.norm(source[:n])))
              for k in range(max_lag)]
    return int(np.argmax(scores)), max(scores)


@pytest.mark.parametrize("suffix", [".m4a", ".aac"])
def test_aac_decodes_real_speech_and_crops_match_whole_reads(sv_mini, tmp_path, suffix):
    from svlib.audio import audio_info, write_audio

    speech = _speech(sv_mini)
    path = write_audio(tmp_path / f"00001{suffix}", speech)  # real AAC, encoded by FFmpeg's encoder via PyAV
    assert path.read_bytes()[4:8] == b"ftyp" if suffix == ".m4a" else path.read_bytes()[:2] == b"\xff\xf1"
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))  # libsndfile cannot read it: the case issue 10 reported
    info = audio_info(path)
    assert info.backend == "pyav" and info.sample_rate == 16000 and info.channels == 1
    assert abs(info.seconds - len(speech) / 16000) < 0.35  # container metadata: + priming / frame padding
    whole = load_audio(path)
    assert whole.dtype == np.float32 and np.abs(whole).max() <= 1.0
    lag, corr = _best_lag(whole, speech)
    assert lag == 1024 and corr > 0.97  # FFmpeg's AAC priming, then the same waveform (lossy at 64 kbit/s)
    for offset, seconds in ((0.0, 1.5), (2.37, 2.0), (4.9, 3.0)):
        crop = load_audio(path, offset=offset, max_seconds=seconds)
        first = int(round(offset * 16000))
        expect = whole[first:first + int(round(seconds * 16000))]
        assert len(crop) == len(expect)
        np.testing.assert_allclose(crop, expect, atol=1e-6)  # seek + preroll decodes exactly the same samples
    with pytest.raises(AudioError, match=rf"00001{suffix}: read offset 30.000 s lies outside the recording"):
        load_audio(path, offset=30.0, max_seconds=1.0)


def test_aac_resampled_to_16k(sv_mini, tmp_path):
    from svlib.audio import write_audio

    speech = _speech(sv_mini, 3.0)
    import soxr
    at_8k = soxr.resample(speech, 16000, 8000)
    path = write_audio(tmp_path / "8k.m4a", at_8k, sample_rate=8000)
    wave = load_audio(path)
    assert abs(len(wave) - 2 * (len(at_8k) + 1024)) <= 2 * 1024  # 16 kHz, up to a frame of codec padding


def test_pyav_errors_name_the_file_in_one_line(tmp_path):
    from svlib.audio import audio_info

    bad = tmp_path / "id00012" / "broken.m4a"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00\x00\x00\x18ftypM4A not really an mp4 file")
    for fn in (load_audio, audio_info):
        with pytest.raises(AudioError) as err:
            fn(bad)
        message = str(err.value)
        assert message.startswith(f"{bad}: not a readable audio file (") and "\n" not in message


def test_soundfile_crops_seek(tmp_path):
    ramp = (np.arange(48000) / 48000 - 0.5).astype(np.float32)
    path = tmp_path / "ramp.flac"
    sf.write(path, ramp, 16000, subtype="PCM_24")
    crop = load_audio(path, offset=1.25, max_seconds=0.5)
    np.testing.assert_allclose(crop, ramp[20000:28000], atol=1e-6)
    assert len(load_audio(path, offset=2.5)) == 8000  # to the end
    with pytest.raises(AudioError, match="ramp.flac: read offset 3.000 s lies outside"):
        load_audio(path, offset=3.0)
