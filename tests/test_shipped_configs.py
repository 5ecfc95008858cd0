"""Every YAML the repo ships validates: a renamed config field must not leave a recipe that fails on its first line."""
from pathlib import Path

import pytest

from experiments.pipeline import load_pipeline
from svlib.config import load_config
from sweeps.prune_sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "experiments" / "configs").glob("*/pipeline.yaml"))
SWEEPS = sorted((ROOT / "sweeps" / "configs").glob("*.yaml"))


def test_every_recipe_folder_has_a_pipeline():
    folders = {p.parent.name for p in PIPELINES}
    assert {"w2vbert", "prune", "demo", "demo_prune", "smoke"} <= folders


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.parent.name)
def test_pipeline_and_its_stage_configs_validate(path):
    cfg, stage_cfgs = load_pipeline(path)
    assert cfg.stages
    with_yaml = [s.name for s in cfg.stages if s.config is not None]
    assert sorted(stage_cfgs) == sorted(with_yaml)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_configs_validate(path):
    assert load_config(path, SweepConfig) is not None
