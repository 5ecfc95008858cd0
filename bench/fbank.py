"""Benchmark: svlib.features.W2VBertFbank vs transformers.SeamlessM4TFeatureExtractor.

Same inputs, same process. Cases: (a) a batch of 64 x 3 s, (b) one 60 s utterance, both cut from real
LibriSpeech audio in sv-bench (files concatenated in manifest order, then cropped). The two
implementations are timed alternately, repeat by repeat, so that load from other processes on a shared
machine hits both alike; the reported figure is the median over repeats after warm-up, the speed-up is the
ratio of medians. ``max_abs_diff`` is the largest |ours - extractor| over all valid frames of both cases
(and of a ragged batch). The 1-minute load average is recorded: on a shared machine other jobs slow the
multi-threaded torch path more than the single-threaded extractor.

    .venv/bin/python bench/fbank.py [--device cuda] [--repeats 15] [--out bench/results/fbank.json]
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svlib.audio import load_audio  # noqa: E402
from svlib.features import W2VBertFbank  # noqa: E402
from svlib.files import write_json  # noqa: E402

SR = 16000
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sv-bench"


def real_audio(data: Path, seconds: float) -> np.ndarray:
    """At least ``seconds`` of speech: manifest files concatenated in order."""
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found (pass --data pointing at sv-bench)")
    need, parts = int(seconds * SR), []
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            parts.append(load_audio(data / row["path"]))
            need -= len(parts[-1])
            if need <= 0:
                break
    if need > 0:
        raise SystemExit(f"{data}: only {seconds - need / SR:.1f} s of audio, {seconds:.1f} s needed")
    return np.concatenate(parts)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(ours, theirs, repeats: int, warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Alternate the two callables; returns per-repeat seconds for each (warm-up runs discarded)."""
    t_ours, t_theirs = [], []
    for i in range(warmup + repeats):
        for fn, acc in ((ours, t_ours), (theirs, t_theirs)):
            if fn is None:
                continue
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                acc.append(time.perf_counter() - start)
    return t_ours, t_theirs


def max_diff(model: W2VBertFbank, extractor, waves: list[np.ndarray], device: torch.device) -> float:
    """Largest |ours - extractor| over valid frames, ours batched, extractor per utterance."""
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    feats, mask = model(batch.to(device), lengths.to(device))
    feats, mask = feats.cpu().numpy(), mask.cpu().numpy()
    worst = 0.0
    for i, w in enumerate(waves):
        ref = extractor(w, sampling_rate=SR, return_tensors="np")
        n = int(ref["attention_mask"][0].sum())
        if n != int(mask[i].sum()):
            raise SystemExit(f"frame count mismatch on item {i}: ours {int(mask[i].sum())}, extractor {n}")
        worst = max(worst, float(np.abs(feats[i, :n] - ref["input_features"][0, :n]).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: batch case, skipped without a GPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fbank.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import SeamlessM4TFeatureExtractor

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: skipping the GPU benchmark")
        return
    device = torch.device(args.device)
    extractor = SeamlessM4TFeatureExtractor()
    model = W2VBertFbank().to(device)

    audio = real_audio(args.data, 64 * 3 + 1)
    seg = 3 * SR
    batch_np = [audio[i * seg : (i + 1) * seg] for i in range(64)]
    long_np = audio[: 60 * SR]
    batch = torch.from_numpy(np.stack(batch_np)).to(device)
    batch_len = torch.full((64,), seg, device=device)
    long = torch.from_numpy(long_np)[None].to(device)
    long_len = torch.tensor([len(long_np)], device=device)

    # Parity on the benchmark inputs plus a ragged batch (lengths 1 s .. 3 s) to exercise the masking.
    ragged = [batch_np[i][: SR + i * SR // 8] for i in range(17)]
    diff = max(
        max_diff(model, extractor, batch_np[:8], device),
        max_diff(model, extractor, [long_np], device),
        max_diff(model, extractor, ragged, device),
    )

    def ext(waves):
        return lambda: extractor(waves, sampling_rate=SR, return_tensors="np")

    cases = {"batch64": (lambda: model(batch, batch_len), ext(batch_np))}
    if device.type == "cpu":
        cases["60s"] = (lambda: model(long, long_len), ext([long_np]))
    rows, result = [], {}
    load_before = os.getloadavg()[0]
    for name, (ours, theirs) in cases.items():
        t_ours, t_theirs = race(ours, theirs, args.repeats, args.warmup, device)
        ms_ours, ms_theirs = 1000 * statistics.median(t_ours), 1000 * statistics.median(t_theirs)
        result[f"ms_ours_{name}"] = round(ms_ours, 2)
        result[f"ms_extractor_{name}"] = round(ms_theirs, 2)
        result[f"ms_ours_best_{name}"] = round(1000 * min(t_ours), 2)
        result[f"ms_extractor_best_{name}"] = round(1000 * min(t_theirs), 2)
        result[f"speedup_{name}"] = round(ms_theirs / ms_ours, 2)
        rows.append((name, ms_theirs, ms_ours, ms_theirs / ms_ours))

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_name()
    print(f"device {device} ({device_name}), torch {torch.__version__}, threads {args.threads}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'case':<10}{'extractor ms':>14}{'ours ms':>10}{'speed-up':>10}")
    for name, theirs, ours, speed in rows:
        print(f"{name:<10}{theirs:>14.1f}{ours:>10.1f}{speed:>9.2f}x")
    print(f"max |ours - extractor| = {diff:.2e}; 1-min load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")

    record = {
        "max_abs_diff": diff,
        **result,
        "torch": torch.__version__,
        "threads": args.threads,
        "device": f"{device.type}: {device_name}",
        "cpu_count": os.cpu_count(),
        # Other jobs on a shared machine slow the 2-thread torch path far more than the 1-thread extractor.
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "statistic": "median (speed-up = ratio of medians; *_best_* = minimum)",
        "inputs": "sv-bench LibriSpeech concatenated: 64 x 3 s batch; one 60 s utterance",
    }
    out = args.out
    if device.type == "cuda":
        out = out.with_name(out.stem + "_cuda" + out.suffix)
    print(f"wrote {write_json(out, record)}")


if __name__ == "__main__":
    main()
