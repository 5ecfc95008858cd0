"""Parity of svlib.features.W2VBertFbank with transformers.SeamlessM4TFeatureExtractor on real audio."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from svlib.audio import load_audio
from svlib.features import (
    FEATURE_DIM,
    MIN_SAMPLES,
    W2VBertFbank,
    _band_blocks,
    kaldi_mel_matrix,
    num_frames,
    povey_window,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sv-mini"
TOL = 1e-3

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def extractor():
    return transformers.SeamlessM4TFeatureExtractor()


@pytest.fixture(scope="module")
def model():
    return W2VBertFbank()


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    """A spread of sv-mini files: both sources, short (1 s) and long (several s) utterances."""
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"sv-mini data not found at {DATA}")
    with open(DATA / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: float(r["seconds"]))
    picked = rows[:3] + rows[len(rows) // 2 : len(rows) // 2 + 2] + rows[-3:]
    return [load_audio(DATA / r["path"]) for r in picked]


def reference(extractor, wave: np.ndarray) -> tuple[np.ndarray, int]:
    """Extractor features for one utterance and its number of valid (unmasked) stacked frames."""
    out = extractor(wave, sampling_rate=16000, return_tensors="np")
    return out["input_features"][0], int(out["attention_mask"][0].sum())


def pad(waves: list[np.ndarray], fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.full((len(waves), int(lengths.max())), fill)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    return batch, lengths


def test_filterbank_and_window_match_transformers(extractor):
    np.testing.assert_allclose(kaldi_mel_matrix().numpy(), extractor.mel_filters, atol=1e-12)
    np.testing.assert_allclose(povey_window().numpy(), extractor.window, atol=1e-12)


def test_band_blocks_cover_every_nonzero(model):
    mel = model.mel_interleaved
    covered = torch.zeros_like(mel, dtype=torch.bool)
    for r0, r1, c0, c1 in _band_blocks(mel):
        covered[r0:r1, c0:c1] = True
    assert bool(covered[mel != 0].all())
    assert covered.sum() < mel.numel() / 3  # the point of the blocks: far less than a dense product


def test_num_frames():
    # 25 ms windows every 10 ms: F = 1 + (N - 400) // 160 analysis frames, floor(F / 2) stacked.
    assert num_frames(560) == 1
    assert num_frames(719) == 1
    assert num_frames(720) == 1  # F = 3: the odd frame is not output
    assert num_frames(880) == 2
    assert num_frames(16000) == 49  # F = 98
    assert num_frames(48000) == 149  # F = 298
    assert W2VBertFbank.num_frames(48000) == 149


def test_single_utterances_match_extractor(model, extractor, waves):
    for wave in waves:
        ref, valid = reference(extractor, wave)
        feats, mask = model(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        assert feats.dtype == torch.float32 and mask.dtype == torch.int64
        assert feats.shape == (1, valid, FEATURE_DIM)
        assert valid == num_frames(len(wave))
        assert int(mask.sum()) == valid
        diff = float(np.abs(feats[0].numpy() - ref[:valid]).max())
        assert diff <= TOL, f"{len(wave)} samples: max abs diff {diff}"


def test_padded_batch_rows_equal_single_utterances(model, extractor, waves):
    # Non-zero padding must not leak into any statistic.
    batch, lengths = pad(waves, fill=0.25)
    feats, mask = model(batch, lengths)
    expected = [num_frames(len(w)) for w in waves]
    assert feats.shape == (len(waves), max(expected), FEATURE_DIM)
    assert mask.sum(1).tolist() == expected
    for i, wave in enumerate(waves):
        ref, valid = reference(extractor, wave)
        assert valid == expected[i]
        diff = float(np.abs(feats[i, :valid].numpy() - ref[:valid]).max())
        assert diff <= TOL, f"row {i}: max abs diff {diff}"
        assert bool((feats[i, valid:] == 0).all()) and bool((mask[i, valid:] == 0).all())
        assert bool((mask[i, :valid] == 1).all())


def test_unnormalised_features_match_extractor_without_normalisation(extractor, waves):
    """``normalise="none"``: the extractor's ``do_normalize_per_mel_bins=False`` features, batched and padded
    (the raw log-mel keeps its level, so the tolerance is relative to the values' size)."""
    raw = W2VBertFbank(normalise="none")
    batch, lengths = pad(waves, fill=0.25)
    feats, mask = raw(batch, lengths)
    assert mask.sum(1).tolist() == [num_frames(len(w)) for w in waves]
    for i, wave in enumerate(waves):
        out = extractor(wave, sampling_rate=16000, return_tensors="np", do_normalize_per_mel_bins=False)
        valid = int(out["attention_mask"][0].sum())
        ref = out["input_features"][0][:valid]
        assert float(np.abs(feats[i, :valid].numpy() - ref).max()) <= TOL * max(1.0, float(np.abs(ref).max()))
        assert bool((feats[i, valid:] == 0).all())
    # a gain is a constant added to every log-mel value: the frames' shapes do not change
    louder, _ = raw(batch * 4.0, lengths)
    valid = mask.bool()
    assert torch.allclose(louder[valid] - feats[valid], torch.full_like(feats[valid], 2 * np.log(4.0)), atol=1e-3)
    with pytest.raises(ValueError, match="features.normalise must be one of"):
        W2VBertFbank(normalise="global")


def test_odd_frame_counts_in_statistics(model, extractor, waves):
    # F odd: the last analysis frame is dropped from the output but still counts in the per-bin mean/var.
    wave = waves[-1]
    n = 400 + 160 * 150  # F = 151
    assert (n - 400) // 160 + 1 == 151
    ref, valid = reference(extractor, wave[:n])
    feats, _ = model(torch.from_numpy(wave[:n])[None], torch.tensor([n]))
    assert valid == 75 == feats.shape[1]
    assert float(np.abs(feats[0].numpy() - ref[:valid]).max()) <= TOL


def test_chunking_does_not_change_values(extractor, waves):
    wave = waves[-1]
    ref, valid = reference(extractor, wave)
    small = W2VBertFbank(chunk_frames=37)  # many chunks, split inside the utterance
    feats, _ = small(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
    assert float(np.abs(feats[0].numpy() - ref[:valid]).max()) <= TOL
    batch, lengths = pad(waves[:4])
    a, _ = small(batch, lengths)
    b, _ = W2VBertFbank(chunk_frames=100000)(batch, lengths)
    assert float((a - b).abs().max()) < 1e-5
    threads = torch.get_num_threads()
    try:  # one thread: chunks run inline instead of on the worker pool
        torch.set_num_threads(1)
        c, _ = small(batch, lengths)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, c)


def test_float64_input_and_output_dtype(model, extractor, waves):
    # float64 input is rounded to float32 first, as the extractor does: same features as the rounded input.
    rng = np.random.default_rng(0)
    wave64 = waves[0].astype(np.float64) + rng.normal(0.0, 1e-6, len(waves[0]))
    f64, m64 = model(torch.from_numpy(wave64)[None], torch.tensor([len(wave64)], dtype=torch.int32))
    wave32 = torch.from_numpy(wave64.astype(np.float32))[None]
    f32, m32 = model(wave32, torch.tensor([len(wave64)]))
    assert f64.dtype == torch.float32
    assert torch.equal(m32, m64)
    assert float((f32 - f64).abs().max()) == 0.0
    ref, valid = reference(extractor, wave64)
    assert float(np.abs(f64[0].numpy() - ref[:valid]).max()) <= TOL


def test_nonfinite_padding_does_not_leak(model, waves):
    batch, lengths = pad(waves[:3])
    clean, _ = model(batch, lengths)
    dirty = batch.clone()
    for i, n in enumerate(lengths.tolist()):
        dirty[i, n:] = float("nan")
    feats, mask = model(dirty, lengths)
    assert bool(torch.isfinite(feats).all())
    assert torch.equal(feats, clean)


def test_device_and_buffers(waves):
    model = W2VBertFbank()
    assert {name for name, _ in model.named_buffers()} == {"window", "window_dft", "mel_interleaved"}
    assert model.state_dict() == {}  # non-persistent: checkpoints do not carry them
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    batch, lengths = pad(waves[:3])
    ref, _ = model(batch, lengths)
    for dev in devices:
        moved = W2VBertFbank().to(dev)
        assert moved.window.device.type == dev
        feats, mask = moved(batch.to(dev), lengths.to(dev))
        assert feats.device.type == dev and mask.device.type == dev
        assert float((feats.cpu() - ref).abs().max()) < 1e-4


def test_no_gradient_and_no_autocast(model, waves):
    wave = torch.from_numpy(waves[0])[None].requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = model(wave, torch.tensor([wave.shape[1]]))
    assert feats.dtype == torch.float32 and not feats.requires_grad


def test_too_short_audio_raises(model):
    with pytest.raises(ValueError, match="too short"):
        model(torch.zeros(1, 399), torch.tensor([399]))
    with pytest.raises(ValueError, match=r"row 1: audio too short: 500 samples.*560"):
        model(torch.zeros(2, 16000), torch.tensor([16000, 500]))
    with pytest.raises(ValueError, match="too short"):
        num_frames(MIN_SAMPLES - 1)
    assert num_frames(MIN_SAMPLES) == 1


def test_bad_input_raises(model):
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(16000), torch.tensor([16000]))
    with pytest.raises(ValueError, match="floating point"):
        model(torch.zeros(1, 16000, dtype=torch.int16), torch.tensor([16000]))
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 16000), torch.tensor([16001]))
    with pytest.raises(ValueError, match="one entry per row"):
        model(torch.zeros(2, 16000), torch.tensor([16000]))
    with pytest.raises(ValueError, match="integers"):
        model(torch.zeros(1, 16000), torch.tensor([16000.0]))


def test_silence_hits_mel_floor_like_extractor(model, extractor):
    # Digital silence: every mel energy is floored, the variance is 0 and eps keeps the output finite (0).
    wave = np.zeros(16000, dtype=np.float32)
    ref, valid = reference(extractor, wave)
    feats, _ = model(torch.from_numpy(wave)[None], torch.tensor([16000]))
    assert bool(torch.isfinite(feats).all())
    assert float(np.abs(feats[0].numpy() - ref[:valid]).max()) <= TOL
