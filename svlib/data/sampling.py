"""Training batches (speaker-balanced random crops or epochs over every (utterance, speed) pair, speed
perturbation as extra classes) and length-sorted evaluation batches.

Resume and multi-process loading rest on one rule: **batch ``i`` is a pure function of
``(seed, i, rank, world_size)``**. Every random choice for batch ``i`` (which samples, crop length, crop
offsets, speeds) is drawn from generators seeded with ``[seed, i, rank]`` (or, for the epoch's shuffle,
``[seed, epoch]``), so

* the loader state is just the step counter: ``state_dict() == {"step": i, "seed": seed}``, and a resumed run
  sees exactly the batches an uninterrupted one would have seen (also in the middle of an epoch);
* DataLoader workers can build batches in any order and the stream does not depend on ``num_workers``;
* DDP ranks draw their batches without any coordination.

Two ways to pick the samples of a batch (``SamplingConfig.mode``):

* ``speaker_balanced``: ``speakers_per_batch`` distinct speakers, then utterances of each, with replacement
  across batches (each rank its own random stream);
* ``epoch`` (the reference recipe, WeSpeaker, torch's DistributedSampler): the ``E = copies * U`` entries
  (``U`` utterances, ``copies`` = number of speeds with speed perturbation, else 1) are shuffled once per
  epoch by ``perm_e = permutation(E)`` drawn from ``[seed, epoch]``; with ``P = batch_size * world_size``
  and ``K = floor(E / P)`` batches per rank and epoch (``steps_per_epoch``; the last ``E - K P`` entries of
  the shuffle are dropped, so every rank has the same number of batches), batch ``i`` of rank ``r`` is
  epoch ``e = i // K``, ``k = i % K`` and the entries ``perm_e[(k W + r) B : (k W + r + 1) B]``. The
  ranks' slices are disjoint, and over an epoch they cover each kept entry exactly once.

Speed perturbation as classes (the reference recipe): an utterance of speaker ``k`` played at speed
``speeds[j]`` is labelled ``k + j' * num_speakers`` where ``j'`` orders the speeds with **1.0 first** and the
others in config order. With ``speeds=(0.9, 1.0, 1.1)``: rows ``0..S-1`` are original speed, ``S..2S-1`` are
0.9 and ``2S..3S-1`` are 1.1. A classifier trained this way therefore keeps its original-speed speakers in
rows ``0..S-1``; a later stage that trains without speed perturbation slices exactly those rows. In the
epoch mode the entry ``x`` is utterance ``x mod U`` at speed ``j' = x // U``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import soxr
import torch

from svlib.audio import SAMPLE_RATE, fit_length

__all__ = [
    "SamplingConfig",
    "Batch",
    "WaveCache",
    "steps_per_epoch",
    "TrainLoader",
    "speed_change",
    "iterate_by_length",
]


@dataclass
class SamplingConfig:
    """How training batches are drawn.

    ``crop_seconds``: every batch draws one crop duration uniformly from this range (one length per batch, so
    no padding is needed and the batch shape varies a little between steps).
    ``speakers_per_batch``: the batch samples this many distinct speakers first, then
    ``batch_size / speakers_per_batch`` utterances of each (the remainder goes one each to the first speakers).
    ``None`` means ``batch_size // 2`` speakers with 2 utterances each (capped at the number of speakers in the
    data, which then get proportionally more utterances).
    ``mode``: ``speaker_balanced`` or ``epoch`` (each (utterance, speed) pair once per epoch, shuffled per
    epoch, sharded over the ranks; see the module docstring). ``speakers_per_batch`` applies to the first only.
    ``speed_perturb``: every utterance also counts at each speed of ``speeds`` (epoch mode: one entry per
    speed; speaker-balanced: a speed drawn uniformly per sample), and each speed is its own set of classes.
    ``cache_bytes``: decoded waveforms kept in memory per process (each DataLoader worker has its own), as an
    LRU bounded by this many bytes of float32 audio; 0 (the default) keeps nothing. The bound is per process,
    not per job: the caches total ``cache_bytes x max(1, num_workers) x ranks`` (the main process holds the
    cache when ``num_workers`` is 0), e.g. 400 MB x 4 workers x 8 GPUs = 12.8 GB on the node, whatever the size
    of the data.
    """

    batch_size: int = 32
    crop_seconds: tuple[float, float] = (2.0, 3.0)
    mode: Literal["speaker_balanced", "epoch"] = "speaker_balanced"
    speakers_per_batch: int | None = None
    speed_perturb: bool = False
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)
    cache_bytes: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        lo, hi = self.crop_seconds
        if not (0 < lo <= hi) or not math.isfinite(hi):
            raise ValueError(f"crop_seconds must be (low, high) with 0 < low <= high, got {self.crop_seconds}")
        if self.mode == "epoch" and self.speakers_per_batch is not None:
            raise ValueError("speakers_per_batch applies to mode speaker_balanced only (an epoch batch is a slice "
                             "of the epoch's shuffle)")
        if self.speakers_per_batch is not None and not 1 <= self.speakers_per_batch <= self.batch_size:
            raise ValueError(f"speakers_per_batch must be in 1..batch_size={self.batch_size}, got {self.speakers_per_batch}")
        if self.speed_perturb:
            if 1.0 not in self.speeds:
                raise ValueError(f"speeds must contain 1.0 (the original-speed classes), got {self.speeds}")
            if len(set(self.speeds)) != len(self.speeds) or any(not (0 < s < 10) for s in self.speeds):
                raise ValueError(f"speeds must be distinct positive factors, got {self.speeds}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 (0 = no cache), got {self.cache_bytes}")

    @property
    def copies(self) -> int:
        """How many times each utterance counts per epoch: the number of speeds with speed perturbation."""
        return len(self.speeds) if self.speed_perturb else 1


def steps_per_epoch(num_utterances: int, batch_size: int, world_size: int, copies: int = 1) -> int:
    """Optimizer steps in one epoch: ``floor(copies * num_utterances / (batch_size * world_size))``.

    One epoch visits each of the ``copies * num_utterances`` (utterance, speed) entries once, split over
    ``world_size`` ranks that each take ``batch_size`` per step; the incomplete last round is dropped
    (``drop_last``), so all ranks take the same number of steps. The reference's s1 on 8 GPUs:
    ``floor(3 * 1,092,009 / (64 * 8)) = 6,398``.
    """
    for name, value in (("num_utterances", num_utterances), ("batch_size", batch_size),
                        ("world_size", world_size), ("copies", copies)):
        if int(value) != value or value < 1:
            raise ValueError(f"steps_per_epoch: {name} must be a positive integer, got {value!r}")
    return (int(copies) * int(num_utterances)) // (int(batch_size) * int(world_size))


class WaveCache:
    """LRU of decoded waveforms bounded by ``max_bytes`` (sum of ``array.nbytes``); 0 stores nothing.

    A waveform larger than the whole bound is returned but not kept. Not shared between processes: each
    DataLoader worker holds its own.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> np.ndarray | None:
        wave = self._items.get(key)
        if wave is not None:
            self._items.move_to_end(key)
        return wave

    def put(self, key: str, wave: np.ndarray) -> None:
        if wave.nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        while self._items and self.nbytes + wave.nbytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._items[key] = wave
        self.nbytes += wave.nbytes


@dataclass
class Batch:
    """``waves`` [B, N] float32 (±1), ``lengths`` [B] valid samples, ``labels`` [B] class ids, ``utts`` ids."""

    waves: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    utts: list[str]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.waves.to(device, non_blocking=non_blocking), self.lengths.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), self.utts)

    def pin_memory(self) -> "Batch":
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return Batch(self.waves.pin_memory(), self.lengths.pin_memory(), self.labels.pin_memory(), self.utts)

    def __len__(self) -> int:
        return len(self.utts)


def speed_change(wave: np.ndarray, speed: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """sox ``speed`` effect: play ``wave`` ``speed`` times faster, so duration scales by ``1/speed`` and every
    frequency by ``speed`` (pitch changes, unlike ``tempo``).

    Implemented as resampling from a pretended rate ``speed * sample_rate`` to ``sample_rate``:
    ``y(t) = x(speed * t)``, giving ``round(len(x) / speed)`` samples.
    """
    if speed == 1.0:
        return wave
    if speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    out = soxr.resample(np.asarray(wave, dtype=np.float32), speed * sample_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


_SPEED_MARGIN = 128  # source samples cut beyond each end of a speed-perturbed crop


class _BatchMaker(torch.utils.data.Dataset):
    """Map-style dataset over *batch index*: ``self[i]`` is batch ``i`` for this seed, rank and world size.

    Lives in each DataLoader worker (pickled to it), so its audio cache and its epoch shuffle are per process.
    """

    def __init__(self, datadir, cfg: SamplingConfig, seed: int, rank: int, sample_rate: int, world_size: int = 1):
        self.datadir = datadir
        self.cfg = cfg
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.sample_rate = sample_rate
        spk2utt = datadir.spk2utt
        self.speakers = list(spk2utt)
        self.spk_utts = [spk2utt[s] for s in self.speakers]
        n_spk = len(self.speakers)
        if cfg.speakers_per_batch is None:
            self.n_batch_spk = min(max(cfg.batch_size // 2, 1), n_spk)
        elif cfg.speakers_per_batch > n_spk:
            raise ValueError(f"speakers_per_batch={cfg.speakers_per_batch} but the training data has only {n_spk} speakers")
        else:
            self.n_batch_spk = cfg.speakers_per_batch
        # 1.0 first so that original-speed classes are rows 0..S-1 whatever order the config lists speeds in.
        self.speed_order = [1.0] + [s for s in cfg.speeds if s != 1.0] if cfg.speed_perturb else [1.0]
        # Epoch mode: utterance u is self.utts[u] of speaker self.utt_speaker[u] (int32: 4 bytes per utterance).
        self.utts = [u for utts in self.spk_utts for u in utts]
        self.utt_speaker = np.repeat(np.arange(n_spk, dtype=np.int32), [len(u) for u in self.spk_utts])
        self.num_entries = len(self.utts) * len(self.speed_order)
        self.steps_per_epoch = steps_per_epoch(len(self.utts), cfg.batch_size, self.world_size, len(self.speed_order))
        if cfg.mode == "epoch" and self.steps_per_epoch == 0:
            raise ValueError(f"epoch sampling: {self.num_entries} (utterance, speed) entries are fewer than one "
                             f"step of batch_size {cfg.batch_size} x {self.world_size} rank(s)")
        self._cache = WaveCache(cfg.cache_bytes)
        self._epoch_order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation): one epoch kept

    def __len__(self) -> int:
        # The stream is infinite; a sampler supplies the indices, this only satisfies the Dataset protocol.
        return 2 ** 62

    def _wave(self, utt: str) -> np.ndarray:
        wave = self._cache.get(utt)
        if wave is None:
            wave = self.datadir.load_wave(utt, sample_rate=self.sample_rate)
            self._cache.put(utt, wave)
        return wave

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The shuffle of epoch ``epoch``: a permutation of the entry ids ``0..E-1`` (int32), from ``[seed, epoch]``."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x45504F43])  # tag: not the stream of any batch
            self._epoch_order = (epoch, rng.permutation(np.arange(self.num_entries, dtype=np.int32)))
        return self._epoch_order[1]

    def epoch_entries(self, index: int) -> np.ndarray:
        """Entry ids of batch ``index`` in the epoch mode (see the module docstring)."""
        epoch, k = divmod(index, self.steps_per_epoch)
        first = (k * self.world_size + self.rank) * self.cfg.batch_size
        return self.epoch_order(epoch)[first:first + self.cfg.batch_size]

    def plan(self, index: int) -> tuple[int, list[tuple[str, int, int]]]:
        """The random choices of batch ``index``: crop samples and ``(utt, speaker_index, speed_index)`` rows."""
        if index < 0:
            raise IndexError(f"batch index must be >= 0, got {index}")
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, index, self.rank])
        lo, hi = cfg.crop_seconds
        num_samples = int(round(rng.uniform(lo, hi) * self.sample_rate))
        if cfg.mode == "epoch":
            speed, utt = np.divmod(self.epoch_entries(index).astype(np.int64), len(self.utts))
            return num_samples, [(self.utts[u], int(self.utt_speaker[u]), int(j)) for u, j in zip(utt, speed)]
        spk_ids = rng.choice(len(self.speakers), size=self.n_batch_spk, replace=False)
        base, extra = divmod(cfg.batch_size, self.n_batch_spk)
        rows = []
        for pos, k in enumerate(spk_ids):
            count = base + (1 if pos < extra else 0)
            utts = self.spk_utts[k]
            # Without replacement when the speaker has enough files; otherwise repeats still get different crops.
            picks = rng.choice(len(utts), size=count, replace=count > len(utts))
            for p in picks:
                j = int(rng.integers(len(self.speed_order))) if len(self.speed_order) > 1 else 0
                rows.append((utts[p], int(k), j))
        return num_samples, rows

    def __getitem__(self, index: int) -> Batch:
        num_samples, rows = self.plan(index)
        rng = np.random.default_rng([self.seed, index, self.rank, 1])  # crop offsets: separate stream from the plan
        n_spk = len(self.speakers)
        waves = np.empty((len(rows), num_samples), dtype=np.float32)
        labels = np.empty(len(rows), dtype=np.int64)
        for b, (utt, k, j) in enumerate(rows):
            speed = self.speed_order[j]
            wave = self._wave(utt)
            if speed == 1.0:
                waves[b] = fit_length(wave, num_samples, rng)
            else:
                # Cut num_samples * speed source samples plus a margin each side: the resampler's filter
                # rings over ~100 samples at a segment's edges, and the margins are cut off afterwards.
                need = int(math.ceil(num_samples * speed)) + 2 * _SPEED_MARGIN
                segment = fit_length(wave, need, rng)
                changed = speed_change(segment, speed, self.sample_rate)
                waves[b] = fit_length(changed[int(round(_SPEED_MARGIN / speed)):], num_samples)
            labels[b] = k + j * n_spk
        return Batch(torch.from_numpy(waves), torch.full((len(rows),), num_samples, dtype=torch.long),
                     torch.from_numpy(labels), [r[0] for r in rows])


class _StepSampler(torch.utils.data.Sampler):
    """Yields ``start, start + 1, ...`` forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        i = self.start
        while True:
            yield i
            i += 1


def _worker_init(_worker_id: int) -> None:
    # Workers only decode and resample; several intra-op threads per worker would oversubscribe the CPUs.
    torch.set_num_threads(1)


class TrainLoader:
    """Infinite iterator of training ``Batch``es; batch ``i`` depends only on ``(seed, i, rank, world_size)``.

    ``num_classes`` is the number of speakers, times ``len(cfg.speeds)`` with speed perturbation (see module
    docstring for the label layout). ``speaker_index`` maps speaker id -> row of its original-speed class.
    ``state_dict()`` / ``load_state_dict()`` save and restore the number of batches consumed.
    ``steps_per_epoch`` (see :func:`steps_per_epoch`) converts epochs into steps for this world size; in the
    epoch mode it is also where the stream moves on to the next epoch's shuffle.
    """

    def __init__(self, datadir, cfg: SamplingConfig, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, pin_memory: bool = False, sample_rate: int = SAMPLE_RATE):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1={world_size - 1}, got {rank}")
        if len(datadir.wavs) == 0:
            raise ValueError("TrainLoader: the training data directory has no utterances")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.cfg = cfg
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self._maker = _BatchMaker(datadir, cfg, seed, rank, sample_rate, world_size)
        self.speaker_index = {spk: k for k, spk in enumerate(self._maker.speakers)}
        self.num_speakers = len(self.speaker_index)
        self.num_classes = self.num_speakers * len(self._maker.speed_order)
        self.speed_order = tuple(self._maker.speed_order)
        self.num_utterances = len(self._maker.utts)
        self.steps_per_epoch = self._maker.steps_per_epoch
        self._step = start_step

    @property
    def epoch_sharded(self) -> bool:
        """Whether batch ``i`` depends on the world size (epoch mode's shard); the training engine then refuses
        to resume a checkpoint of another world size (see ``svlib.train.engine.check_resume_world_size``)."""
        return self.cfg.mode == "epoch"

    @property
    def step(self) -> int:
        """Number of batches handed out so far (= index of the next batch)."""
        return self._step

    def batch(self, index: int) -> Batch:
        """Batch ``index`` computed directly in this process (no workers, no effect on the iterator)."""
        return self._maker[index]

    def label_of(self, speaker: str, speed: float = 1.0) -> int:
        """Class id of ``speaker`` played at ``speed``."""
        if speed not in self.speed_order:
            raise KeyError(f"speed {speed} is not one of this loader's speeds {self.speed_order}")
        return self.speaker_index[speaker] + self.speed_order.index(speed) * self.num_speakers

    def __iter__(self) -> Iterator[Batch]:
        workers = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(
            self._maker, batch_size=None, sampler=_StepSampler(self._step), num_workers=workers,
            pin_memory=self.pin_memory, worker_init_fn=_worker_init if workers > 0 else None,
            persistent_workers=False, prefetch_factor=2 if workers > 0 else None)
        for batch in loader:
            # Count only batches actually handed out, not those prefetched by workers, so state_dict is exact.
            self._step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"step": self._step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "step" not in state:
            raise ValueError(f"TrainLoader state needs a 'step' entry, got keys {sorted(state)}")
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"TrainLoader state was saved with seed {state['seed']} but this loader has seed "
                             f"{self.seed}; resuming would not reproduce the batches")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"TrainLoader state has a negative step {step}")
        self._step = step


def iterate_by_length(datadir, utts=None, max_seconds: float | None = 60.0, max_batch_seconds: float = 240.0,
                      sample_rate: int = SAMPLE_RATE) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Evaluation batches ``(utts, waves [B, N] zero-padded, lengths [B])`` of utterances of similar length.

    Utterances are sorted longest first (an out-of-memory shows on the first batch, not the last) and each is
    read up to ``max_seconds``. A batch grows while ``B * longest <= max_batch_seconds``, i.e. the padded
    size is bounded; a single utterance longer than that still forms a batch of one.
    """
    if max_batch_seconds <= 0:
        raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive or None, got {max_seconds}")
    utts = sorted(datadir.wavs) if utts is None else list(utts)
    cap = math.inf if max_seconds is None else max_seconds
    durs = {u: min(datadir.seconds(u), cap) for u in utts}
    order = sorted(durs, key=lambda u: (-durs[u], u))

    def emit(group: list[str]):
        waves = [datadir.load_wave(u, max_seconds=max_seconds, sample_rate=sample_rate) for u in group]
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        out = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
        for b, w in enumerate(waves):
            out[b, :len(w)] = torch.from_numpy(w)
        return group, out, lengths

    group: list[str] = []
    for u in order:
        longest = durs[group[0]] if group else durs[u]
        if group and (len(group) + 1) * longest > max_batch_seconds:
            yield emit(group)
            group = []
        group.append(u)
    if group:
        yield emit(group)
