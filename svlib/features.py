"""W2V-BERT 2.0 input features in torch: batched, masked, on any device.

Numerically the same as ``transformers.SeamlessM4TFeatureExtractor`` run on each utterance alone.

The math, for one utterance x (float in [-1, 1], 16 kHz) of L samples:

* Kaldi scale: x <- 32768 x.
* Frames: F = 1 + floor((L - 400) / 160); frame t is x_t[n] = x[160 t + n], n = 0..399 (25 ms / 10 ms).
* Per frame: DC removal d = x_t - mean(x_t); pre-emphasis p[n] = d[n] - 0.97 d[n-1] (n >= 1),
  p[0] = 0.03 d[0]; window z = w * p with the symmetric Povey window w[n] = (0.5 - 0.5 cos(2 pi n / 399))^0.85.
* Power spectrum P_t[k] = |sum_n z[n] e^{-2 pi i k n / 512}|^2, k = 0..256 (zero-padded 512-point DFT).
* Log-mel: E_t[m] = log(max(1.1920929e-7, sum_k P_t[k] M[k, m])), with 80 Kaldi triangles M built in
  mel space, mel(f) = 1127 ln(1 + f / 700), centres evenly spaced between mel(20 Hz) and mel(8 kHz).
* Per-bin normalisation over the F frames of this utterance only:
  E'_t[m] = (E_t[m] - mu[m]) / sqrt(s2[m] + 1e-7), s2 the unbiased variance (ddof = 1).
* Stacking: frames (2j, 2j+1) are concatenated into one 160-dim frame, j < floor(F / 2). An odd last
  frame counts in mu and s2 but is not output (the extractor pads it to a pair and masks that pair out).

How it is computed (same numbers, fewer passes over memory):

* DC removal and pre-emphasis commute: for n >= 1, p[n] = e[t0 + n] - c_t with e[i] = x[i] - 0.97 x[i-1]
  the pre-emphasised *whole* signal and c_t = 0.03 mean(x_t) (a constant passes through pre-emphasis
  scaled by 1 - 0.97). p[0] differs, but w[0] = 0, so it never reaches the spectrum. Hence
  z = w * e_t - c_t w, and by linearity Y_t = DFT(w * e_t) - c_t DFT(w): frames are windowed straight
  from a strided view of e, and the DC term is one fused multiply-add on the spectrum.
* mean(x_t) comes from 80-sample block sums (400 = 5 x 80, 160 = 2 x 80): one read of the signal, not one
  read of every overlapping frame.
* Waveform-sized work and the FFT run in float64, like the extractor: a float32 FFT (or even a float32
  window) adds noise ~144 dB below a frame's peak bin, and frames with >120 dB spread between bins exist
  in real speech; after per-bin normalisation that was up to 2e-3 off. The spectrum is then rounded to
  float32, which the extractor also does (it stores complex64), and everything after is float32.
* The 2^15 input scale is an exact 2^30 factor on the mel matrix (powers of two round exactly), and
  |Y|^2 M is (Re^2, Im^2 interleaved) times M with duplicated rows, restricted on CPU to the few
  column blocks x row spans where the banded mel matrix is nonzero (~4x fewer multiply-adds than dense).
* On CPU, frames go through in chunks of ``chunk_frames`` (default 256: the float64 FFT buffer, 1 MB,
  stays in a core's L2) spread over ``torch.get_num_threads()`` Python threads, rather than whole-batch
  ops each split over threads. Measured on a shared 2-core box, 64 x 3 s: 2048-frame or 16384-frame
  chunks with op-level threads took 1.4-3x longer, since every op waits at a barrier for a thread the OS
  may have descheduled, and buffers of tens of MB miss cache and page-fault on every call.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_FFT = 512
NUM_MEL_BINS = 80
STACK = 2
FEATURE_DIM = NUM_MEL_BINS * STACK
PREEMPHASIS = 0.97
MEL_FLOOR = 1.192092955078125e-07  # float32 machine epsilon, as in the extractor
NORM_EPS = 1e-7
INPUT_SCALE = 2.0**15  # Kaldi expects 16-bit integer amplitudes
# Fewest samples that give one stacked output frame (two analysis frames).
MIN_SAMPLES = WIN_LENGTH + HOP_LENGTH * (STACK - 1)

NORMALISATIONS = ("utterance", "none")


@dataclass
class FeatureConfig:
    """Which input features the speaker model computes from the waveform.

    ``normalise``:

    * ``utterance`` (the default): the W2V-BERT 2.0 extractor's per-utterance, per-bin mean and variance
      normalisation. The pretrained weights were trained on exactly these inputs, so a pretrained encoder
      must keep it.
    * ``none``: the raw stacked log-mel frames. Per-utterance normalisation removes the long-term average
      spectrum and its spread, which are speaker cues (they are all that the mean/std log-mel baseline uses).
      An encoder trained from scratch can keep them this way. Gain is still removed: the encoder's input
      LayerNorm normalises every frame across its 160 values, and a gain adds a constant to a log-mel frame.
    """

    normalise: Literal["utterance", "none"] = "utterance"

    def __post_init__(self) -> None:
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"features.normalise must be one of {list(NORMALISATIONS)}, got {self.normalise!r}")


_BLOCK = 80  # gcd(400, 160): frame means are sums of 5 consecutive 80-sample blocks, hop = 2 blocks


def _analysis_frames(num_samples: int) -> int:
    return 1 + (num_samples - WIN_LENGTH) // HOP_LENGTH


def num_frames(num_samples: int) -> int:
    """Number of 160-dim output frames for an utterance of ``num_samples`` samples (after 2-frame stacking)."""
    num_samples = int(num_samples)
    if num_samples < MIN_SAMPLES:
        raise ValueError(
            f"audio too short: {num_samples} samples; W2V-BERT features need at least {MIN_SAMPLES} samples "
            f"({1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms at {SAMPLE_RATE} Hz: two {WIN_LENGTH}-sample windows "
            f"{HOP_LENGTH} apart make one stacked frame)"
        )
    return _analysis_frames(num_samples) // STACK


def povey_window(length: int = WIN_LENGTH) -> Tensor:
    """Symmetric Povey window (Hann^0.85), float64."""
    n = torch.arange(length, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))).pow(0.85)


def kaldi_mel_matrix(
    num_bins: int = NUM_MEL_BINS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    low_hz: float = 20.0,
    high_hz: float | None = None,
) -> Tensor:
    """Kaldi mel filterbank, shape (n_fft // 2 + 1, num_bins), float64, triangles in mel space."""
    high_hz = sample_rate / 2 if high_hz is None else high_hz

    def to_mel(hz: Tensor) -> Tensor:
        return 1127.0 * torch.log1p(hz / 700.0)

    edges = torch.linspace(
        float(to_mel(torch.tensor(low_hz, dtype=torch.float64))),
        float(to_mel(torch.tensor(float(high_hz), dtype=torch.float64))),
        num_bins + 2,
        dtype=torch.float64,
    )
    bin_mel = to_mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * (sample_rate / n_fft))
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mel[:, None] - left) / (centre - left)
    falling = (right - bin_mel[:, None]) / (right - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def _band_blocks(matrix: Tensor, call_cost: int = 2048) -> list[tuple[int, int, int, int]]:
    """Split a banded (rows x cols) matrix into column groups with their nonzero row span.

    The mel matrix has ~2 nonzeros per row, so one dense matmul does ~40x the needed work. A dynamic
    programme over contiguous column groups minimises sum(rows_in_span * cols) + call_cost per group
    (call_cost stands for the fixed overhead of one matmul call, in multiply-adds per frame).
    Returns (row_start, row_stop, col_start, col_stop) tuples.
    """
    nonzero = matrix != 0
    cols = matrix.shape[1]
    first = [int(nonzero[:, c].nonzero().min()) for c in range(cols)]
    last = [int(nonzero[:, c].nonzero().max()) + 1 for c in range(cols)]
    best = [0] + [None] * cols  # best[j]: cost of covering columns [0, j)
    choice = [0] * (cols + 1)
    for j in range(1, cols + 1):
        for i in range(j):
            lo, hi = min(first[i:j]), max(last[i:j])
            cost = best[i] + (hi - lo) * (j - i) + call_cost
            if best[j] is None or cost < best[j]:
                best[j], choice[j] = cost, i
    blocks, j = [], cols
    while j > 0:
        i = choice[j]
        blocks.append((min(first[i:j]), max(last[i:j]), i, j))
        j = i
    return blocks[::-1]


def _centre_per_bin(logmel: Tensor, frames_per_row: Tensor, ragged: bool) -> Tensor:
    """Subtract each row's per-bin mean over its own frames from ``logmel`` in place; returns the per-bin
    ``1 / sqrt(s2 + eps)`` [B, 1, 80] (s2 the unbiased variance) to scale it by. Padding frames count in neither."""
    batch, total, _ = logmel.shape
    device = logmel.device
    counts = frames_per_row.to(device=device, dtype=torch.float32).view(batch, 1, 1)
    if ragged:
        valid = (torch.arange(total, device=device) < frames_per_row.to(device)[:, None]).unsqueeze(-1)
        mean = torch.where(valid, logmel, 0.0).sum(1, keepdim=True) / counts
        centred = logmel.sub_(mean)
        var = torch.where(valid, centred, 0.0).square_().sum(1, keepdim=True) / (counts - 1)
    else:
        mean = logmel.sum(1, keepdim=True) / counts
        centred = logmel.sub_(mean)
        var = centred.square().sum(1, keepdim=True) / (counts - 1)
    return torch.rsqrt(var.add_(NORM_EPS))


class W2VBertFbank(nn.Module):
    """Batched W2V-BERT 2.0 fbank: ``(waves [B, N], lengths [B]) -> (feats [B, T, 160], mask [B, T])``.

    Row b equals the transformers extractor on ``waves[b, :lengths[b]]`` alone; samples past ``lengths[b]``
    influence nothing. With ``normalise="none"`` the per-bin normalisation is skipped (``FeatureConfig``). Output frames past a row's own length are 0 in ``feats`` and in ``mask``.
    Features are data, not a learnt layer: no gradient flows to ``waves``, and autocast is switched off
    inside so that no step runs in reduced precision.
    """

    def __init__(self, chunk_frames: int = 256, normalise: str = "utterance") -> None:
        super().__init__()
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be positive, got {chunk_frames}")
        self.normalise = FeatureConfig(normalise).normalise  # validated; see FeatureConfig
        # CPU: chunked over threads (see the module docstring); GPUs take the batch whole.
        self.chunk_frames = int(chunk_frames)
        window = povey_window()  # float64: a float32 window alone adds -144 dB noise to every bin
        # Rows duplicated so that (Re^2, Im^2)-interleaved spectra reduce to |Y|^2 @ M within one matmul;
        # 2^30 = (2^15)^2 folds the int16 input scale into the filterbank exactly.
        mel = kaldi_mel_matrix() * INPUT_SCALE**2
        mel_interleaved = mel.repeat_interleave(2, dim=0).to(torch.float32).contiguous()
        self.register_buffer("window", window, persistent=False)
        window_dft = torch.view_as_real(torch.fft.rfft(window, n=N_FFT)).contiguous()  # [257, 2]
        self.register_buffer("window_dft", window_dft, persistent=False)
        self.register_buffer("mel_interleaved", mel_interleaved, persistent=False)
        self._mel_blocks = _band_blocks(mel_interleaved)

    @staticmethod
    def num_frames(num_samples: int) -> int:
        """Output frames (after stacking) for ``num_samples`` samples; ValueError when too short."""
        return num_frames(num_samples)

    def _check(self, waves: Tensor, lengths: Tensor) -> Tensor:
        if not isinstance(waves, Tensor) or waves.dim() != 2:
            shape = tuple(waves.shape) if isinstance(waves, Tensor) else type(waves).__name__
            raise ValueError(f"waves must be a 2-D tensor [batch, samples], got {shape}")
        if not waves.is_floating_point():
            raise ValueError(f"waves must be floating point in [-1, 1], got dtype {waves.dtype}")
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.shape[0] != waves.shape[0]:
            got = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
            raise ValueError(f"lengths must be a 1-D tensor with one entry per row ({waves.shape[0]}), got {got}")
        if lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be integers (sample counts), got dtype {lengths.dtype}")
        if waves.device.type == "mps":
            raise ValueError(
                "W2VBertFbank needs float64 (FFT parity with the extractor), which MPS lacks: run it on CPU"
            )
        if waves.shape[0] == 0:
            raise ValueError("empty batch: waves has 0 rows")
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        shortest, longest = int(lengths_cpu.min()), int(lengths_cpu.max())
        if longest > waves.shape[1]:
            raise ValueError(f"a length ({longest}) exceeds the padded wave length ({waves.shape[1]})")
        if shortest < MIN_SAMPLES:
            row = int(torch.argmin(lengths_cpu))
            try:
                num_frames(shortest)
            except ValueError as err:
                raise ValueError(f"row {row}: {err}") from None
        return lengths_cpu

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        lengths_cpu = self._check(waves, lengths)
        with torch.no_grad(), torch.autocast(device_type=waves.device.type, enabled=False):
            return self._normalise_and_stack(*self._log_mel(waves, lengths_cpu))

    def log_mel(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The raw Kaldi log-mel frames before normalisation and stacking: ([B, F, 80], frames per row [B]).

        Frames past a row's count are unspecified. Used by the fbank-statistics baseline.
        """
        lengths_cpu = self._check(waves, lengths)
        with torch.no_grad(), torch.autocast(device_type=waves.device.type, enabled=False):
            return self._log_mel(waves, lengths_cpu)

    def _log_mel(self, waves: Tensor, lengths_cpu: Tensor) -> tuple[Tensor, Tensor]:
        device = waves.device
        batch = waves.shape[0]
        frames_per_row = 1 + (lengths_cpu - WIN_LENGTH) // HOP_LENGTH  # analysis frames, [B]
        total = int(frames_per_row.max())

        logmel = torch.empty(batch, total, NUM_MEL_BINS, dtype=torch.float32, device=device)
        chunks = list(self._chunks(batch, total, device))
        largest = max((r.stop - r.start) * (c.stop - c.start) for r, c in chunks)

        def worker(next_index: Callable[[], int]) -> None:
            work = {
                "fft_in": torch.zeros(largest, N_FFT, dtype=torch.float64, device=device),  # tail stays 0
                "power": torch.empty(largest, N_FFT + 2, dtype=torch.float32, device=device),
            }
            while (i := next_index()) < len(chunks):
                rows, cols = chunks[i]
                start = HOP_LENGTH * cols.start
                stop = HOP_LENGTH * (cols.stop - 1) + WIN_LENGTH
                self._logmel_chunk(waves[rows, start:stop], logmel[rows, cols], work)

        workers = min(torch.get_num_threads(), len(chunks)) if device.type == "cpu" else 1
        if workers <= 1:
            worker(itertools.count().__next__)
        else:
            # Chunk-level threads instead of op-level ones: torch ops release the GIL, each thread keeps its
            # chunk in its own cache, and a thread the OS deschedules does not stall the other at every op's
            # barrier. The shared counter hands out chunks dynamically (count.__next__ is atomic in CPython).
            next_index = itertools.count().__next__
            with ThreadPoolExecutor(workers, thread_name_prefix="fbank") as pool:
                for job in [pool.submit(worker, next_index) for _ in range(workers)]:
                    job.result()
        return logmel, frames_per_row

    def _chunks(self, batch: int, total: int, device: torch.device):
        """(row slice, frame slice) pairs of about ``chunk_frames`` frames each."""
        target = total * batch if device.type != "cpu" else self.chunk_frames
        if total >= target:
            for b in range(batch):
                for f0 in range(0, total, target):
                    yield slice(b, b + 1), slice(f0, min(total, f0 + target))
        else:
            step = max(1, target // total)
            for b0 in range(0, batch, step):
                yield slice(b0, min(batch, b0 + step)), slice(0, total)

    def _logmel_chunk(self, samples: Tensor, out: Tensor, work: dict[str, Tensor]) -> None:
        """Log-mel energies of all frames inside ``samples`` [rows, 160 (count - 1) + 400] into ``out``."""
        rows, count = out.shape[0], out.shape[1]
        n = rows * count
        # Waveform-sized work (2.5x smaller than the frames) in float64: the pre-emphasis difference and
        # the frame means must not add float32 rounding of the full-band signal.
        if samples.dtype != torch.float32:
            samples = samples.to(torch.float32)  # the extractor rounds any input to float32 first
        x = samples.to(torch.float64)
        emph = torch.empty_like(x)
        emph[:, 0] = 0.0  # only ever meets w[0] = 0, so the sample before the chunk is not needed
        torch.sub(x[:, 1:], x[:, :-1], alpha=PREEMPHASIS, out=emph[:, 1:])
        blocks = x.view(rows, x.shape[1] // _BLOCK, _BLOCK).sum(-1)  # the span is a multiple of 80
        frame_dc = blocks.unfold(1, WIN_LENGTH // _BLOCK, HOP_LENGTH // _BLOCK).sum(-1)
        frame_dc.mul_((1.0 - PREEMPHASIS) / WIN_LENGTH)  # [rows, count]

        padded = work["fft_in"][:n]
        framed = padded[:, :WIN_LENGTH].view(rows, count, WIN_LENGTH)
        torch.mul(emph.unfold(1, WIN_LENGTH, HOP_LENGTH), self.window, out=framed)
        # float64 FFT: float32 FFT error is relative to the whole frame's energy and reaches 2e-3 after
        # normalisation in weak bands (the extractor transforms in float64).
        spec = torch.view_as_real(torch.fft.rfft(padded, dim=-1))  # [n, 257, 2]
        # DC removal by linearity, fused with the cast: FFT(w (e - c)) = FFT(w e) - c FFT(w). Rounding the
        # spectrum to float32 is what the extractor does too (it stores complex64).
        power = work["power"][:n].view(n, N_FFT // 2 + 1, 2)
        torch.addcmul(spec, frame_dc.reshape(n, 1, 1), self.window_dft, value=-1.0, out=power)
        power = power.view(n, N_FFT + 2)
        power.square_()
        weights = self.mel_interleaved
        if power.device.type != "cpu":
            # Training may switch on TF32 (10-bit mantissa) globally; float64 matmuls never use it.
            mel = (power.double() @ weights.double()).float()
        elif len(self._mel_blocks) == 1:
            mel = power @ weights
        else:
            # Plain products, no out=: matmul's out= variant measured 10-50x slower on CPU here.
            mel = torch.cat([power[:, r0:r1] @ weights[r0:r1, c0:c1] for r0, r1, c0, c1 in self._mel_blocks], 1)
        # A chunk is whole rows or a frame range of one row, so its slice of the result is contiguous.
        torch.log(mel.clamp_min_(MEL_FLOOR), out=out.view(n, NUM_MEL_BINS))

    def to_config(self) -> FeatureConfig:
        return FeatureConfig(self.normalise)

    def _normalise_and_stack(self, logmel: Tensor, frames_per_row: Tensor) -> tuple[Tensor, Tensor]:
        batch, total, _ = logmel.shape
        device = logmel.device
        ragged = not bool((frames_per_row == total).all())
        scale = None if self.normalise == "none" else _centre_per_bin(logmel, frames_per_row, ragged)

        out_per_row = frames_per_row // STACK
        out_frames = int(out_per_row.max())
        feats = torch.empty(batch, out_frames, FEATURE_DIM, dtype=torch.float32, device=device)
        # Stacking is a reshape: write the (scaled) frames straight into the [B, T, 160] result.
        frames, stacked = logmel[:, : STACK * out_frames], feats.view(batch, STACK * out_frames, NUM_MEL_BINS)
        if scale is None:
            stacked.copy_(frames)
        else:
            torch.mul(frames, scale, out=stacked)
        mask = (torch.arange(out_frames, device=device) < out_per_row.to(device)[:, None]).long()
        if ragged:
            feats.masked_fill_(mask.unsqueeze(-1) == 0, 0.0)  # not a multiply: padding may hold inf/nan
        return feats, mask
