"""The pruning sweep at the user's scale, rehearsed on this machine; writes ``bench/results/sweep_scale.json``.

    python bench/sweep_scale.py [--size full|tiny] [--skip-smoke] [--skip-rehearsal] [--keep DIR]

1. ``smoke``: the smoke sweep's 2-point grid (tiny model, sv-mini, the smoke pipeline's s2 as teacher) by one
   process (2 threads) and by ``torchrun --nproc_per_node 2`` (2 gloo ranks, 1 thread each), side by side in
   one run: ``sweep_1rank_seconds``, ``sweep_2rank_seconds``, with the machine's load around each.
2. ``plan``: ``--plan`` of ``sweeps/configs/w2vbert.yaml`` (the reference's stage YAMLs, VoxCeleb2's 1,092,009
   utterances) on 8 GPUs of ``--card``: ``plan_prune1_steps_8gpu_budget1`` (the reference's 170,620),
   ``plan_trial_gpu_hours_budget1`` with its source (measured from ``bench/results/gpu_<card>.json``, else the
   labelled estimate), and what the 7-point grid costs at budgets 0.1 and 1.0.
3. ``rehearsal``: the full-size sweep on CPU. A random-weight 580M W2V-BERT 2.0 folder and the sv-bench lists
   (``bench/full_size_rehearsal.py``'s own writers), the w2vbert pipeline's s1 -> merge -> s2 in a process of
   its own (the teacher ``exp/w2vbert/s2``), then ``torchrun --nproc_per_node 2 -m sweeps.prune_sweep --config
   sweeps/configs/w2vbert.yaml --overrides experiments/configs/rehearsal/sweep.yaml --grid``: 2 trials (the dense
   point and target 0.8), each prune1 -> shrink -> prune2 -> graft -> ps1 -> ps2 -> ps3 -> eval_pruned on both
   ranks, 2 steps per stage. The work's memory (the private memory of the teacher's pipeline process, then of
   the sweep's torchrun job: :class:`WorkloadMemory`) is sampled every 0.5 s: ``rehearsal_peak_rss_gib`` (limit
   20 GiB; ``rehearsal_peak_with_harness_gib`` adds this script's own RSS), ``rehearsal_wall_minutes`` (limit 30
   on a quiet 2-core machine), ``rehearsal_all_ok``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.full_size_rehearsal import (GIB, PRETRAINED, Sampler, _children, _kib_field, native_bf16,  # noqa: E402
                                       prepare_data, write_pretrained_folder)
from svlib.files import write_json  # noqa: E402

RESULTS = REPO / "bench" / "results"
SMOKE_SWEEP = REPO / "sweeps" / "configs" / "smoke.yaml"
FULL_SWEEP = REPO / "sweeps" / "configs" / "w2vbert.yaml"
SWEEP_OVERRIDES = REPO / "experiments" / "configs" / "rehearsal" / "sweep.yaml"
W2VBERT = (REPO / "experiments" / "configs" / "w2vbert" / "pipeline.yaml",
           REPO / "experiments" / "configs" / "rehearsal" / "w2vbert.yaml")
SMOKE_PIPELINE = REPO / "experiments" / "configs" / "smoke" / "pipeline.yaml"
VOXCELEB2_UTTERANCES = 1_092_009
REFERENCE_PRUNE1_STEPS = 170_620   # 20 epochs x floor(1,092,009 / (16 x 8)) on 8 GPUs
LIMIT_MINUTES, LIMIT_RSS_GIB = 30.0, 20.0
TEACHER_STAGES = ["s1", "merge", "s2"]


def _env(threads: int) -> dict:
    return os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}


def sweep_command(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "sweeps.prune_sweep", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "sweeps.prune_sweep", *args]


def run_teacher_stages(config: Path, overrides: Path | None, threads: int, cwd: Path) -> None:
    """A pipeline's stages up to s2 (the sweep's teacher), as ``python -m experiments.pipeline --until s2`` in a
    process of its own: what it held (a 580M model at full size) is freed before the sweep's ranks start."""
    args = ["--config", str(config), "--until", TEACHER_STAGES[-1], "--no-tracking"]
    if overrides is not None:
        args += ["--overrides", str(overrides)]
    subprocess.run([sys.executable, "-m", "experiments.pipeline", *args], cwd=cwd, env=_env(threads), check=True,
                   stdout=subprocess.DEVNULL)


def scrub(text: str, scratch: Path) -> str:
    """A log tail without this machine's absolute paths (results are committed)."""
    return text.replace(str(scratch), "<scratch>").replace(str(REPO.parent), "<repo>/..").replace(str(REPO), "<repo>")


def study_outcome(storage: str, study: str) -> dict:
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    except KeyError:   # the sweep never created it (its stderr is in the record)
        return {"states": [], "points": []}
    return {"states": [t.state.name for t in trials],
            "points": [{"number": t.number, "target": t.params.get("target_sparsity"), "state": t.state.name,
                        "val_eer_pct": t.values[0] if t.values else None,
                        "params_encoder": t.values[1] if t.values else None,
                        "achieved_sparsity": t.user_attrs.get("achieved_sparsity"),
                        "budget": t.user_attrs.get("budget"), "minutes": t.user_attrs.get("minutes"),
                        "fail_reason": t.user_attrs.get("fail_reason")} for t in trials]}


# ------------------------------------------------------------------------------------------ 1. smoke grid

def smoke(scratch: Path, shared: Path) -> dict:
    from svlib.corpora.manifest import prepare_manifest

    scratch.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    os.chdir(scratch)
    try:
        prepare_manifest(shared / "sv-mini" / "manifest.csv", Path("data/sv-mini"), seed=0)
    finally:
        os.chdir(cwd)
    run_teacher_stages(SMOKE_PIPELINE, None, threads=2, cwd=scratch)
    out = {}
    for nproc, threads in ((1, 2), (2, 1)):   # both use the 2 cores
        # beside the folder the lists were prepared in: their audio paths are relative to it
        job = scratch.with_name(f"{scratch.name}_{nproc}rank")
        job.mkdir()
        for name in ("exp", "data"):
            (job / name).symlink_to(scratch / name, target_is_directory=True)
        storage = f"sqlite:///{job / 'optuna.db'}"
        args = ["--config", str(SMOKE_SWEEP), "--grid", "--n-trials", "2", "--storage", storage,
                "--mlflow-uri", f"sqlite:///{job / 'mlflow.db'}"]
        load_start = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(sweep_command(nproc, *args), cwd=job, env=_env(threads), capture_output=True, text=True)
        seconds = time.perf_counter() - start
        out[nproc] = {"seconds": seconds, "returncode": proc.returncode, "threads_per_rank": threads,
                      "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
                      **study_outcome(storage, "smoke-prune-grid")}
        out[nproc]["ok"] = proc.returncode == 0 and out[nproc]["states"] == ["COMPLETE", "COMPLETE"]
        if proc.returncode != 0:
            out[nproc]["stderr_tail"] = scrub(proc.stderr[-2000:], job)
    return out


# ------------------------------------------------------------------------------------------ 2. plan

def plan(card: str) -> dict:
    from sweeps.plan import plan_sweep
    from sweeps.prune_sweep import load_sweep_config

    cfg = load_sweep_config(FULL_SWEEP)
    out = {}
    for budget in (1.0, 0.1):
        grid = plan_sweep(cfg, world_size=8, budget=budget, n_trials=len(cfg.grid), card=card,
                          train_utterances=VOXCELEB2_UTTERANCES, grid=cfg.grid)
        pruned = [row for row in grid["trials"] if row["target"] > 0]
        prune1 = next(row for row in grid["stages"] if row["stage"] == "prune1")
        out[f"budget_{budget:g}"] = {
            "prune1_steps": prune1["steps"], "source": grid["source"],
            "trial_gpu_hours_max": max(row["gpu_hours"] for row in pruned),
            "trial_gpu_hours_target_0.8": next(row["gpu_hours"] for row in pruned if row["target"] == 0.8),
            "grid_points": len(grid["trials"]), "grid_gpu_hours": grid["total"]["gpu_hours"],
            "grid_wall_hours_one_node": grid["total"].get("wall_hours"), "grid_steps": grid["total"]["steps"],
            "grid_audio_hours": grid["total"]["audio_hours"]}
    return out


# ------------------------------------------------------------------------------------------ 3. full-size rehearsal

class WorkloadMemory(Sampler):
    """The rehearsal's memory sampler. ``peak`` (the limit's measure) is the private memory of this script's
    child processes, i.e. of the work itself: the teacher's pipeline process, then the sweep's torchrun job
    (its agent and ranks); ``peak_with_harness`` adds this script's own RSS (the measuring harness, which
    imported torch and wrote the 580M folder). At the highest sample it keeps each process's share and the
    trial stage folder written last: where the peak is."""

    def __init__(self, interval: float = 0.5):
        super().__init__(interval)
        self.runs: Path | None = None
        self.at_peak: dict = {}
        self.peak_with_harness = 0

    def sample(self) -> None:
        processes = {}
        for pid in _children(os.getpid()):
            try:
                name = " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0")[1:4])
            except OSError:
                continue
            private = _kib_field(f"/proc/{pid}/smaps_rollup", ("Private_Clean:", "Private_Dirty:"))
            processes[str(pid)] = {"cmd": name, "private_gib": round(private / GIB, 2)}
        workload = int(sum(p["private_gib"] for p in processes.values()) * GIB)
        harness = _kib_field(f"/proc/{os.getpid()}/status", ("VmRSS:",))
        with self._lock:
            self.peak_with_harness = max(self.peak_with_harness, workload + harness)
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), workload)
            self.loads.append(os.getloadavg()[0])
            if workload <= self.peak:
                return
            self.peak = workload
        try:
            stages = sorted(self.runs.glob("*/trial_*/*"), key=lambda p: p.stat().st_mtime) if self.runs else []
        except OSError:  # a checkpoint folder removed while listed
            stages = []
        self.at_peak = {"gib": workload / GIB, "harness_rss_gib": harness / GIB, "phase": self.label,
                        "processes": processes,
                        "newest_stage": stages[-1].relative_to(self.runs).as_posix() if stages else None}


def effective_sweep_overrides(amp_off: bool, device: str, dest: Path) -> Path:
    """The committed sweep overrides + the device (and ``train.amp: off`` in every stage when asked)."""
    overrides = yaml.safe_load(SWEEP_OVERRIDES.read_text())
    overrides["device"] = device
    if amp_off:
        for stage in [overrides["prune1"], overrides["prune2"], *overrides["finetune"]]:
            stage.setdefault("train", {})["amp"] = "off"
    dest.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return dest


def rehearsal(scratch: Path, shared: Path, size: str, threads: int, sampler: Sampler) -> dict:
    from bench.full_size_rehearsal import effective_overrides

    amp_off = size == "w2v-bert-2.0" and not native_bf16()
    out: dict = {"size": size, "amp": "off (float32): this CPU has no native bf16" if amp_off else "recipe"}
    start = time.perf_counter()
    cwd = Path.cwd()
    os.chdir(scratch)
    try:
        sampler.relabel("setup")
        out["pretrained"] = write_pretrained_folder(scratch / PRETRAINED, size)
        out["data"] = prepare_data(scratch, shared)
        sampler.relabel("teacher")
        t = time.perf_counter()
        overrides = effective_overrides(W2VBERT[1], "cpu", amp_off, scratch / "overrides_w2vbert.yaml")
        run_teacher_stages(W2VBERT[0], overrides, threads, cwd=scratch)
        out["teacher_minutes"] = (time.perf_counter() - t) / 60
        for stage_dir in (scratch / "exp" / "w2vbert").glob("*/ckpt"):
            shutil.rmtree(stage_dir)   # gigabytes of checkpoints the sweep does not read
    finally:
        os.chdir(cwd)
    sampler.runs = scratch / "sweeps" / "runs"
    sampler.relabel("sweep")
    storage = f"sqlite:///{scratch / 'optuna.db'}"
    sweep_overrides = effective_sweep_overrides(amp_off, "cpu", scratch / "overrides_sweep.yaml")
    args = ["--config", str(FULL_SWEEP), "--overrides", str(sweep_overrides), "--grid", "--storage", storage,
            "--no-tracking"]
    t = time.perf_counter()
    proc = subprocess.run(sweep_command(2, *args), cwd=scratch, env=_env(max(1, threads // 2)), capture_output=True,
                          text=True)
    out["sweep_minutes"] = (time.perf_counter() - t) / 60
    out["sweep_returncode"] = proc.returncode
    if proc.returncode != 0:
        out["stderr_tail"] = scrub(proc.stderr[-3000:], scratch)
    out |= study_outcome(storage, "w2vbert-prune-grid")
    folders = scratch / "sweeps" / "runs" / "w2vbert-prune-grid"
    out["trials"] = {}
    for point in out["points"]:
        record_path = folders / f"trial_{point['number']}" / "result.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        prune1 = folders / f"trial_{point['number']}" / "prune1" / "result.json"
        out["trials"][point["number"]] = {
            "stages": sorted(p.name for p in (folders / f"trial_{point['number']}").iterdir() if p.is_dir()),
            "params_encoder": None if record is None else record["params_encoder"],
            "dense_params_encoder": None if record is None else record["dense_params_encoder"],
            "prune1_world_size": json.loads(prune1.read_text())["world_size"] if prune1.is_file() else None}
    out["wall_minutes"] = (time.perf_counter() - start) / 60
    return out


def rehearsal_checks(rehearsal_out: dict, peak_gib: float) -> dict:
    points = rehearsal_out.get("points", [])
    trials = rehearsal_out.get("trials", {})
    pruned = [trials[p["number"]] for p in points if p["target"] and p["target"] > 0]
    dense = [trials[p["number"]] for p in points if p["target"] == 0]
    return {
        "sweep_exit_0": rehearsal_out.get("sweep_returncode") == 0,
        "two_trials_complete": [p["state"] for p in points] == ["COMPLETE", "COMPLETE"],
        "pruned_trial_smaller": bool(pruned) and bool(dense) and dense[0]["params_encoder"] is not None and all(
            t["params_encoder"] is not None and t["params_encoder"] < dense[0]["params_encoder"] for t in pruned),
        "pruning_on_two_ranks": bool(pruned) and all(t["prune1_world_size"] == 2 for t in pruned),
        "dense_is_580m": bool(dense) and dense[0]["params_encoder"] is not None
        and dense[0]["params_encoder"] == dense[0]["dense_params_encoder"],
        "within_minutes": rehearsal_out.get("wall_minutes", 1e9) <= LIMIT_MINUTES,
        "within_rss": peak_gib <= LIMIT_RSS_GIB,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--card", default="H100")
    parser.add_argument("--skip-smoke", action="store_true")
    parser.add_argument("--skip-rehearsal", action="store_true")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/sweep_scale.json; tiny: _tiny)")
    args = parser.parse_args(argv)
    out_path = Path(args.out) if args.out else RESULTS / (
        "sweep_scale.json" if args.size == "full" else "sweep_scale_tiny.json")
    shared = Path(args.shared).resolve()
    scratch = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="sweep_scale_"))
    scratch.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpu_count": os.cpu_count(), "native_bf16": native_bf16(), "torch": torch.__version__,
                                "load_average_start": list(os.getloadavg())}}
    sampler = WorkloadMemory()
    sampler.start()
    try:
        if not args.skip_smoke:
            smoke_runs = result["smoke"] = smoke(scratch / "smoke", shared)
            result["smoke_ok"] = smoke_runs[1]["ok"] and smoke_runs[2]["ok"]
            if result["smoke_ok"]:   # the times of sweeps that completed their 2 trials, else none
                result["sweep_1rank_seconds"] = smoke_runs[1]["seconds"]
                result["sweep_2rank_seconds"] = smoke_runs[2]["seconds"]
                result["sweep_2rank_over_1rank"] = result["sweep_2rank_seconds"] / result["sweep_1rank_seconds"]
        plans = result["plan"] = plan(args.card)
        result["plan_prune1_steps_8gpu_budget1"] = plans["budget_1"]["prune1_steps"]
        result["plan_prune1_steps_reference"] = REFERENCE_PRUNE1_STEPS
        result["plan_trial_gpu_hours_budget1"] = plans["budget_1"]["trial_gpu_hours_max"]
        result["plan_trial_gpu_hours_source"] = plans["budget_1"]["source"]
        result["plan_grid7_gpu_hours"] = {"budget_0.1": plans["budget_0.1"]["grid_gpu_hours"],
                                          "budget_1": plans["budget_1"]["grid_gpu_hours"]}
        if not args.skip_rehearsal:
            size = "w2v-bert-2.0" if args.size == "full" else "tiny"
            (scratch / "rehearsal").mkdir(exist_ok=True)
            sampler.peak = sampler.peak_with_harness = 0
            reh = result["rehearsal"] = rehearsal(scratch / "rehearsal", shared, size, args.threads, sampler)
            peak = sampler.peak / GIB
            checks = result["rehearsal_checks"] = rehearsal_checks(reh, peak)
            if args.size != "full":   # the limits are the full-size model's
                checks.pop("within_minutes"), checks.pop("within_rss")
            result["rehearsal_all_ok"] = all(checks.values())
            result["rehearsal_wall_minutes"] = reh["wall_minutes"]
            result["rehearsal_peak_rss_gib"] = peak
            result["rehearsal_peak_with_harness_gib"] = sampler.peak_with_harness / GIB
            result["rehearsal_peak_gib_by_phase"] = {k: v / GIB for k, v in sampler.peaks.items()}
            result["rehearsal_peak_breakdown"] = sampler.at_peak
            result["rehearsal_limits"] = {"minutes": LIMIT_MINUTES, "rss_gib": LIMIT_RSS_GIB}
    finally:
        sampler.stop()
        result["machine"]["load_average_end"] = list(os.getloadavg())
        result["machine"]["load_1min_mean"] = float(np.mean(sampler.loads)) if sampler.loads else None
        result["machine"]["load_1min_max"] = float(np.max(sampler.loads)) if sampler.loads else None
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    rows = [(k, result.get(k)) for k in ("smoke_ok", "sweep_1rank_seconds", "sweep_2rank_seconds", "plan_prune1_steps_8gpu_budget1",
                                         "plan_trial_gpu_hours_budget1", "plan_trial_gpu_hours_source",
                                         "rehearsal_all_ok", "rehearsal_wall_minutes", "rehearsal_peak_rss_gib")]
    for key, value in rows:
        print(f"{key:<34} {value:.2f}" if isinstance(value, float) else f"{key:<34} {value}")
    print(f"load 1-min mean {result['machine']['load_1min_mean']}")
    print(f"wrote {write_json(out_path, result)}")
    return result


if __name__ == "__main__":
    main()
