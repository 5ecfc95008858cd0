"""Channel simulation: a narrow-band (8 kHz) telephone line, in torch on the batch's device.

The telephone path of an utterance ``x`` at 16 kHz:

1. band-pass ``h_bp`` (``band`` = 300-3400 Hz, the ITU-T G.712 telephone band), a linear-phase Kaiser-windowed
   sinc FIR: ``h_bp[n] = w[n] (2 f_2 sinc(2 f_2 m) - 2 f_1 sinc(2 f_1 m))``, ``m = n - (L - 1) / 2``,
   frequencies in cycles/sample. It is also the anti-alias filter of step 2 (nothing is left above 4 kHz);
2. decimation to 8 kHz: ``x_8[k] = (h_bp * x)[2k]``;
3. optional G.711 mu-law companding at 8 bits (``mu = 255``): ``c = sign(x) ln(1 + mu|x|) / ln(1 + mu)`` on the
   clamped full scale ``[-1, 1]``, rounded to 256 levels, expanded with ``|x| = ((1 + mu)^|c| - 1) / mu``
   (quantisation noise ~38 dB below a full-scale signal, more for quiet speech, as on a real line);
4. back to 16 kHz: zeros between the samples, then the interpolation low-pass ``2 h_lp`` (cut-off
   ``interp_cutoff`` < 4 kHz) that removes the spectral image of step 2 above 4 kHz (the gain 2 restores the
   level the zeros halved).

The filters are symmetric, so they are applied by ``reverberate`` (here: the linear filter that both a room's
impulse response in ``svlib.data.augment`` and the telephone line's FIRs go through) with their centre tap as
the "direct-path peak": zero delay, the speech stays where it was (crops, labels and lengths stay valid) and
padding is kept as it was. With ``taps`` = 255 and Kaiser ``beta`` = 8 (~80 dB side lobes, transition
~0.32 kHz) the band above 4 kHz is attenuated by more than 60 dB and the pass band is flat to ~0.1 dB
(``tests/test_channel.py`` measures both).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from svlib.audio import SAMPLE_RATE

__all__ = ["TelephoneConfig", "fir_bandpass", "mu_law", "reverberate", "telephone", "valid_mask"]

MU = 255.0
PHONE_RATE = 8000


@dataclass(frozen=True)
class TelephoneConfig:
    """The narrow-band line: pass band (Hz), G.711 mu-law on/off, FIR length and window, interpolation cut-off."""

    band: tuple[float, float] = (300.0, 3400.0)
    mu_law: bool = True
    taps: int = 255
    beta: float = 8.0
    interp_cutoff: float = 3700.0

    def __post_init__(self) -> None:
        lo, hi = self.band
        if not 0.0 <= lo < hi < PHONE_RATE / 2:
            raise ValueError(f"telephone band must be (low, high) with 0 <= low < high < {PHONE_RATE // 2} Hz, "
                             f"got {self.band}")
        if not hi <= self.interp_cutoff < PHONE_RATE / 2:
            raise ValueError(f"interp_cutoff must lie in [band high, {PHONE_RATE // 2}) Hz, got {self.interp_cutoff}")
        if self.taps < 3 or self.taps % 2 == 0:
            raise ValueError(f"taps must be odd and >= 3 (a linear-phase filter with a centre tap), got {self.taps}")


def fir_bandpass(low_hz: float, high_hz: float, taps: int, sample_rate: int, beta: float = 8.0,
                 dtype=torch.float64) -> torch.Tensor:
    """Kaiser-windowed sinc band-pass (``low_hz = 0``: low-pass), unit gain in the pass band (module docstring)."""
    m = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    f1, f2 = low_hz / sample_rate, high_hz / sample_rate
    ideal = 2 * f2 * torch.sinc(2 * f2 * m) - 2 * f1 * torch.sinc(2 * f1 * m)
    h = ideal * torch.kaiser_window(taps, periodic=False, beta=beta, dtype=torch.float64)
    # Normalise the gain at the pass band's centre to exactly 1 (the window shifts it by a hair).
    centre = (f1 + f2) / 2 if low_hz > 0 else 0.0
    gain = (h * torch.cos(2 * math.pi * centre * m)).sum()
    return (h / gain).to(dtype)


def mu_law(x: torch.Tensor, bits: int = 8, mu: float = MU) -> torch.Tensor:
    """G.711-style mu-law compress -> quantise to ``2^bits`` levels -> expand, on the full scale ``[-1, 1]``."""
    x = x.clamp(-1.0, 1.0)
    c = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    levels = 2 ** (bits - 1) - 0.5  # 256 levels: mid-rise, so zero is not a level and silence dithers by one step
    c = (torch.floor(c * levels) + 0.5) / levels
    return torch.sign(c) * ((1.0 + mu) ** c.abs() - 1.0) / mu


def valid_mask(lengths: torch.Tensor | None, batch: int, num: int, device) -> torch.Tensor:
    """[B, N] True on the samples before each row's length (all of them when ``lengths`` is None)."""
    if lengths is None:
        return torch.ones(batch, num, dtype=torch.bool, device=device)
    return torch.arange(num, device=device)[None, :] < lengths.to(device)[:, None]


def reverberate(waves: torch.Tensor, rirs: torch.Tensor, peaks: torch.Tensor | Sequence[int],
                lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Row ``b`` becomes ``(x_b * h_b)[n + peaks[b]]`` for ``n < lengths[b]`` (padding is kept as it was).

    ``rirs`` [B, R] are used as given (normalise them first); FFT size ``>= N + R - 1`` so the linear
    convolution does not wrap around.
    """
    batch, num = waves.shape
    mask = valid_mask(lengths, batch, num, waves.device)
    x = waves * mask
    size = num + rirs.shape[1] - 1
    size = 1 << (size - 1).bit_length()  # power of two: fastest FFT path on both CPU and GPU
    full = torch.fft.irfft(torch.fft.rfft(x, n=size) * torch.fft.rfft(rirs.to(x), n=size), n=size)
    peaks = torch.as_tensor(peaks, device=waves.device, dtype=torch.long)
    index = peaks[:, None] + torch.arange(num, device=waves.device)[None, :]
    shifted = torch.gather(full, 1, index)
    return torch.where(mask, shifted, waves)


def _filter(waves: torch.Tensor, h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Zero-delay linear-phase FIR on the valid part of rows [B, N] (the centre tap is ``reverberate``'s peak)."""
    rows = h.to(waves)[None].expand(waves.shape[0], -1)
    return reverberate(waves, rows, [(h.numel() - 1) // 2] * waves.shape[0], lengths)


def telephone(waves: torch.Tensor, lengths: torch.Tensor | None = None, cfg: TelephoneConfig = TelephoneConfig(),
              sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Rows [B, N] at 16 kHz through the 8 kHz line (module docstring); padding (beyond ``lengths``) unchanged."""
    if sample_rate != 2 * PHONE_RATE:
        raise ValueError(f"telephone simulation expects {2 * PHONE_RATE} Hz input, got {sample_rate}")
    batch, num = waves.shape
    x = waves.to(torch.float32)
    if lengths is not None:
        valid = torch.arange(num, device=waves.device)[None, :] < lengths.to(waves.device)[:, None]
        x = x * valid
    band = fir_bandpass(cfg.band[0], cfg.band[1], cfg.taps, sample_rate, cfg.beta)
    narrow = _filter(x, band, lengths)[:, ::2]              # 8 kHz
    if cfg.mu_law:
        narrow = mu_law(narrow)
    up = torch.zeros(batch, num, dtype=x.dtype, device=x.device)
    up[:, ::2] = narrow
    lowpass = 2 * fir_bandpass(0.0, cfg.interp_cutoff, cfg.taps, sample_rate, cfg.beta)
    out = _filter(up, lowpass, lengths)  # a row sees only its valid samples, as if it were alone
    if lengths is not None:
        out = torch.where(valid, out, waves.to(out.dtype))
    return out.to(waves.dtype)
