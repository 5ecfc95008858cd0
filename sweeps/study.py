"""Optuna studies that many worker processes (on one or many machines) share through one database.

The layer under every svlib sweep; the objective (prune -> fine-tune -> evaluate) is plugged in from
outside. One study lives in an SQLAlchemy database: SQLite (``sqlite:///sweeps/<name>.db``, the default,
fine for a few workers on one machine) or PostgreSQL for workers on many machines. Robustness rules:

- every worker heart-beats its running trial; a worker that dies (OOM, SIGKILL, preempted node) leaves a
  trial whose heartbeat stops. Once its grace period is over, any worker's stale check (before each trial,
  while its own trial runs, while it waits) marks it FAIL and re-queues it once (``max_retry``) as a WAITING
  retry with the same parameters: the same trial, continued;
- no new trial repeats a point another trial holds: the TPE sampler's seed is drawn from the worker index
  *and* the number of trials already in the study, so a restarted or re-invoked worker does not replay its
  predecessor's points; a grid point held by any trial (finished, running - a dead worker's trial still
  inside its grace period included - or re-queued) goes to no new trial;
- a worker does not leave while trials it is counting on run elsewhere: it waits, running the stale
  check every poll, until they finish or turn into retries it runs, or until ``wait_for_others`` runs out;
  then it reports them as ``unfinished`` (the CLI exits 3);
- an objective that raises is recorded FAIL (its one-line reason in the trial's user attr ``fail_reason``)
  and the worker goes on with the next trial; a worker whose every trial failed exits 1 from the CLI;
- ``n_trials`` is the number of COMPLETE trials the *study* should hold, all workers together, so an
  interrupted sweep is resumed by simply starting the workers again.

MLflow: :func:`tracked_objective` gives each trial a run nested under one parent run per study
(tags ``kind``, ``optuna_study``, ``optuna_trial``), so stages the objective tracks nest under the trial.
A failed trial's run ends FAILED with every run nested under it (at any depth), whether the objective
raised or its worker died (:func:`close_orphaned_runs`).

CLI (one worker; start as many as you like, each with its own ``--worker`` index)::

    python -m sweeps.study worker --study NAME --objective pkg.module:objective --n-trials 40 \
        [--storage postgresql+psycopg2://user:pw@host/db] [--directions minimize minimize] [--track] \
        [--wait-for-others SECONDS] [--poll SECONDS]
    python -m sweeps.study pareto --study NAME [--storage URL]

The worker prints its :class:`WorkerReport` as JSON and exits 0 when it leaves nothing behind, 1 when
every trial it ran failed, 2 for a sweep it cannot open or run as asked, 3 when it stopped waiting for
trials still running in other workers (the study is not finished).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "SweepError", "GridExhausted", "WorkerReport", "default_storage", "make_storage", "open_study", "load_study",
    "grid_sampler", "GridSweepSampler", "run_worker", "fail_stale_trials", "close_orphaned_runs", "pareto_front",
    "tracked_objective", "trial_run_name", "study_parent_run", "worker_exit", "main",
]

log = logging.getLogger("sweeps.study")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# optuna >= 4.9 renamed the retry callback; keep working with the older name that pyproject allows.
_RetryCallback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


class SweepError(RuntimeError):
    """A sweep that cannot be opened or run as asked (the message says what to change)."""


class GridExhausted(SweepError):
    """A new trial found no grid point free: every one is finished or held by another trial (a race between
    workers that both saw a point free; :func:`run_worker` does not count it as a failure of the objective)."""


def default_storage(name: str) -> str:
    """``sqlite:///sweeps/<name>.db``, relative to the working directory (the repo root)."""
    return f"sqlite:///sweeps/{name}.db"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SweepError(f"study name {name!r}: use letters, digits, '.', '_' or '-' (it names a file and MLflow runs)")
    return name


def make_storage(url: str, *, heartbeat_interval: int = 60, grace_period: int | None = None,
                 max_retry: int = 1) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeats: a trial whose worker stops heart-beating is FAILED, then retried ``max_retry`` times."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Several processes write to one SQLite file; wait for the lock instead of failing at once.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        # Long trials leave pooled connections idle for hours; servers drop them.
        engine_kwargs = {"pool_pre_ping": True}
    # Workers started together on a fresh database race to create its tables; the losers see an
    # integrity or "already exists" error once, then find the tables made.
    for attempt in range(5):
        try:
            return _rdb_storage(url, engine_kwargs, heartbeat_interval, grace_period, max_retry)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == 4:
                raise SweepError(f"cannot open Optuna storage {_redact(url)}: {str(err).splitlines()[0]}") from err
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _rdb_storage(url, engine_kwargs, heartbeat_interval, grace_period, max_retry) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=dict(engine_kwargs), heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=_RetryCallback(max_retry=max_retry))
        except TypeError:  # optuna < 4.9 names the argument failed_trial_callback
            return optuna.storages.RDBStorage(
                url, engine_kwargs=dict(engine_kwargs), heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, failed_trial_callback=_RetryCallback(max_retry=max_retry))


def _worker_seed(seed: int, worker: int, trials_in_study: int) -> int:
    # Workers that share a seed would draw the same random start-up points: give each its own stream. The
    # trials already in the study make it the study's state, not only the command line: the same command
    # run again (a resumed sweep, a worker restarted after a crash) would otherwise replay its
    # predecessor's points, since TPE's start-up draws ignore the trials already there.
    digest = hashlib.sha256(f"{int(seed)}/{int(worker)}/{int(trials_in_study)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def open_study(name: str, storage: str | None = None, directions: Sequence[str] = ("minimize",), *,
               seed: int = 0, worker: int = 0, sampler: optuna.samplers.BaseSampler | None = None,
               metric_names: Sequence[str] | None = None, load_if_exists: bool = True,
               heartbeat_interval: int = 60, grace_period: int | None = None,
               max_retry: int = 1) -> optuna.Study:
    """Create or join study ``name`` in ``storage`` (default :func:`default_storage`).

    The default sampler is TPE seeded from ``seed``, ``worker`` (this process' index among the workers) and
    the number of trials the study holds when it is opened, so neither concurrent workers nor successive
    invocations of one command draw the same points. Its ``constant_liar`` makes TPE treat other workers'
    RUNNING trials as evaluated, but only once ``n_startup_trials`` (10) trials are COMPLETE or PRUNED: the
    random start-up draws before that are kept apart by the seed alone. A ``sampler`` given here is used as
    is (a grid must be built with the same seed in every worker, see :func:`grid_sampler`).
    ``heartbeat_interval``/``grace_period`` are seconds; a dead worker's trial is noticed after ``grace_period``
    (default ``2 * heartbeat_interval``) by the next stale check of any worker (see :func:`run_worker`).
    """
    _check_name(name)
    directions = [str(d).lower() for d in directions]
    bad = [d for d in directions if d not in ("minimize", "maximize")]
    if not directions or bad:
        raise SweepError(f"study {name}: directions must be 'minimize'/'maximize', got {list(directions)}")
    if metric_names is not None and len(metric_names) != len(directions):
        raise SweepError(f"study {name}: {len(metric_names)} metric names for {len(directions)} directions")
    url = storage or default_storage(name)
    store = make_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(storage=store, sampler=sampler, study_name=name, directions=directions,
                                        load_if_exists=load_if_exists)
    except optuna.exceptions.DuplicatedStudyError:
        raise SweepError(f"study {name} already exists in {_redact(url)}; pass load_if_exists=True to resume it") from None
    if sampler is None:  # seeded only now: the seed depends on what the (maybe existing) study holds
        trials_in_study = len(study.get_trials(deepcopy=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.sampler = optuna.samplers.TPESampler(seed=_worker_seed(seed, worker, trials_in_study),
                                                       constant_liar=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise SweepError(f"study {name} in {_redact(url)} has directions {stored}, not {directions}: "
                         "use another study name for another objective")
    if metric_names is not None:
        if study.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(list(metric_names))
        elif list(study.metric_names) != list(metric_names):
            raise SweepError(f"study {name} has metric names {study.metric_names}, not {list(metric_names)}")
    return study


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    """Open an existing study read-mostly (no sampler or directions needed), e.g. for reports.

    Never creates storage: a SQLite URL naming no file is an error (opening it would leave an empty
    database behind), and an absent study's error names the studies the storage does hold.
    """
    url = storage or default_storage(_check_name(name))
    if url.startswith("sqlite:///") and not url.endswith(":memory:") and not Path(url[len("sqlite:///"):]).is_file():
        raise SweepError(f"no Optuna storage at {url[len('sqlite:///'):]} (no such file; nothing was created)")
    store = make_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        held = sorted(s.study_name for s in store.get_all_studies())
        raise SweepError(f"no study {name!r} in {_redact(url)}; it holds: {', '.join(held) or 'no studies'}") from None


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class GridSweepSampler(optuna.samplers.GridSampler):
    """GridSampler that gives a new trial only a point no trial holds, and tells which points are left.

    Optuna's GridSampler hands trial ``n`` point ``n`` without looking, and once every point is started
    it hands out points still RUNNING - a dead worker's trial inside its grace period included - so one
    point would run as two trials. Here a point is held by every trial that carries it: a finished one
    (a failed point is not re-run), a RUNNING one, or a WAITING heartbeat retry, which keeps its point (it
    is the same trial, continued). A new trial takes point ``trial.number`` when that is free (as
    GridSampler does), else a free one at random. Two workers racing for one point both write their claim
    and then read the claims back, so at least one sees the other and moves on. A trial that finds no point
    free fails with :class:`GridExhausted` at its first ``suggest``.
    """

    def __init__(self, search_space: Mapping[str, Sequence[Any]], seed: int = 0) -> None:
        super().__init__(search_space, seed=seed)
        self.search_space = {k: list(v) for k, v in search_space.items()}
        self.n_points = len(self._all_grids)
        # Every worker shares ``seed`` (it fixes the grid order): choosing with the seeded RNG would send
        # racing workers to the same point, so the choice uses this process' own RNG.
        self._claim_rng = random.Random()

    def _holders(self, study: optuna.Study) -> dict[int, list[FrozenTrial]]:
        """Grid point -> the trials that hold it (read from the storage, as GridSampler does)."""
        holders: dict[int, list[FrozenTrial]] = {}
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            grid_id = t.system_attrs.get("grid_id")
            if grid_id is not None and self._same_search_space(t.system_attrs.get("search_space", {})):
                holders.setdefault(grid_id, []).append(t)
        return holders

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return  # a heartbeat retry keeps its point; an enqueued trial brings its own parameters
        storage, lost = study._storage, set()
        while True:
            free = set(range(self.n_points)) - set(self._holders(study)) - lost
            if not free:
                grid_id = None  # sample_independent raises GridExhausted
            elif trial.number in free:
                grid_id = trial.number
            else:
                grid_id = self._claim_rng.choice(sorted(free))
            storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
            storage.set_trial_system_attr(trial._trial_id, "grid_id", grid_id)
            if grid_id is None:
                return
            rivals = [t for t in self._holders(study).get(grid_id, []) if t._trial_id != trial._trial_id]
            if not rivals:
                return
            lost.add(grid_id)  # each lost race removes a point: the loop ends

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        if "grid_id" in trial.system_attrs and trial.system_attrs["grid_id"] is None:
            raise GridExhausted(f"trial {trial.number}: each of the {self.n_points} grid points is finished "
                                "or held by another trial")
        return super().sample_independent(study, trial, param_name, param_distribution)

    def pending(self, study: optuna.Study) -> int:
        """Grid points no trial holds (finished, running or a re-queued WAITING retry)."""
        return self.n_points - len(self._holders(study))

    def complete_points(self, study: optuna.Study) -> int:
        """Grid points that a COMPLETE trial holds."""
        return sum(any(t.state == TrialState.COMPLETE for t in trials) for trials in self._holders(study).values())


def grid_sampler(values: Iterable[float], param: str = "target_sparsity", seed: int = 0) -> GridSweepSampler:
    """Grid over one parameter (default: the target sparsity of a pruning sweep).

    Every worker must use the same ``values`` and ``seed`` (they fix the order of the grid); each point is
    evaluated once, a point whose trial failed is not re-run (except a heartbeat retry).
    """
    values = list(values)
    if not values:
        raise SweepError("grid_sampler: no values")
    if len(set(values)) != len(values):
        raise SweepError(f"grid_sampler: duplicate values in {values}")
    return GridSweepSampler({param: values}, seed=seed)


@dataclasses.dataclass
class WorkerReport:
    """What one :func:`run_worker` call did (the study itself may hold more from other workers).

    ``unfinished``: trials still RUNNING in other workers when this worker stopped waiting for them (0 when
    it left nothing behind). ``first_failure``: ``"trial N: <reason>"`` for this worker's first FAILED trial,
    the reason in one line (``""`` when none failed).
    """

    ran: int = 0
    complete: int = 0
    failed: int = 0
    pruned: int = 0
    stopped_because: str = ""
    unfinished: int = 0
    first_failure: str = ""


_FAIL_REASON_CHARS = 500  # an MLflow tag value, a line of a report: long tracebacks stay in the log


def _fail_reason(err: BaseException) -> str:
    """``"<ExceptionType>: <first line of the message>"``, at most 500 characters."""
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__
    return reason[:_FAIL_REASON_CHARS]


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    counts = {state: 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def fail_stale_trials(study: optuna.Study, on_stale: Callable[[optuna.Study], Any] | None = None) -> None:
    """Turn dead workers' trials (heartbeat older than the grace period) into FAIL + a WAITING retry, then
    call ``on_stale`` (e.g. :func:`close_orphaned_runs`) so what they left elsewhere is closed too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if on_stale is not None:
        on_stale(study)


def close_orphaned_runs(study: optuna.Study, tracking_uri: str) -> list[str]:
    """Close the MLflow runs of FAILED trials that are still RUNNING (their worker died): status FAILED,
    tag ``optuna_state=FAIL``, the trial's params logged (the dead worker never got to), and every RUNNING
    run nested under it (its stages, at any depth) FAILED too. Returns the trial runs' ids."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    closed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id or t.user_attrs.get("trial_number", t.number) != t.number:
            continue  # untracked, or the attrs a retry inherited from the trial it replaces
        if _close_run(client, run_id, t.params, t.number):
            closed.append(run_id)
    if closed:
        log.info("closed %d MLflow run(s) left RUNNING by dead workers", len(closed))
    return closed


def _close_run(client, run_id: str, params: dict, number: int) -> bool:
    """End a dead trial's MLflow run FAILED (tag ``optuna_state=FAIL``) with the params its worker never got to
    log, after its RUNNING descendant runs; False when it is not RUNNING (closed already) or cannot be read
    (a store hiccup must not stop a worker)."""
    try:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            return False
        # Innermost first and the trial run last: a worker that dies half-way leaves the trial run RUNNING,
        # so the next check (which skips closed trial runs) finishes the job.
        for nested in reversed(_descendant_runs(client, run)):
            if nested.info.status == "RUNNING":
                client.set_terminated(nested.info.run_id, "FAILED")
        for key, value in params.items():
            if key not in run.data.params:
                client.log_param(run_id, key, value)
        client.set_tag(run_id, "optuna_state", "FAIL")
        client.set_terminated(run_id, "FAILED")
        return True
    except Exception as err:  # noqa: BLE001
        log.warning("could not close MLflow run %s of trial %s: %s", run_id, number, err)
        return False


def _descendant_runs(client, run) -> list:
    """Every run nested under ``run`` at any depth (tag ``mlflow.parentRunId``), each after its parent."""
    found, parents = [], [run.info.run_id]
    while parents:
        query = f"tags.mlflow.parentRunId = '{parents.pop()}'"
        page_token = None
        while True:
            page = client.search_runs([run.info.experiment_id], query, max_results=1000, page_token=page_token)
            found.extend(page)
            parents.extend(child.info.run_id for child in page)
            page_token = page.token
            if not page_token:
                break
    return found


class _StaleWatch:
    """While this worker runs a (long) trial, fail other workers' stale trials every ``interval`` seconds:
    a trial whose worker died is FAILED (and re-queued) within the grace period plus ``interval``, not only
    when this worker's trial ends."""

    def __init__(self, study: optuna.Study, interval: float, on_stale) -> None:
        import threading

        self.study, self.interval, self.on_stale = study, interval, on_stale
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stale-trial-watch", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                fail_stale_trials(self.study, self.on_stale)
            except Exception as err:  # noqa: BLE001 - the main loop checks again anyway
                log.warning("stale-trial check failed: %s", err)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _heartbeat_interval(study: optuna.Study) -> float | None:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    return storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None


class _RecordedObjective:
    """The objective as :func:`run_worker` calls it: remembers the trial it ran last and the exception it
    raised, and stores the one-line reason in the trial (user attr ``fail_reason``; optuna keeps none) for
    reports and other workers to read."""

    def __init__(self, objective: Callable[[optuna.Trial], Any]) -> None:
        self.objective = objective
        self.trial_id: int | None = None
        self.error: Exception | None = None

    def __call__(self, trial: optuna.Trial):
        self.trial_id, self.error = trial._trial_id, None
        try:
            return self.objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            self.error = err
            with contextlib.suppress(Exception):  # a storage hiccup here must not replace the objective's error
                trial.set_user_attr("fail_reason", _fail_reason(err))
            raise


_MAX_POLL_S = 30.0


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], Any], n_trials: int, *,
               catch: tuple[type[BaseException], ...] = (Exception,), max_failures: int | None = None,
               timeout: float | None = None, callbacks: Sequence[Callable] = (),
               on_stale: Callable[[optuna.Study], Any] | None = None, on_idle: Callable[[], Any] | None = None,
               poll_seconds: float | None = None, wait_for_others: float = math.inf,
               only_enqueued: bool = False) -> WorkerReport:
    """Run trials until the study holds ``n_trials`` COMPLETE trials (counting every worker's).

    Trials already COMPLETE (from an interrupted run) count, so restarting a worker resumes the sweep.
    Re-queued (WAITING) trials are run first. An exception in ``catch`` marks the trial FAIL (its one-line
    reason goes to the trial's user attr ``fail_reason`` and, for this worker's first, to
    ``first_failure``) and the worker goes on. It leaves when the study is done, after ``max_failures``
    failed trials of its own (default ``n_trials``: a broken objective must not loop forever), or after
    ``timeout`` seconds (checked between trials and while waiting).

    When the remaining trials are all being run by other workers (COMPLETE + RUNNING >= ``n_trials``, or
    every grid point finished or held, and nothing WAITING) the worker waits instead of leaving: one of
    those workers may be dead, its trial RUNNING until the heartbeat grace period is over, and its retry
    then needs a worker. It polls every ``poll_seconds`` (default: the heartbeat interval, at most 30 s;
    30 s without heartbeats), each time failing stale trials (``on_stale`` after each check) and calling
    ``on_idle()`` (e.g. to keep a distributed job's other ranks alive), for at most ``wait_for_others``
    seconds in a row. Giving up with trials still RUNNING elsewhere sets ``unfinished`` and says so in
    ``stopped_because``. Without heartbeats a dead worker's trial stays RUNNING for ever: give
    ``wait_for_others`` then.

    With a grid sampler no point is run twice (:class:`GridSweepSampler`): the worker stops when every
    point is complete, or finished with some failed, whatever ``n_trials`` says (a retry still waiting for
    a completed point is not run). Dead workers' trials are also failed while a trial runs, every heartbeat
    interval (:class:`_StaleWatch`).

    ``only_enqueued``: run the study's WAITING (enqueued) trials and never sample a new point (a study that
    ``enqueue_trial`` filled, e.g. the promoted trials of a pruning sweep); the worker stops when none waits.
    """
    if n_trials < 1:
        raise SweepError(f"n_trials must be >= 1, got {n_trials}")
    if poll_seconds is not None and poll_seconds <= 0:
        raise SweepError(f"poll_seconds must be > 0, got {poll_seconds}")
    if wait_for_others < 0:
        raise SweepError(f"wait_for_others must be >= 0, got {wait_for_others}")
    max_failures = n_trials if max_failures is None else max_failures
    report = WorkerReport()
    grid = study.sampler if isinstance(study.sampler, GridSweepSampler) else None
    interval = _heartbeat_interval(study)
    poll_seconds = poll_seconds or (min(interval, _MAX_POLL_S) if interval else _MAX_POLL_S)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    recorded = _RecordedObjective(objective)
    waiting_since: float | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            # Turn dead workers' trials into FAIL + a WAITING retry before deciding what is left to do.
            fail_stale_trials(study, on_stale)
            counts = _counts(study)
            done, running, waiting = counts[TrialState.COMPLETE], counts[TrialState.RUNNING], counts[TrialState.WAITING]
            if done >= n_trials and not only_enqueued:  # enqueued-only: what waits runs, whatever else is done
                report.stopped_because = f"study has {done} complete trials (target {n_trials})"
                break
            if grid is not None and grid.complete_points(study) >= grid.n_points:
                # a retry still WAITING for a point that another trial completed must not run it again
                report.stopped_because = "grid: every point is complete"
                break
            if report.failed >= max_failures:
                report.stopped_because = f"{report.failed} failed trials in this worker (max_failures={max_failures})"
                log.warning("worker stops: %s", report.stopped_because)
                break
            others_hold_the_rest = waiting == 0 and (done + running >= n_trials or only_enqueued
                                                     or (grid is not None and grid.pending(study) == 0))
            if others_hold_the_rest and running == 0:  # a grid or enqueued trials only: nothing left to run
                if only_enqueued:
                    report.stopped_because = f"every enqueued trial is finished ({done} complete)"
                else:
                    failed_points = grid.n_points - grid.complete_points(study)
                    report.stopped_because = f"grid: every point is finished, {failed_points} of them failed"
                break
            now = time.monotonic()
            if others_hold_the_rest:
                if waiting_since is None:
                    waiting_since = now
                    log.info("waiting for %d trial(s) running in other workers", running)
                give_up_at = min(waiting_since + wait_for_others, deadline)
                if now >= give_up_at:
                    report.unfinished = running
                    report.stopped_because = (f"{running} trial(s) still running in other workers; the study is "
                                              f"not finished (waited {now - waiting_since:.0f} s)")
                    log.warning("worker stops: %s", report.stopped_because)
                    break
                if on_idle is not None:
                    on_idle()
                time.sleep(min(poll_seconds, give_up_at - now))
                continue
            waiting_since = None
            if now >= deadline:
                report.stopped_because = f"timeout {timeout} s"
                break
            watch = _StaleWatch(study, interval, on_stale) if interval else contextlib.nullcontext()
            # this trial's id once the objective starts: an interrupt before that must not re-queue the last one
            recorded.trial_id = None
            try:
                with watch:
                    study.optimize(recorded, n_trials=1, catch=(*catch, GridExhausted), callbacks=list(callbacks))
            except KeyboardInterrupt:
                _requeue_interrupted(study, recorded.trial_id)
                raise
            if isinstance(recorded.error, GridExhausted):
                log.info("%s (another worker took the last free point); checking again", recorded.error)
                continue
            _count_trial(report, study._storage.get_trial(recorded.trial_id), recorded.error)
    return report


def _requeue_interrupted(study: optuna.Study, trial_id: int | None) -> None:
    """A trial stopped by a signal (Ctrl-C, a scheduler's SIGTERM at its time limit, a preemption) is not the
    trial's fault: Optuna has recorded it FAIL, so queue it again as a heartbeat retry does (same parameters,
    system attr ``failed_trial``), and the next worker resumes it in its folder from its checkpoints instead
    of losing the point."""
    if trial_id is None:
        return
    with contextlib.suppress(Exception):  # a storage hiccup must not hide the interrupt
        trial = study._storage.get_trial(trial_id)
        if trial.state == TrialState.FAIL:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                _RetryCallback(max_retry=None)(study, trial)
            log.warning("trial %d was interrupted: queued again with the same parameters", trial.number)


def _count_trial(report: WorkerReport, trial: FrozenTrial, error: Exception | None) -> None:
    report.ran += 1
    if trial.state == TrialState.COMPLETE:
        report.complete += 1
    elif trial.state == TrialState.PRUNED:
        report.pruned += 1
    else:
        report.failed += 1
        if not report.first_failure:
            # no exception: optuna refused what the objective returned (its warning in the log says why)
            reason = _fail_reason(error) if error is not None else "optuna refused the objective's return value"
            report.first_failure = f"trial {trial.number}: {reason}"


def pareto_front(study: optuna.Study) -> list[dict[str, Any]]:
    """The non-dominated COMPLETE trials (the best one(s) of a single-objective study), best first objective first.

    Each item: ``number``, ``params``, ``values`` (metric name -> value; names ``value_i`` when unset)
    and ``user_attrs`` (``mlflow_run_id`` when the trial was tracked).
    """
    names = study.metric_names or ([f"value_{i}" for i in range(len(study.directions))]
                                   if len(study.directions) > 1 else ["value"])
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    front = []
    for t in study.best_trials:
        front.append({"number": t.number, "params": dict(t.params),
                      "values": dict(zip(names, t.values)), "user_attrs": dict(t.user_attrs)})
    front.sort(key=lambda item: (list(item["values"].values()), item["number"]))
    return front


# ---------------------------------------------------------------------------------------------- MLflow join

def study_parent_run(tracker, study_name: str, study: optuna.Study | None = None) -> str:
    """Id of the parent MLflow run of ``study_name`` (run name ``study:<name>``, tags ``kind=study``, ``optuna_study``).

    Created on first use and marked FINISHED right away (it is a container; trials run under it from many
    workers, and none of them owns its end): each trial then moves its end time to the trial's own
    (:func:`tracked_objective`), so its duration spans the trials. Two workers that create it at the same time
    converge on the earliest one and delete theirs.
    """
    from mlflow import MlflowClient

    from svlib.tracking import git_commit

    client = MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment_by_name(tracker.experiment)
    if experiment is None:
        raise SweepError(f"MLflow experiment {tracker.experiment!r} not found at {tracker.tracking_uri}")
    query = f"tags.kind = 'study' and tags.optuna_study = '{_check_name(study_name)}'"

    def _parents() -> list:
        runs = client.search_runs([experiment.experiment_id], query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    existing = _parents()
    if existing:
        return existing[0].info.run_id
    tags = {"kind": "study", "optuna_study": study_name, "git_commit": git_commit()}
    own = client.create_run(experiment.experiment_id, run_name=f"study:{study_name}", tags=tags)
    own_id = own.info.run_id
    if study is not None:
        client.log_param(own_id, "directions", ",".join(d.name.lower() for d in study.directions))
        client.log_param(own_id, "sampler", type(study.sampler).__name__)
        if study.metric_names:
            client.log_param(own_id, "metric_names", ",".join(study.metric_names))
    client.set_terminated(own_id, "FINISHED")
    winner = _parents()[0].info.run_id
    if winner != own_id:
        client.delete_run(own_id)
    return winner


def trial_run_name(number: int, label: str | None = None, retry_of: int | None = None) -> str:
    """``trial-3``, ``trial-3 t=0.5``, ``trial-3 t=0.5 (retry of 1)``: the trial run's name in the MLflow UI."""
    return f"trial-{number}" + (f" {label}" if label else "") + (f" (retry of {retry_of})" if retry_of is not None else "")


def tracked_objective(tracker, study_name: str, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
    """Wrap ``objective`` so each trial is an MLflow run nested under the study's parent run.

    The trial run is named by :func:`trial_run_name` (the objective may set the user attr ``run_label``,
    e.g. ``t=0.5``) and tagged ``kind=trial``, ``optuna_study``, ``optuna_trial``
    (``optuna_retry_of`` for a heartbeat retry) and ``optuna_state``; it logs the trial's params and the
    returned values as metrics (the study's metric names, else ``value``/``value_i``). A raising objective
    leaves the run FAILED with the tag ``fail_reason`` (``"<ExceptionType>: <first line>"``), a pruned one
    KILLED. The run is the active MLflow run while the objective runs, so ``tracker.run(stage, nested=True)``
    inside the objective nests stages under the trial; a nested run the objective leaves active (started
    without ``with``, or its ``with`` skipped by the exception) is ended with the trial: FAILED, KILLED or
    FINISHED as the trial.
    """
    _check_name(study_name)
    parent: dict[str, str] = {}

    def wrapped(trial: optuna.Trial):
        from mlflow import MlflowClient

        from svlib.tracking import git_commit

        if tracker.active_run_id is not None:
            raise SweepError("tracked_objective: an MLflow run is already active in this thread; "
                             "trial runs are nested under the study run, end the active run first")
        if "id" not in parent:
            parent["id"] = study_parent_run(tracker, study_name, trial.study)
        client = MlflowClient(tracker.tracking_uri)
        tags = {"kind": "trial", "optuna_study": study_name, "optuna_trial": str(trial.number),
                "mlflow.parentRunId": parent["id"], "git_commit": git_commit()}
        # A heartbeat retry inherits the user attrs of the trial it replaces: close that trial's run,
        # which its dead worker left RUNNING.
        previous = trial.user_attrs.get("trial_number")
        retry_of = previous if previous is not None and previous != trial.number else None
        if retry_of is not None:
            tags["optuna_retry_of"] = str(previous)
            old_run = trial.user_attrs.get("mlflow_run_id")
            if old_run:
                # the objective finds the dead trial's stage runs here (reused stages copy their metrics)
                trial.set_user_attr("retry_of_mlflow_run_id", old_run)
                _close_run(client, old_run, trial.params, previous)  # if no worker has closed it yet
        state, pruned_exc, failure = "FAIL", None, None
        with tracker.run(trial_run_name(trial.number, retry_of=retry_of), tags=tags) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("trial_number", trial.number)
            try:
                result = objective(trial)
            except optuna.TrialPruned as err:
                state, pruned_exc = "PRUNED", err
            except BaseException as err:  # KeyboardInterrupt too: the run ends FAILED all the same
                failure = err
                raise
            finally:
                # First, since MLflow's fluent calls below go to the innermost active run.
                outcome = "FAILED" if failure is not None else "KILLED" if pruned_exc is not None else "FINISHED"
                _end_nested_runs(run_id, outcome)
                if failure is not None:
                    client.set_tag(run_id, "fail_reason", _fail_reason(failure))
                if trial.params:
                    tracker.log_params(dict(trial.params))
                tracker.set_tags({"optuna_state": state})
                label = trial.user_attrs.get("run_label")  # what the objective says tells trials apart
                if label:
                    client.update_run(run_id, name=trial_run_name(trial.number, label, retry_of))
                _extend_study_run(client, parent["id"])  # failed and pruned trials too
            if pruned_exc is None:
                values = list(result) if isinstance(result, (list, tuple)) else [result]
                names = trial.study.metric_names or ([f"value_{i}" for i in range(len(values))]
                                                     if len(values) > 1 else ["value"])
                if len(names) != len(values):
                    raise SweepError(f"objective returned {len(values)} values for metrics {names}")
                tracker.log_metrics({n: float(v) for n, v in zip(names, values)})
                tracker.set_tags({"optuna_state": "COMPLETE"})
        if pruned_exc is not None:
            client.set_terminated(run_id, "KILLED")
            raise pruned_exc
        return result

    return wrapped


def _extend_study_run(client, parent_id: str) -> None:
    """End the study's run now, as its latest trial ends (it is made FINISHED at once, and would read as over
    58 ms after it began); never earlier than it already ends (another worker's later trial). A failure is a
    warning: it must not hide the trial's own outcome."""
    try:
        ended = client.get_run(parent_id).info.end_time or 0
        client.set_terminated(parent_id, "FINISHED", end_time=max(ended, int(time.time() * 1000)))
    except Exception as err:  # noqa: BLE001 - a lost end time, never a lost trial
        log.warning("could not move the end of study run %s: %s", parent_id, str(err).splitlines()[0][:300])


def _end_nested_runs(run_id: str, status: str) -> None:
    """End the MLflow runs started (in this thread) inside run ``run_id`` and still active, innermost first."""
    import mlflow

    while (active := mlflow.active_run()) is not None and active.info.run_id != run_id:
        log.warning("ending MLflow run %s (%s) that the objective left active: %s",
                    active.info.run_id, active.info.run_name, status)
        mlflow.end_run(status)


# ------------------------------------------------------------------------------------------------------ CLI

def _load_objective(spec: str) -> Callable[[optuna.Trial], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SweepError(f"--objective {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SweepError(f"--objective {spec!r}: cannot import {module_name} ({err})") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise SweepError(f"--objective {spec!r}: {module_name} has no callable {attr!r}")
    return func


def _make_tracker(experiment: str, uri: str | None):
    from svlib.tracking import Tracker, default_tracking_uri

    uri = uri or default_tracking_uri()
    # Workers starting together race to create the experiment, and on a fresh SQLite store to create its tables
    # (two migrations at once can leave it half-made): on SQLite they take turns through a lock file beside the
    # database; a server store's loser finds the experiment made on a later try.
    with _sqlite_store_lock(uri):
        for attempt in range(5):
            try:
                return Tracker(experiment, tracking_uri=uri)
            except Exception:  # noqa: BLE001 - MlflowException, SQLAlchemy's and alembic's errors alike
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))


@contextlib.contextmanager
def _sqlite_store_lock(uri: str):
    """An exclusive lock (``<database>.lock``) held while a SQLite MLflow store is opened; no-op otherwise."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _parse_grid(spec: str) -> tuple[str, list[float]]:
    param, sep, values = spec.partition("=")
    try:
        parsed = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        parsed = []
    if not sep or not param or not parsed:
        raise SweepError(f"--grid {spec!r}: expected NAME=v1,v2,... (numbers)")
    return param, parsed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--study", required=True, help="study name (also the MLflow experiment)")
    common.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///sweeps/<study>.db)")
    w = sub.add_parser("worker", parents=[common], help="run trials until the study has --n-trials complete ones")
    w.add_argument("--directions", nargs="+", default=["minimize"])
    w.add_argument("--metric-names", nargs="+", default=None)
    w.add_argument("--objective", required=True, help="package.module:function taking an optuna.Trial")
    w.add_argument("--n-trials", type=int, required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--worker", type=int, default=0, help="this worker's index (offsets the sampler seed)")
    w.add_argument("--grid", default=None, help="grid sweep over one parameter: NAME=v1,v2,...")
    w.add_argument("--heartbeat", type=int, default=60, help="heartbeat interval, s")
    w.add_argument("--grace", type=int, default=None, help="grace period before a silent trial is failed, s")
    w.add_argument("--max-retry", type=int, default=1)
    w.add_argument("--max-failures", type=int, default=None)
    w.add_argument("--wait-for-others", type=float, default=math.inf, metavar="SECONDS",
                   help="longest wait for trials running in other workers before leaving them unfinished "
                        "(exit 3; default: no limit)")
    w.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                   help="while waiting, check every SECONDS (default: the heartbeat interval, at most 30)")
    w.add_argument("--track", action="store_true", help="log trials to MLflow (nested under the study run)")
    w.add_argument("--mlflow-uri", default=None, help="tracking URI (default: svlib's default, implies --track)")
    sub.add_parser("pareto", parents=[common], help="print the Pareto front as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "pareto":
            study = load_study(args.study, args.storage)
            print(json.dumps(pareto_front(study), indent=1, default=str))
            return 0
        objective = _load_objective(args.objective)
        sampler = None
        if args.grid:
            param, values = _parse_grid(args.grid)
            sampler = grid_sampler(values, param=param, seed=args.seed)
        study = open_study(args.study, args.storage, args.directions, seed=args.seed, worker=args.worker,
                           sampler=sampler, metric_names=args.metric_names, heartbeat_interval=args.heartbeat,
                           grace_period=args.grace, max_retry=args.max_retry)
        on_stale = None
        if args.track or args.mlflow_uri:
            tracker = _make_tracker(args.study, args.mlflow_uri)
            objective = tracked_objective(tracker, args.study, objective)
            on_stale = lambda s: close_orphaned_runs(s, tracker.tracking_uri)  # noqa: E731
        report = run_worker(study, objective, args.n_trials, max_failures=args.max_failures, on_stale=on_stale,
                            poll_seconds=args.poll, wait_for_others=args.wait_for_others)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"worker": args.worker, **dataclasses.asdict(report)}))
    return _worker_exit_code(report)


def worker_exit(report: WorkerReport) -> tuple[int, str]:
    """The worker's exit status and its one-line reason: 1 when every trial it ran failed (a broken objective
    matters most), 3 when it left trials running in other workers (the study is not finished), else 0."""
    if report.ran and report.failed == report.ran:
        return 1, f"error: every trial failed; first: {report.first_failure}"
    if report.unfinished:
        return 3, f"error: {report.stopped_because}"
    return 0, ""


def _worker_exit_code(report: WorkerReport) -> int:
    code, message = worker_exit(report)
    if message:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
