"""Epochs -> steps: the reference recipe's step counts from the committed YAMLs, at the world size of each stage."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.prune import DistillStageConfig
from experiments.train import TrainStageConfig
from svlib.config import ConfigError, from_dict, load_config
from svlib.data.sampling import steps_per_epoch
from svlib.train.engine import TrainConfig, resolve_config
from svlib.train.schedules import ScheduleConfig, lr_factor

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
VOX2_DEV = 1_092_009  # VoxCeleb2-dev utterances


class FakeLoader:
    """What the engine reads of a loader to convert epochs: its steps per epoch at this world size."""

    def __init__(self, cfg, world: int):
        self.steps_per_epoch = steps_per_epoch(VOX2_DEV, cfg.sampling.batch_size, world, cfg.sampling.copies)


def resolved(path: Path, world: int, cls=TrainStageConfig) -> TrainConfig:
    cfg = load_config(path, cls)
    assert cfg.sampling.mode == "epoch" and cfg.train.grad_clip == 1.0 and cfg.train.seed == 24, path
    return resolve_config(cfg.train, FakeLoader(cfg, world), world)[0]


def test_s1_on_8_gpus_is_the_reference_95970_steps():
    cfg = resolved(CONFIGS / "w2vbert" / "s1.yaml", world=8)
    assert cfg.steps == 95_970 and cfg.schedule.warmup_steps == 31_990 and cfg.schedule.step_size == 31_990
    assert cfg.val_every == 6_398  # once per epoch
    s = cfg.schedule
    assert lr_factor(s, 0) == pytest.approx(1 / 31_990) and lr_factor(s, 31_989) == 1.0
    assert lr_factor(s, 63_979) == 1.0 and lr_factor(s, 63_980) == pytest.approx(0.1)
    assert lr_factor(s, 95_969) == pytest.approx(0.1)  # 15 epochs: one decay after the 5-epoch plateau


def test_s2_and_s3_on_4_gpus():
    s2 = resolved(CONFIGS / "w2vbert" / "s2.yaml", world=4)
    assert s2.steps == 51_184 and s2.schedule.decay_steps == 25_592
    assert lr_factor(s2.schedule, 12_796, s2.steps) == pytest.approx(0.75)  # cosine half-way: 1e-5 -> 7.5e-6
    assert lr_factor(s2.schedule, 25_592, s2.steps) == pytest.approx(0.5) == lr_factor(s2.schedule, 51_183)
    s3 = resolved(CONFIGS / "w2vbert" / "s3.yaml", world=4)
    assert s3.steps == 2 * 8_531 and s3.schedule.decay_steps == 8_531
    # the same configs after s1 on 8 ranks: the step counts follow the world size of each stage
    assert resolved(CONFIGS / "w2vbert" / "s2.yaml", world=8).steps == 4 * 6_398


def test_prune_recipe_in_epochs():
    ps1 = resolved(CONFIGS / "prune" / "ps1.yaml", world=4)
    assert ps1.steps == 10 * 12_796 and ps1.schedule.step_size == 5 * 12_796 and ps1.schedule.warmup_steps == 0
    assert resolved(CONFIGS / "prune" / "ps2.yaml", world=4).steps == 51_184
    assert resolved(CONFIGS / "prune" / "ps3.yaml", world=4).steps == 17_062
    for name in ("prune1.yaml", "prune2.yaml"):
        assert resolved(CONFIGS / "prune" / name, world=8, cls=DistillStageConfig).steps == 20 * 8_531


def test_reference_augmentation_in_the_yamls():
    for path in (CONFIGS / "w2vbert" / "s1.yaml", CONFIGS / "w2vbert" / "s2.yaml", CONFIGS / "prune" / "ps1.yaml"):
        aug = load_config(path, TrainStageConfig).augment
        assert aug.exclusive and aug.noise_prob == pytest.approx(1 / 3) == aug.reverb_prob
        assert aug.noise_types == ("noise", "music", "babble", "babble_music") and aug.babble_speakers == (3, 8)
        assert aug.snr_noise == aug.snr_music == (5.0, 20.0) and aug.snr_babble == (15.0, 25.0)
    assert load_config(CONFIGS / "w2vbert" / "s3.yaml", TrainStageConfig).augment.noise_prob == 0


def test_epoch_fields_are_exclusive_and_need_a_size():
    with pytest.raises(ConfigError, match="steps or epochs"):
        from_dict(TrainConfig, {"steps": 10, "epochs": 2})
    with pytest.raises(ConfigError, match="warmup_steps or warmup_epochs"):
        from_dict(ScheduleConfig, {"warmup_steps": 10, "warmup_epochs": 1})
    with pytest.raises(ConfigError, match="decay_steps or decay_epochs"):
        from_dict(ScheduleConfig, {"decay_steps": 10, "decay_epochs": 1})
    with pytest.raises(ConfigError, match="step_size"):
        from_dict(ScheduleConfig, {"kind": "step"})
    with pytest.raises(ConfigError, match="val_every or val_every_epochs"):
        from_dict(TrainConfig, {"val_every": 5, "val_every_epochs": 1})
    cfg = from_dict(TrainConfig, {"epochs": 1.5, "schedule": {"kind": "cosine", "decay_epochs": 1}})
    with pytest.raises(ValueError, match="in epochs"):
        lr_factor(cfg.schedule, 0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        cfg.in_steps(None)
    out = cfg.in_steps(7)
    assert (out.steps, out.schedule.decay_steps, out.epochs, out.schedule.decay_epochs) == (10, 7, None, None)
    assert TrainConfig().in_steps().steps == 1000  # neither given: the default length in steps
    assert TrainConfig(steps=5).in_steps() == TrainConfig(steps=5)
