"""sweeps.plan: the cost of a pruning sweep from its configs alone, checked against the step counts the
reference stage YAMLs (experiments/configs/prune/) state in their comments. No data, no training."""
from __future__ import annotations

import dataclasses
import json

import pytest

from svlib.config import ConfigError, from_dict, read_yaml
from sweeps.plan import (PEAK_BF16_DENSE_TFLOPS, card_slug, format_plan, plan_sweep, resolve_stage,
                         scale_budget)
from sweeps.prune_sweep import SweepConfig
from tests.conftest import REPO

STAGE_YAMLS = REPO / "experiments" / "configs" / "prune"
VOX2_DEV = 1_092_009    # utterances of VoxCeleb2-dev, the reference's training set
GRID = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
BENCH_CARD = "NVIDIA H100 80GB HBM3"


def reference_sweep(train: str = "data/vox2_dev", **finetune_changes) -> SweepConfig:
    """A sweep over the reference's full-size stages (prune1, prune2, ps1-ps3); paths need not exist.
    ``finetune_changes``: ``{"ps2": {"sampling": {...}}}`` replaces sections of a fine-tune stage's YAML."""
    finetune = []
    for name in ("ps1", "ps2", "ps3"):
        stage = read_yaml(STAGE_YAMLS / f"{name}.yaml") | {"stage": name}
        finetune.append(stage | finetune_changes.get(name, {}))
    return from_dict(SweepConfig, {
        "name": "reference", "teacher": "exp/w2vbert/s2",
        "data": {"train": train, "val": "data/vox2_val", "val_trials": "data/vox2_val_trials.txt",
                 "test": "data/vox1", "test_trials": {"test": "data/vox1/veri_test2.txt"}},
        "prune1": read_yaml(STAGE_YAMLS / "prune1.yaml"), "prune2": read_yaml(STAGE_YAMLS / "prune2.yaml"),
        "finetune": finetune})


@pytest.fixture(scope="module")
def cfg() -> SweepConfig:
    return reference_sweep()


def stage_row(plan: dict, stage: str, trial: int = 0) -> dict:
    (row,) = [r for r in plan["stages"] if r["trial"] == trial and r["stage"] == stage]
    return row


def plan_of(cfg, world_size: int, budget: float, **kwargs) -> dict:
    kwargs.setdefault("n_trials", 1)
    kwargs.setdefault("train_utterances", VOX2_DEV)
    return plan_sweep(cfg, world_size=world_size, budget=budget, **kwargs)


# ------------------------------------------------------------------------------------------ steps

# (world size, budget, stage, steps per epoch, steps): the YAML comments' numbers
REFERENCE_STEPS = [
    (8, 1.0, "prune1", 8_531, 170_620),    # floor(1,092,009 / (16 x 8)) x 20 epochs
    (8, 0.1, "prune1", 8_531, 17_062),     # 2 epochs
    (4, 1.0, "prune1", 17_062, 341_240),
    (4, 0.1, "prune1", 17_062, 34_124),
    (8, 1.0, "prune2", 8_531, 170_620),
    (4, 1.0, "prune2", 17_062, 341_240),
    (4, 1.0, "ps1", 12_796, 127_960),      # floor(3 x 1,092,009 / (64 x 4)) x 10 (speed perturbation: 3 copies)
    (4, 1.0, "ps2", 12_796, 51_184),       # x 4 epochs
    (4, 1.0, "ps3", 8_531, 17_062),        # floor(1,092,009 / (32 x 4)) x 2
]


@pytest.mark.parametrize("world_size, budget, stage, per_epoch, steps", REFERENCE_STEPS)
def test_steps_match_the_reference_yaml_comments(cfg, world_size, budget, stage, per_epoch, steps):
    row = stage_row(plan_of(cfg, world_size, budget), stage)
    assert (row["steps_per_epoch"], row["steps"]) == (per_epoch, steps)
    assert row["epochs"] == pytest.approx(steps / per_epoch)


def test_samples_hours_and_gpu_hours_follow_from_the_steps(cfg):
    plan = plan_of(cfg, 8, 1.0, card="H100")
    crops = {"prune1": 4.0, "prune2": 4.0, "ps1": 2.5, "ps2": 2.5, "ps3": 5.5}   # middle of crop_seconds
    batches = {"prune1": 16, "prune2": 16, "ps1": 64, "ps2": 64, "ps3": 32}
    for row in plan["stages"]:
        assert row["samples"] == row["steps"] * batches[row["stage"]] * 8
        assert row["audio_hours"] == pytest.approx(row["samples"] * crops[row["stage"]] / 3600)
        assert row["gpu_hours"] == pytest.approx(row["seconds_per_step"] * row["steps"] * 8 / 3600)
        assert row["wall_hours"] == pytest.approx(row["gpu_hours"] / 8)
    (trial,) = plan["trials"]
    for key in ("steps", "samples", "audio_hours", "gpu_hours"):
        assert trial[key] == pytest.approx(sum(r[key] for r in plan["stages"]))
        assert plan["total"][key] == pytest.approx(trial[key])


def test_schedule_lengths_in_epochs_are_converted_as_the_engine_does(cfg):
    ps1, per_epoch = resolve_stage(cfg.finetune[0], VOX2_DEV, 4)
    assert (per_epoch, ps1.steps, ps1.schedule.step_size, ps1.val_every) == (12_796, 127_960, 63_980, 12_796)
    ps2, _ = resolve_stage(cfg.finetune[1], VOX2_DEV, 4)
    assert (ps2.steps, ps2.schedule.decay_steps, ps2.val_every) == (51_184, 25_592, 1_000)


# ------------------------------------------------------------------------------------------ budget

def test_scale_budget_scales_epoch_lengths_and_keeps_step_lengths(cfg):
    ps1 = scale_budget(cfg.finetune[0], 0.1)
    assert ps1.train.epochs == pytest.approx(1.0)
    assert ps1.train.schedule.step_size_epochs == pytest.approx(0.5)
    assert ps1.train.val_every_epochs == pytest.approx(0.1)
    assert (ps1.train.ckpt_every, ps1.train.schedule.warmup_steps) == (1_000, 0)
    assert cfg.finetune[0].train.epochs == 10 and cfg.finetune[0].train.schedule.step_size_epochs == 5  # a copy
    ps2 = scale_budget(cfg.finetune[1], 0.1)
    assert ps2.train.schedule.decay_epochs == pytest.approx(0.2) and ps2.train.val_every == 1_000
    prune1 = scale_budget(cfg.prune1, 0.1)
    assert prune1.train.epochs == pytest.approx(2.0)
    assert prune1.prune.warmup_steps == 10_000 and prune1.train.ckpt_every == 2_000


def test_scale_budget_leaves_a_stage_in_steps_unchanged(cfg):
    in_steps = dataclasses.replace(cfg.prune2, train=dataclasses.replace(cfg.prune2.train, epochs=None, steps=300))
    scaled = scale_budget(in_steps, 0.5)
    assert scaled == in_steps and scaled is not in_steps and scaled.train is not in_steps.train


@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.1, True, float("nan")])
def test_a_budget_outside_0_1_is_a_config_error(cfg, budget):
    with pytest.raises(ConfigError, match=r"budget: must lie in \(0, 1\]"):
        scale_budget(cfg.prune1, budget)
    with pytest.raises(ConfigError, match="budget"):
        plan_of(cfg, 8, budget)


def test_a_warm_up_longer_than_prune1_is_reported(cfg):
    plan = plan_of(cfg, 8, 0.05)   # 1 epoch = 8,531 steps < the 10,000-step sparsity warm-up
    assert stage_row(plan, "prune1")["steps"] == 8_531
    assert any("prune1" in w and "10,000" in w for w in plan["warnings"])
    assert not plan_of(cfg, 8, 0.1)["warnings"]


# ------------------------------------------------------------------------------------------ trials

def test_grid_trials_and_the_dense_end(cfg):
    plan = plan_of(cfg, 8, 0.1, card="H100", grid=GRID)
    assert [t["target"] for t in plan["trials"]] == GRID and plan["study"]["kind"] == "grid"
    dense = [r["stage"] for r in plan["stages"] if r["trial"] == 0]
    assert dense == ["ps1", "ps2", "ps3"]   # target 0: the teacher's fine-tune, no pruning
    assert [r["stage"] for r in plan["stages"] if r["trial"] == 3] == ["prune1", "prune2", "ps1", "ps2", "ps3"]
    # prune1 always trains the dense student; a sparser student makes the later stages cheaper
    prune1 = {stage_row(plan, "prune1", t)["seconds_per_step"] for t in range(1, len(GRID))}
    assert len(prune1) == 1
    ps2 = [stage_row(plan, "ps2", t)["seconds_per_step"] for t in range(len(GRID))]
    assert ps2 == sorted(ps2, reverse=True)
    assert plan["total"]["gpu_hours"] == pytest.approx(sum(t["gpu_hours"] for t in plan["trials"]))
    assert plan["total"]["trials"] == len(GRID)


def test_tpe_trials_are_priced_at_the_middle_of_the_target_range(cfg):
    plan = plan_of(cfg, 4, 0.1, n_trials=3)
    assert [t["target"] for t in plan["trials"]] == [pytest.approx(0.6)] * 3   # space default [0.3, 0.9]
    assert "middle" in plan["study"]["targets"]
    assert plan["total"]["steps"] == 3 * plan["trials"][0]["steps"]
    assert len(plan["stages"]) == 3 * 5


def test_without_prune2_a_trial_has_one_distillation(cfg):
    single = dataclasses.replace(cfg, prune2=None)
    plan = plan_of(single, 8, 0.1)
    assert [r["stage"] for r in plan["stages"]] == ["prune1", "ps1", "ps2", "ps3"]


# ------------------------------------------------------------------------------------------ utterances

def test_utterances_are_counted_from_the_training_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "utt2spk").write_text("".join(f"u{i} s{i % 2}\n" for i in range(300)) + "\n")
    plan = plan_sweep(reference_sweep("data/train"), world_size=1, budget=1.0, n_trials=1)
    assert plan["train_utterances"] == 300
    assert stage_row(plan, "prune1")["steps_per_epoch"] == 300 // 16


def test_a_missing_training_folder_asks_for_the_utterance_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data/nowhere.*--train-utterances"):
        plan_sweep(reference_sweep("data/nowhere"), world_size=8, budget=0.1, n_trials=1)


# ------------------------------------------------------------------------------------------ seconds per step

def test_estimates_name_their_card_and_assumption(cfg):
    known = plan_of(cfg, 8, 0.1, card="H100")
    assert known["source"] == "estimate (H100: 989 TFLOP/s bf16 dense x 0.35 utilisation)"
    unknown = plan_of(cfg, 8, 0.1, card="RTX 4090")
    assert unknown["source"].startswith("estimate (unknown card RTX 4090: assumed 989 TFLOP/s")
    assert all(r["source"] == unknown["source"] for r in unknown["stages"])
    a100 = plan_of(cfg, 8, 0.1, card="NVIDIA A100-SXM4-80GB")
    ratio = PEAK_BF16_DENSE_TFLOPS["h100"] / PEAK_BF16_DENSE_TFLOPS["a100"]
    assert a100["total"]["gpu_hours"] == pytest.approx(known["total"]["gpu_hours"] * ratio)
    pcie = plan_of(cfg, 8, 0.1, card="NVIDIA H100 PCIe")   # the most specific table entry
    assert "756 TFLOP/s" in pcie["source"]


def test_flop_model_of_a_step(cfg, monkeypatch):
    """prune1 = 3 student + 1 teacher forward of the dense encoder; a frozen encoder (ps1) only runs forward."""
    monkeypatch.delenv("SVLIB_ATTENTION", raising=False)   # count_macs of the lean attention
    plan = plan_of(cfg, 8, 0.1, card="H100", grid=[0.0])
    ps1, ps2 = stage_row(plan, "ps1"), stage_row(plan, "ps2")   # same batch and crops, dense teacher
    assert ps2["seconds_per_step"] == pytest.approx(3 * ps1["seconds_per_step"])
    prune = plan_of(cfg, 8, 0.1, card="H100", grid=[0.5])
    prune1, prune2 = stage_row(prune, "prune1"), stage_row(prune, "prune2")
    assert prune2["seconds_per_step"] < prune1["seconds_per_step"]
    # 2 FLOPs per MAC x 16 crops x 4 passes x 118.27 GMACs (count_macs of W2V-BERT 2.0 at 4 s) / (989T x 0.35)
    assert prune1["seconds_per_step"] == pytest.approx(2 * 16 * 4 * 118.27e9 / (989e12 * 0.35), rel=1e-3)


def write_bench(folder, name: str = BENCH_CARD, dry: bool = False) -> dict:
    """A bench/gpu.py result file with its keys (values made up)."""
    result = {"card": name, "dry": dry, "preset": "tiny" if dry else "w2v-bert-2.0", "batch": 64, "seconds": 3.0,
              "amp": "bf16",
              "training_s1": {"stage": "s1", "lean": {"seconds_per_step": 0.4}, "stock": {"seconds_per_step": 0.6}},
              "training_s2": {"stage": "s2", "lean": {"seconds_per_step": 0.9}, "stock": {"seconds_per_step": 1.3}},
              "prune1": {"batch": 16, "seconds": 4.0, "seconds_per_step": 0.5}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"gpu_{'dry' if dry else card_slug(name)}.json").write_text(json.dumps(result))
    return result


def test_measured_timings_are_scaled_by_the_work_ratio(tmp_path, monkeypatch):
    monkeypatch.delenv("SVLIB_ATTENTION", raising=False)
    write_bench(tmp_path)
    # ps2 at the benchmark's own shape (64 x 3 s, everything trained) and ps1 the same with a frozen encoder
    shape = {"sampling": {"mode": "epoch", "batch_size": 64, "crop_seconds": [3.0, 3.0], "speed_perturb": True}}
    cfg = reference_sweep(ps1=shape, ps2=shape)
    plan = plan_of(cfg, 8, 0.1, card="H100", grid=[0.0, 0.5], results_dir=tmp_path)   # H100 finds the file
    assert plan["source"] == f"measured ({tmp_path / 'gpu_nvidia_h100_80gb_hbm3.json'})"
    assert stage_row(plan, "ps2")["seconds_per_step"] == pytest.approx(0.9)
    assert stage_row(plan, "ps1")["seconds_per_step"] == pytest.approx(0.9 / 3)
    assert stage_row(plan, "prune1", trial=1)["seconds_per_step"] == pytest.approx(0.5)   # the bench's 16 x 4 s
    assert stage_row(plan, "prune2", trial=1)["seconds_per_step"] < 0.5
    assert plan_of(cfg, 8, 0.1, card=BENCH_CARD, results_dir=tmp_path)["source"].startswith("measured")
    assert plan_of(cfg, 8, 0.1, card="A100", results_dir=tmp_path)["source"].startswith("estimate")


def test_dry_and_incomplete_benchmarks(tmp_path, cfg):
    write_bench(tmp_path, dry=True)   # a CPU dry run of the tiny preset is no timing of any card
    assert plan_of(cfg, 8, 0.1, card="dry", results_dir=tmp_path)["source"].startswith("estimate")
    bench = write_bench(tmp_path)
    del bench["prune1"]
    (tmp_path / f"gpu_{card_slug(BENCH_CARD)}.json").write_text(json.dumps(bench))
    plan = plan_of(cfg, 8, 0.1, card=BENCH_CARD, results_dir=tmp_path)
    assert plan["source"].startswith("mixed: ")
    assert stage_row(plan, "prune1")["source"].startswith("estimate") and "no usable prune1 timing" in plan["source"]
    assert stage_row(plan, "ps1")["source"].startswith("measured")
    write_bench(tmp_path, "NVIDIA H100 PCIe")
    with pytest.raises(ConfigError, match="several benchmarks"):
        plan_of(cfg, 8, 0.1, card="H100", results_dir=tmp_path)


# ------------------------------------------------------------------------------------------ table

def test_format_plan(cfg):
    plan = plan_of(cfg, 8, 0.1, card="H100", grid=GRID)
    text = format_plan(plan)
    header = text.splitlines()[0]
    assert "7 grid trial(s) x 8 GPU(s) each" in header and "budget 0.1" in header and "card H100" in header
    assert f"GPU time: {plan['source']}" in text
    assert "trial 0: target 0 (dense teacher, fine-tune only)" in text and "study total" in text
    assert f"{plan['total']['steps']:,}" in text and "17,062" in text
    tpe = format_plan(plan_of(cfg, 4, 0.1, n_trials=20))
    assert "trials 0-19 (20 trials, each): target 0.6" in tpe


def test_the_readmes_plan_output_is_what_its_command_prints():
    """docs/sweeps.md: the --plan command, run as written, prints every line of the output the page shows."""
    import re
    import shlex
    import subprocess
    import sys

    readme = (REPO / "docs" / "sweeps.md").read_text()
    line = next(line for line in readme.splitlines() if "sweeps.prune_sweep" in line and "--plan" in line)
    words = shlex.split(line.split("  #")[0])
    shown = readme.split("Its output for the full-size grid", 1)[1]
    block = re.search(r"```text\n(.*?)\n```", shown, re.S).group(1).splitlines()
    out = subprocess.run([sys.executable, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout.splitlines()
    missing = [row for row in block if row != "..." and row not in printed]
    assert not missing, missing
    assert "  prune1            2     17,062      2,183,936     2,426.6   0.0437      1.66     0.21" in block
