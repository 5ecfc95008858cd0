"""Training batches: labels with speed classes, speaker balance, crops, determinism, resume, workers."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from svlib.config import ConfigError, from_dict
from svlib.data.lists import DataDir
import time

from svlib.data.sampling import (Batch, SamplingConfig, TrainLoader, WaveCache, _BatchMaker, iterate_by_length,
                                 speed_change, steps_per_epoch)

SR = 16000
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def peak_hz(x: np.ndarray) -> float:
    """Frequency of the largest FFT bin of a Hann-windowed signal, refined by parabolic interpolation."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / len(x)


@pytest.fixture(scope="module")
def mini() -> DataDir:
    root = DATA / "sv-mini"
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"sv-mini not found at {root} (CI always has it; clone next to ../shared)")
    wavs, utt2spk = {}, {}
    with open(root / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            utt = Path(row["path"]).with_suffix("").as_posix().replace("/", "-")
            wavs[utt] = str(root / row["path"])
            utt2spk[utt] = row["speaker"]
    return DataDir(wavs=wavs, utt2spk=utt2spk)


# Speaker k's files are pure tones at TONES[k], so the content of a crop tells which speaker and which speed
# produced it, independently of the label the loader assigns.
TONES = [300.0, 500.0, 700.0, 900.0]


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> DataDir:
    folder = tmp_path_factory.mktemp("tones")
    wavs, utt2spk = {}, {}
    for k, freq in enumerate(TONES):
        for u, seconds in enumerate((1.3, 2.5, 4.0)):
            t = np.arange(int(seconds * SR)) / SR
            utt = f"spk{k}-u{u}"
            path = folder / f"{utt}.wav"
            sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t + u)).astype(np.float32), SR)
            wavs[utt], utt2spk[utt] = str(path), f"spk{k}"
    return DataDir(wavs=wavs, utt2spk=utt2spk)


def same(a: Batch, b: Batch) -> bool:
    return (a.utts == b.utts and torch.equal(a.waves, b.waves) and torch.equal(a.labels, b.labels)
            and torch.equal(a.lengths, b.lengths))


def test_config_is_strict_and_validated():
    cfg = from_dict(SamplingConfig, {"batch_size": 8, "crop_seconds": [1, 2], "speed_perturb": True})
    assert cfg.crop_seconds == (1.0, 2.0) and cfg.speeds == (0.9, 1.0, 1.1)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SamplingConfig, {"batchsize": 8})
    with pytest.raises(ConfigError, match="crop_seconds"):
        from_dict(SamplingConfig, {"crop_seconds": [3.0, 2.0]})
    with pytest.raises(ConfigError, match="1.0"):
        from_dict(SamplingConfig, {"speed_perturb": True, "speeds": [0.9, 1.1]})
    with pytest.raises(ConfigError, match="speakers_per_batch"):
        from_dict(SamplingConfig, {"batch_size": 4, "speakers_per_batch": 5})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(SamplingConfig, {"mode": "random"})
    with pytest.raises(ConfigError, match="speaker_balanced only"):
        from_dict(SamplingConfig, {"mode": "epoch", "speakers_per_batch": 4})
    with pytest.raises(ConfigError, match="cache_bytes"):
        from_dict(SamplingConfig, {"cache_bytes": -1})
    assert SamplingConfig().cache_bytes == 0  # no audio cache unless asked for


def test_speed_change_length_and_frequency():
    t = np.arange(SR) / SR
    x = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
    for speed in (1.1, 0.9):
        y = speed_change(x, speed)
        assert y.dtype == np.float32
        assert abs(len(y) - len(x) / speed) <= 1, (speed, len(y))
        # Measure away from the edges, where the resampler's filter has its transient.
        assert peak_hz(y[800:-800]) == pytest.approx(440.0 * speed, abs=0.5)
    assert speed_change(x, 1.0) is x


def test_speed_classes_labels_match_content(tones):
    cfg = SamplingConfig(batch_size=12, crop_seconds=(1.0, 1.5), speakers_per_batch=4, speed_perturb=True)
    loader = TrainLoader(tones, cfg, seed=3)
    assert loader.num_speakers == 4 and loader.num_classes == 12
    assert loader.speed_order == (1.0, 0.9, 1.1)
    assert loader.speaker_index == {"spk0": 0, "spk1": 1, "spk2": 2, "spk3": 3}
    assert loader.label_of("spk2", 1.0) == 2 and loader.label_of("spk2", 0.9) == 6 and loader.label_of("spk2", 1.1) == 10
    counts = Counter()
    for i in range(10):
        batch = loader.batch(i)
        for utt, label, wave in zip(batch.utts, batch.labels.tolist(), batch.waves.numpy()):
            spk, speed_idx = label % 4, label // 4
            assert spk == loader.speaker_index[tones.utt2spk[utt]]
            expected = TONES[spk] * loader.speed_order[speed_idx]
            assert peak_hz(wave) == pytest.approx(expected, rel=0.01), (utt, label)
            counts[speed_idx] += 1
    # 120 draws, uniform over 3 speeds: each speed 40 +- ~16 (3 sigma), i.e. about 2/3 perturbed.
    assert sum(counts.values()) == 120 and all(25 <= counts[j] <= 55 for j in range(3)), counts


def test_without_speed_perturbation_classes_are_speakers(mini):
    loader = TrainLoader(mini, SamplingConfig(batch_size=8, crop_seconds=(1.0, 1.0)), seed=0)
    assert loader.num_classes == 40 == len(mini.speakers)
    batch = loader.batch(0)
    assert batch.labels.tolist() == [loader.speaker_index[mini.utt2spk[u]] for u in batch.utts]


def test_speaker_balanced_batches(mini):
    loader = TrainLoader(mini, SamplingConfig(batch_size=12, speakers_per_batch=4, crop_seconds=(1.0, 1.0)), seed=1)
    for i in range(5):
        batch = loader.batch(i)
        per_spk = Counter(mini.utt2spk[u] for u in batch.utts)
        assert sorted(per_spk.values()) == [3, 3, 3, 3]
        # Every sv-mini speaker has >= 3 files, so a speaker's 3 utterances are distinct files.
        assert len(set(batch.utts)) == 12
    default = TrainLoader(mini, SamplingConfig(batch_size=10, crop_seconds=(1.0, 1.0)), seed=1).batch(0)
    assert sorted(Counter(mini.utt2spk[u] for u in default.utts).values()) == [2] * 5
    uneven = TrainLoader(mini, SamplingConfig(batch_size=10, speakers_per_batch=4, crop_seconds=(1.0, 1.0)), seed=1).batch(0)
    assert sorted(Counter(mini.utt2spk[u] for u in uneven.utts).values()) == [2, 2, 3, 3]
    with pytest.raises(ValueError, match="only 40 speakers"):
        TrainLoader(mini, SamplingConfig(batch_size=64, speakers_per_batch=41), seed=0)


def test_speakers_are_sampled_uniformly(tones):
    loader = TrainLoader(tones, SamplingConfig(batch_size=2, speakers_per_batch=2, crop_seconds=(0.5, 0.5)), seed=0)
    counts = Counter(tones.utt2spk[u] for i in range(200) for u in loader.batch(i).utts)
    # 400 draws over 4 speakers: 100 each, 3 sigma ~ 26.
    assert all(70 <= counts[s] <= 130 for s in tones.speakers), counts


def test_crop_length_in_range_and_constant_per_batch(mini):
    cfg = SamplingConfig(batch_size=6, crop_seconds=(2.0, 3.0), speed_perturb=True)
    loader = TrainLoader(mini, cfg, seed=7)
    sizes = set()
    for i in range(6):
        batch = loader.batch(i)
        n = batch.waves.shape[1]
        assert batch.waves.dtype == torch.float32 and batch.waves.shape[0] == 6
        assert 2.0 * SR <= n <= 3.0 * SR
        assert batch.lengths.tolist() == [n] * 6 and batch.labels.dtype == torch.long
        assert torch.isfinite(batch.waves).all() and (batch.waves.abs().amax(1) > 1e-3).all()
        sizes.add(n)
    assert len(sizes) == 6  # a fresh crop length per batch


def test_short_files_are_repeat_padded(tones):
    one = tones.subset(["spk0-u0"])
    loader = TrainLoader(one, SamplingConfig(batch_size=2, crop_seconds=(3.0, 3.0)), seed=0)
    wave = loader.batch(0).waves[0].numpy()
    length = int(1.3 * SR)
    # Tiling puts the file end to end, so the crop repeats with the file's period.
    np.testing.assert_array_equal(wave[:3 * SR - length], wave[length:])


def test_batches_are_a_pure_function_of_seed_step_rank(mini):
    cfg = SamplingConfig(batch_size=8, crop_seconds=(1.0, 2.0), speed_perturb=True)
    a, b = TrainLoader(mini, cfg, seed=5), TrainLoader(mini, cfg, seed=5)
    assert same(a.batch(3), b.batch(3)) and same(a.batch(3), a.batch(3))
    assert not same(a.batch(3), a.batch(4))
    assert not same(a.batch(3), TrainLoader(mini, cfg, seed=6).batch(3))
    r1 = TrainLoader(mini, cfg, seed=5, rank=1, world_size=2)
    assert not same(a.batch(3), r1.batch(3))
    with pytest.raises(ValueError, match="rank"):
        TrainLoader(mini, cfg, seed=5, rank=2, world_size=2)


def test_resume_from_state_dict_continues_the_stream(mini):
    cfg = SamplingConfig(batch_size=4, crop_seconds=(1.0, 1.5))
    full = TrainLoader(mini, cfg, seed=11)
    it = iter(full)
    reference = [next(it) for _ in range(5)]
    first = TrainLoader(mini, cfg, seed=11)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert state == {"step": 3, "seed": 11}
    resumed = TrainLoader(mini, cfg, seed=11)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert same(next(it), reference[3]) and same(next(it), reference[4])
    assert resumed.step == 5
    assert same(next(iter(TrainLoader(mini, cfg, seed=11, start_step=4))), reference[4])
    with pytest.raises(ValueError, match="seed 11"):
        TrainLoader(mini, cfg, seed=12).load_state_dict(state)


def test_workers_give_the_same_batches(mini):
    base = dict(batch_size=6, crop_seconds=(1.0, 2.0), speed_perturb=True)
    serial = iter(TrainLoader(mini, SamplingConfig(**base, num_workers=0), seed=2))
    parallel_loader = TrainLoader(mini, SamplingConfig(**base, num_workers=2), seed=2)
    parallel = iter(parallel_loader)
    for _ in range(4):
        assert same(next(serial), next(parallel))
    # Prefetched batches are not counted: the state names the next batch the caller will see.
    assert parallel_loader.state_dict()["step"] == 4


def test_iterate_by_length(mini):
    utts = sorted(mini.wavs)
    seen = []
    previous_longest = float("inf")
    for names, waves, lengths in iterate_by_length(mini, utts, max_seconds=3.0, max_batch_seconds=12.0):
        assert waves.shape == (len(names), int(lengths.max())) and waves.dtype == torch.float32
        assert int(lengths.max()) <= 3 * SR
        longest = int(lengths.max()) / SR
        assert len(names) == 1 or len(names) * longest <= 12.0 + 1e-6
        assert longest <= previous_longest + 1e-6
        previous_longest = longest
        for b, utt in enumerate(names):
            n = int(lengths[b])
            assert n == min(round(mini.seconds(utt) * SR), 3 * SR)
            expected = mini.load_wave(utt, max_seconds=3.0)
            np.testing.assert_array_equal(waves[b, :n].numpy(), expected)
            assert not waves[b, n:].any()
        seen.extend(names)
    assert sorted(seen) == utts
    with pytest.raises(ValueError, match="max_batch_seconds"):
        next(iterate_by_length(mini, utts, max_batch_seconds=0))


# ------------------------------------------------------------------------------------------ epoch mode

def test_steps_per_epoch_reference_numbers():
    vox2 = 1_092_009
    assert steps_per_epoch(vox2, 64, 8, copies=3) == 6398       # s1: 8 GPUs, 3 speeds
    assert steps_per_epoch(vox2, 64, 4, copies=3) == 12796      # s2: 4 GPUs
    assert steps_per_epoch(vox2, 32, 4) == 8531                 # s3: no speed perturbation
    assert steps_per_epoch(10, 3, 1) == 3 and steps_per_epoch(5, 8, 1) == 0
    with pytest.raises(ValueError, match="world_size"):
        steps_per_epoch(10, 2, 0)
    assert SamplingConfig(speed_perturb=True).copies == 3 and SamplingConfig().copies == 1


def epoch_loaders(data, world, **cfg):
    cfg = SamplingConfig(mode="epoch", **{"crop_seconds": (0.5, 0.5), **cfg})
    return [TrainLoader(data, cfg, seed=4, rank=r, world_size=world) for r in range(world)]


def test_epoch_mode_ranks_are_disjoint_and_cover_the_epoch(mini):
    # 150 utterances x 3 speeds = 450 entries; 2 ranks x 8 = 16 per step -> 28 steps, 2 entries dropped
    loaders = epoch_loaders(mini, 2, batch_size=8, speed_perturb=True)
    assert all(lo.steps_per_epoch == 450 // 16 == 28 for lo in loaders) and loaders[0].num_utterances == 150
    makers = [lo._maker for lo in loaders]
    per_rank = [np.concatenate([m.epoch_entries(i) for i in range(28)]) for m in makers]
    assert all(len(e) == 28 * 8 for e in per_rank)
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    together = np.concatenate(per_rank)
    assert len(set(together.tolist())) == 448  # no duplicates, within or across ranks
    assert sorted(together.tolist()) == sorted(makers[0].epoch_order(0)[:448].tolist())
    # each kept (utterance, speed) pair is seen once: labels carry the right speaker and speed class
    loader = loaders[0]
    pairs = set()
    for i in range(3):
        batch = loader.batch(i)
        assert len(batch) == 8 and len(set(batch.waves.shape[1:])) == 1
        for utt, label in zip(batch.utts, batch.labels.tolist()):
            speaker = loader.speaker_index[mini.utt2spk[utt]]
            assert label % loader.num_speakers == speaker
            pairs.add((utt, label // loader.num_speakers))
    assert len(pairs) == 24


def test_epoch_mode_speed_labels_match_content(tones):
    loader = epoch_loaders(tones, 1, batch_size=4, speed_perturb=True, crop_seconds=(1.0, 1.0))[0]
    assert loader.steps_per_epoch == 36 // 4
    speeds = Counter()
    for i in range(loader.steps_per_epoch):
        batch = loader.batch(i)
        for label, wave in zip(batch.labels.tolist(), batch.waves.numpy()):
            spk, j = label % 4, label // 4
            assert peak_hz(wave) == pytest.approx(TONES[spk] * loader.speed_order[j], rel=0.01)
            speeds[j] += 1
    assert speeds == {0: 12, 1: 12, 2: 12}  # every utterance once at every speed


def test_only_the_epoch_mode_stream_depends_on_the_world_size(mini):
    """What the engine's resume check reads: epoch-mode batches are shards of the epoch (rank 0's first batch
    changes with the world size), speaker-balanced ones are not (the same batch on 1 or 2 ranks)."""
    for mode, sharded in (("epoch", True), ("speaker_balanced", False)):
        cfg = SamplingConfig(mode=mode, batch_size=16, crop_seconds=(0.5, 1.0))
        one, two = (TrainLoader(mini, cfg, seed=3, rank=0, world_size=n) for n in (1, 2))
        assert one.epoch_sharded is two.epoch_sharded is sharded
        assert same(one.batch(1), two.batch(1)) is not sharded, mode


def test_epoch_mode_resume_mid_epoch_and_epochs_reshuffle(mini):
    cfg = SamplingConfig(mode="epoch", batch_size=16, crop_seconds=(0.5, 1.0))
    full = TrainLoader(mini, cfg, seed=9, rank=1, world_size=2)
    assert full.steps_per_epoch == 150 // 32 == 4
    it = iter(full)
    reference = [next(it) for _ in range(10)]  # 2 1/2 epochs
    first = TrainLoader(mini, cfg, seed=9, rank=1, world_size=2)
    it = iter(first)
    for _ in range(5):  # stop one batch into the second epoch
        next(it)
    resumed = TrainLoader(mini, cfg, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for k in range(5, 10):
        assert same(next(it), reference[k]), k
    # a fresh epoch: a different order of the same entries, and (a pure function) again on request
    maker = full._maker
    e0, e1, e2 = (maker.epoch_order(e).copy() for e in (0, 1, 2))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(150))
    assert not np.array_equal(e0, e1) and not np.array_equal(e1, e2)
    np.testing.assert_array_equal(maker.epoch_order(0), e0)
    assert set(reference[0].utts) != set(reference[4].utts)  # the first batch of epochs 0 and 1 differ
    with pytest.raises(ValueError, match="fewer than one step"):
        TrainLoader(mini, SamplingConfig(mode="epoch", batch_size=80), seed=0, world_size=2)


def test_epoch_mode_workers_give_the_same_batches(mini):
    base = dict(mode="epoch", batch_size=40, crop_seconds=(0.5, 0.8))  # 3 steps per epoch
    serial = iter(TrainLoader(mini, SamplingConfig(**base), seed=2))
    parallel = iter(TrainLoader(mini, SamplingConfig(**base, num_workers=2), seed=2))
    for _ in range(5):
        assert same(next(serial), next(parallel))


def test_epoch_permutation_is_cheap_at_voxceleb_scale():
    # The shuffle is one numpy permutation of an int32 array per epoch (3.3M entries for VoxCeleb2 x 3
    # speeds), not Python tuples per batch; a stand-in maker with only the fields the epoch path reads.
    maker = _BatchMaker.__new__(_BatchMaker)
    maker.seed, maker.rank, maker.world_size, maker.num_entries = 24, 3, 8, 3 * 1_092_009
    maker.cfg, maker.steps_per_epoch, maker._epoch_order = SamplingConfig(batch_size=64), 6398, None
    start = time.process_time()
    order = maker.epoch_order(0)
    first = time.process_time() - start
    assert order.dtype == np.int32 and order.nbytes == 4 * 3 * 1_092_009
    start = time.process_time()
    rows = [maker.epoch_entries(i) for i in range(1000)]
    per_batch = (time.process_time() - start) / 1000
    assert first < 2.0 and per_batch < 1e-3, (first, per_batch)
    assert all(len(r) == 64 for r in rows) and maker._epoch_order[0] == 0


# ------------------------------------------------------------------------------------------ audio cache

def test_wave_cache_is_an_lru_bounded_in_bytes():
    cache = WaveCache(max_bytes=3000)
    waves = {k: np.zeros(n, dtype=np.float32) for k, n in (("a", 250), ("b", 250), ("c", 250), ("big", 800))}
    cache.put("a", waves["a"])
    cache.put("b", waves["b"])
    cache.put("c", waves["c"])  # 3 x 1000 bytes: full
    assert cache.nbytes == 3000 and len(cache) == 3
    assert cache.get("a") is waves["a"]  # a is now the most recently used
    cache.put("d", np.zeros(250, dtype=np.float32))
    assert "b" not in cache and {"a", "c", "d"} <= set(cache._items)
    cache.put("big", waves["big"])  # 3200 bytes: larger than the whole bound, not kept
    assert "big" not in cache and cache.nbytes == 3000
    assert WaveCache(0).get("a") is None
    off = WaveCache(0)
    off.put("a", waves["a"])
    assert len(off) == 0 and off.nbytes == 0


def test_loader_cache_stays_within_its_bound(mini):
    bound = 400_000  # bytes: a few sv-mini files of float32 audio
    loader = TrainLoader(mini, SamplingConfig(batch_size=8, crop_seconds=(0.5, 0.5), cache_bytes=bound), seed=0)
    uncached = TrainLoader(mini, SamplingConfig(batch_size=8, crop_seconds=(0.5, 0.5)), seed=0)
    peak = 0
    for i in range(12):
        assert same(loader.batch(i), uncached.batch(i))  # caching never changes a batch
        peak = max(peak, loader._maker._cache.nbytes)
        assert loader._maker._cache.nbytes <= bound
    assert peak > bound // 2 and len(loader._maker._cache) > 0
    assert len(uncached._maker._cache) == 0 and uncached._maker._cache.nbytes == 0
