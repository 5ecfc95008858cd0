"""Noise and reverberation: exact SNRs over valid samples, delta-RIR identity, alignment, lists, determinism."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from svlib.config import ConfigError, from_dict
from svlib.data.augment import AugmentConfig, Augmenter, read_noise_list, read_rir_list, reverberate
from svlib.data.lists import ListError

SR = 16000
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Per row: 10 log10(P_clean / P_(noisy - clean))."""
    c, d = clean.double(), (noisy - clean).double()
    return 10 * torch.log10((c * c).sum(-1) / (d * d).sum(-1))


def pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise: white spectrum scaled by 1/sqrt(f)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec))
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    x = np.fft.irfft(spec, n)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    """Real speech from sv-mini: the files of one LibriSpeech speaker and one Arabic one."""
    root = DATA / "sv-mini"
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"sv-mini not found at {root} (CI always has it; clone next to ../shared)")
    with open(root / "manifest.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: -float(r["seconds"]))
    return [sf.read(root / r["path"], dtype="float32")[0] for r in rows[:8]]


@pytest.fixture(scope="module")
def files(tmp_path_factory, speech) -> dict[str, Path]:
    """Synthetic noise / music (white / pink noise), speech for babble, and RIRs written as wav files."""
    folder = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(0)
    out = {}
    for name, wave in [("white", (0.1 * rng.standard_normal(3 * SR)).astype(np.float32)),
                       ("pink", pink(int(2.5 * SR), rng)),
                       ("short_white", (0.1 * rng.standard_normal(SR // 2)).astype(np.float32))]:
        out[name] = folder / f"{name}.wav"
        sf.write(out[name], wave, SR)
    for i, wave in enumerate(speech[4:8]):
        out[f"speech{i}"] = folder / f"speech{i}.wav"
        sf.write(out[f"speech{i}"], wave, SR)
    delta = np.zeros(2000, dtype=np.float32)
    delta[120] = 0.3
    out["delta"] = folder / "delta.wav"
    sf.write(out["delta"], delta, SR)
    # Room-like: 2 ms pre-delay, direct path, exponentially decaying reverberant tail (T60 ~ 0.3 s).
    t = np.arange(int(0.5 * SR)) / SR
    rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / 0.3) * 0.2
    rir[:32] = 0.0
    rir[32] = 1.0
    out["room"] = folder / "room.wav"
    sf.write(out["room"], (0.5 * rir / np.abs(rir).max()).astype(np.float32), SR)
    return out


@pytest.fixture(scope="module")
def clean(speech) -> torch.Tensor:
    """4 real-speech crops of 2 s."""
    return torch.stack([torch.from_numpy(w[:2 * SR].copy()) for w in speech[:4]])


def test_config_is_strict_and_validated():
    cfg = from_dict(AugmentConfig, {"noise_prob": 0.6, "snr_music": [5, 10]})
    assert cfg.snr_music == (5.0, 10.0) and cfg.babble_speakers == (3, 7)
    with pytest.raises(ConfigError, match="noise_prob"):
        from_dict(AugmentConfig, {"noise_prob": 1.5})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(AugmentConfig, {"snr_speech": [1, 2]})
    with pytest.raises(ConfigError, match="babble_speakers"):
        from_dict(AugmentConfig, {"babble_speakers": [0, 3]})


@pytest.mark.parametrize("category,names,field,snr", [
    ("noise", ["white"], "snr_noise", 7.5),
    ("music", ["pink"], "snr_music", 12.0),
    ("speech", ["speech0", "speech1", "speech2", "speech3"], "snr_babble", 16.0),
    ("noise", ["short_white"], "snr_noise", 0.0),
])
def test_snr_is_exact(files, clean, category, names, field, snr):
    cfg = AugmentConfig(noise_prob=1.0, **{field: (snr, snr)})
    aug = Augmenter(cfg, [(files[n], category) for n in names])
    noisy = aug(clean, None, torch.Generator().manual_seed(0))
    assert noisy.shape == clean.shape and noisy.dtype == torch.float32
    np.testing.assert_allclose(snr_db(clean, noisy).numpy(), snr, atol=0.1)
    assert not torch.equal(noisy, clean)


def test_snr_over_valid_samples_and_padding_untouched(files, clean):
    aug = Augmenter(AugmentConfig(noise_prob=1.0, snr_noise=(5.0, 5.0)), [(files["white"], "noise")])
    lengths = torch.tensor([2 * SR, int(1.5 * SR), SR, SR // 2])
    padded = clean.clone()
    for b, n in enumerate(lengths.tolist()):
        padded[b, n:] = 0.0
    noisy = aug(padded, lengths, torch.Generator().manual_seed(1))
    for b, n in enumerate(lengths.tolist()):
        assert snr_db(padded[b, :n], noisy[b, :n]).item() == pytest.approx(5.0, abs=0.1)
        assert not noisy[b, n:].any()


def test_snr_drawn_within_range(files, clean):
    aug = Augmenter(AugmentConfig(noise_prob=1.0, snr_noise=(0.0, 15.0), snr_music=(5.0, 15.0)),
                    [(files["white"], "noise"), (files["pink"], "music")])
    batch = clean.repeat(8, 1)
    snrs = snr_db(batch, aug(batch, None, torch.Generator().manual_seed(2)))
    assert (snrs > -0.1).all() and (snrs < 15.1).all()
    assert snrs.std() > 1.0  # drawn per utterance, not one value per batch


def test_delta_rir_returns_the_input(files, clean):
    aug = Augmenter(AugmentConfig(reverb_prob=1.0), rirs=[files["delta"]])
    out = aug(clean, None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=0)


def test_reverb_matches_direct_convolution_and_keeps_alignment(files, clean):
    aug = Augmenter(AugmentConfig(reverb_prob=1.0), rirs=[files["room"]])
    out = aug(clean, None, torch.Generator().manual_seed(0))
    rir = sf.read(files["room"], dtype="float64")[0]
    rir /= np.sqrt((rir ** 2).sum())
    peak = int(np.abs(rir).argmax())
    assert peak == 32
    for b in range(clean.shape[0]):
        x = clean[b].double().numpy()
        expected = np.convolve(x, rir)[peak:peak + len(x)]
        np.testing.assert_allclose(out[b].numpy(), expected, atol=2e-5)
    assert not torch.allclose(out, clean, atol=1e-3)
    # Aligned at the direct path: a click at sample 5000 stays the loudest sample at 5000.
    click = torch.zeros(1, 2 * SR)
    click[0, 5000] = 1.0
    heard = aug(click, None, torch.Generator().manual_seed(0))[0]
    assert int(heard.abs().argmax()) == 5000
    assert heard[5000].item() == pytest.approx(rir[peak], abs=1e-5)
    assert heard[:5000 - peak].abs().max() < 1e-6  # nothing before the RIR's start


def test_reverberate_padding_untouched():
    x = torch.randn(2, 1000)
    x[1, 600:] = 0.0
    rir = torch.zeros(2, 50)
    rir[:, 10] = 1.0
    rir[:, 30] = 0.5
    out = reverberate(x, rir, [10, 10], torch.tensor([1000, 600]))
    assert not out[1, 600:].any()
    torch.testing.assert_close(out[1, 20:600], x[1, 20:600] + 0.5 * x[1, 0:580])


def test_probability_determinism_and_no_in_place_change(files, clean):
    cfg = AugmentConfig(noise_prob=0.5, reverb_prob=0.5)
    aug = Augmenter(cfg, [(files["white"], "noise")], [files["room"]])
    batch = clean[:, :SR // 2].repeat(50, 1)  # short rows: 200 of them keep the FFTs cheap
    before = batch.clone()
    out = aug(batch, None, torch.Generator().manual_seed(4))
    assert torch.equal(batch, before)
    changed = (out != batch).any(1).float().mean().item()
    # P(changed) = 1 - 0.5 * 0.5 = 0.75; 200 rows: 3 sigma ~ 0.09.
    assert 0.64 <= changed <= 0.86
    torch.testing.assert_close(aug(batch, None, torch.Generator().manual_seed(4)), out, atol=0, rtol=0)
    assert not torch.equal(aug(batch, None, torch.Generator().manual_seed(5)), out)
    # Contract short form: augmenter(waves, generator).
    torch.testing.assert_close(aug(batch, torch.Generator().manual_seed(4)), out, atol=0, rtol=0)
    half = aug(batch.half(), None, torch.Generator().manual_seed(4))
    assert half.dtype == torch.float16


def test_exclusive_gives_one_of_none_noise_reverb(files, clean):
    # the reference recipe: each utterance gets none, noise or reverb, with probability 1/3 each
    third = 1.0 / 3.0
    cfg = AugmentConfig(noise_prob=third, reverb_prob=third, exclusive=True, snr_noise=(5.0, 20.0))
    aug = Augmenter(cfg, [(files["white"], "noise")], [files["room"]])
    batch = clean[:, :SR // 4].repeat(60, 1)  # 240 short rows
    out = aug(batch, None, torch.Generator().manual_seed(6))
    draws = torch.rand(2 * len(batch), generator=torch.Generator().manual_seed(6), dtype=torch.float64)[:len(batch)]
    reverb, noise = draws < third, (draws >= third) & (draws < 2 * third)
    none = ~(reverb | noise)
    assert all(60 <= int(m.sum()) <= 100 for m in (reverb, noise, none))  # 80 each, 3 sigma ~ 22
    assert torch.equal(out[none], batch[none])
    # reverb rows carry no noise: they equal the reverb-only augmenter's output (one RIR, no other choice)
    only_reverb = Augmenter(AugmentConfig(reverb_prob=1.0), rirs=[files["room"]])(batch, None, torch.Generator())
    torch.testing.assert_close(out[reverb], only_reverb[reverb], atol=1e-6, rtol=0)
    snrs = snr_db(batch[noise], out[noise])  # noise rows are not reverberated: the SNR against the clean row
    assert (snrs > 4.9).all() and (snrs < 20.1).all()
    with pytest.raises(ConfigError, match="exclusive"):
        from_dict(AugmentConfig, {"noise_prob": 0.6, "reverb_prob": 0.6, "exclusive": True})


def test_babble_music_and_noise_types(files, clean):
    cfg = AugmentConfig(noise_prob=1.0, noise_types=("babble_music",), snr_babble=(18.0, 18.0))
    aug = Augmenter(cfg, [(files["speech0"], "speech"), (files["pink"], "music"), (files["white"], "noise")])
    assert aug.categories == ["babble_music"]
    noisy = aug(clean, None, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(snr_db(clean, noisy).numpy(), 18.0, atol=0.1)
    # the added signal is speech + music at equal power, not either alone
    added = (noisy - clean)[0]
    music_only = Augmenter(AugmentConfig(noise_prob=1.0, noise_types=("music",), snr_music=(18.0, 18.0)),
                           [(files["pink"], "music")])(clean, None, torch.Generator().manual_seed(0))[0] - clean[0]
    assert not torch.allclose(added, music_only, atol=1e-4)
    reference = AugmentConfig(noise_types=("noise", "music", "babble", "babble_music"))
    assert Augmenter(reference, [(files["white"], "noise"), (files["speech0"], "speech")]).categories == ["noise", "babble"]
    with pytest.raises(ConfigError, match="noise_types"):
        from_dict(AugmentConfig, {"noise_types": ["speech"]})
    with pytest.raises(ValueError, match="no noise files"):
        Augmenter(cfg, [(files["speech0"], "speech")])  # babble_music needs music too


def test_disabled_augmenter_is_identity(clean):
    aug = Augmenter(AugmentConfig())
    assert aug(clean, None, torch.Generator().manual_seed(0)) is clean


def test_from_lists_and_list_errors(files, clean, tmp_path):
    noise_list = tmp_path / "noise.lst"
    noise_list.write_text(f"n1 noise {files['white']}\nm1 music {files['pink']}\r\n"
                          + "".join(f"s{i} speech {files[f'speech{i}']}\n" for i in range(4)))
    rir_list = tmp_path / "rir.lst"
    rir_list.write_text(f"r1 {files['room']}\nr2 small {files['delta']}\n")
    aug = Augmenter.from_lists(AugmentConfig(noise_prob=1.0, reverb_prob=1.0), noise_list, rir_list)
    assert aug.num_noises == {"noise": 1, "music": 1, "speech": 4} and aug.num_rirs == 2
    assert aug.categories == ["noise", "music", "babble"]
    out = aug(clean, None, torch.Generator().manual_seed(0))
    assert out.shape == clean.shape and torch.isfinite(out).all()

    bad = tmp_path / "bad.lst"
    bad.write_text(f"n1 noise {files['white']}\nx1 traffic {files['white']}\n")
    with pytest.raises(ListError, match="bad.lst.*traffic"):
        read_noise_list(bad)
    bad.write_text(f"r1 {files['room']}\nr2\n")
    with pytest.raises(ListError, match=r"bad.lst:2"):
        read_rir_list(bad)
    with pytest.raises(ValueError, match="no RIR files"):
        Augmenter(AugmentConfig(reverb_prob=0.5), [(files["white"], "noise")])
    with pytest.raises(ValueError, match="category 'babble'"):
        Augmenter(AugmentConfig(), [(files["white"], "babble")])
    missing = Augmenter(AugmentConfig(noise_prob=1.0), [(str(tmp_path / "gone.wav"), "noise")])
    with pytest.raises(ValueError, match="gone.wav"):
        missing(clean, None, torch.Generator().manual_seed(0))


def test_preloaded_arrays(clean):
    rng = np.random.default_rng(3)
    aug = Augmenter(AugmentConfig(noise_prob=1.0, snr_noise=(3.0, 3.0), reverb_prob=1.0),
                    [(rng.standard_normal(SR).astype(np.float32), "noise")], [np.array([0.0, 2.0, 0.0])])
    out = aug(clean, None, torch.Generator().manual_seed(0))
    # The RIR is a scaled delta, so only the noise changes the signal: SNR exact.
    np.testing.assert_allclose(snr_db(clean, out).numpy(), 3.0, atol=0.1)


# ---- bounded memory: crops read on demand, RIRs in a byte-bounded LRU ------------------------------------
def test_noise_files_are_read_a_crop_at_a_time(tmp_path, clean):
    """A 40-s music file costs one crop per use, and the crop is the one an in-memory copy gives."""
    rng = np.random.default_rng(5)
    long_music = pink(40 * SR, rng)
    path = tmp_path / "music-long.wav"
    sf.write(path, long_music, SR, subtype="FLOAT")
    cfg = AugmentConfig(noise_prob=1.0, noise_types=("music",), snr_music=(10.0, 10.0))
    on_disk = Augmenter(cfg, [(path, "music")])
    in_memory = Augmenter(cfg, [(long_music, "music")])
    got = on_disk(clean, None, torch.Generator().manual_seed(3))
    want = in_memory(clean, None, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert on_disk.bytes_read == clean.numel() * 4  # 4 crops of 2 s, not 4 x 40 s
    assert on_disk.cached_bytes == 0
    limited = Augmenter(AugmentConfig(noise_prob=1.0, noise_types=("music",), max_noise_seconds=2.5), [(path, "music")])
    for seed in range(3):
        noisy = limited(clean, None, torch.Generator().manual_seed(seed))
        assert torch.isfinite(noisy).all()
    assert limited.bytes_read == 3 * clean.numel() * 4


def test_noise_cache_gives_the_same_crops_from_memory_within_its_bound(tmp_path, clean):
    """noise_cache_bytes: each file decoded once and kept; the augmented batch is the one read-a-crop gives."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"clip{i}.wav")
        sf.write(paths[-1], pink(5 * SR, rng), SR, subtype="FLOAT")
    noises = [(p, "noise") for p in paths]
    cfg = dict(noise_prob=1.0, noise_types=("noise",), snr_noise=(5.0, 20.0))
    from_disk = Augmenter(AugmentConfig(**cfg), noises)
    cached = Augmenter(AugmentConfig(**cfg, noise_cache_bytes=3 * 5 * SR * 4), noises)
    for seed in range(4):
        want = from_disk(clean, None, torch.Generator().manual_seed(seed))
        got = cached(clean, None, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert cached.bytes_read <= 3 * 5 * SR * 4 == cached.cached_bytes  # every clip decoded once, then kept
    assert from_disk.bytes_read == 4 * clean.numel() * 4 and from_disk.cached_bytes == 0
    # a bound below one file: crops from disk as before, nothing held
    small = Augmenter(AugmentConfig(**cfg, noise_cache_bytes=5 * SR * 4 - 1), noises)
    small(clean, None, torch.Generator().manual_seed(0))
    assert small.cached_bytes == 0 and small.bytes_read == clean.numel() * 4
    with pytest.raises(ValueError, match="noise_cache_bytes must be >= 0"):
        AugmentConfig(noise_cache_bytes=-1)


def test_memory_does_not_grow_with_corpus_size(tmp_path, clean):
    """Twice the RIRs and noises, the same bytes held: the RIR LRU stays under its bound."""
    rng = np.random.default_rng(6)
    rir_bytes = int(0.25 * SR) * 4
    short = clean[:, :SR // 2]
    held = {}
    for count in (6, 24):
        folder = tmp_path / f"corpus{count}"
        folder.mkdir()
        rirs, noises = [], []
        for i in range(count):
            rir = rng.standard_normal(int(0.25 * SR)).astype(np.float32) * np.exp(-np.arange(int(0.25 * SR)) / 800)
            rir[0] = 3.0
            sf.write(folder / f"rir{i}.wav", (0.3 * rir / np.abs(rir).max()).astype(np.float32), SR, subtype="FLOAT")
            sf.write(folder / f"noise{i}.wav", (0.1 * rng.standard_normal(2 * SR)).astype(np.float32), SR)
            rirs.append(folder / f"rir{i}.wav")
            noises.append((folder / f"noise{i}.wav", "noise"))
        cfg = AugmentConfig(noise_prob=1.0, reverb_prob=1.0, noise_types=("noise",), rir_cache_bytes=4 * rir_bytes)
        aug = Augmenter(cfg, noises, rirs)
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            aug(short, None, gen)
            assert aug.cached_bytes <= 4 * rir_bytes
        held[count] = aug.cached_bytes
    assert held[6] == held[24] == 4 * rir_bytes
    with pytest.raises(ValueError, match="rir_cache_bytes must be >= 0"):
        AugmentConfig(rir_cache_bytes=-1)


def test_training_stage_builds_the_augmenter_for_any_enabled_augmentation():
    """experiments.train: a telephone-only config still augments (it once needed noise or reverb to be on)."""
    from experiments.common import DataConfig
    from experiments.train import build_augmenter

    data = DataConfig()
    assert build_augmenter(AugmentConfig(), data) is None
    phone = build_augmenter(AugmentConfig(telephone_prob=1.0), data)
    assert isinstance(phone, Augmenter) and phone.num_rirs == 0
    waves = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    out = phone(waves.clone(), torch.tensor([16000, 16000]))
    spectrum = torch.fft.rfft(out, dim=1).abs() ** 2
    # the narrow-band line: almost nothing left above 4 kHz (bins at 1 Hz spacing)
    assert spectrum[:, 4200:].sum() < 1e-4 * spectrum.sum()
