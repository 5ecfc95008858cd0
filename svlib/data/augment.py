"""Additive noise (MUSAN noise / music / babble) and reverberation (RIR convolution), in torch on the batch.

Per utterance, independently:

* with probability ``reverb_prob``: ``y = (x * h)[n + p]`` where ``h`` is a random RIR scaled to unit energy
  (``sum h^2 = 1``) and ``p = argmax |h|`` its direct-path peak. Reading the full convolution from ``p`` on
  keeps the speech where it was (labels, crops and lengths stay valid) and a unit delta RIR returns ``x``
  exactly. The convolution is done with real FFTs of size ``>= N + R - 1`` (no circular wrap).
* with probability ``noise_prob``: a category is chosen uniformly among ``noise_types`` that have files
  (``noise``, ``music``, ``babble`` = sum of ``babble_speakers`` speech files, each first scaled to unit power
  so no talker dominates, ``babble_music`` = one speech file + one music file, each at unit power; both
  babble kinds use ``snr_babble``), an SNR ``s`` is drawn uniformly from that category's range, and
  ``y = x + g * n`` with ``g = sqrt(P_x / (P_n * 10^(s/10)))``, powers ``P = mean(v^2)`` taken over the
  utterance's valid (unpadded) samples only, so padding neither dilutes the speech power nor gets noise.

Reverberation comes first, as in a room: the noise is not reverberated by the speaker's room. With
``exclusive`` an utterance gets at most one of the two (the reference recipe: one of none / noise / reverb,
``noise_prob = reverb_prob = 1/3``): one uniform draw ``u``, reverb if ``u < reverb_prob``, noise if
``reverb_prob <= u < reverb_prob + noise_prob``.
* with probability ``telephone_prob``, last (the line carries the noisy room's signal): the narrow-band 8 kHz
  telephone channel of ``svlib.data.channel`` (300-3400 Hz band-pass, 16k -> 8k -> 16k, optional G.711 mu-law
  with ``telephone_mu_law``). Its draws come after the others', so ``telephone_prob = 0`` changes nothing.

All random choices come from the ``torch.Generator`` passed in, so a seeded generator reproduces a batch.

Memory does not grow with the corpora. A noise file is never decoded whole: each use draws a random offset
from its header length (lengths are all that is kept per file) and reads just the crop it needs (soundfile
seeks; a minutes-long MUSAN music file costs one crop, not minutes of float32 on every rank). Only files
shorter than the crop are read whole, and they are short by definition. RIRs (short, but RIRS_NOISES has
~60k of them) are read on use and kept, energy-normalised, in an LRU of at most ``rir_cache_bytes``.
``max_noise_seconds`` limits crops to each noise file's first seconds (smaller reads near the start of very
long files; it does not change memory). ``noise_cache_bytes`` (default 0) instead keeps whole decoded noise files
in a byte-bounded LRU, for small noise sets of compressed clips (ESC-10's 400 x 5 s Ogg/Opus: seeking into Opus
decodes from the previous page, so a crop costs nearly a file): the crops are drawn exactly as from disk, and
a file larger than the bound is read a crop at a time as before. ``bytes_read`` counts decoded float32 bytes, for tests and benchmarks.
Only the crops of one batch go to the device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from svlib.audio import SAMPLE_RATE, audio_info, fit_length, load_audio
from svlib.data.channel import TelephoneConfig, reverberate, telephone, valid_mask
from svlib.data.lists import ListError, read_audio_list
from svlib.data.sampling import WaveCache

__all__ = ["AugmentConfig", "Augmenter", "read_noise_list", "read_rir_list", "add_noise", "reverberate"]

NOISE_CATEGORIES = ("noise", "music", "speech")
NOISE_TYPES = ("noise", "music", "babble", "babble_music")  # what a noised utterance gets (noise_types)
_TYPE_SOURCES = {"noise": ("noise",), "music": ("music",), "babble": ("speech",), "babble_music": ("speech", "music")}


@dataclass
class AugmentConfig:
    """Probabilities per utterance and SNR ranges (dB) per noise category; ``babble_speakers`` inclusive."""

    noise_prob: float = 0.0
    reverb_prob: float = 0.0
    snr_noise: tuple[float, float] = (0.0, 15.0)
    snr_music: tuple[float, float] = (5.0, 15.0)
    snr_babble: tuple[float, float] = (13.0, 20.0)
    babble_speakers: tuple[int, int] = (3, 7)
    noise_types: tuple[str, ...] = ("noise", "music", "babble")   # drawn uniformly; may add "babble_music"
    exclusive: bool = False   # at most one of reverb / noise per utterance (see the module docstring)
    max_noise_seconds: float | None = None   # crops come from each noise file's first seconds; None: anywhere
    rir_cache_bytes: int = 64 * 2 ** 20   # LRU of decoded RIRs per process (64 MiB ~ 1,000 one-second RIRs)
    noise_cache_bytes: int = 0   # LRU of whole decoded noise files per process; 0: read a crop at a time
    telephone_prob: float = 0.0   # narrow-band 8 kHz line (svlib.data.channel), after reverb and noise
    telephone_mu_law: bool = True   # G.711 mu-law 8-bit companding on the 8 kHz line

    def __post_init__(self) -> None:
        for name in ("noise_prob", "reverb_prob", "telephone_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.exclusive and self.noise_prob + self.reverb_prob > 1.0 + 1e-9:
            raise ValueError(f"exclusive: noise_prob + reverb_prob must be <= 1, got "
                             f"{self.noise_prob} + {self.reverb_prob}")
        bad = [t for t in self.noise_types if t not in NOISE_TYPES]
        if bad or not self.noise_types or len(set(self.noise_types)) != len(self.noise_types):
            raise ValueError(f"noise_types must be distinct names from {list(NOISE_TYPES)}, got {list(self.noise_types)}")
        for name in ("snr_noise", "snr_music", "snr_babble"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {getattr(self, name)}")
        lo, hi = self.babble_speakers
        if not 1 <= lo <= hi:
            raise ValueError(f"babble_speakers must be (low, high) with 1 <= low <= high, got {self.babble_speakers}")
        if self.max_noise_seconds is not None and not self.max_noise_seconds > 0:
            raise ValueError(f"max_noise_seconds must be positive or None, got {self.max_noise_seconds}")
        if self.rir_cache_bytes < 0:
            raise ValueError(f"rir_cache_bytes must be >= 0 (0 = read every use), got {self.rir_cache_bytes}")
        if self.noise_cache_bytes < 0:
            raise ValueError(f"noise_cache_bytes must be >= 0 (0 = a crop at a time), got {self.noise_cache_bytes}")


def read_noise_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``name category path`` lines (category noise / music / speech) -> ``[(path, category)]``."""
    out = []
    for entry in read_audio_list(path):
        if entry.category not in NOISE_CATEGORIES:
            raise ListError(f"{path}: entry '{entry.name}' has category {entry.category!r}; "
                            f"expected one of {list(NOISE_CATEGORIES)}")
        out.append((entry.path, entry.category))
    if not out:
        raise ListError(f"{path}: noise list is empty")
    return out


def read_rir_list(path: str | os.PathLike) -> list[str]:
    """RIR list -> paths. Lines are ``name path`` or ``name category path`` (category, e.g. room size, ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ListError(f"{path}: file not found")
    out, seen = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise ListError(f"{path}:{number}: expected '<name> <path>' or '<name> <category> <path>', "
                            f"got {len(fields)} field(s)")
        if fields[0] in seen:
            raise ListError(f"{path}:{number}: duplicate name '{fields[0]}' (first on line {seen[fields[0]]})")
        seen[fields[0]] = number
        out.append(fields[-1])
    if not out:
        raise ListError(f"{path}: RIR list is empty")
    return out


def add_noise(waves: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor,
              lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``x + g n`` with ``g = sqrt(P_x / (P_n 10^(snr/10)))``, powers over valid samples; rows [B, N].

    A silent noise row (``P_n = 0``) leaves its utterance unchanged instead of dividing by zero.
    """
    mask = valid_mask(lengths, waves.shape[0], waves.shape[1], waves.device).to(waves.dtype)
    noise = noise * mask
    p_x = (waves * waves * mask).sum(1)
    p_n = (noise * noise).sum(1)  # the count of valid samples cancels in the ratio
    gain = torch.where(p_n > 0, torch.sqrt(p_x / (p_n.clamp_min(1e-30) * 10.0 ** (snr_db.to(waves) / 10.0))),
                       torch.zeros_like(p_n))
    return waves + gain[:, None] * noise


class Augmenter:
    """``augmenter(waves [B, N], lengths [B] | None, generator) -> waves`` on ``waves.device``.

    ``noises``: ``(path, category)`` pairs, or ``(array, category)`` with 16-kHz audio already in memory;
    category in noise / music / speech (speech files make babble). ``rirs``: paths or arrays.
    Files are read on demand, a crop at a time (module docstring); ``max_noise_seconds`` overrides
    ``cfg.max_noise_seconds`` when given.
    """

    def __init__(self, cfg: AugmentConfig, noises: Iterable = (), rirs: Iterable = (), sample_rate: int = SAMPLE_RATE,
                 max_noise_seconds: float | None = None):
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.max_noise_seconds = max_noise_seconds if max_noise_seconds is not None else cfg.max_noise_seconds
        self._noises: dict[str, list] = {c: [] for c in NOISE_CATEGORIES}
        for item in noises:
            try:
                source, category = item
            except (TypeError, ValueError):
                raise ValueError(f"noise entries must be (path or array, category) pairs, got {item!r}") from None
            if category not in NOISE_CATEGORIES:
                raise ValueError(f"noise {source if isinstance(source, (str, Path)) else 'array'}: category "
                                 f"{category!r} is not one of {list(NOISE_CATEGORIES)}")
            self._noises[category].append(self._check_source(source, "noise"))
        self._rirs = [self._check_source(r, "RIR") for r in rirs]
        # babble is made of speech files, babble_music of speech and music; both use snr_babble.
        self.categories = [name for name in cfg.noise_types if all(self._noises[s] for s in _TYPE_SOURCES[name])]
        if cfg.noise_prob > 0 and not self.categories:
            raise ValueError(f"noise_prob={cfg.noise_prob} but no noise files were given")
        if cfg.reverb_prob > 0 and not self._rirs:
            raise ValueError(f"reverb_prob={cfg.reverb_prob} but no RIR files were given")
        self._noise_lengths: dict[tuple[str, int], tuple[int, int]] = {}  # header (frames, rate) per file used
        self._rir_cache = WaveCache(cfg.rir_cache_bytes)
        self._noise_cache = WaveCache(cfg.noise_cache_bytes)
        self.bytes_read = 0

    @staticmethod
    def _check_source(source, what: str):
        if isinstance(source, (str, os.PathLike)):
            return str(source)
        array = torch.as_tensor(np.asarray(source, dtype=np.float32)).reshape(-1)
        if array.numel() == 0 or not torch.isfinite(array).all():
            raise ValueError(f"an in-memory {what} signal is empty or not finite")
        return array

    @classmethod
    def from_lists(cls, cfg: AugmentConfig, noise_list_path: str | os.PathLike | None = None,
                   rir_list_path: str | os.PathLike | None = None, **kwargs) -> "Augmenter":
        """Build from the lists that ``svlib.corpora.prepare`` writes (either may be None when unused)."""
        noises = read_noise_list(noise_list_path) if noise_list_path is not None else []
        rirs = read_rir_list(rir_list_path) if rir_list_path is not None else []
        return cls(cfg, noises, rirs, **kwargs)

    @property
    def num_noises(self) -> dict[str, int]:
        return {c: len(v) for c, v in self._noises.items()}

    @property
    def num_rirs(self) -> int:
        return len(self._rirs)

    # ---- audio ------------------------------------------------------------------------------------
    def _noise_crop(self, category: str, index: int, num: int, generator) -> torch.Tensor:
        """``num`` samples of noise file ``index`` from a random offset (the draws of ``_crop``), read on demand."""
        source = self._noises[category][index]
        if not isinstance(source, str):
            return self._crop(self._limit(source), num, generator)
        key = (category, index)
        if key not in self._noise_lengths:
            info = audio_info(source)
            self._noise_lengths[key] = (info.frames, info.sample_rate)
        frames, rate = self._noise_lengths[key]
        length = int(frames * self.sample_rate // rate)  # in output samples
        if self.max_noise_seconds is not None:
            length = min(length, int(self.max_noise_seconds * self.sample_rate))
        whole = self._cached_noise(source, length)
        if length < num:  # shorter than the crop: read it whole (it is short) and wrap around as _crop does
            return self._crop(whole if whole is not None else self._read(source, 0, length), num, generator)
        start = self._randint(length - num + 1, generator)
        return whole[start:start + num] if whole is not None else self._read(source, start, num)

    def _cached_noise(self, source: str, length: int) -> torch.Tensor | None:
        """The first ``length`` samples of a noise file from the LRU (decoded on first use), or None when the
        file does not fit the bound (``noise_cache_bytes``; 0 keeps nothing)."""
        if length * 4 > self._noise_cache.max_bytes:
            return None
        wave = self._noise_cache.get(source)
        if wave is None:
            wave = self._read(source, 0, length).numpy()
            self._noise_cache.put(source, wave)
        return torch.from_numpy(wave)

    def _limit(self, signal: torch.Tensor) -> torch.Tensor:
        if self.max_noise_seconds is None:
            return signal
        return signal[:int(self.max_noise_seconds * self.sample_rate)]

    def _read(self, path: str, start: int, num: int) -> torch.Tensor:
        """Samples ``[start, start + num)`` (at ``sample_rate``) of ``path``; resampling may be a sample off,
        so the result is fitted to ``num``."""
        wave = load_audio(path, self.sample_rate, max_seconds=num / self.sample_rate, offset=start / self.sample_rate)
        self.bytes_read += wave.nbytes
        return torch.from_numpy(fit_length(wave, num))

    def _rir(self, index: int) -> tuple[torch.Tensor, int]:
        """RIR ``index`` scaled to unit energy, and the index of its direct-path peak."""
        source = self._rirs[index]
        if not isinstance(source, str):
            return _unit_energy(source, "(array)")
        rir = self._rir_cache.get(source)
        if rir is None:
            wave = load_audio(source, self.sample_rate)
            self.bytes_read += wave.nbytes
            rir = _unit_energy(torch.from_numpy(wave), source)[0].numpy()
            self._rir_cache.put(source, rir)
        rir = torch.from_numpy(rir)
        return rir, int(rir.abs().argmax())

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded audio this augmenter holds (the RIR and noise LRUs)."""
        return self._rir_cache.nbytes + self._noise_cache.nbytes

    # ---- randomness -------------------------------------------------------------------------------
    @staticmethod
    def _uniform(n: int, generator: torch.Generator | None) -> list[float]:
        device = generator.device if generator is not None else "cpu"
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64).tolist()

    def _randint(self, high: int, generator) -> int:
        """Uniform integer in ``[0, high)``."""
        return min(int(self._uniform(1, generator)[0] * high), high - 1)

    def _crop(self, signal: torch.Tensor, num: int, generator) -> torch.Tensor:
        """``num`` samples from a random offset, wrapping around (repeat-padding) when the signal is short."""
        length = signal.numel()
        if length >= num:
            start = self._randint(length - num + 1, generator)
            return signal[start:start + num]
        start = self._randint(length, generator)
        return signal.roll(-start).repeat(-(-num // length))[:num]

    # ---- the transform ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, waves: torch.Tensor, lengths: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(lengths, torch.Generator):
            # The short contract form augmenter(waves, generator) passes the generator second.
            lengths, generator = None, lengths
        if waves.dim() != 2:
            raise ValueError(f"Augmenter expects waves [B, N], got shape {tuple(waves.shape)}")
        cfg = self.cfg
        if (cfg.noise_prob == 0 and cfg.reverb_prob == 0 and cfg.telephone_prob == 0) or waves.numel() == 0:
            return waves
        batch, num = waves.shape
        device, dtype = waves.device, waves.dtype
        out = waves.to(torch.float32, copy=True)  # never modify the caller's batch in place
        draws = self._uniform(2 * batch, generator)
        reverb_rows = [b for b in range(batch) if draws[b] < cfg.reverb_prob]
        if cfg.exclusive:  # one draw decides: reverb, noise or nothing
            noise_rows = [b for b in range(batch) if cfg.reverb_prob <= draws[b] < cfg.reverb_prob + cfg.noise_prob]
        else:
            noise_rows = [b for b in range(batch) if draws[batch + b] < cfg.noise_prob]

        if reverb_rows:
            picked = [self._rir(self._randint(len(self._rirs), generator)) for _ in reverb_rows]
            rirs = torch.zeros(len(picked), max(r.numel() for r, _ in picked))
            for i, (r, _) in enumerate(picked):
                rirs[i, :r.numel()] = r
            rows = torch.tensor(reverb_rows, device=device)
            sub_lengths = lengths[rows.to(lengths.device)] if lengths is not None else None
            out[rows] = reverberate(out[rows], rirs.to(device), [p for _, p in picked], sub_lengths)

        if noise_rows:
            noise = torch.empty(len(noise_rows), num)
            snrs = torch.empty(len(noise_rows), dtype=torch.float64)
            for i in range(len(noise_rows)):
                category = self.categories[self._randint(len(self.categories), generator)]
                lo, hi = cfg.snr_babble if category.startswith("babble") else getattr(cfg, f"snr_{category}")
                snrs[i] = lo + (hi - lo) * self._uniform(1, generator)[0]
                if category == "babble":
                    noise[i] = self._babble(num, generator)
                elif category == "babble_music":
                    music = self._noise_crop("music", self._randint(len(self._noises["music"]), generator),
                                             num, generator)
                    noise[i] = self._babble(num, generator, count=1) + _unit_power(music)
                else:
                    files = self._noises[category]
                    noise[i] = self._noise_crop(category, self._randint(len(files), generator), num, generator)
            rows = torch.tensor(noise_rows, device=device)
            sub_lengths = lengths[rows.to(lengths.device)] if lengths is not None else None
            out[rows] = add_noise(out[rows], noise.to(device), snrs.to(device), sub_lengths)

        if cfg.telephone_prob > 0:
            phone_rows = [b for b, u in enumerate(self._uniform(batch, generator)) if u < cfg.telephone_prob]
            if phone_rows:
                rows = torch.tensor(phone_rows, device=device)
                sub_lengths = lengths[rows.to(lengths.device)] if lengths is not None else None
                out[rows] = telephone(out[rows], sub_lengths, TelephoneConfig(mu_law=cfg.telephone_mu_law),
                                      self.sample_rate)
        return out.to(dtype)

    def _babble(self, num: int, generator, count: int | None = None) -> torch.Tensor:
        """Sum of ``count`` (default: drawn from ``babble_speakers``) unit-power speech crops."""
        if count is None:
            lo, hi = self.cfg.babble_speakers
            count = lo + self._randint(hi - lo + 1, generator)
        files = self._noises["speech"]
        if count <= len(files):
            device = generator.device if generator is not None else "cpu"
            chosen = torch.randperm(len(files), generator=generator, device=device)[:count].tolist()
        else:  # fewer speech files than talkers: repeats still differ by their crop offset
            chosen = [self._randint(len(files), generator) for _ in range(count)]
        total = torch.zeros(num)
        for index in chosen:
            total += _unit_power(self._noise_crop("speech", index, num, generator))
        return total


def _unit_energy(rir: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    """``rir / sqrt(sum rir^2)`` (in float64, then float32) and the index of its largest magnitude."""
    energy = float((rir.double() ** 2).sum())
    if energy <= 0:
        raise ValueError(f"RIR {name} is all zeros")
    rir = (rir.double() / energy ** 0.5).float()
    return rir, int(rir.abs().argmax())


def _unit_power(segment: torch.Tensor) -> torch.Tensor:
    """``segment / sqrt(mean(segment^2))``; a silent segment stays zero."""
    power = float((segment.double() ** 2).mean())
    return segment / power ** 0.5 if power > 0 else torch.zeros_like(segment)
