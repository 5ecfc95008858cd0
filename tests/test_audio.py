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
