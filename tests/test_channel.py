"""Narrow-band telephone channel (svlib.data.channel) and its AugmentConfig wiring."""
import numpy as np
import pytest
import torch

from svlib.data.augment import AugmentConfig, Augmenter
from svlib.data.channel import TelephoneConfig, fir_bandpass, mu_law, telephone

RATE = 16000


def _band_gain_db(x: torch.Tensor, y: torch.Tensor, low: float, high: float) -> float:
    """Power gain of y over x in [low, high) Hz, Hann-windowed (no leakage from the signal's edges)."""
    w = torch.hann_window(x.shape[-1], periodic=False, dtype=torch.float64)
    px = torch.fft.rfft(x.double() * w).abs().pow(2).mean(0)
    py = torch.fft.rfft(y.double() * w).abs().pow(2).mean(0)
    f = torch.fft.rfftfreq(x.shape[-1], 1 / RATE)
    band = (f >= low) & (f < high)
    return float(10 * torch.log10(py[band].sum() / px[band].sum()))


@pytest.fixture(scope="module")
def white():
    return torch.randn(3, 2 * RATE, generator=torch.Generator().manual_seed(0)) * 0.1


@pytest.mark.parametrize("mu", [False, True])
def test_spectrum_above_4khz_is_removed_and_the_band_kept(white, mu):
    y = telephone(white, cfg=TelephoneConfig(mu_law=mu))
    assert y.shape == white.shape and y.dtype == white.dtype
    assert _band_gain_db(white, y, 4000, 8000) < -60.0       # nothing above the 8 kHz Nyquist survives
    assert _band_gain_db(white, y, 4300, 8000) < -90.0
    assert abs(_band_gain_db(white, y, 500, 3000)) < 0.1      # the pass band is kept (mu-law noise ~ -38 dB)
    assert _band_gain_db(white, y, 0, 150) < -20.0            # and the low end cut, as on a line


def test_filter_is_zero_delay_and_unit_gain():
    h = fir_bandpass(300, 3400, 255, RATE)
    assert torch.allclose(h, h.flip(0))                      # linear phase: symmetric taps
    t = torch.arange(RATE, dtype=torch.float64) / RATE
    tone = torch.sin(2 * np.pi * 1000 * t)[None].float()
    y = telephone(tone, cfg=TelephoneConfig(mu_law=False))
    middle = slice(2000, RATE - 2000)                        # away from the edges' transients
    assert torch.allclose(y[0, middle], tone[0, middle], atol=2e-3)   # same phase: speech stays where it was


def test_mu_law_quantisation_error_is_relative():
    x = torch.linspace(-1, 1, 20001)
    err = (mu_law(x) - x).abs()
    loud, quiet = x.abs() > 0.5, (x.abs() > 0.01) & (x.abs() < 0.02)
    assert 0.015 < err.max() < 0.025                          # half the largest step (at full scale): 8 bits
    assert err[quiet].max() < 1e-3                            # companding: fine steps for quiet samples
    assert err[quiet].max() < err[loud].max() / 10
    assert len(torch.unique(mu_law(torch.rand(100000) * 2 - 1))) <= 256


def test_padding_is_kept_and_lengths_honoured(white):
    lengths = torch.tensor([2 * RATE, RATE, RATE // 2])
    padded = white.clone()
    padded[1, RATE:] = 0.0
    padded[2, RATE // 2:] = 0.0
    y = telephone(padded, lengths)
    assert torch.equal(y[1, RATE:], padded[1, RATE:]) and torch.equal(y[2, RATE // 2:], padded[2, RATE // 2:])
    alone = telephone(padded[1:2, :RATE])                      # the valid part does not see the padding
    assert torch.allclose(y[1, :RATE], alone[0], atol=1e-6)


def test_config_is_validated():
    with pytest.raises(ValueError, match="band"):
        TelephoneConfig(band=(300, 4500))
    with pytest.raises(ValueError, match="odd"):
        TelephoneConfig(taps=256)
    with pytest.raises(ValueError, match="telephone_prob"):
        AugmentConfig(telephone_prob=1.5)
    with pytest.raises(ValueError, match="16000"):
        telephone(torch.zeros(1, 800), sample_rate=8000)


def test_augmenter_applies_the_line_to_the_drawn_rows(white):
    aug = Augmenter(AugmentConfig(telephone_prob=0.5))
    out = aug(white.repeat(4, 1), generator=torch.Generator().manual_seed(3))
    phone = telephone(white)
    changed = [not torch.equal(out[b], white[b % 3]) for b in range(12)]
    assert 2 <= sum(changed) <= 10                            # about half of 12 rows
    for b in range(12):
        expect = phone[b % 3] if changed[b] else white[b % 3]
        assert torch.allclose(out[b], expect, atol=1e-6)
    again = aug(white.repeat(4, 1), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)                            # seeded: reproducible
    none = Augmenter(AugmentConfig(telephone_prob=0.0))(white, generator=torch.Generator().manual_seed(3))
    assert torch.equal(none, white)
