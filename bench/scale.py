"""The numbers of issue 10 (the reference recipe at VoxCeleb scale), assembled into bench/results/scale.json.

Measured here, in one run:

* ``parse_seconds_1m1``: ``DataDir.load`` of a generated VoxCeleb2-sized data dir (1,092,009 utterances:
  wav.scp + utt2spk + utt2dur, and spk2utt as ``DataDir.write`` writes it), best of ``--repeats``, in CPU
  seconds (the parse is single-threaded, so this is its wall time on a core of its own; the wall time on a
  shared machine is recorded beside it); next to it, in the same process and on the same files, the parser
  of ``--compare-ref`` (the code before the fix, read from git), so that machine load hits both alike.
* the training stages' step counts: the w2vbert YAMLs read through the config loader
  (``experiments.train.TrainStageConfig``), their epochs converted with
  ``svlib.data.sampling.steps_per_epoch`` and the engine's ``TrainConfig.in_steps`` for 1,092,009
  utterances on 8 and 4 GPUs, next to the reference's counts.

Read from the other benchmarks' JSON (run them first; a missing one is null here and named in ``missing``):

* ``bench/results/loader_memory.json`` (``bench/loader_memory.py``): worker RSS growth, samples per
  CPU-second for WAV / FLAC / AAC, decode speed; from these, CPU cores needed per GPU at batch 64 and
  0.4 s per step (``64 / 0.4 / samples_per_cpu_s``).
* ``bench/results/pipeline_2rank.json`` (``bench/pipeline_2rank.py``): the 2-rank torchrun pipeline's wall time.

    .venv/bin/python bench/scale.py [--repeats 2] [--compare-ref d4d498d] [--out bench/results/scale.json]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.train import TrainStageConfig  # noqa: E402
from svlib.config import load_config, to_dict  # noqa: E402
from svlib.data.lists import DataDir  # noqa: E402
from svlib.data.sampling import steps_per_epoch  # noqa: E402
from svlib.files import write_json  # noqa: E402

VOX2_DEV_UTTERANCES = 1_092_009
VOX2_DEV_SPEAKERS = 5_994
REFERENCE_STEPS = {"s1_steps_8gpu": 95_970, "s2_steps_4gpu": 51_184, "s3_steps_4gpu": 2 * 8_531}
STAGES = {"s1": 8, "s2": 4, "s3": 4}  # the reference's GPUs per stage
GPU_BATCH, GPU_STEP_SECONDS = 64, 0.4
RESULTS = REPO / "bench" / "results"


# ---- list parsing ------------------------------------------------------------------------------------
def write_vox2_sized_dir(folder: Path, num: int = VOX2_DEV_UTTERANCES) -> Path:
    """A data dir shaped like VoxCeleb2 dev (ids ``id00012/<video>/00001.m4a``; durations 4-20 s)."""
    per_spk = -(-num // VOX2_DEV_SPEAKERS)
    wavs, utt2spk, durations = {}, {}, {}
    for i in range(num):
        spk = f"id{i // per_spk:05d}"
        utt = f"{spk}/{'abcdefghijk'[i % 11]}{(i // 7) % 997:03d}xYz_Q/{i % 7 + 1:05d}.m4a"
        wavs[utt], utt2spk[utt], durations[utt] = f"vox2/dev/aac/{utt}", spk, 4.0 + (i % 1601) / 100
    DataDir(wavs=wavs, utt2spk=utt2spk, durations=durations).write(folder)
    return folder


def _old_lists_module(ref: str):
    """svlib/data/lists.py as of git ``ref``, imported under another name (None when git cannot give it)."""
    try:
        source = subprocess.run(["git", "show", f"{ref}:svlib/data/lists.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="svlib-oldlists-")) / "old_lists.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_lists", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_lists"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def time_load(load, folder: Path, repeats: int) -> dict:
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        d = load(folder)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assert len(d) == VOX2_DEV_UTTERANCES
        del d
    return {"wall_seconds": round(min(walls), 2), "cpu_seconds": round(min(cpus), 2),
            "wall_all": [round(w, 2) for w in walls]}


# ---- step counts -------------------------------------------------------------------------------------
def stage_steps() -> dict:
    """Per w2vbert stage: epochs, batch, copies, steps per epoch and total steps on 8 and 4 GPUs."""
    out = {}
    for stage in STAGES:
        cfg = load_config(REPO / "experiments" / "configs" / "w2vbert" / f"{stage}.yaml", TrainStageConfig)
        per_world = {}
        for world in (8, 4):
            spe = steps_per_epoch(VOX2_DEV_UTTERANCES, cfg.sampling.batch_size, world, cfg.sampling.copies)
            steps_cfg = cfg.train.in_steps(spe)
            per_world[f"{world}gpu"] = {"steps_per_epoch": spe, "steps": steps_cfg.steps,
                                        "schedule": to_dict(steps_cfg.schedule)}
        out[stage] = {"epochs": cfg.train.epochs, "batch_size": cfg.sampling.batch_size,
                      "copies": cfg.sampling.copies, **per_world}
    return out


def _read_json(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pipeline_seconds(result) -> float | None:
    if not isinstance(result, dict):
        return None
    for key in ("pipeline_2rank_seconds", "wall_seconds", "seconds", "torchrun_seconds"):
        if isinstance(result.get(key), (int, float)):
            return float(result[key])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare-ref", default="d4d498d", help="git revision whose list parser is timed alongside "
                        "('' to skip)")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    missing = []

    with tempfile.TemporaryDirectory(prefix="svlib-scale-") as tmp:
        folder = write_vox2_sized_dir(Path(tmp) / "vox2_dev")
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
        parse = {"new": time_load(DataDir.load, folder, args.repeats)}
        old = _old_lists_module(args.compare_ref) if args.compare_ref else None
        if old is not None:
            parse[f"before ({args.compare_ref})"] = time_load(old.DataDir.load, folder, args.repeats)
    steps = stage_steps()

    loader = _read_json("loader_memory.json")
    if loader is None:
        missing.append("bench/results/loader_memory.json (run bench/loader_memory.py)")
    pipeline = _read_json("pipeline_2rank.json")
    pipeline_seconds = _pipeline_seconds(pipeline)
    if pipeline_seconds is None:
        missing.append("bench/results/pipeline_2rank.json (bench/pipeline_2rank.py, engineer A)")

    samples = loader["samples_per_cpu_s"] if loader else None
    need = GPU_BATCH / GPU_STEP_SECONDS
    cores = {fmt: round(need / value, 2) for fmt, value in samples.items()} if samples else None
    result = {
        "parse_seconds_1m1": parse["new"]["cpu_seconds"],
        "parse_seconds_1m1_basis": "CPU seconds of the parsing process, i.e. wall time on a core of its own; "
                                   "wall times on this shared machine are in parse.*.wall_seconds",
        "parse": {"utterances": VOX2_DEV_UTTERANCES, "files_bytes": sizes, **parse},
        "worker_rss_growth": loader["worker_rss_growth"] if loader else None,
        "worker_rss_mb_start_end": ([sum(loader["memory"]["worker_rss_mb_start"]), sum(loader["memory"]["worker_rss_mb_end"])]
                                    if loader else None),
        "samples_per_cpu_s": samples,
        "aac_samples_per_cpu_s": samples["aac"] if samples else None,
        "decode_x_realtime_per_core": loader["decode_x_realtime_per_core"] if loader else None,
        "cores_per_gpu_at_batch64_0.4s": cores,
        "loader_setup": ({k: loader[k] for k in ("files", "workers", "batch_size", "mode", "speed_perturb", "cache_bytes")}
                         | {"batches": loader["memory"]["batches"], "machine": loader["machine"]} if loader else None),
        "s1_steps_8gpu": steps["s1"]["8gpu"]["steps"],
        "s2_steps_4gpu": steps["s2"]["4gpu"]["steps"],
        "s3_steps_4gpu": steps["s3"]["4gpu"]["steps"],
        "reference_steps": REFERENCE_STEPS,
        "stages": steps,
        "pipeline_2rank_seconds": None if pipeline_seconds is None else round(pipeline_seconds, 1),
        "missing": missing,
        "machine": {"cpu_count": os.cpu_count(), "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in os.getloadavg()]},
    }

    print(f"list parsing, {VOX2_DEV_UTTERANCES:,} utterances (best of {args.repeats}):")
    for name, t in parse.items():
        print(f"  {name:22} {t['wall_seconds']:>7.2f} s wall {t['cpu_seconds']:>7.2f} s CPU")
    print(f"\n{'stage':6}{'epochs':>7}{'batch':>6}{'copies':>7}{'steps 8 GPUs':>14}{'steps 4 GPUs':>14}{'reference':>11}")
    for stage, world in STAGES.items():
        s = steps[stage]
        ref = REFERENCE_STEPS[f"{stage}_steps_{world}gpu"]
        print(f"{stage:6}{s['epochs']:>7}{s['batch_size']:>6}{s['copies']:>7}{s['8gpu']['steps']:>14,}{s['4gpu']['steps']:>14,}"
              f"{ref:>11,} ({world} GPUs)")
    if loader:
        print(f"\nloader: worker RSS growth {loader['worker_rss_growth']:.1%}; samples/CPU-s "
              + ", ".join(f"{k} {v}" for k, v in samples.items())
              + f"; cores per GPU at batch {GPU_BATCH} / {GPU_STEP_SECONDS} s: "
              + ", ".join(f"{k} {v}" for k, v in cores.items()))
    print(f"2-rank pipeline: {pipeline_seconds if pipeline_seconds is not None else 'not measured yet'} s")
    if missing:
        print("missing: " + "; ".join(missing))
    print(f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    out = write_json(args.out, result)
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
