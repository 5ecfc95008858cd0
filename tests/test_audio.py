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


# load_audio's stated tolerance: after a seek, AAC frames with noise-substituted (PNS) bands hold other noise
AAC_SEEK_TOLERANCE = 2e-3


def _assert_same_span(crop: np.ndarray, expect: np.ndarray, tolerance: float) -> bool:
    """The crop has the span's length, is aligned to the sample (most samples are bit-identical: a shift of
    even one sample leaves almost none) and differs nowhere by more than ``tolerance``; True if exact."""
    assert len(crop) == len(expect)
    assert np.mean(crop == expect) > 0.8
    np.testing.assert_array_less(np.abs(crop - expect), tolerance + 1e-12)
    return bool(np.array_equal(crop, expect))


def _write_pyav(path, wave: np.ndarray, codec: str):
    """``wave`` as 16-bit PCM into ``codec`` (pcm_s16le, alac; ``aac_no_pns``: AAC with noise substitution
    off) in ``path``'s container, via PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec.removesuffix("_no_pns"), rate=16000, layout="mono")
        if codec == "aac_no_pns":
            stream.options = {"aac_pns": "0"}
        frame = av.AudioFrame.from_ndarray((wave[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("suffix,codec", [(".m4a", "aac"), (".aac", "aac"), (".mka", "aac"), (".flac", None),
                                          (".m4a", "alac"), (".mka", "pcm_s16le"), (".m4a", "aac_no_pns")])
def test_crops_at_random_offsets(sv_mini, tmp_path, suffix, codec):
    """47 random crops against the whole-file read: lossless formats bit-exact; AAC aligned to the sample,
    most crops exact, the rest within AAC_SEEK_TOLERANCE (load_audio's docstring), and exact without noise
    substitution, the one cause. Matroska starts AAC at 64 ms: offsets count from the stream's first
    sample, or every crop was 1024 samples off."""
    from svlib.audio import write_audio

    speech = _speech(sv_mini)
    if codec in (None, "aac"):
        path = write_audio(tmp_path / f"speech{suffix}", speech)
    else:
        path = _write_pyav(tmp_path / f"speech{suffix}", speech, codec)
    whole = load_audio(path)
    rng = np.random.default_rng(1)  # these offsets include one whose crop holds a frame with PNS bands
    offsets, seconds = rng.uniform(0.0, len(whole) / 16000 - 0.1, 47), rng.uniform(0.1, 3.0, 47)
    exact = 0
    for offset, span in zip(offsets, seconds):
        crop = load_audio(path, offset=float(offset), max_seconds=float(span))
        first = int(round(offset * 16000))
        expect = whole[first:first + int(round(span * 16000))]
        exact += _assert_same_span(crop, expect, AAC_SEEK_TOLERANCE if codec == "aac" else 0.0)
    assert exact == 47 if codec != "aac" else exact >= 47 - 47 // 10


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
        _assert_same_span(crop, expect, AAC_SEEK_TOLERANCE)  # seek + preroll: see test_crops_at_random_offsets
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
