"""Audio loading: any speech file -> mono float32 at 16 kHz, whole or a crop.

Two decoders, chosen per file:

* **soundfile** (libsndfile) for WAV, FLAC, Ogg Vorbis/Opus and the other formats it knows: exact
  sample-accurate seeks, the fastest path (see ``bench/loader_memory.py``).
* **PyAV** (FFmpeg's decoders, bundled in the ``av`` wheel) for AAC in ``.m4a``/``.mp4``/``.aac`` (VoxCeleb2)
  and any other file libsndfile does not recognise.

A crop ``[offset, offset + max_seconds)`` reads only what it needs: soundfile seeks to the first frame;
PyAV seeks the container to ``offset - PREROLL_SECONDS`` and decodes from there. The preroll matters for AAC:
each frame's MDCT overlaps the previous one, so the first frame decoded after a seek is only correct when
one frame (1024 samples, 64 ms at 16 kHz) before it has been decoded too; samples before ``offset`` are then
dropped, so a crop is the same span of a whole-file decode: to the sample for lossless formats, within
``load_audio``'s stated tolerance for AAC. FFmpeg's AAC decoder keeps the encoder's
priming samples (typically 1024 at the start); at 64 ms of near-silence this does not matter for speaker
embeddings, and crops and whole reads agree with each other either way.

Errors are ``AudioError`` and always name the file in one line, because in a 1M-utterance list the question
a user asks first is *which* file is broken.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
PYAV_SUFFIXES = (".m4a", ".aac", ".mp4", ".mka", ".webm")  # containers/codecs libsndfile cannot read
PREROLL_SECONDS = 0.2  # decoded before a PyAV seek target: > 2 AAC frames at 16 kHz, ~9 at 44.1 kHz
# libsndfile's SF_COUNT_MAX, its frame count for a header that does not state the length (a FLAC STREAMINFO
# with total_samples 0). Reading such a file makes it allocate that many frames ("array is too big") or fail
# at the end of the data ("psf_fseek() failed"), so FFmpeg counts and decodes these files instead.
UNKNOWN_FRAMES = 2 ** 63 - 1

__all__ = ["SAMPLE_RATE", "AudioError", "AudioInfo", "audio_info", "audio_seconds", "load_audio", "to_mono",
           "write_audio", "fit_length", "highband_fraction", "is_narrowband", "NARROWBAND_NOTE"]


class AudioError(ValueError):
    """A file that cannot be used as speech audio."""


@dataclass(frozen=True)
class AudioInfo:
    """Header facts of a file; ``frames`` at ``sample_rate`` (container metadata for PyAV files: may differ
    from a full decode by the codec's padding, a frame or two).

    ``declared_frames`` is what the header promises; it exceeds ``frames`` when the audio data was cut short
    (a WAV whose RIFF ``data`` chunk claims more bytes than the file holds: libsndfile then reports, and reads,
    only the frames present). See ``truncated``.
    """

    sample_rate: int
    frames: int
    channels: int
    backend: str  # "soundfile" | "pyav"
    declared_frames: int | None = None  # None: the same as ``frames`` (or not known for this format)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    @property
    def truncated(self) -> bool:
        """The file holds fewer frames than its header declares (a cut download or copy, a killed recorder).

        Only the frames present can be read, and they are correct (PCM frames do not depend on each other),
        so callers read them and say so (``svlib embed`` warns and flags the utterance) rather than refuse:
        refusing would throw away valid speech and, in a long list, stop the run for one short file.
        """
        return self.declared_frames is not None and self.declared_frames > self.frames

    @property
    def declared_seconds(self) -> float:
        return (self.frames if self.declared_frames is None else self.declared_frames) / self.sample_rate


def _uses_pyav(path: Path) -> bool:
    return path.suffix.lower() in PYAV_SUFFIXES


def _ffmpeg_message(err: Exception) -> str:
    # FFmpegError's str() repeats the path; its strerror alone is the reason.
    return getattr(err, "strerror", None) or str(err)


def _av():
    import av  # imported lazily: WAV/FLAC-only users never load FFmpeg's libraries

    return av


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    if path.stat().st_size == 0:  # FFmpeg "opens" a 0-byte file as a stream of rate 0: say what it is
        raise AudioError(f"{path}: empty file (0 bytes)")


# ---- header ----------------------------------------------------------------------------------------
def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Rate, length and channels from the header / container metadata, without decoding."""
    path = Path(path)
    _check_exists(path)
    if not _uses_pyav(path):
        try:
            info = sf.info(str(path))
            if info.frames < UNKNOWN_FRAMES:
                return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels), "soundfile",
                                 _wav_declared_frames(path) if info.format in ("WAV", "WAVEX") else None)
            sf_error = "the header does not state the length"
        except (sf.LibsndfileError, RuntimeError, TypeError) as err:
            sf_error = err
        try:
            return _pyav_info(path)
        except AudioError:
            raise AudioError(f"{path}: not a readable audio file ({sf_error})") from None
    return _pyav_info(path)


def _wav_declared_frames(path: Path) -> int | None:
    """Frames the RIFF ``data`` chunk header declares (its byte size / the ``fmt`` block alignment), read
    from the header itself: libsndfile clamps the count to the bytes present and only notes the difference
    in its log, so a cut WAV otherwise reads as a shorter, intact file. None when not a plain RIFF/WAVE file
    (RF64, RIFX, W64) or the chunks are not where they should be."""
    import struct

    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        block_align = None
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return None
            tag, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if tag == b"fmt ":
                fmt = fh.read(size)
                if len(fmt) < 14:
                    return None
                block_align = struct.unpack("<H", fmt[12:14])[0]
                fh.seek(size % 2, os.SEEK_CUR)  # chunks are padded to even sizes
            elif tag == b"data":
                # 0 and 0xFFFFFFFF: a streamed WAV (written to a pipe) whose writer never knew the length
                unknown = size in (0, 0xFFFFFFFF) or not block_align
                return None if unknown else size // block_align
            else:
                fh.seek(size + size % 2, os.SEEK_CUR)


def _pyav_info(path: Path) -> AudioInfo:
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = _audio_stream(container, path)
            rate = int(stream.rate)
            if rate <= 0:
                raise AudioError(f"{path}: no decodable audio (sample rate {rate} in the header)")
            if stream.duration is not None and stream.time_base is not None:
                frames = int(round(float(stream.duration * stream.time_base) * rate))
            elif container.duration is not None:
                frames = int(round(container.duration / av.time_base * rate))
            else:  # raw streams without an index: count by decoding (slow, but only such files pay)
                frames = sum(frame.samples for frame in container.decode(stream))
            return AudioInfo(rate, frames, int(stream.channels), "pyav")
    except AudioError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise AudioError(f"{path}: not a readable audio file ({_ffmpeg_message(err)})") from None


def audio_seconds(path: str | os.PathLike) -> float:
    """Duration without decoding (for batching by length, ``utt2dur``)."""
    return audio_info(path).seconds


# ---- decoding --------------------------------------------------------------------------------------
def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
               offset: float = 0.0) -> np.ndarray:
    """Read ``path`` as mono float32 in [-1, 1] at ``sample_rate``.

    Only ``[offset, offset + max_seconds)`` seconds are read when given (``max_seconds`` None: to the end);
    an offset at or past the end of the file is an error, a span running past it is cut at the end.

    A crop against the same span of a whole-file read: lossless formats (WAV, FLAC, PCM or ALAC through
    PyAV) give the same samples exactly. AAC gives exactly the same length and alignment, and the same
    samples except in frames where the encoder used perceptual noise substitution (PNS, on by default in
    FFmpeg's encoder): the decoder fills those bands with pseudo-random noise whose generator state depends
    on where decoding began, so after a seek they hold other noise of the same spectrum. Stated tolerance:
    on the test's speech (FFmpeg AAC, 64 kbit/s) 1 of 47 random offsets differs, in one frame, by at most
    1.35e-3 (``tests/test_audio.py`` allows 2e-3); content or bit rates that make the encoder use PNS more
    give more such frames (up to 1e-2 seen at 69 kbit/s). AAC encoded without PNS crops exactly.
    """
    path = Path(path)
    _check_exists(path)
    if offset < 0 or (max_seconds is not None and max_seconds <= 0):
        raise AudioError(f"{path}: bad read span offset={offset} max_seconds={max_seconds}")
    if _uses_pyav(path):
        wave, rate = _read_pyav(path, offset, max_seconds)
    else:
        try:
            wave, rate = _read_soundfile(path, offset, max_seconds)
        except _NotSoundfile as err:
            try:  # a format libsndfile lacks (e.g. AAC in a .wav-named file): FFmpeg may know it
                wave, rate = _read_pyav(path, offset, max_seconds)
            except AudioError:
                raise AudioError(f"{path}: not a readable audio file ({err})") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (zero samples)")
    return to_mono(wave, rate, sample_rate, path)


class _NotSoundfile(Exception):
    pass


def _read_soundfile(path: Path, offset: float, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            first = int(round(offset * rate))
            if offset > 0 and first >= f.frames:
                raise AudioError(f"{path}: read offset {offset:.3f} s lies outside the recording "
                                 f"({f.frames / rate:.3f} s)")
            if first:
                f.seek(first)
            if f.frames >= UNKNOWN_FRAMES:
                raise _NotSoundfile("the header does not state the length")
            frames = -1 if max_seconds is None else int(round(max_seconds * rate))
            return f.read(frames, dtype="float32", always_2d=True), rate
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise _NotSoundfile(str(err)) from None


def _audio_stream(container, path: Path):
    if not container.streams.audio:
        raise AudioError(f"{path}: no audio stream in the file")
    return container.streams.audio[0]


def _frame_array(frame) -> np.ndarray:
    """A decoded PyAV frame -> float32 [channels, samples] whatever its sample format (planar or packed)."""
    a = frame.to_ndarray()
    if not frame.format.is_planar:
        a = a.reshape(-1, len(frame.layout.channels)).T
    if a.dtype.kind == "i":
        return a.astype(np.float32) / float(2 ** (8 * a.dtype.itemsize - 1))
    if a.dtype.kind == "u":  # u8 is offset binary
        return (a.astype(np.float32) - 128.0) / 128.0
    return a.astype(np.float32, copy=False)


class _NoTimestamps(Exception):
    pass


def _read_pyav(path: Path, offset: float, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Decode ``[offset, offset + max_seconds)``; [frames, channels] float32 and the file's rate."""
    av = _av()
    try:
        try:
            return _decode_span(av, path, offset, max_seconds, seek=offset > 0)
        except _NoTimestamps:  # a stream without timestamps cannot be seeked reliably: decode from the start
            return _decode_span(av, path, offset, max_seconds, seek=False)
    except AudioError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise AudioError(f"{path}: not a readable audio file ({_ffmpeg_message(err)})") from None


def _decode_span(av, path: Path, offset: float, max_seconds: float | None, seek: bool) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        stream = _audio_stream(container, path)
        rate = int(stream.rate)
        first = int(round(offset * rate))
        stop = None if max_seconds is None else first + int(round(max_seconds * rate))
        # offsets count from the stream's first sample: Matroska starts AAC at 64 ms, MP4 at 0
        origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if seek:
            target = origin + max(0.0, offset - PREROLL_SECONDS)
            container.seek(int(target / stream.time_base), stream=stream, backward=True)
        chunks, position, timed = [], 0, False
        for frame in container.decode(stream):
            if frame.time is not None:
                position, timed = int(round((frame.time - origin) * rate)), True
            elif seek and not timed:
                raise _NoTimestamps()
            data = _frame_array(frame)
            end = position + data.shape[1]
            lo, hi = max(first, position), end if stop is None else min(stop, end)
            if hi > lo:
                chunks.append(data[:, lo - position:hi - position])
            position = end
            if stop is not None and position >= stop:
                break
        if not chunks:
            if offset > 0:
                raise AudioError(f"{path}: read offset {offset:.3f} s lies outside the recording "
                                 f"({position / rate:.3f} s decoded)")
            return np.zeros((0, 1), dtype=np.float32), rate
        return np.concatenate(chunks, axis=1).T, rate


def to_mono(wave: np.ndarray, rate: int, sample_rate: int, path: str | os.PathLike) -> np.ndarray:
    """[frames, channels] as read by soundfile -> checked mono float32 at ``sample_rate``."""
    wave = wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32)


# ---- bandwidth -------------------------------------------------------------------------------------
# Narrow-band (telephone, 8 kHz) speech upsampled to 16 kHz is not what the models were trained on, and its
# embeddings collapse together: sv-mini files of 4 different speakers, resampled to 8 kHz and back, scored
# cosine 0.78-0.93 against each other, above a genuine 16 kHz same-speaker pair (0.67). svlib therefore
# flags such input (``is_narrowband``) and ``svlib verify`` refuses to decide on it.
HIGHBAND_HZ = 4250.0            # "above 4 kHz", past the transition band an 8 kHz file's resampler leaves
NARROWBAND_MAX_FRACTION = 1e-8  # energy share above HIGHBAND_HZ at or below which audio is narrow-band (-80 dB)
PSD_FRAME = 512                 # 32 ms Hann frames (hop 16 ms) of the spectrum average
NARROWBAND_NOTE = (f"narrow-band audio (recorded below {SAMPLE_RATE // 1000} kHz or no energy above "
                   f"{HIGHBAND_HZ / 1000:g} kHz): its embeddings match across speakers")


def highband_fraction(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Share of ``wave``'s energy above ``HIGHBAND_HZ``; NaN for digital silence.

    The spectrum is the average of Hann-windowed ``PSD_FRAME`` frames (Welch), not one FFT of the whole
    file: the file's abrupt ends (and a DC offset, removed per frame) leak broadband energy into a single
    FFT, which put up to 2e-6 above 4 kHz for audio that has none.
    """
    wave = np.asarray(wave, dtype=np.float64).reshape(-1)
    if len(wave) < PSD_FRAME:
        wave = np.pad(wave, (0, PSD_FRAME - len(wave)))
    frames = np.lib.stride_tricks.sliding_window_view(wave, PSD_FRAME)[::PSD_FRAME // 2]
    frames = frames - frames.mean(axis=1, keepdims=True)
    power = (np.abs(np.fft.rfft(frames * np.hanning(PSD_FRAME), axis=1)) ** 2).sum(axis=0)
    total = float(power.sum())
    if total <= 0.0:
        return math.nan
    high = np.fft.rfftfreq(PSD_FRAME, 1.0 / sample_rate) >= HIGHBAND_HZ
    return float(power[high].sum()) / total


def is_narrowband(wave: np.ndarray, file_rate: int, sample_rate: int = SAMPLE_RATE) -> bool:
    """Whether audio read at ``sample_rate`` from a file recorded at ``file_rate`` is narrow-band: the file's
    rate is below ``SAMPLE_RATE`` (upsampled: nothing above half its rate), or at most
    ``NARROWBAND_MAX_FRACTION`` of its energy lies above ``HIGHBAND_HZ`` (a 16 kHz file made from 8 kHz
    audio). Silence is not narrow-band: it carries no evidence (``svlib`` refuses it as near-silent anyway).

    The threshold, measured with ``highband_fraction`` on the shared speech data (581 files: sv-mini,
    every tenth sv-bench Arabic file, every 20th speechocean762 Opus file):

    * as they are (16 kHz): lowest 3.2e-7 (four one-word Arabic Speech Commands clips of one speaker whose
      own recording was nearly band-limited), 1 % quantile 1.8e-6, median 7.6e-4; sv-mini FLACs >= 4.9e-3;
    * the same files resampled to 8 kHz and back with soxr (HQ): at most 1.1e-9, 99 % quantile 8e-11.

    1e-8 lies 10x above the worst resampled file and 30x below the lowest genuine one. Measuring from
    4.25 kHz rather than 4 kHz skips the resampler's transition band (at 4.0 kHz the resampled files reach
    3.8e-8). Audio upsampled by a poor resampler (linear interpolation) keeps aliases above 4 kHz and is not
    caught by the spectrum; the file-rate test catches every file still stored at its original rate.
    """
    if file_rate < SAMPLE_RATE:
        return True
    fraction = highband_fraction(wave, sample_rate)
    return not math.isnan(fraction) and fraction <= NARROWBAND_MAX_FRACTION


# ---- writing ---------------------------------------------------------------------------------------
def write_audio(path: str | os.PathLike, wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
                bitrate: int = 64000) -> Path:
    """Write mono float audio: AAC (``bitrate`` bit/s) for PyAV suffixes (.m4a, .aac, ...), else soundfile
    (WAV 16-bit PCM, FLAC, Ogg...). Used by conversion, tests and benchmarks; not atomic (callers rename)."""
    path = Path(path)
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if not _uses_pyav(path):
        sf.write(str(path), wave, sample_rate, subtype="PCM_16" if path.suffix.lower() == ".wav" else None)
        return path
    av = _av()
    fmt = "adts" if path.suffix.lower() == ".aac" else None  # raw AAC has no container; FFmpeg calls it adts
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        stream.bit_rate = bitrate
        step = 16 * 1024
        for start in range(0, len(wave), step):
            frame = av.AudioFrame.from_ndarray(wave[None, start:start + step], format="flt", layout="mono")
            frame.rate = sample_rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def fit_length(wave: np.ndarray, num_samples: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Crop to ``num_samples`` (random offset when ``rng`` is given, else from the start) or repeat-pad.

    Repeating rather than zero-padding keeps short files speech-like everywhere, as the reference does.
    """
    if len(wave) == 0:
        raise AudioError("cannot fit an empty waveform to length")
    if len(wave) < num_samples:
        reps = -(-num_samples // len(wave))
        wave = np.tile(wave, reps)
    if len(wave) > num_samples:
        start = int(rng.integers(0, len(wave) - num_samples + 1)) if rng is not None else 0
        wave = wave[start:start + num_samples]
    return wave
