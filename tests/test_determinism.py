"""The same seed on the same machine gives the same numbers: the demo-shaped smoke pipeline (s1 -> merge -> s2 ->
s3 -> eval -> prune1 -> shrink -> prune2 -> graft -> ps1..ps3 -> eval_pruned, the real loader with its worker
process, augmentation, hard-concrete sampling) run twice from nothing, every stage's result.json compared
exactly, and the test scores bit for bit."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from experiments import pipeline
from svlib.config import load_config
from svlib.corpora.manifest import prepare_manifest

SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke" / "pipeline.yaml"
# what may differ between two identical runs: wall time (and the folder names, see ``numbers``)
VOLATILE = {"minutes", "steps_per_s"}


def numbers(record, run: str, path=""):
    """Every leaf of a result.json but the volatile ones, as {dotted key: value}; the run's own folder
    (``exp/<run>``) in a string reads ``exp/RUN``."""
    if isinstance(record, dict):
        out = {}
        for key, value in record.items():
            if key not in VOLATILE:
                out |= numbers(value, run, f"{path}.{key}" if path else key)
        return out
    if isinstance(record, list):
        out = {}
        for i, value in enumerate(record):
            out |= numbers(value, run, f"{path}[{i}]")
        return out
    return {path: record.replace(f"exp/{run}", "exp/RUN") if isinstance(record, str) else record}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, sv_mini):
    root = tmp_path_factory.mktemp("determinism")
    old = os.getcwd()
    os.chdir(root)
    try:
        prepare_manifest(sv_mini / "manifest.csv", root / "data" / "sv-mini", seed=0)
        outs = []
        for name in ("a", "b"):
            cfg = load_config(SMOKE, pipeline.PipelineConfig)
            cfg.out_dir, cfg.baselines = f"exp/{name}", False
            pipeline.run(cfg, SMOKE.parent, None)
            outs.append(root / "exp" / name)
    finally:
        os.chdir(old)
    return outs


def test_every_stage_gives_the_same_numbers_twice(two_runs):
    a, b = two_runs
    stages = sorted(p.parent.name for p in a.glob("*/result.json"))
    assert len(stages) == 13, stages
    for stage in stages:
        ra = numbers(json.loads((a / stage / "result.json").read_text()), "a")
        rb = numbers(json.loads((b / stage / "result.json").read_text()), "b")
        assert ra == rb, (stage, {k: (ra.get(k), rb.get(k)) for k in set(ra) | set(rb) if ra.get(k) != rb.get(k)})
    for stage in ("eval", "eval_pruned"):
        assert (a / stage / "scores" / "test.txt").read_bytes() == (b / stage / "scores" / "test.txt").read_bytes()
    # and the numbers are real: trained stages report a validation EER, the evaluations a test EER
    assert json.loads((a / "eval_pruned" / "result.json").read_text())["test"]["test"]["eer_pct"] > 0
