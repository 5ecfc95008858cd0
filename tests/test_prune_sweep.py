"""The pruning sweep (sweeps.prune_sweep) on the smoke pipeline's s2 as the fixed teacher (tiny model, sv-mini).

Every trial runs prune1 -> shrink -> prune2 -> graft -> ps1 -> eval_pruned with a few steps each; the sweep runs
in a scratch folder whose ``exp/`` and ``data/`` point at the ``smoke_run`` fixture's (read only).
"""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from svlib.config import ConfigError, from_dict, load_config, to_dict
from sweeps import prune_sweep
from sweeps.prune_sweep import SweepConfig, run_sweep
from tests.conftest import REPO

SMOKE_SWEEP = REPO / "sweeps" / "configs" / "smoke.yaml"
STAGES = {"prune1", "shrink", "prune2", "graft", "ps1", "eval_pruned"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def sweep_dir(smoke_run, tmp_path, monkeypatch):
    """A working folder with the smoke run's exp/ (the teacher exp/smoke/s2) and data/, and an MLflow store."""
    for name in ("exp", "data"):
        (tmp_path / name).symlink_to(smoke_run["workdir"] / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def _runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=500)


def test_two_trials_nested_runs_and_resume(sweep_dir):
    from mlflow import MlflowClient

    root, storage, uri = sweep_dir
    cfg = load_config(SMOKE_SWEEP, SweepConfig)
    out = run_sweep(cfg, storage=storage, tracking_uri=uri)
    assert out["worker"]["complete"] == 2 and out["worker"]["failed"] == 0
    study = optuna.load_study(study_name="smoke-prune", storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert study.metric_names == ["val_eer_pct", "params_encoder"]
    teacher = json.loads((root / "exp/smoke/s2/result.json").read_text())
    for t in trials:
        assert set(t.params) == {"target_sparsity", "l1_weight", "cos_weight", "layers", "lr_log_alpha", "lr_lambda"}
        assert 0.3 <= t.params["target_sparsity"] <= 0.8
        folder = root / "sweeps" / "runs" / "smoke-prune" / f"trial_{t.number}"
        assert t.user_attrs["trial_dir"] == f"sweeps/runs/smoke-prune/trial_{t.number}"
        assert all((folder / s / "result.json").is_file() for s in STAGES)
        record = json.loads((folder / "result.json").read_text())
        structure = json.loads((folder / "structure.json").read_text())
        assert t.values == [record["val_eer_pct"], float(record["params_encoder"])]
        assert record["params_encoder"] == structure["params_encoder"] < teacher["params_encoder"]
        assert record["achieved_sparsity"] == pytest.approx(1 - record["params_encoder"] / teacher["params_encoder"])
        # prune1 ran with the trial's knobs
        prune1 = load_config(folder / "prune1" / "config.yaml", prune_sweep.prune_stage.DistillStageConfig)
        assert prune1.prune.target_sparsity == t.params["target_sparsity"]
        assert prune1.prune.lr_lambda == -t.params["lr_lambda"]
        assert prune1.distill.l1_weight == t.params["l1_weight"]
        assert prune1.distill.layers == cfg.space.layers[t.params["layers"]]

    # MLflow: study parent -> trial runs (params, metrics, structure artifact) -> stage runs
    client = MlflowClient(uri)
    runs = _runs(uri, "smoke-prune")
    by_id = {r.info.run_id: r for r in runs}
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1 and parents[0].data.tags["optuna_study"] == "smoke-prune"
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert sorted(r.data.tags["optuna_trial"] for r in trial_runs) == ["0", "1"]
    for run in trial_runs:
        t = trials[int(run.data.tags["optuna_trial"])]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna_state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        assert float(run.data.params["target_sparsity"]) == pytest.approx(t.params["target_sparsity"])
        m = run.data.metrics
        assert m["val_eer_pct"] == t.values[0] and m["params_encoder"] == t.values[1]
        assert m["target_sparsity"] == pytest.approx(t.params["target_sparsity"])
        assert m["test_eer_pct"] == t.user_attrs["test_eer_pct"] and 0 < m["achieved_sparsity"] < 1
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"structure.json", "structure.png", "trial.json"} <= artifacts
        stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
        assert set(stages) == STAGES
        assert stages["prune1"].data.metrics["target_sparsity"] == pytest.approx(t.params["target_sparsity"])
        assert stages["eval_pruned"].data.metrics["val_eer_pct"] == t.values[0]
    # the fixed teacher: one finished run under the study run, found as the reference by svlib.analysis
    teachers = [r for r in runs if r.data.tags.get("kind") == "use"]
    assert len(teachers) == 1 and teachers[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert teachers[0].data.metrics["test_eer_pct"] == teacher["test"]["test"]["eer_pct"]
    from svlib import analysis
    frame = analysis.load_runs(uri, "smoke-prune")
    reference = analysis.teacher_reference(frame)
    assert reference["run_id"] == teachers[0].info.run_id and reference["params_encoder"] == teacher["params_encoder"]
    points = analysis.pruning_points(frame, teacher=reference)
    assert sorted(points.loc[points["source"] == "trial", "label"]) == ["trial 0", "trial 1"]
    assert len(runs) == 1 + 1 + 2 + 2 * len(STAGES) and all(by_id[r].info.status == "FINISHED" for r in by_id)

    # every trial's grafted and fine-tuned models are logged models of their stage runs; --register takes the
    # best trial's fine-tuned model (the one its evaluation scored) from its own run
    models = client.search_logged_models([client.get_experiment_by_name("smoke-prune").experiment_id])
    assert sorted(m.name for m in models) == ["graft", "graft", "ps1", "ps1"]
    for run in trial_runs:
        t = trials[int(run.data.tags["optuna_trial"])]
        assert run.info.run_name == (f"trial-{t.number} s={t.user_attrs['achieved_sparsity']:.2f} ← "
                                     f"t={t.params['target_sparsity']:.2f}")
        assert run.data.metrics["val_eer_lo"] == round(t.user_attrs["val_eer_pct_ci_low"], 2)
        stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
        ps1 = next(m for m in models if m.source_run_id == stages["ps1"].info.run_id)
        assert t.user_attrs["mlflow_model_id"] == ps1.model_id
        assert {m.key: m.value for m in ps1.metrics}["test_eer"] == round(t.user_attrs["test_eer_pct"], 2)
        assert run.data.metrics["test_eer"] == round(t.user_attrs["test_eer_pct"], 2)
        assert run.data.metrics["test_eer_lo"] == round(t.user_attrs["test_eer_pct_ci_low"], 2)
    report = json.loads((root / "sweeps" / "runs" / "smoke-prune" / "report.json").read_text())
    best = prune_sweep.best_point(report)
    line = prune_sweep.register_best_model(report, "smoke-pruned", "best", uri)
    assert line == f"registered model smoke-pruned version 1 (trial {best['number']}): models:/smoke-pruned@best"
    version = MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("smoke-pruned", "best")
    assert version.source == f"models:/{best['mlflow_model_id']}"
    assert version.run_id == client.get_logged_model(best["mlflow_model_id"]).source_run_id
    assert [p["number"] for p in report["points"]] == [0, 1] and report["pareto_front"]
    assert {p["number"] for p in report["points"] if p["pareto"]} == {p["number"] for p in report["pareto_front"]}
    assert report["teacher_reference"]["params_encoder"] == teacher["params_encoder"]
    assert (root / "sweeps" / "runs" / "smoke-prune" / "curve.png").stat().st_size > 20_000

    # resume: the same command again finds the 2 COMPLETE trials and reruns nothing
    stamp = (root / "sweeps/runs/smoke-prune/trial_0/result.json").stat().st_mtime_ns
    again = run_sweep(cfg, storage=storage, tracking_uri=uri)
    assert again["worker"]["ran"] == 0 and "2 complete" in again["worker"]["stopped_because"]
    assert len(optuna.load_study(study_name="smoke-prune", storage=storage).get_trials()) == 2
    assert len(_runs(uri, "smoke-prune")) == len(runs)
    assert (root / "sweeps/runs/smoke-prune/trial_0/result.json").stat().st_mtime_ns == stamp


def test_grid_covers_the_grid_and_a_failing_trial_is_recorded(sweep_dir, monkeypatch):
    root, storage, uri = sweep_dir
    cfg = load_config(SMOKE_SWEEP, SweepConfig)
    real_shrink = prune_sweep.prune_stage.run_shrink

    def shrink(init, out_dir, **kwargs):  # the 0.6 point breaks inside a stage
        if json.loads((Path(out_dir).parent / "trial.json").read_text())["params"]["target_sparsity"] == 0.6:
            raise RuntimeError("injected shrink failure")
        return real_shrink(init, out_dir, **kwargs)

    monkeypatch.setattr(prune_sweep.prune_stage, "run_shrink", shrink)
    out = run_sweep(cfg, storage=storage, grid=True, tracking_uri=uri)
    assert out["study"] == "smoke-prune-grid"
    assert out["worker"]["complete"] == 2 and out["worker"]["failed"] == 1
    study = optuna.load_study(study_name="smoke-prune-grid", storage=storage)
    states = {t.params["target_sparsity"]: t.state for t in study.get_trials()}
    assert states == {0.0: TrialState.COMPLETE, 0.3: TrialState.COMPLETE, 0.6: TrialState.FAIL}
    assert all(set(t.params) == {"target_sparsity"} for t in study.get_trials())  # the grid varies nothing else

    teacher = json.loads((root / "exp/smoke/s2/result.json").read_text())
    points = {p["target_sparsity"]: p for p in out["report"]["points"]}
    assert set(points) == {0.0, 0.3}
    assert points[0.0]["achieved_sparsity"] == 0.0 and points[0.0]["params_encoder"] == teacher["params_encoder"]
    assert points[0.3]["params_encoder"] < teacher["params_encoder"]
    dense = root / "sweeps/runs/smoke-prune-grid" / Path(points[0.0]["trial_dir"]).name
    assert not (dense / "prune1").exists() and (dense / "ps1" / "result.json").is_file()  # teacher + fine-tune
    assert out["report"]["trials"] == {"COMPLETE": 2, "FAIL": 1}

    runs = _runs(uri, "smoke-prune-grid")
    failed = [r for r in runs if r.data.tags.get("kind") == "trial" and r.data.tags["optuna_state"] == "FAIL"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert float(failed[0].data.params["target_sparsity"]) == 0.6
    shrink_runs = [r for r in runs if r.data.tags.get("stage") == "shrink"
                   and r.data.tags["mlflow.parentRunId"] == failed[0].info.run_id]
    assert len(shrink_runs) == 1 and shrink_runs[0].info.status == "FAILED"

    # the grid is done: a second worker finds no point left (a failed point is not rerun)
    again = run_sweep(cfg, storage=storage, grid=True, tracking_uri=uri)
    assert again["worker"]["ran"] == 0 and "grid" in again["worker"]["stopped_because"]


def test_config_is_validated():
    base = load_config(SMOKE_SWEEP, SweepConfig)
    raw = json.loads(json.dumps(to_dict(base)))
    for change, message in (
        (lambda d: d["prune1"].update(prune=None), "prune1: needs a 'prune:' section"),
        (lambda d: d.update(test_list="nope"), "test_list"),
        (lambda d: d.update(teacher="/abs/s2"), "absolute paths"),
        (lambda d: d.update(grid=[0.0, 0.0]), "grid"),
        (lambda d: d["space"].update(target_sparsity={"low": 0.5, "high": 1.0}), "target_sparsity"),
        (lambda d: d["finetune"].append(dict(d["finetune"][0])), "distinct"),
        (lambda d: d["space"].update(colour=1), "unknown key"),
    ):
        data = json.loads(json.dumps(raw))
        change(data)
        with pytest.raises(ConfigError, match=message):
            from_dict(SweepConfig, data)


def test_a_folder_of_another_study_is_moved_aside(tmp_path):
    folder = tmp_path / "trial_0"
    prune_sweep._claim_folder(folder, "uid-a", 0, {"target_sparsity": 0.5})
    (folder / "result.json").write_text("{}")
    prune_sweep._claim_folder(folder, "uid-a", 0, {"target_sparsity": 0.5})  # a retry of the same trial: kept
    assert (folder / "result.json").is_file()
    prune_sweep._claim_folder(folder, "uid-b", 0, {"target_sparsity": 0.5})  # another study: set aside
    assert not (folder / "result.json").exists()
    assert len(list(tmp_path.glob("trial_0.stale-*"))) == 1


def test_cli_reports_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE_SWEEP.read_text().replace("n_trials: 2", "n_trials: 0"))
    assert prune_sweep.main(["--config", str(bad), "--no-tracking"]) == 2
    assert "n_trials" in capsys.readouterr().err


# ------------------------------------------------------------------ the worker around the trials (fake trials)

def _fake_record(knobs: dict) -> dict:
    target = float(knobs["target_sparsity"])
    params = int(1000 * (1 - target))
    return {"params": knobs, "target_sparsity": target, "achieved_sparsity": target, "params_encoder": params,
            "dense_params_encoder": 1000, "val_eer_pct": 10.0 + 10 * target ** 2, "val_mindcf_0.01": 0.5,
            "test_eer_pct": 11.0 + 10 * target ** 2, "test_mindcf_0.01": 0.61234, "test_mindcf_0.05": 0.4,
            "test_eer_pct_ci_low": 9.0, "test_eer_pct_ci_high": 13.0 + 10 * target ** 2,
            "val_eer_pct_ci_low": 8.0, "val_eer_pct_ci_high": 12.5,
            "layers": [], "minutes": 0.01,
            "test": {"val": {"eer_pct": 10.0 + 10 * target ** 2, "mindcf_0.01": 0.5, "eer_ci_pct": [8.0, 12.5]},
                     "test": {"eer_pct": 11.0 + 10 * target ** 2, "mindcf_0.01": 0.61234,
                              "eer_ci_pct": [9.0, 13.0 + 10 * target ** 2]}}}


@pytest.fixture
def fake_trials(tmp_path, monkeypatch):
    """Trials that return at once (the worker, storage, naming and report logic are what is tested)."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def run_trial(cfg, knobs, folder, tracker=None, previous_run=None, models=None):
        calls.append(knobs)
        for name in (prune_sweep.prune_stage.STRUCTURE, prune_sweep.prune_stage.STRUCTURE_PNG):
            (folder / name).write_text("{}")  # the trial run's artifacts
        return _fake_record(knobs)

    monkeypatch.setattr(prune_sweep, "run_trial", run_trial)
    return tmp_path, calls


def test_grid_honours_n_trials_and_never_reruns_a_point(fake_trials, capsys):
    from mlflow import MlflowClient

    root, calls = fake_trials
    cfg = load_config(SMOKE_SWEEP, SweepConfig)  # grid [0.0, 0.3, 0.6]
    storage, uri = f"sqlite:///{root}/optuna.db", f"sqlite:///{root}/mlflow.db"
    out = run_sweep(cfg, storage=storage, grid=True, n_trials=2, tracking_uri=uri)
    assert out["worker"]["complete"] == 2 and len(calls) == 2
    out = run_sweep(cfg, storage=storage, grid=True, tracking_uri=uri)  # the rest of the grid
    assert out["worker"]["complete"] == 1 and sorted(k["target_sparsity"] for k in calls) == [0.0, 0.3, 0.6]
    # 3 of 3 points complete: no 4th trial, whatever --n-trials says
    with pytest.raises(prune_sweep.SweepError, match="the grid has 3 points"):
        run_sweep(cfg, storage=storage, grid=True, n_trials=4, tracking_uri=uri)
    assert prune_sweep.main(["--config", str(SMOKE_SWEEP), "--grid", "--n-trials", "4", "--storage", storage,
                             "--no-tracking"]) == 2
    assert "--n-trials 4 with --grid" in capsys.readouterr().err
    optuna.load_study(study_name="smoke-prune-grid", storage=storage).enqueue_trial({"target_sparsity": 0.3})
    again = run_sweep(cfg, storage=storage, grid=True, tracking_uri=uri)
    assert again["worker"]["ran"] == 0 and "3 complete" in again["worker"]["stopped_because"]
    assert len(calls) == 3

    # MLflow: descriptive run names and the study parent's result columns
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke-prune-grid").experiment_id])
    names = {r.data.tags.get("optuna_trial", r.data.tags["kind"]): r.info.run_name for r in runs}
    targets = {t.number: t.params["target_sparsity"]
               for t in optuna.load_study(study_name="smoke-prune-grid", storage=storage).get_trials(
                   states=(TrialState.COMPLETE,))}
    # (no teacher run here: the scratch folder has no exp/smoke/s2)
    # a trial's name says what it reached, then its target (here the fake reaches its target exactly)
    assert names == {"study": "study:smoke-prune-grid"} | {str(n): f"trial-{n} s={t:.2f} ← t={t:.2f}"
                                                           for n, t in targets.items()}
    assert sorted(name.split(" ", 1)[1] for n, name in names.items() if n != "study") == [
        "s=0.00 ← t=0.00", "s=0.30 ← t=0.30", "s=0.60 ← t=0.60"]
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    # the study's run spans its trials (it used to end the moment it was made)
    assert max(r.info.end_time for r in trial_runs) - 2000 <= parent.info.end_time <= max(r.info.end_time for r in trial_runs)
    assert parent.info.end_time >= max(r.info.start_time for r in trial_runs)
    # every trial fills the saved view's columns: val EER, sparsity reached, test EER with its interval
    for run in trial_runs:
        t = targets[int(run.data.tags["optuna_trial"])]
        assert {k: run.data.metrics[k] for k in ("val_eer", "val_eer_lo", "val_eer_hi", "test_eer", "test_eer_lo",
                                                  "test_eer_hi", "test_mindcf", "sparsity")} == {
            "val_eer": round(10.0 + 10 * t ** 2, 2), "val_eer_lo": 8.0, "val_eer_hi": 12.5,
            "test_eer": round(11.0 + 10 * t ** 2, 2), "test_eer_lo": 9.0, "test_eer_hi": round(13.0 + 10 * t ** 2, 2),
            "test_mindcf": 0.612, "sparsity": t}
    m = parent.data.metrics
    # ... and the study's row shows its best trial in the same columns
    assert (m["val_eer"], m["val_eer_lo"], m["val_eer_hi"], m["test_eer"], m["test_eer_lo"], m["test_eer_hi"],
            m["sparsity"]) == (10.0, 8.0, 12.5, 11.0, 9.0, 13.0, 0.0)
    # every point is on the front (size falls as EER rises); the best validation EER is the dense one
    assert m["trials_complete"] == 3 and m["pareto_size"] == 3
    assert m["best_val_eer_pct"] == 10.0 and m["best_test_eer_pct"] == 11.0 and m["best_params_encoder"] == 1000
    assert m["best_test_mindcf_0.01"] == 0.612  # rounded as the runs table shows it


def test_an_interrupted_worker_still_writes_its_report(tmp_path):
    """SIGTERM in the middle of the second trial: exit 130, the finished trial in report.json and curve.png, and
    the interrupted trial queued again (same point), so the same command finishes the grid with no point lost."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from sweeps import prune_sweep
calls = []
def run_trial(cfg, knobs, folder, tracker=None, previous_run=None, models=None):
    calls.append(knobs)
    if len(calls) == 2 and not os.environ.get("NO_SLEEP"):
        Path("started").touch()
        time.sleep(120)
    t = float(knobs["target_sparsity"])
    return {{"params": knobs, "target_sparsity": t, "achieved_sparsity": t, "params_encoder": int(1000 * (1 - t)),
             "dense_params_encoder": 1000, "val_eer_pct": 10.0, "val_mindcf_0.01": 0.5, "test_eer_pct": 11.0,
             "test_mindcf_0.01": 0.6, "test_mindcf_0.05": 0.4, "layers": [], "minutes": 0.0}}
prune_sweep.run_trial = run_trial
sys.exit(prune_sweep.main(["--config", {str(SMOKE_SWEEP)!r}, "--grid", "--no-tracking",
                           "--storage", "sqlite:///optuna.db"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "report.json and curve.png written" in err
    folder = tmp_path / "sweeps" / "runs" / "smoke-prune-grid"
    report = json.loads((folder / "report.json").read_text())
    assert report["trials"] == {"COMPLETE": 1, "FAIL": 1, "WAITING": 1} and len(report["points"]) == 1
    assert (folder / "curve.png").stat().st_size > 10_000
    study = optuna.load_study(study_name="smoke-prune-grid", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    failed = next(t for t in study.get_trials() if t.state == TrialState.FAIL)
    retry = next(t for t in study.get_trials() if t.state == TrialState.WAITING)
    assert retry.system_attrs["failed_trial"] == failed.number and retry.params == failed.params
    again = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "NO_SLEEP": "1"})
    assert again.returncode == 0, again.stderr[-2000:]
    trials = optuna.load_study(study_name="smoke-prune-grid", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials()
    complete = sorted(t.params["target_sparsity"] for t in trials if t.state == TrialState.COMPLETE)
    assert complete == [0.0, 0.3, 0.6]   # every grid point, the interrupted one included, once


def test_a_retry_copies_the_metrics_of_the_stages_it_reuses(tmp_path):
    """A heartbeat retry reuses the dead trial's finished stages: their runs in the retry carry the dead
    trial's metric histories (or, without that run, the stage result's numbers)."""
    from mlflow import MlflowClient

    from svlib.tracking import Tracker

    tracker = Tracker("retry", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient(tracker.tracking_uri)
    folder = tmp_path / "prune1"
    folder.mkdir()
    record = {"stage": "prune1", "params_encoder": 600, "achieved_sparsity": 0.4,
              "test": {"test": {"eer_pct": 12.5, "mindcf_0.01": 0.9, "mindcf_0.05": 0.8}}}
    (folder / "result.json").write_text(json.dumps(record))
    with tracker.run("trial-0") as dead:
        with tracker.run("prune1", nested=True, tags={"stage": "prune1"}):
            for step in (10, 20, 30):
                tracker.log_metrics({"expected_sparsity": step / 100}, step=step)
            tracker.log_metrics({"params_encoder": 600.0})
    calls = []
    with tracker.run("trial-1 (retry of 0)"):
        got = prune_sweep._stage(tracker, "prune1", "prune", folder, {"init": "teacher"},
                                 lambda t: calls.append(t) or record, previous_run=dead)
        reused = tracker.active_run_id
    assert got == record and len(calls) == 1
    retry_stage = client.search_runs([tracker.experiment_id], "tags.stage = 'prune1' and tags.reused = 'True'")
    assert len(retry_stage) == 1 and retry_stage[0].data.tags["mlflow.parentRunId"] == reused
    history = client.get_metric_history(retry_stage[0].info.run_id, "expected_sparsity")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.2), (30, 0.3)]
    assert retry_stage[0].data.metrics["params_encoder"] == 600.0
    # no earlier run to copy from: the result's final numbers
    with tracker.run("trial-2"):
        prune_sweep._stage(tracker, "prune1", "prune", folder, None, lambda t: record)
    fresh = client.search_runs([tracker.experiment_id], "tags.stage = 'prune1' and tags.reused = 'True'",
                               order_by=["attributes.start_time DESC"])[0]
    assert fresh.data.metrics == {"test_eer_pct": 12.5, "test_mindcf_0.01": 0.9, "test_mindcf_0.05": 0.8,
                                  "params_encoder": 600.0, "achieved_sparsity": 0.4,
                                  # and the runs table's result columns, as any stage run
                                  "test_eer": 12.5, "test_mindcf": 0.9, "sparsity": 0.4}


def test_readme_pareto_command_reads_the_readme_grid_sweep(fake_trials):
    """docs/sweeps.md's `sweeps.study pareto` line, run after the page's grid sweep (same study and storage)."""
    import shlex
    import subprocess
    import sys

    root, _calls = fake_trials
    readme = (REPO / "docs" / "sweeps.md").read_text()
    grid_line = next(line for line in readme.splitlines() if "sweeps.prune_sweep" in line and "--grid" in line
                     and "demo.yaml" in line)
    pareto = next(line for line in readme.splitlines() if "sweeps.study pareto" in line)
    args = shlex.split(pareto.split("#")[0])
    assert "--config sweeps/configs/demo.yaml" in grid_line
    demo = load_config(REPO / "sweeps" / "configs" / "demo.yaml", SweepConfig)
    assert args[args.index("--study") + 1] == prune_sweep.study_name(demo, grid=True)
    config = load_config(SMOKE_SWEEP, SweepConfig)
    config.name = demo.name  # the README's sweep, on the smoke sizes
    run_sweep(config, grid=True, n_trials=2, track=False)  # default storage, as the README's grid sweep
    proc = subprocess.run([sys.executable, *args[1:]], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    front = json.loads(proc.stdout)
    assert [p["values"]["params_encoder"] for p in front] and all(p["params"] for p in front)


def test_a_task_loss_trial_prunes_without_a_teacher(sweep_dir):
    """``objective: classification`` as the trial's choice: prune1 trains on the AAM loss (the fine-tune's head
    and augmentation), no prune2, and graft takes prune1's own back-end and classifier."""
    root, _, _ = sweep_dir
    cfg = load_config(SMOKE_SWEEP, SweepConfig, overrides={"space": {"objective": ["distill", "classification"]}})
    knobs = {"target_sparsity": 0.5, "objective": "classification", "budget": cfg.budget}
    prune1, prune2, finetune = prune_sweep.stage_configs(cfg, knobs)
    assert prune1.objective == "classification" and prune2 is None and prune1.head == finetune[0].head
    assert cfg.prune1.objective == "distill"  # the sweep config itself is not changed
    distill, _, _ = prune_sweep.stage_configs(cfg, {**knobs, "objective": "distill"})
    assert distill.objective == "distill" and distill.head is None
    with pytest.raises(prune_sweep.SweepError, match="snapshots with objective classification"):
        prune_sweep.stage_configs(cfg, {**knobs, "snapshots": [0.3, 0.5]})
    folder = Path("sweeps/runs/task/trial_0")
    record = prune_sweep.run_trial(cfg, knobs, folder)
    assert not (folder / "prune2").exists()
    assert json.loads((folder / "prune1" / "result.json").read_text())["objective"] == "classification"
    graft = json.loads((folder / "graft" / "result.json").read_text())
    assert graft["teacher"] == (folder / "prune1").as_posix() and graft["init"] == (folder / "shrink").as_posix()
    assert 0.0 < record["achieved_sparsity"] < 0.5 and record["val_eer_pct"] >= 0  # 6 prune1 steps toward 0.5
    with pytest.raises(ConfigError, match="space.objective"):
        load_config(SMOKE_SWEEP, SweepConfig, overrides={"space": {"objective": ["mse"]}})


def test_snapshots_trace_the_grid_in_one_trial(sweep_dir):
    """``--snapshots``: one trial, one prune1 ramping to the grid's top; every grid target above 0 is a point
    (shrunk from its snapshot, fine-tuned, evaluated) and the trial's values are the highest point's."""
    root, storage, uri = sweep_dir
    cfg = load_config(SMOKE_SWEEP, SweepConfig, overrides={"grid": [0.0, 0.2, 0.4]})
    out = run_sweep(cfg, storage=storage, tracking_uri=uri, snapshots=True)
    assert out["study"] == "smoke-prune-snapshots" and out["worker"]["complete"] == 1
    (trial,) = optuna.load_study(study_name="smoke-prune-snapshots", storage=storage).get_trials()
    folder = root / trial.user_attrs["trial_dir"]
    record = json.loads((folder / "result.json").read_text())
    assert [p["snapshot"] for p in record["points"]] == [0.2, 0.4] == [p["snapshot"] for p in trial.user_attrs["points"]]
    assert record["params"]["snapshots"] == [0.2, 0.4] and trial.params["target_sparsity"] == 0.4
    assert list(trial.values) == [record["points"][-1]["val_eer_pct"], record["points"][-1]["params_encoder"]]
    prune1 = json.loads((folder / "prune1" / "result.json").read_text())
    assert [s["snapshot"] for s in prune1["snapshots"]] == [0.2, 0.4]
    for p in record["points"]:
        point = folder / f"snapshot_{p['snapshot']:.3f}"
        assert all((point / s / "result.json").is_file() for s in STAGES - {"prune1"})
        shrink = json.loads((point / "shrink" / "result.json").read_text())
        assert shrink["init"].endswith(f"prune1/snapshots/{p['snapshot']:.3f}")
        assert p["achieved_sparsity"] == pytest.approx(shrink["achieved_sparsity"])
    # the later snapshot is the same run further on (or its final state): never larger
    assert record["points"][0]["params_encoder"] >= record["points"][1]["params_encoder"]
    # the trial's MLflow artifacts are its top point's structure; no stage keeps its checkpoints
    assert (folder / "structure.json").read_bytes() == (folder / "snapshot_0.400" / "structure.json").read_bytes()
    assert not list(folder.glob("**/ckpt"))
    with pytest.raises(prune_sweep.SweepError, match="without --grid"):
        run_sweep(cfg, storage=storage, track=False, snapshots=True, grid=True)
