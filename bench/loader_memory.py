"""Benchmark: memory and throughput of the real training loader (svlib.data.sampling.TrainLoader).

Builds under a temp dir a synthetic corpus of ``--files`` short utterances (1-3 s: harmonic tones + noise,
1,000 speakers x 4 videos, VoxCeleb-style ids) written as 16-bit WAV, plus FLAC and AAC (.m4a, 64 kbit/s)
copies of the first ``--throughput-files`` of them, and a MUSAN / RIRS_NOISES-like augmentation corpus
(minute-long music files among them). Then, in one run:

1. **Memory.** The loader exactly as training builds it (epoch mode, speed perturbation 0.9/1.0/1.1, 2-3 s
   crops, ``--workers`` DataLoader workers, the default ``cache_bytes=0``) draws ``--batches`` batches of the
   WAV corpus; the main process applies the augmentation (one of none / noise / reverb per utterance, the
   reference recipe) to every batch, as training does. The RSS of every worker and of the main process is
   read (``/proc`` through psutil) after ``--warmup`` batches ("start": imports, first buffers) and at the
   end; growth = sum(end) / sum(start) - 1 over the workers. A loader that kept what it decoded would grow
   with every new file (20k files x ~2 s x 64 kB/s = 2.5 GB per worker).
2. **Throughput.** The same loader over the WAV, FLAC and AAC copies of one subset: samples per CPU-second,
   counting the CPU time of the workers and of the main process (augmentation included) between batch
   ``--warmup`` and the end.
3. **Decode speed.** ``load_audio`` of whole files in this process, per format: seconds of audio per
   CPU-second ("x real time per core").

    .venv/bin/python bench/loader_memory.py [--files 20000] [--batches 2000] [--workers 4] [--batch-size 16]

On a shared machine other jobs change wall time but hardly CPU time; the load average is recorded.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svlib.audio import load_audio, write_audio  # noqa: E402
from svlib.data.augment import AugmentConfig, Augmenter  # noqa: E402
from svlib.data.lists import DataDir  # noqa: E402
from svlib.data.sampling import SamplingConfig, TrainLoader  # noqa: E402
from svlib.files import write_json  # noqa: E402

SR = 16000
FORMATS = {"wav": ".wav", "flac": ".flac", "aac": ".m4a"}


# ---- synthetic corpora -------------------------------------------------------------------------------
def _bank(rng: np.random.Generator, count: int = 48, seconds: float = 3.2) -> list[np.ndarray]:
    """Speech-like signals: a harmonic series on a gliding f0 (90-260 Hz) plus a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    out = []
    for _ in range(count):
        f0 = rng.uniform(90, 260) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        wave = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
        wave = wave + 0.05 * rng.standard_normal(len(t))
        out.append((0.25 * wave / np.abs(wave).max()).astype(np.float32))
    return out


def make_corpus(root: Path, num_files: int, throughput_files: int, seed: int = 0) -> dict[str, DataDir]:
    """``{"wav": all files, "wav_subset"/"flac"/"aac": the first throughput_files in each format}``."""
    rng = np.random.default_rng(seed)
    bank = _bank(rng)
    lengths = rng.uniform(1.0, 3.0, num_files)
    dirs: dict[str, dict] = {name: {"wavs": {}, "utt2spk": {}} for name in ("wav", "wav_subset", "flac", "aac")}
    for i in range(num_files):
        spk, video = f"id{i // 20:05d}", f"v{(i // 5) % 4}"
        utt_base = f"{spk}/{video}/{i % 5 + 1:05d}"
        source = bank[i % len(bank)]
        start = int(rng.integers(0, len(source) - int(lengths[i] * SR)))
        wave = source[start:start + int(lengths[i] * SR)] * rng.uniform(0.3, 1.0)
        formats = ("wav", "flac", "aac") if i < throughput_files else ("wav",)
        for fmt in formats:
            path = root / fmt / f"{utt_base}{FORMATS[fmt]}"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_audio(path, wave)
            utt = f"{utt_base}{FORMATS[fmt]}"
            names = ("wav", "wav_subset") if fmt == "wav" and i < throughput_files else (fmt,)
            for name in names:
                dirs[name]["wavs"][utt], dirs[name]["utt2spk"][utt] = str(path), spk
    return {name: DataDir(wavs=d["wavs"], utt2spk=d["utt2spk"]) for name, d in dirs.items()}


def make_augmenter(root: Path, seed: int = 1) -> Augmenter:
    """MUSAN-like noise (8 s), music (60 s: read a crop at a time), speech for babble (10 s), 40 RIRs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    noises, rirs = [], []
    for category, count, seconds in (("noise", 10, 8.0), ("music", 4, 60.0), ("speech", 12, 10.0)):
        for i in range(count):
            path = root / f"{category}-{i:03d}.wav"
            wave = rng.standard_normal(int(seconds * SR)).astype(np.float32)
            if category != "noise":  # coloured, with a slow envelope
                wave = np.cumsum(wave) * 0.02
                wave -= np.convolve(wave, np.ones(200) / 200, mode="same")
            sf.write(str(path), 0.2 * wave / np.abs(wave).max(), SR, subtype="PCM_16")
            noises.append((path, category))
    t = np.arange(int(0.5 * SR)) / SR
    for i in range(40):
        rir = rng.standard_normal(len(t)) * np.exp(-6.9 * t / rng.uniform(0.2, 0.6))
        rir[: 16 + i] = 0.0
        rir[16 + i] = 3.0
        path = root / f"rir-{i:03d}.wav"
        sf.write(str(path), (0.5 * rir / np.abs(rir).max()).astype(np.float32), SR, subtype="FLOAT")
        rirs.append(path)
    third = 1.0 / 3.0
    cfg = AugmentConfig(noise_prob=third, reverb_prob=third, exclusive=True, snr_noise=(5.0, 20.0),
                        snr_music=(5.0, 20.0), snr_babble=(15.0, 25.0), babble_speakers=(3, 8))
    return Augmenter(cfg, noises, rirs)


# ---- measurements ------------------------------------------------------------------------------------
def _workers() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _rss(procs: list[psutil.Process]) -> list[int]:
    return [p.memory_info().rss for p in procs]


def _uss(procs: list[psutil.Process]) -> list[int]:
    return [p.memory_full_info().uss for p in procs]


def run_loader(datadir: DataDir, cfg: SamplingConfig, augmenter: Augmenter, batches: int, warmup: int,
               trace_every: int = 0) -> dict:
    """Iterate ``batches`` batches, augmenting each on this process; memory and CPU at ``warmup`` and at the end."""
    loader = TrainLoader(datadir, cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    me = psutil.Process()
    start = trace = None
    samples = 0
    wall = time.time()
    for step, batch in enumerate(loader, start=1):
        augmenter(batch.waves, batch.lengths, gen)
        if step > warmup:
            samples += len(batch)
        if step == warmup:
            procs = _workers()
            start = {"rss": _rss(procs), "uss": _uss(procs), "main_rss": me.memory_info().rss,
                     "cpu_workers": _cpu(procs), "cpu_main": time.process_time(), "wall": time.time()}
            trace = [(step, sum(start["rss"]))]
        elif trace is not None and trace_every and step % trace_every == 0 and step < batches:
            trace.append((step, sum(_rss(procs))))
        if step == batches:
            end = {"rss": _rss(procs), "uss": _uss(procs), "main_rss": me.memory_info().rss,
                   "cpu_workers": _cpu(procs), "cpu_main": time.process_time(), "wall": time.time()}
            trace.append((step, sum(end["rss"])))
            break
    del loader  # workers exit with the iterator
    cpu_workers = end["cpu_workers"] - start["cpu_workers"]
    cpu_main = end["cpu_main"] - start["cpu_main"]
    return {
        "batches": batches, "measured_batches": batches - warmup, "samples": samples, "workers": len(procs),
        "worker_rss_mb_start": [round(r / 2 ** 20, 1) for r in start["rss"]],
        "worker_rss_mb_end": [round(r / 2 ** 20, 1) for r in end["rss"]],
        "worker_uss_mb_start": [round(r / 2 ** 20, 1) for r in start["uss"]],
        "worker_uss_mb_end": [round(r / 2 ** 20, 1) for r in end["uss"]],
        "worker_rss_growth": round(sum(end["rss"]) / sum(start["rss"]) - 1.0, 4),
        "worker_rss_growth_max": round(max(e / s - 1.0 for s, e in zip(start["rss"], end["rss"])), 4),
        "worker_uss_growth": round(sum(end["uss"]) / sum(start["uss"]) - 1.0, 4),
        "main_rss_mb_start_end": [round(start["main_rss"] / 2 ** 20, 1), round(end["main_rss"] / 2 ** 20, 1)],
        "rss_trace_mb": [(s, round(r / 2 ** 20, 1)) for s, r in trace],
        "cpu_seconds_workers": round(cpu_workers, 2), "cpu_seconds_main": round(cpu_main, 2),
        "samples_per_cpu_s": round(samples / (cpu_workers + cpu_main), 1),
        "worker_samples_per_cpu_s": round(samples / cpu_workers, 1),
        "wall_seconds": round(end["wall"] - start["wall"], 1), "total_wall_seconds": round(time.time() - wall, 1),
    }


def decode_speed(datadir: DataDir, max_files: int = 400) -> float:
    """Seconds of audio decoded per CPU-second (x real time per core), whole files, this process."""
    utts = datadir.utts[:max_files]
    audio = 0.0
    cpu = time.process_time()
    for utt in utts:
        audio += len(load_audio(datadir.wavs[utt])) / SR
    return round(audio / (time.process_time() - cpu), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--throughput-files", type=int, default=2000)
    parser.add_argument("--throughput-batches", type=int, default=220)
    parser.add_argument("--tmp", default=None, help="parent of the temp corpus (default: the system temp dir)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "loader_memory.json"))
    args = parser.parse_args(argv)
    if args.files < args.throughput_files:
        raise SystemExit("--files must be >= --throughput-files")
    torch.set_num_threads(1)  # the main process only augments; keep the cores for the workers
    # More workers than cores is the point of the run (workers x memory); torch's advice about it is noise here.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="svlib-loader-", dir=args.tmp))
    try:
        t0 = time.time()
        dirs = make_corpus(tmp / "corpus", args.files, args.throughput_files)
        augmenter = make_augmenter(tmp / "augment")
        corpus_seconds = round(time.time() - t0, 1)
        print(f"corpus: {args.files} WAV + {args.throughput_files} FLAC / AAC files in {corpus_seconds} s", flush=True)
        cfg = SamplingConfig(batch_size=args.batch_size, crop_seconds=(2.0, 3.0), mode="epoch", speed_perturb=True,
                             num_workers=args.workers, cache_bytes=0)
        memory = run_loader(dirs["wav"], cfg, augmenter, args.batches, args.warmup, trace_every=250)
        print(f"memory run: {memory['total_wall_seconds']} s", flush=True)
        throughput = {fmt: run_loader(dirs["wav_subset" if fmt == "wav" else fmt], cfg, augmenter,
                                      args.throughput_batches, min(args.warmup, args.throughput_batches // 5))
                      for fmt in FORMATS}
        decode = {fmt: decode_speed(dirs["wav_subset" if fmt == "wav" else fmt]) for fmt in FORMATS}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = os.getloadavg()

    print(f"\nloader: {args.workers} workers, batch {args.batch_size}, epoch mode + speed perturbation, "
          f"augmentation on the main process, cache_bytes=0")
    print(f"{'':24}{'start':>10}{'end':>10}{'growth':>9}")
    print(f"{'worker RSS MB (sum)':24}{sum(memory['worker_rss_mb_start']):>10.1f}{sum(memory['worker_rss_mb_end']):>10.1f}"
          f"{memory['worker_rss_growth']:>9.1%}")
    print(f"{'worker USS MB (sum)':24}{sum(memory['worker_uss_mb_start']):>10.1f}{sum(memory['worker_uss_mb_end']):>10.1f}"
          f"{memory['worker_uss_growth']:>9.1%}")
    print(f"{'main RSS MB':24}{memory['main_rss_mb_start_end'][0]:>10.1f}{memory['main_rss_mb_start_end'][1]:>10.1f}")
    print(f"batches {args.warmup} -> {args.batches} ({memory['samples']} samples); trace {memory['rss_trace_mb']}")
    print(f"augmenter: {augmenter.bytes_read / 2 ** 20:.0f} MB read in crops, {augmenter.cached_bytes / 2 ** 20:.1f} MB held")
    print(f"\n{'format':8}{'samples/CPU-s':>15}{'workers only':>14}{'decode x RT/core':>18}")
    for fmt in FORMATS:
        print(f"{fmt:8}{throughput[fmt]['samples_per_cpu_s']:>15.1f}{throughput[fmt]['worker_samples_per_cpu_s']:>14.1f}"
              f"{decode[fmt]:>18.1f}")
    print(f"load average {load_start[0]:.1f} -> {load_end[0]:.1f} on {os.cpu_count()} CPUs")

    result = {
        "files": args.files, "throughput_files": args.throughput_files, "batch_size": args.batch_size,
        "workers": args.workers, "crop_seconds": [2.0, 3.0], "mode": "epoch", "speed_perturb": True,
        "cache_bytes": cfg.cache_bytes, "corpus_seconds": corpus_seconds,
        "augment": {"recipe": "exclusive none/noise/reverb at 1/3 each", "bytes_read_mb": round(augmenter.bytes_read / 2 ** 20, 1),
                    "cached_mb": round(augmenter.cached_bytes / 2 ** 20, 2)},
        "memory": memory,
        "worker_rss_growth": memory["worker_rss_growth"],
        "throughput": throughput,
        "samples_per_cpu_s": {fmt: throughput[fmt]["samples_per_cpu_s"] for fmt in FORMATS},
        "worker_samples_per_cpu_s": {fmt: throughput[fmt]["worker_samples_per_cpu_s"] for fmt in FORMATS},
        "decode_x_realtime_per_core": decode,
        "machine": {"cpu_count": os.cpu_count(), "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in load_end]},
    }
    out = write_json(args.out, result)
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
