"""Sweep storage and workers: shared trials, dead workers and restarts, waiting for other workers, failing trials,
exit codes, resume, grid, Pareto, MLflow join (nested runs of dead trials included).

Every storage test runs on SQLite and, when ``SVLIB_TEST_POSTGRES_URL`` is set (CI starts a server with
.ci/postgres.sh), on PostgreSQL. Multi-worker tests start real ``python -m sweeps.study worker`` processes
on ``tests/sweep_objective.py``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from sweeps.study import (GridExhausted, GridSweepSampler, SweepError, close_orphaned_runs, fail_stale_trials,
                          grid_sampler, load_study, open_study, pareto_front, run_worker, study_parent_run,
                          tracked_objective)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep_objective  # noqa: E402  (tests/ is not a package)

REPO = Path(__file__).resolve().parents[1]
NO_PG = "no PostgreSQL server: set SVLIB_TEST_POSTGRES_URL (CI starts one via .ci/postgres.sh)"
NO_PG_MLFLOW = "no PostgreSQL MLflow store: set SVLIB_TEST_MLFLOW_PG_URL (CI starts one via .ci/postgres.sh)"
PROC_TIMEOUT_S = 240  # the CPU is shared: generous, but every wait is bounded
HEARTBEAT_S, GRACE_S = 1, 2
# A worker restarted right after a kill must start its first trial while the dead one is inside its grace
# period (a worker starts in about 1 s).
RESTART_GRACE_S = 4
METRICS = ["eer_pct", "params_frac"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def mlflow_sqlite(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module: creating its tables costs seconds, experiments keep tests apart."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path, mlflow_sqlite):
    """(storage URL, MLflow tracking URI) on one backend; study names are unique per test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/optuna.db", mlflow_sqlite
    url = os.environ.get("SVLIB_TEST_POSTGRES_URL")
    if not url:
        pytest.skip(NO_PG)
    return url, os.environ.get("SVLIB_TEST_MLFLOW_PG_URL")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _start_worker(study: str, storage: str, n_trials: int, worker: int, markers: Path, *, extra_env=None,
                  args=(), grace: int = GRACE_S) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"SVLIB_SWEEP_MARKERS": str(markers), "PYTHONPATH": str(REPO)}, **(extra_env or {}))
    cmd = [sys.executable, "-m", "sweeps.study", "worker", "--study", study, "--storage", storage,
           "--objective", "tests.sweep_objective:objective", "--n-trials", str(n_trials),
           "--directions", "minimize", "minimize", "--metric-names", *METRICS, "--worker", str(worker),
           "--heartbeat", str(HEARTBEAT_S), "--grace", str(grace), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _grid_args(values) -> tuple[str, str]:
    return "--grid", "target_sparsity=" + ",".join(map(str, values))


def _finish(proc: subprocess.Popen, returncode: int = 0) -> tuple[dict, str]:
    """Wait for a worker (bounded), check its exit code; its JSON report and stderr (shown on failure)."""
    try:
        out, err = proc.communicate(timeout=PROC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"worker {proc.pid} did not finish in {PROC_TIMEOUT_S} s:\n{err[-3000:]}")
    assert proc.returncode == returncode, f"worker exited {proc.returncode}, not {returncode}:\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), err


def _first_start_marker(markers: Path) -> Path:
    return _wait_for(lambda: next(markers.glob("start-*"), None), "the first trial to start")


def _kill_worker_mid_trial(study: str, storage: str, n_trials: int, markers: Path, *, args=()) -> int:
    """Start worker 0 on a long trial and SIGKILL it once the trial has started; returns that trial's number."""
    victim = _start_worker(study, storage, n_trials, 0, markers, extra_env={"SVLIB_SWEEP_SLEEP": "120"}, args=args)
    try:
        marker = _first_start_marker(markers)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=30)
    return int(marker.name.split("-")[1])


def _kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _wait_for(predicate, what: str, timeout: float = PROC_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _open(name: str, storage: str, **kw):
    return open_study(name, storage, ["minimize", "minimize"], metric_names=METRICS,
                      heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kw)


# ------------------------------------------------------------------------------ several worker processes

@pytest.mark.parametrize("mode", ["tpe", "grid"])
def test_two_worker_processes_share_one_study(backend, tmp_path, mode):
    storage, _ = backend
    name = _name("share")
    grid = [0.1, 0.25, 0.4, 0.55, 0.7, 0.85]
    n_trials = 6
    args = _grid_args(grid) if mode == "grid" else ()
    # The grid is a ceiling: asking for more complete trials than points must still stop at the grid.
    n_arg = 50 if mode == "grid" else n_trials
    # Both workers must have a trial in flight before either proceeds, so they really overlap.
    env = {"SVLIB_SWEEP_BARRIER": "2", "SVLIB_SWEEP_SLEEP": "0.3"}
    procs = [_start_worker(name, storage, n_arg, k, tmp_path, extra_env=env, args=args) for k in (0, 1)]
    try:
        reports = [_finish(p)[0] for p in procs]
    finally:
        _kill_all(procs)

    trials = load_study(name, storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(r["ran"] >= 1 for r in reports), reports
    assert sum(r["ran"] for r in reports) == len(trials)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    params = [t.params["target_sparsity"] for t in complete]
    assert len(set(params)) == len(params), f"duplicate params across workers: {params}"
    if mode == "grid":
        assert sorted(params) == grid
    else:
        # A race between the last two trials may add one, never more (two workers).
        assert n_trials <= len(complete) <= n_trials + 1
    # Each trial number was started by exactly one process.
    starts = {}
    for marker in tmp_path.glob("start-*"):
        _, number, pid = marker.name.split("-")
        starts.setdefault(int(number), set()).add(pid)
    assert {n: len(p) for n, p in starts.items()} == {t.number: 1 for t in trials}
    assert len({pid for pids in starts.values() for pid in pids}) == 2
    # The values are the objective's, computed by svlib's EER.
    for t in complete:
        assert t.values[0] == pytest.approx(sweep_objective.synthetic_eer_pct(t.params["target_sparsity"]))


def test_killed_worker_trial_fails_by_heartbeat_and_is_retried(backend, tmp_path):
    storage, mlflow_uri = backend
    name = _name("kill")
    track = ("--mlflow-uri", mlflow_uri) if mlflow_uri else ()
    killed_number = _kill_worker_mid_trial(name, storage, 3, tmp_path, args=track)
    # Before the grace period the trial still looks RUNNING to everyone.
    study = _open(name, storage)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    time.sleep(GRACE_S + 1.5)
    survivor = _start_worker(name, storage, 3, 1, tmp_path, extra_env={"SVLIB_SWEEP_SLEEP": "0.1"}, args=track)
    report, _ = _finish(survivor)

    trials = load_study(name, storage).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[killed_number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1, "the killed trial is retried exactly once"
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == by_number[killed_number].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert report == {**report, "ran": 3, "complete": 3, "failed": 0}

    if not mlflow_uri:
        pytest.skip(NO_PG_MLFLOW + " (the Optuna part passed)")
    runs = _mlflow_runs(mlflow_uri, name)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1 and parents[0].data.tags["optuna_study"] == name
    trial_runs = {r.data.tags["optuna_trial"]: r for r in runs if r.data.tags.get("kind") == "trial"}
    assert set(trial_runs) == {str(t.number) for t in trials}
    for number, run in trial_runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna_study"] == name
        retry_of = f" (retry of {killed_number})" if number == str(retry.number) else ""
        assert run.info.run_name == f"trial-{number}{retry_of}"
        assert float(run.data.params["target_sparsity"]) == by_number[int(number)].params["target_sparsity"]
    # The dead worker's run is closed by the retry, not left RUNNING forever.
    assert trial_runs[str(killed_number)].info.status == "FAILED"
    assert trial_runs[str(retry.number)].data.tags["optuna_retry_of"] == str(killed_number)
    for t in trials:
        if t.state == TrialState.COMPLETE:
            run = trial_runs[str(t.number)]
            assert run.info.status == "FINISHED"
            assert run.data.metrics == pytest.approx(dict(zip(METRICS, t.values)))
            assert t.user_attrs["mlflow_run_id"] == run.info.run_id


@pytest.mark.parametrize("mode", ["tpe", "grid"])
def test_each_run_of_one_command_draws_a_new_point(backend, tmp_path, mode):
    """``--n-trials 1``, then the same command with ``--n-trials 2``: the second process must not replay the
    first one's point (same seed, same worker index)."""
    storage, _ = backend
    name = _name("again")
    args = _grid_args([0.2, 0.5, 0.8]) if mode == "grid" else ()
    first, _ = _finish(_start_worker(name, storage, 1, 0, tmp_path, args=args))
    second, _ = _finish(_start_worker(name, storage, 2, 0, tmp_path, args=args))

    trials = load_study(name, storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].params["target_sparsity"] != trials[1].params["target_sparsity"]
    assert (first["ran"], second["ran"]) == (1, 1)


@pytest.mark.parametrize("mode", ["tpe", "grid"])
def test_a_worker_restarted_right_after_a_kill_waits_for_the_dead_trial_and_runs_its_retry(backend, tmp_path, mode):
    storage, _ = backend
    name = _name("restart")
    args = _grid_args([0.3, 0.7]) if mode == "grid" else ()
    killed_number = _kill_worker_mid_trial(name, storage, 2, tmp_path, args=args)
    # The same command again at once: the dead trial stays RUNNING for the whole grace period.
    survivor = _start_worker(name, storage, 2, 0, tmp_path, extra_env={"SVLIB_SWEEP_SLEEP": "0.1"}, args=args,
                             grace=RESTART_GRACE_S)
    report, _ = _finish(survivor)

    trials = load_study(name, storage).get_trials()
    dead = trials[killed_number]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    new = [t for t in trials if t.number != killed_number and t not in retries]
    assert dead.state == TrialState.FAIL
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == dead.params
    assert len(new) == 1 and new[0].params != dead.params, "a new trial replayed the dead trial's point"
    # The new trial started while the dead one was inside its grace period (the retry was queued later):
    # the worker did not leave then, it waited for the dead trial to go stale and ran its retry.
    assert new[0].number < retries[0].number
    assert Counter(t.state for t in trials) == {TrialState.FAIL: 1, TrialState.COMPLETE: 2}
    assert report == {**report, "ran": 2, "complete": 2, "failed": 0, "unfinished": 0}


def test_a_worker_that_stops_waiting_leaves_the_running_trials_unfinished(tmp_path):
    storage, name = f"sqlite:///{tmp_path}/s.db", _name("giveup")
    # Worker 1 holds the only trial asked for, alive (heart-beating) for longer than anyone waits.
    busy = _start_worker(name, storage, 1, 1, tmp_path, extra_env={"SVLIB_SWEEP_SLEEP": "60"})
    try:
        _first_start_marker(tmp_path)
        idle_calls = []
        started = time.monotonic()
        report = run_worker(_open(name, storage), sweep_objective.objective, 1, poll_seconds=0.2, wait_for_others=1.0,
                            on_idle=lambda: idle_calls.append(time.monotonic()))
        waited = time.monotonic() - started
        assert (report.ran, report.unfinished) == (0, 1)
        assert report.stopped_because.startswith("1 trial(s) still running in other workers; the study is not finished")
        assert 1.0 <= waited < 10 and len(idle_calls) >= 3  # polled every 0.2 s for 1 s, on_idle each time

        waiter = _start_worker(name, storage, 1, 0, tmp_path, args=("--wait-for-others", "1", "--poll", "0.2"))
        cli_report, err = _finish(waiter, returncode=3)
        assert (cli_report["ran"], cli_report["unfinished"]) == (0, 1)
        assert err.strip().splitlines()[-1] == f"error: {cli_report['stopped_because']}"
        assert [t.state for t in load_study(name, storage).get_trials()] == [TrialState.RUNNING]
    finally:
        _kill_all([busy])


def test_a_worker_whose_every_trial_failed_exits_1_naming_the_first_failure(tmp_path):
    storage, name = f"sqlite:///{tmp_path}/s.db", _name("allfail")
    worker = _start_worker(name, storage, 2, 0, tmp_path, extra_env={"SVLIB_SWEEP_FAIL_TRIALS": "0,1"})
    report, err = _finish(worker, returncode=1)
    first = "trial 0: InjectedFailure: trial 0 fails on purpose"
    assert (report["ran"], report["failed"], report["first_failure"]) == (2, 2, first)
    assert err.strip().splitlines()[-1] == f"error: every trial failed; first: {first}"
    # The reason is kept in the study too (optuna stores none).
    trials = load_study(name, storage).get_trials()
    assert [t.user_attrs["fail_reason"] for t in trials] == [
        f"InjectedFailure: trial {n} fails on purpose" for n in (0, 1)]


def _mlflow_runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment} in {uri}"
    return client.search_runs([exp.experiment_id], max_results=1000)


# ------------------------------------------------------------------------------ in-process worker loop

def test_raising_trial_is_failed_and_the_study_goes_on(backend, monkeypatch):
    storage, _ = backend
    monkeypatch.setenv("SVLIB_SWEEP_FAIL_TRIALS", "1")
    study = _open(_name("raise"), storage)
    report = run_worker(study, sweep_objective.objective, 3)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert (report.ran, report.complete, report.failed) == (4, 3, 1)
    assert "3 complete" in report.stopped_because
    assert report.first_failure == "trial 1: InjectedFailure: trial 1 fails on purpose"


def test_always_failing_objective_stops_after_max_failures(tmp_path):
    def broken(trial):
        trial.suggest_float("target_sparsity", 0.1, 0.9)
        raise ValueError("broken objective")

    study = _open("broken", f"sqlite:///{tmp_path}/s.db")
    report = run_worker(study, broken, 10, max_failures=3)
    assert (report.ran, report.failed, report.complete) == (3, 3, 0)
    assert "max_failures=3" in report.stopped_because
    # An exception outside `catch` is not swallowed.
    with pytest.raises(ValueError, match="broken objective"):
        run_worker(study, broken, 10, catch=(KeyError,))


def test_interrupted_study_resumes_with_load_if_exists(backend):
    storage, _ = backend
    name = _name("resume")
    first = run_worker(_open(name, storage), sweep_objective.objective, 2)
    assert first.complete == 2
    # A fresh process/worker joins the same study: only the missing trials are run.
    resumed = _open(name, storage, worker=1)
    assert len(resumed.trials) == 2
    second = run_worker(resumed, sweep_objective.objective, 5)
    assert (second.ran, second.complete) == (3, 3)
    assert [t.number for t in resumed.trials if t.state == TrialState.COMPLETE] == [0, 1, 2, 3, 4]
    again = run_worker(_open(name, storage), sweep_objective.objective, 5)
    assert again.ran == 0
    with pytest.raises(SweepError, match="already exists"):
        _open(name, storage, load_if_exists=False)
    with pytest.raises(SweepError, match="directions"):
        open_study(name, storage, ["minimize"])


def test_grid_sweep_runs_each_point_once(tmp_path):
    values = [0.2, 0.5, 0.8]
    sampler = grid_sampler(values)
    assert isinstance(sampler, GridSweepSampler) and sampler.n_points == 3
    study = _open("grid", f"sqlite:///{tmp_path}/s.db", sampler=sampler)
    report = run_worker(study, sweep_objective.objective, 100)
    assert report.ran == 3 and report.stopped_because.startswith("grid")
    assert sorted(t.params["target_sparsity"] for t in study.trials) == values
    with pytest.raises(SweepError, match="duplicate"):
        grid_sampler([0.1, 0.1])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_grid_gives_no_new_trial_a_point_another_trial_holds(tmp_path):
    """Optuna's GridSampler hands a new trial a point still RUNNING once every point is started (here: a dead
    worker's trial inside its grace period); only that trial's heartbeat retry may have it."""
    study = _open(_name("held"), f"sqlite:///{tmp_path}/s.db", sampler=grid_sampler([0.2, 0.5]))
    space = {"target_sparsity": optuna.distributions.FloatDistribution(0.0, 1.0)}
    dead = study.ask(space)
    study._storage.record_heartbeat(dead._trial_id)  # alive a moment ago, silent from now on
    done = study.ask(space)
    study.tell(done, [1.0, 0.5])
    assert {dead.params["target_sparsity"], done.params["target_sparsity"]} == {0.2, 0.5}
    assert (study.sampler.pending(study), study.sampler.complete_points(study)) == (0, 1)

    late = study.ask()
    with pytest.raises(GridExhausted, match="held by another trial"):
        late.suggest_float("target_sparsity", 0.0, 1.0)
    study.tell(late, state=TrialState.FAIL)

    def queued_retry():
        fail_stale_trials(study)
        return next(iter(study.get_trials(states=(TrialState.WAITING,))), None)

    retry = _wait_for(queued_retry, "the dead trial to go stale", timeout=30)
    resumed = study.ask()
    assert resumed.number == retry.number
    assert resumed.suggest_float("target_sparsity", 0.0, 1.0) == dead.params["target_sparsity"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_workers_with_one_seed_but_different_indices_propose_different_points(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    a = _open("seeds", storage, seed=7, worker=0)
    b = _open("seeds", storage, seed=7, worker=1)
    ta, tb = a.ask(), b.ask()
    assert ta.suggest_float("x", 0, 1) != tb.suggest_float("x", 0, 1)


def test_pareto_front_is_the_non_dominated_set(tmp_path):
    study = _open("pareto", f"sqlite:///{tmp_path}/s.db", seed=3)
    run_worker(study, sweep_objective.objective, 12)
    front = pareto_front(study)
    values = np.array([t.values for t in study.trials if t.state == TrialState.COMPLETE])
    expected = {tuple(v) for v in values
                if not any(np.all(o <= v) and np.any(o < v) for o in values)}
    assert {tuple(item["values"][m] for m in METRICS) for item in front} == expected
    assert [item["values"]["eer_pct"] for item in front] == sorted(item["values"]["eer_pct"] for item in front)
    assert set(front[0]) == {"number", "params", "values", "user_attrs"}
    assert pareto_front(_open("empty", f"sqlite:///{tmp_path}/s.db")) == []


def test_open_study_rejects_bad_input(tmp_path):
    with pytest.raises(SweepError, match="study name"):
        open_study("../escape", f"sqlite:///{tmp_path}/s.db")
    with pytest.raises(SweepError, match="directions"):
        open_study("ok", f"sqlite:///{tmp_path}/s.db", ["down"])
    with pytest.raises(SweepError, match="metric names"):
        open_study("ok", f"sqlite:///{tmp_path}/s.db", ["minimize"], metric_names=["a", "b"])
    with pytest.raises(SweepError, match="no Optuna storage at"):  # read-only: the file is not created
        load_study("missing", f"sqlite:///{tmp_path}/s.db")
    assert not (tmp_path / "s.db").exists()


def test_default_storage_is_sqlite_under_sweeps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = open_study("local", None)
    assert (tmp_path / "sweeps" / "local.db").is_file()
    assert study.study_name == "local"


def test_tracked_objective_nests_trials_under_one_study_run(tmp_path, monkeypatch, mlflow_sqlite):
    import mlflow

    from svlib.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = mlflow_sqlite
    tracker = Tracker("tracked", tracking_uri=uri)

    def objective(trial):
        sparsity = trial.suggest_float("target_sparsity", 0.1, 0.9)
        if trial.number == 1:  # fails inside a stage it started without `with`: the stage stays active
            mlflow.start_run(run_name="leaked", nested=True, tags={"stage": "leaked"})
            raise RuntimeError("boom\nsecond line of the message")
        if trial.number == 2:
            raise optuna.TrialPruned()
        with tracker.run("prune1", nested=True, tags={"stage": "prune1"}):
            tracker.log_metrics({"expected_sparsity": sparsity}, step=0)
        return sweep_objective.synthetic_eer_pct(sparsity), 1.0 - sparsity

    study = _open("tracked", f"sqlite:///{tmp_path}/s.db")
    report = run_worker(study, tracked_objective(tracker, "tracked", objective), 2)
    assert (report.complete, report.failed, report.pruned) == (2, 1, 1)
    assert report.first_failure == "trial 1: RuntimeError: boom"
    # A second worker (new wrapper, no cache) finds the same parent run.
    run_worker(study, tracked_objective(tracker, "tracked", objective), 3)

    runs = _mlflow_runs(uri, "tracked")
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "study:tracked" and parent.data.params["directions"] == "minimize,minimize"
    trial_runs = {int(r.data.tags["optuna_trial"]): r for r in runs if r.data.tags.get("kind") == "trial"}
    assert sorted(trial_runs) == [0, 1, 2, 3, 4]
    assert {n: r.info.status for n, r in trial_runs.items()} == {
        0: "FINISHED", 1: "FAILED", 2: "KILLED", 3: "FINISHED", 4: "FINISHED"}
    assert trial_runs[1].data.tags["optuna_state"] == "FAIL"
    assert trial_runs[1].data.tags["fail_reason"] == "RuntimeError: boom"
    leaked = [r for r in runs if r.data.tags.get("stage") == "leaked"]
    assert [(r.info.status, r.data.tags["mlflow.parentRunId"]) for r in leaked] == [
        ("FAILED", trial_runs[1].info.run_id)]
    assert trial_runs[2].data.tags["optuna_state"] == "PRUNED"
    assert "target_sparsity" in trial_runs[1].data.params  # params of a failed trial are kept
    for n, run in trial_runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    stages = [r for r in runs if r.data.tags.get("stage") == "prune1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {trial_runs[n].info.run_id for n in (0, 3, 4)}
    assert trial_runs[0].data.metrics.keys() == set(METRICS)
    # the study's run spans its trials, the failed and the pruned ones too (it used to end 58 ms after it began)
    last = max(r.info.end_time for r in trial_runs.values())
    assert last - 2000 <= parent.info.end_time <= last  # set as each trial's run ends (a pruned one's a bit later)
    assert parent.info.end_time >= max(r.info.start_time for r in trial_runs.values())  # it ended before they began


def test_unreachable_storage_is_a_clear_error():
    # Port 1 on 127.0.0.1: nothing listens there, the connection is refused at once.
    with pytest.raises(SweepError, match=r"cannot open Optuna storage postgresql\+psycopg2://u:\*\*\*@127.0.0.1:1/x"):
        open_study("unreachable", "postgresql+psycopg2://u:secret@127.0.0.1:1/x")


def _dead_tracked_trial(study: optuna.Study, tracker, client):
    """A trial RUNNING in the study and its MLflow trial run, as a tracked worker that died leaves them
    (the run's id in the trial's user attrs); returns (trial, run)."""
    dead = study.ask({"target_sparsity": optuna.distributions.FloatDistribution(0.0, 1.0)})
    parent = study_parent_run(tracker, study.study_name, study)
    run = client.create_run(tracker.experiment_id, run_name=f"trial-{dead.number}",
                            tags={"mlflow.parentRunId": parent, "kind": "trial"})
    dead.set_user_attr("mlflow_run_id", run.info.run_id)
    dead.set_user_attr("trial_number", dead.number)
    return dead, run


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_dead_workers_trial_is_failed_and_its_run_closed_while_this_worker_runs(tmp_path, mlflow_sqlite):
    """The dead trial goes stale only after this worker has started its own (long) trial: the watcher fails
    it and closes its MLflow run during that trial, not when the trial ends; the retry then runs here."""
    from mlflow import MlflowClient

    from svlib.tracking import Tracker

    name = _name("stale")
    tracker = Tracker(name, tracking_uri=mlflow_sqlite)
    client = MlflowClient(mlflow_sqlite)
    study = _open(name, f"sqlite:///{tmp_path}/s.db")
    dead, orphan = _dead_tracked_trial(study, tracker, client)
    study._storage.record_heartbeat(dead._trial_id)  # alive a moment ago, silent from now on
    seen = []

    def objective(trial):
        sparsity = trial.suggest_float("target_sparsity", 0.0, 1.0)
        if not seen:  # this worker's first trial: wait (bounded) for the watcher to notice the dead one
            deadline = time.monotonic() + 30
            while client.get_run(orphan.info.run_id).info.status == "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.1)
            seen.append((study._storage.get_trial(dead._trial_id).state, client.get_run(orphan.info.run_id).info.status))
        return sweep_objective.synthetic_eer_pct(sparsity), 1.0 - sparsity

    report = run_worker(study, objective, 2, on_stale=lambda s: close_orphaned_runs(s, mlflow_sqlite))
    assert seen == [(TrialState.FAIL, "FAILED")]
    trials = study.get_trials()
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and report.complete == 2
    assert client.get_run(orphan.info.run_id).data.tags["optuna_state"] == "FAIL"
    assert close_orphaned_runs(study, mlflow_sqlite) == []  # closed once


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_closing_a_dead_trials_run_closes_every_run_nested_under_it(tmp_path, mlflow_sqlite):
    from mlflow import MlflowClient

    from svlib.tracking import Tracker

    name = _name("nested")
    tracker = Tracker(name, tracking_uri=mlflow_sqlite)
    client = MlflowClient(mlflow_sqlite)
    study = _open(name, f"sqlite:///{tmp_path}/s.db")
    dead, trial_run = _dead_tracked_trial(study, tracker, client)

    def stage_run(parent, status="RUNNING") -> str:
        run = client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    # The dead worker was inside stage "finetune" (itself inside "prune2"), after finishing stage "prune1".
    prune1 = stage_run(trial_run.info.run_id, "FINISHED")
    prune2 = stage_run(trial_run.info.run_id)
    finetune = stage_run(prune2)
    study.tell(dead, state=TrialState.FAIL)  # what the stale check does once the grace period is over

    assert close_orphaned_runs(study, mlflow_sqlite) == [trial_run.info.run_id]
    statuses = {run_id: client.get_run(run_id).info.status
                for run_id in (trial_run.info.run_id, prune1, prune2, finetune)}
    assert statuses == {trial_run.info.run_id: "FAILED", prune1: "FINISHED", prune2: "FAILED", finetune: "FAILED"}
    assert close_orphaned_runs(study, mlflow_sqlite) == []


def test_a_complete_grid_starts_no_further_trial(tmp_path):
    study = _open("grid-n", f"sqlite:///{tmp_path}/g.db", sampler=grid_sampler([0.1, 0.5, 0.9]))
    assert run_worker(study, sweep_objective.objective, 4).complete == 3
    study.enqueue_trial({"target_sparsity": 0.5})  # e.g. a retry queued for a point another trial completed
    again = run_worker(study, sweep_objective.objective, 4)
    assert again.ran == 0 and again.stopped_because == "grid: every point is complete"
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3 + [TrialState.WAITING]


def test_pareto_cli_never_creates_storage_and_names_the_studies_held(tmp_path, capsys):
    from sweeps.study import main

    absent = tmp_path / "sweeps" / "demo-prune.db"
    assert main(["pareto", "--study", "demo-prune", "--storage", f"sqlite:///{absent}"]) == 2
    assert "no Optuna storage at" in capsys.readouterr().err and not absent.exists() and not absent.parent.exists()
    storage = f"sqlite:///{tmp_path}/grid.db"
    study = _open("demo-prune-grid", storage)
    study.tell(study.ask({"target_sparsity": optuna.distributions.FloatDistribution(0.0, 1.0)}), [12.0, 0.5])
    assert main(["pareto", "--study", "demo-prune", "--storage", storage]) == 2
    assert "no study 'demo-prune'" in capsys.readouterr().err.replace('"', "'")
    assert main(["pareto", "--study", "demo-prune", "--storage", storage]) == 2
    assert "it holds: demo-prune-grid" in capsys.readouterr().err
    assert main(["pareto", "--study", "demo-prune-grid", "--storage", storage]) == 0
    assert json.loads(capsys.readouterr().out)[0]["values"] == {"eer_pct": 12.0, "params_frac": 0.5}
