"""``--overrides O.yaml`` (laid over the raw pipeline and stage YAMLs before validation) and stage selection
(``--until``, ``--stages``) of experiments.pipeline, on the smoke configs; nothing is trained here."""
from __future__ import annotations

import pytest
import yaml

from experiments import pipeline
from experiments.train import TrainStageConfig
from svlib.config import ConfigError, load_config
from tests.conftest import SMOKE_CONFIG


def write(tmp_path, overrides) -> str:
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return str(path)


def test_overrides_deep_merge_into_pipeline_data_and_stage_configs(tmp_path):
    base_cfg, base_stages = pipeline.load_pipeline(SMOKE_CONFIG)
    cfg, stages = pipeline.load_pipeline(SMOKE_CONFIG, write(tmp_path, {
        "out_dir": "exp/rehearsal", "device": "cpu", "dist_timeout_minutes": 45,
        "data": {"train": "data/other/train", "test_trials": {"o": "data/other/o.txt"}},
        "stages": {"s1": {"train": {"steps": 3, "optim": {"lr_backend": 0.5}}, "sampling": {"batch_size": 2},
                          "lora": {"target_modules": ["linear_q"]}},
                   "prune1": {"prune": {"target_sparsity": 0.25}}}}))
    assert (cfg.out_dir, cfg.device, cfg.dist_timeout_minutes) == ("exp/rehearsal", "cpu", 45.0)
    assert cfg.data.train == "data/other/train" and cfg.data.val == base_cfg.data.val  # siblings kept
    assert cfg.data.test_trials == {"test": "data/sv-mini/test_trials.txt", "o": "data/other/o.txt"}  # merged
    assert [s.name for s in cfg.stages] == [s.name for s in base_cfg.stages]
    s1, base_s1 = stages["s1"], base_stages["s1"]
    assert (s1.train.steps, s1.train.optim.lr_backend, s1.sampling.batch_size) == (3, 0.5, 2)
    # what the overrides do not name keeps the stage YAML's value, at every depth
    assert s1.train.optim.lr_frontend == base_s1.train.optim.lr_frontend == 1e-3
    assert s1.train.val_every == base_s1.train.val_every == 3
    assert s1.sampling.crop_seconds == base_s1.sampling.crop_seconds
    assert s1.lora.target_modules == ["linear_q"] and s1.lora.r == base_s1.lora.r == 4  # lists replace
    assert stages["prune1"].prune.target_sparsity == 0.25
    assert stages["s2"].train == base_stages["s2"].train and stages["s2"].sampling == base_stages["s2"].sampling
    # the pipeline device reaches stages left on auto
    assert s1.device == "cpu" and stages["s2"].device == "cpu"
    # the stage YAML itself is untouched
    assert load_config(SMOKE_CONFIG.parent / "s1.yaml", TrainStageConfig).train.steps == 6


@pytest.mark.parametrize("overrides, message", [
    ({"stages": {"s1": {"train": {"stepz": 3}}}}, "stages.s1.train: unknown key(s) ['stepz']"),
    ({"stages": {"s1": {"sampling": {"batch": 2}}}}, "stages.s1.sampling: unknown key(s) ['batch']"),
    ({"data": {"trian": "data/x"}}, "data: unknown key(s) ['trian']"),
    ({"outdir": "exp/x"}, "PipelineConfig: unknown key(s) ['outdir']"),
    ({"stages": {"s9": {"train": {"steps": 3}}}}, "stages.s9: no such stage"),
    ({"stages": {"merge": {"train": {"steps": 3}}}}, "stages.merge: a merge stage has no config to override"),
    ({"stages": [{"name": "s1"}]}, "stages: expected a mapping of stage name -> settings"),
])
def test_override_typos_are_errors_with_their_dotted_path(tmp_path, overrides, message):
    path = write(tmp_path, overrides)
    with pytest.raises(ConfigError) as err:
        pipeline.load_pipeline(SMOKE_CONFIG, path)
    assert message in str(err.value) and str(err.value).startswith(path)


def test_overridden_values_are_validated_like_the_yaml_itself(tmp_path):
    with pytest.raises(ConfigError, match=r"s1.yaml \(with overrides\): train.steps: expected an integer"):
        pipeline.load_pipeline(SMOKE_CONFIG, write(tmp_path, {"stages": {"s1": {"train": {"steps": "many"}}}}))
    with pytest.raises(ConfigError, match="out_dir: absolute paths are not allowed"):
        pipeline.load_pipeline(SMOKE_CONFIG, write(tmp_path, {"out_dir": "/abs/exp"}))
    with pytest.raises(ConfigError, match="dist_timeout_minutes: must be > 0"):
        pipeline.load_pipeline(SMOKE_CONFIG, write(tmp_path, {"dist_timeout_minutes": 0}))


def test_cli_reports_a_bad_overrides_file_in_one_line(tmp_path, capsys):
    path = write(tmp_path, {"stages": {"s1": {"train": {"stepz": 3}}}})
    assert pipeline.main(["--config", str(SMOKE_CONFIG), "--overrides", path, "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stages.s1.train: unknown key(s) ['stepz']" in err


def test_until_and_stages_select_what_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stage folder exists here: nothing is finished
    cfg, _ = pipeline.load_pipeline(SMOKE_CONFIG)
    assert pipeline.select_stages(cfg) is None
    assert pipeline.select_stages(cfg, until="merge") == ["s1", "merge"]
    assert pipeline.select_stages(cfg, stages="merge, s1") == ["s1", "merge"]  # pipeline order
    with pytest.raises(ConfigError, match="stage s2 starts from merge, which is not selected and not finished"):
        pipeline.select_stages(cfg, stages="s2,s3")
    with pytest.raises(ConfigError, match=r"--until: no stage 's9'"):
        pipeline.select_stages(cfg, until="s9")
    with pytest.raises(ConfigError, match=r"--stages: no stage\(s\) \['s9'\]"):
        pipeline.select_stages(cfg, stages="s1,s9")
    with pytest.raises(ConfigError, match="not both"):
        pipeline.select_stages(cfg, stages="s1", until="s1")
    # once merge is finished, s2 and s3 may run on their own (e.g. on fewer GPUs)
    (tmp_path / "exp/smoke/merge").mkdir(parents=True)
    (tmp_path / "exp/smoke/merge/result.json").write_text("{}\n")
    assert pipeline.select_stages(cfg, stages="s2,s3") == ["s2", "s3"]
