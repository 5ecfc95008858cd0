"""The smoke pipeline under ``torchrun --nproc_per_node 2`` (gloo, CPU): training on both ranks, everything
else on rank 0, a barrier at every stage boundary; it must leave what the single-process run leaves.

s1 is trained first in this process (one rank) and the rest under two ranks, so a pipeline continued with
another number of ranks is covered too (finished stages skipped, nothing pinned to the world size).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from experiments import pipeline
from experiments.common import read_result
from experiments.prune import load_stage_encoder
from svlib.model.frontend import count_parameters
from svlib.model.speaker import load_model
from tests.conftest import REPO, SMOKE_CONFIG

STAGES = ["s1", "merge", "s2", "s3", "eval", "prune1", "shrink", "prune2", "graft", "ps1", "ps2", "ps3",
          "eval_pruned"]


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """One pipeline job on ``nproc`` gloo ranks, one thread each (two ranks share this machine's cores)."""
    start = time.perf_counter()
    out = subprocess.run(pipeline.launch_command(nproc, *args), cwd=cwd, capture_output=True, text=True,
                         timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | env)
    return out, time.perf_counter() - start


def files_per_stage(root: Path) -> dict[str, set[str]]:
    return {stage.name: {p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()}
            for stage in root.iterdir() if stage.is_dir()}


@pytest.fixture(scope="module")
def two_rank_run(smoke_run, tmp_path_factory):
    """The smoke pipeline into ``exp/smoke_2rank`` of the single-process run's workdir (same lists), tracked in
    a store of its own: s1 here on one rank, then every stage under torchrun with two ranks."""
    workdir = smoke_run["workdir"]
    store = tmp_path_factory.mktemp("mlflow_2rank")
    overrides = store / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"out_dir": "exp/smoke_2rank"}))
    old = os.getcwd()
    os.chdir(workdir)
    try:
        cfg, stage_cfgs = pipeline.load_pipeline(SMOKE_CONFIG, overrides)
        pipeline.run(cfg, SMOKE_CONFIG.parent, None, stage_cfgs=stage_cfgs, stages=["s1"])
    finally:
        os.chdir(old)
    s1_before = read_result(workdir / "exp/smoke_2rank/s1")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    out, seconds = torchrun(2, ["--config", str(SMOKE_CONFIG), "--overrides", str(overrides),
                                "--experiment", "smoke_2rank"], workdir, timeout=600, MLFLOW_TRACKING_URI=uri)
    return {"out": out, "seconds": seconds, "root": workdir / "exp/smoke_2rank", "single": workdir / "exp/smoke",
            "uri": uri, "s1_before": s1_before}


def test_two_ranks_leave_the_single_process_stages_files_and_records(two_rank_run):
    out = two_rank_run["out"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    root, single = two_rank_run["root"], two_rank_run["single"]
    # the same stage folders, each with the same files (models, heads, checkpoints, scores, result.json)
    assert files_per_stage(root) == files_per_stage(single)
    # every stage, plus the fbank baseline's scores (rank 0 writes them, for the paired comparison)
    assert sorted(files_per_stage(root)) == sorted([*STAGES, "baselines"])
    for name in STAGES:
        two, one = read_result(root / name), read_result(single / name)
        assert two is not None and set(two) == set(one), name
        for key in ("num_classes", "params_encoder", "params_total"):  # steps may follow epochs x world size
            assert two.get(key) == one.get(key), (name, key)
        assert two.get("final_step") == two.get("steps", two.get("final_step")), name  # trained to the end
        if "test" in one:
            assert {k: v["num_trials"] for k, v in two["test"].items()} == {k: v["num_trials"] for k, v in one["test"].items()}
    # s1 was finished by the one-rank run and skipped by the two-rank one
    assert read_result(root / "s1") == two_rank_run["s1_before"]
    # every model and encoder folder the two-rank run wrote loads, with the single-process run's size
    for name in STAGES:
        if (root / name / "model").is_dir():
            sizes = [count_parameters(load_model(run / name / "model")) for run in (root, single)]
            assert sizes[0] == sizes[1] > 0, name
        if (root / name / "encoder").is_dir():
            sizes = [count_parameters(load_stage_encoder(run / name)) for run in (root, single)]
            assert sizes[0] == sizes[1] > 0, name
    two_summary = json.loads((root / "summary.json").read_text())
    assert list(two_summary["stages"]) == STAGES and set(two_summary["baselines"]) == {"fbank", "random_init"}


def test_only_rank_zero_tracks(two_rank_run):
    assert two_rank_run["out"].returncode == 0
    mlflow.set_tracking_uri(two_rank_run["uri"])
    runs = mlflow.search_runs(experiment_names=["smoke_2rank"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 1  # a second rank tracking would have opened a second parent run
    children = [r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(children) == sorted(STAGES)  # one nested run per stage, none twice
    assert len(runs) == 1 + len(STAGES)
    s2 = next(r for r in runs if r.data.tags.get("stage") == "s2")
    assert "train_loss" in s2.data.metrics and "test_eer_pct" in s2.data.metrics


BROKEN = """
name: broken
out_dir: exp/broken
dist_timeout_minutes: 5
data:
  test: data/sv-mini/test
  test_trials: {test: data/sv-mini/test_trials.txt}
stages:
  - {name: s3, kind: use, path: exp/unfinished}
  - {name: eval, kind: evaluate, init: s3}
baselines: false
"""


def test_a_stage_failing_on_rank_zero_stops_every_rank_with_its_error(tmp_path, monkeypatch):
    """eval runs on rank 0 alone and fails (its init has a result.json but no model); rank 1, waiting for rank
    0's record, must raise rank 0's error at once, not sit in the broadcast until the 5-minute timeout."""
    from svlib.corpora.manifest import prepare_manifest
    from tests.conftest import DATA

    if not (DATA / "sv-mini").exists():
        pytest.skip("shared data not found")
    monkeypatch.chdir(tmp_path)  # the lists' audio paths are relative to where the job runs
    prepare_manifest(DATA / "sv-mini" / "manifest.csv", tmp_path / "data" / "sv-mini", seed=0)
    (tmp_path / "exp" / "unfinished").mkdir(parents=True)
    (tmp_path / "exp" / "unfinished" / "result.json").write_text("{}\n")
    config = tmp_path / "broken.yaml"
    config.write_text(BROKEN)
    out, seconds = torchrun(2, ["--config", str(config), "--no-tracking"], tmp_path, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "error: rank 0 failed: ModelFormatError" in text, text[-4000:]  # rank 1 names rank 0's error, in one line
    assert seconds < 150
    assert not (tmp_path / "exp" / "broken" / "eval" / "result.json").exists()
