"""A training stage's own switches, on the smoke s1 config with sv-mini (tiny model, 6 steps)."""
from __future__ import annotations

from experiments import pipeline
from experiments.common import read_result
from experiments.train import TrainStageConfig, run
from svlib.config import load_config
from svlib.corpora.manifest import prepare_manifest
from tests.conftest import SMOKE_CONFIG


def test_evaluate_test_off_skips_the_test_lists_but_keeps_validation(tmp_path, sv_mini, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_manifest(sv_mini / "manifest.csv", tmp_path / "data" / "sv-mini", seed=0)
    data = load_config(SMOKE_CONFIG, pipeline.PipelineConfig).data
    cfg = load_config(SMOKE_CONFIG.parent / "s1.yaml", TrainStageConfig)
    cfg.evaluate_test = False
    record = run(cfg, data, tmp_path / "s1")
    assert "test" not in record and not (tmp_path / "s1" / "scores").exists()
    assert record["best_val_eer_pct"] is not None and 0.0 <= record["best_val_eer_pct"] <= 100.0
    assert read_result(tmp_path / "s1") == record and (tmp_path / "s1" / "model").is_dir()
