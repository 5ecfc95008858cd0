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


def test_recipe_search_candidates_validate_and_never_read_the_test_lists(tmp_path):
    """bench/demo_recipe_search.py: each candidate is a valid overrides file of the demo pipeline, and what the
    script adds to it takes the test lists (and the baselines, which score them) out of every search run."""
    import yaml

    from bench.demo_recipe_search import PIPELINE, RECIPES, search_overrides
    from svlib.config import read_yaml

    recipes = read_yaml(RECIPES)["recipes"]
    assert recipes
    for name, recipe in recipes.items():
        assert recipe["why"], name
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(search_overrides(recipe, "exp/x")))
        cfg, stages = load_pipeline(ROOT / PIPELINE, path)
        assert cfg.data.tests() is None and cfg.baselines is False, name
        assert cfg.data.val is not None and cfg.data.val_trials is not None, name  # val still chooses
        assert set(stages) == {"s1", "s2", "s3"}
    # the unchanged demo config does read the test lists
    assert load_pipeline(ROOT / PIPELINE)[0].data.test_trials
