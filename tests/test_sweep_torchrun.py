"""The pruning sweep as users run it: one trial spread over the ranks of a torchrun job (2 gloo ranks, CPU).

The smoke sweep (tiny model, sv-mini, the smoke pipeline's s2 as teacher) is run as a grid of 2 points by one
process and by a 2-rank job, each in a scratch folder of its own; then a fault on rank 1, two 2-rank workers
sharing one PostgreSQL study, an all-failed worker, and the promotion of a trial to a linked study.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import REPO

SMOKE_SWEEP = REPO / "sweeps" / "configs" / "smoke.yaml"
STUDY = "smoke-prune-grid"
PRUNED_STAGES = {"prune1", "shrink", "prune2", "graft", "ps1", "eval_pruned"}
DENSE_STAGES = {"ps1", "eval_pruned"}
# Two ranks see other batches than one process (each its shard, twice the samples per step), so their EERs
# differ; on sv-mini's 10-speaker lists after a few steps each they stay within this many points.
EER_TOLERANCE_PCT = 15.0
TIMEOUT_S = 420

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sweep_command(nproc: int, *args: str, script: str | None = None) -> list[str]:
    """``python -m sweeps.prune_sweep ARGS`` (nproc 1) or the same under ``torchrun --standalone``."""
    target = [script] if script else ["-m", "sweeps.prune_sweep"]
    if nproc == 1:
        return [sys.executable, *target, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            *target, *args]


def run(cmd: list[str], cwd: Path, timeout: float = TIMEOUT_S, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | env)
    return out, time.perf_counter() - start


def workdir(smoke_run, root: Path) -> Path:
    """A folder with the smoke run's exp/ (the teacher) and data/ linked in, for one sweep job. The lists' audio
    paths are relative (to the smoke run's folder), so ``root`` must lie as deep as that folder: a pytest
    ``tmp_path`` or a ``tmp_path_factory.mktemp`` folder."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("exp", "data"):
        (root / name).symlink_to(smoke_run["workdir"] / name, target_is_directory=True)
    return root


def stores(root: Path) -> tuple[str, str]:
    return f"sqlite:///{root / 'optuna.db'}", f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def grid_args(root: Path, *extra: str) -> list[str]:
    storage, uri = stores(root)
    return ["--config", str(SMOKE_SWEEP), "--grid", "--n-trials", "2", "--storage", storage, "--mlflow-uri", uri,
            *extra]


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=500)


def trial_folders(root: Path, study: str = STUDY) -> dict[int, Path]:
    base = root / "sweeps" / "runs" / study
    return {int(p.name.split("_")[1]): p for p in base.glob("trial_*") if p.is_dir() and "." not in p.name}


@pytest.fixture(scope="module")
def both_sweeps(smoke_run, tmp_path_factory):
    """The same 2-point grid sweep by one process and by two ranks (torchrun), timed."""
    out = {}
    for nproc in (1, 2):
        root = workdir(smoke_run, tmp_path_factory.mktemp(f"sweep_{nproc}rank"))
        result, seconds = run(sweep_command(nproc, *grid_args(root)), root)
        out[nproc] = {"root": root, "out": result, "seconds": seconds}
    return out


def test_a_trial_spans_both_ranks_and_matches_the_single_process_sweep(both_sweeps):
    one, two = both_sweeps[1], both_sweeps[2]
    for job in (one, two):
        assert job["out"].returncode == 0, job["out"].stdout[-3000:] + job["out"].stderr[-6000:]
    studies = {n: optuna.load_study(study_name=STUDY, storage=stores(job["root"])[0]) for n, job in both_sweeps.items()}
    # one Optuna trial per trial (not one per rank), the same grid points, all COMPLETE
    for study in studies.values():
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    points = {n: sorted(t.params["target_sparsity"] for t in s.get_trials()) for n, s in studies.items()}
    assert points[1] == points[2]
    for n, job in both_sweeps.items():
        folders = trial_folders(job["root"])
        assert sorted(folders) == [0, 1]   # one trial folder per trial
        for t in studies[n].get_trials():
            record = json.loads((folders[t.number] / "result.json").read_text())
            stages = {p.name for p in folders[t.number].iterdir() if p.is_dir()}
            assert stages == (PRUNED_STAGES if t.params["target_sparsity"] > 0 else DENSE_STAGES)
            # a finished stage's checkpoints are removed (keep_checkpoints: false), its model stays
            assert not list(folders[t.number].glob("*/ckpt")) and (folders[t.number] / "ps1" / "model").is_dir()
            assert record["budget"] == t.user_attrs["budget"] == 0.1
            assert json.loads((folders[t.number] / "trial.json").read_text())["params"]["budget"] == 0.1
    by_target = {n: {t.params["target_sparsity"]: t for t in s.get_trials()} for n, s in studies.items()}
    for target, single in by_target[1].items():
        double = by_target[2][target]
        r1 = json.loads((trial_folders(one["root"])[single.number] / "result.json").read_text())
        r2 = json.loads((trial_folders(two["root"])[double.number] / "result.json").read_text())
        assert set(r1) == set(r2)
        # the structure follows the target on either world size; the EER is close, not equal (other batches)
        assert abs(r1["val_eer_pct"] - r2["val_eer_pct"]) <= EER_TOLERANCE_PCT
        assert abs(r1["test_eer_pct"] - r2["test_eer_pct"]) <= EER_TOLERANCE_PCT
        if target > 0:  # the pruning trained on both ranks
            prune1 = json.loads((trial_folders(two["root"])[double.number] / "prune1" / "result.json").read_text())
            assert prune1["world_size"] == 2
    # MLflow: one trial run per trial, its stage runs nested once (rank 0 alone tracks)
    runs = mlflow_runs(stores(two["root"])[1], STUDY)
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert sorted(r.data.tags["optuna_trial"] for r in trial_runs) == ["0", "1"]
    for run_ in trial_runs:
        assert run_.info.status == "FINISHED" and run_.data.params["budget"] == "0.1"
        target = float(run_.data.params["target_sparsity"])
        nested = [r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == run_.info.run_id]
        assert sorted(nested) == sorted(PRUNED_STAGES if target > 0 else DENSE_STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_failure_on_rank_one_fails_the_trial_on_both_ranks_and_the_next_trial_runs(smoke_run, tmp_path):
    root = workdir(smoke_run, tmp_path)
    overrides = root / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"dist_timeout_minutes": 2}))
    storage, uri = stores(root)
    args = ["--config", str(SMOKE_SWEEP), "--overrides", str(overrides), "--grid", "--n-trials", "1",
            "--max-failures", "2", "--storage", storage, "--mlflow-uri", uri]
    out, seconds = run(sweep_command(2, *args, script=str(REPO / "tests" / "sweep_fault_worker.py")), root,
                       timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert seconds < 240   # no collective waited for its timeout
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    reason = trials[0].user_attrs["fail_reason"]
    assert reason == ("TrialFailed: RankFailure: rank 1 failed at step 3 (batch): OSError: injected: "
                      "data/sv-mini/bad_utt.wav: cannot decode"), reason
    assert "\n" not in reason
    assert trials[0].params["target_sparsity"] != trials[1].params["target_sparsity"]
    runs = mlflow_runs(uri, STUDY)
    failed = next(r for r in runs if r.data.tags.get("optuna_trial") == "0" and r.data.tags.get("kind") == "trial")
    assert failed.info.status == "FAILED" and "cannot decode" in failed.data.tags["fail_reason"]
    assert not [r for r in runs if r.info.status == "RUNNING"]   # nested stage runs closed too


def test_a_worker_whose_every_trial_fails_exits_non_zero_with_the_first_failure(tmp_path):
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"teacher": "exp/missing/s2", "n_trials": 2}))
    storage, _ = stores(tmp_path)
    out, _ = run(sweep_command(1, "--config", str(SMOKE_SWEEP), "--overrides", str(overrides), "--storage", storage,
                               "--no-tracking"), tmp_path, timeout=120)
    assert out.returncode == 1, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: every trial failed; first: trial 0: TrialFailed: FileNotFoundError: teacher")
    assert "exp/missing/s2" in last
    states = [t.state for t in optuna.load_study(study_name="smoke-prune", storage=storage).get_trials()]
    assert states == [TrialState.FAIL, TrialState.FAIL]


@pytest.mark.skipif(not os.environ.get("SVLIB_TEST_POSTGRES_URL"), reason="SVLIB_TEST_POSTGRES_URL not set "
                    "(.ci/run starts a throw-away PostgreSQL: eval \"$(.ci/postgres.sh start)\")")
def test_two_two_rank_workers_share_one_postgres_study(smoke_run, tmp_path):
    import sqlalchemy

    url = os.environ["SVLIB_TEST_POSTGRES_URL"]
    root = workdir(smoke_run, tmp_path)
    _, uri = stores(root)
    name = f"smoke-prune-{os.getpid()}-{int(time.time())}"   # a fresh study in the shared database
    overrides = root / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"name": name, "heartbeat_interval": 5}))
    args = ["--config", str(SMOKE_SWEEP), "--overrides", str(overrides), "--grid", "--storage", url, "--mlflow-uri", uri]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    jobs = [subprocess.Popen(sweep_command(2, *args, "--worker", str(k)), cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in (0, 1)]
    outs = [job.communicate(timeout=TIMEOUT_S) for job in jobs]
    for job, (stdout, stderr) in zip(jobs, outs):
        assert job.returncode == 0, stdout[-2000:] + stderr[-4000:]
    study = optuna.load_study(study_name=f"{name}-grid", storage=url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3   # every grid point once, none twice
    assert sorted(t.params["target_sparsity"] for t in trials) == [0.0, 0.3, 0.6]
    runs = mlflow_runs(uri, f"{name}-grid")
    assert len([r for r in runs if r.data.tags.get("kind") == "trial"]) == 3
    assert not [r for r in runs if r.info.status == "RUNNING"]
    sqlalchemy.create_engine(url).dispose()


def test_promote_reruns_the_best_trial_at_a_higher_budget_in_a_linked_study(both_sweeps):
    root = both_sweeps[1]["root"]
    storage, uri = stores(root)
    source = optuna.load_study(study_name=STUDY, storage=storage)
    best = min(source.best_trials, key=lambda t: (t.values[0], t.number))
    promote = sweep_command(1, "--config", str(SMOKE_SWEEP), "--grid", "--storage", storage, "--mlflow-uri", uri,
                            "--promote", "1", "--budget", "0.5")
    out, _ = run(promote, root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    linked = optuna.load_study(study_name=f"{STUDY}-b0.5", storage=storage)
    assert linked.user_attrs["promoted_from"] == STUDY
    (trial,) = linked.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.params == best.params
    assert trial.user_attrs["promoted_from_trial"] == best.number and trial.user_attrs["budget"] == 0.5
    record = json.loads((trial_folders(root, f"{STUDY}-b0.5")[trial.number] / "result.json").read_text())
    assert record["budget"] == 0.5
    # both fidelities in one MLflow experiment, told apart by the budget column
    runs = [r for r in mlflow_runs(uri, STUDY) if r.data.tags.get("kind") == "trial"]
    assert sorted(r.data.params["budget"] for r in runs) == ["0.1", "0.1", "0.5"]
    # the notebooks' curve: one series per budget
    from svlib import analysis

    points = analysis.pruning_points(analysis.load_runs(uri, STUDY))
    trials = points[points["source"] == "trial"]
    assert sorted(trials["budget"]) == [0.1, 0.1, 0.5]
    fig = analysis.plot_pruning_curve(points)
    assert {"trials, budget 0.1", "trials, budget 0.5"} <= set(analysis.figure_series(fig))
    # the same command again enqueues nothing new and reruns nothing
    again, _ = run(promote, root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(optuna.load_study(study_name=f"{STUDY}-b0.5", storage=storage).get_trials()) == 1
