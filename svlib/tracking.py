"""MLflow tracking: one parent run per pipeline or study, one nested run per stage or trial.

The embedded store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (relative
to the working directory, i.e. the repo root); ``MLFLOW_TRACKING_URI`` points everything at a team's
tracking server instead. Stages never talk to MLflow directly: they receive a ``Tracker`` (or ``None`` in
unit tests) so that the same code runs tracked and untracked.

Every row of the runs table (stage, pipeline, trial, study) fills the same rounded result columns
(:data:`STAGE_COLUMNS`, the experiment's saved view :data:`RESULTS_VIEW`); a stage's model folder becomes an MLflow
logged model of its run (:meth:`Tracker.log_model`). ``python -m svlib.tracking ui`` (``make mlflow-ui``) serves
the store and prints its links, which all open the UI's model-training side.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import flatten

log = logging.getLogger("svlib.tracking")

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
# MLflow 3 opens an experiment without this tag on its GenAI overview; "custom_model_development" makes the
# UI open the "Model training" view (runs table) for our experiments.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# A saved view of the runs table (experiment tag ``mlflow.sharedViewState.<key>``, opened by
# ``#/experiments/<id>/runs?viewStateShareKey=<key>``) whose columns are the result metrics: without it MLflow
# shows no metric column until the user picks them.
RESULTS_VIEW = "svlib-results"
# The result columns every row fills under the same names (a stage, the pipeline's parent from its final stage,
# a sweep trial, the study's parent from its best trial), so one column reads every row: val EER and its
# speaker-level bootstrap interval, test EER and its interval, test minDCF(0.01), sparsity reached (the stages'
# ``achieved_sparsity``, rounded: a metric's latest value is what the table shows, so the rounded copy needs its
# own name), encoder size, minutes. EERs are in %. Short names: MLflow cuts a header at ~15 characters, and three ``final_test_eer_p...`` read alike.
STAGE_COLUMNS = ("val_eer", "val_eer_lo", "val_eer_hi", "test_eer", "test_eer_lo", "test_eer_hi", "test_mindcf",
                 "sparsity", "params_encoder", "wall_min")
RESULT_COLUMNS = STAGE_COLUMNS + ("pareto_size",)
# Decimals of the headline metrics as the runs table shows them (an EER of 12.0044 % reads 12.0), by the first
# part of the metric's name that matches.
_ROUND = {"eer": 2, "mindcf": 3, "sparsity": 3, "wall_min": 1, "minutes": 1}
# MLflow refuses longer param values; a list of 25 layer indices can get close.
_MAX_PARAM_CHARS = 6000
# model_type of svlib's logged models (the Models tab's "type"): speaker-model folders (svlib_model.json)
MODEL_TYPE = "svlib-speaker-model"


def param_strings(params: Any) -> dict[str, str]:
    """A config (dataclass or nested mapping) or a flat mapping -> MLflow params: dotted keys, string values
    cut to the length MLflow accepts."""
    nested = not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values())
    return {k: str(v)[:_MAX_PARAM_CHARS] for k, v in (flatten(params) if nested else params).items()}


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def git_commit(repo: str | os.PathLike = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    if commit != "unknown":
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += "-dirty"
    return commit


def data_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """Hash of the list files (wav.scp, utt2spk, trials) a run used: same lists -> same fingerprint."""
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        p = Path(path)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.suffix in {".wav", ".flac", ".npz", ".pt", ".safetensors"}:
                continue
            digest.update(f.name.encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


class Tracker:
    """Thin wrapper over MLflow's fluent API with nesting kept explicit."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, artifact_root: str | None = None):
        import mlflow

        self._mlflow = mlflow
        self.tracking_uri = tracking_uri or default_tracking_uri()
        if self.tracking_uri.startswith("sqlite:///"):
            db_path = Path(self.tracking_uri[len("sqlite:///"):])
            db_path.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            if artifact_root is None and self.tracking_uri.startswith("sqlite:///"):
                db_dir = Path(self.tracking_uri[len("sqlite:///"):]).resolve().parent
                artifact_root = (db_dir / "artifacts" / experiment).as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifact_root,
                                     tags={EXPERIMENT_KIND_TAG: TRAINING_KIND, **results_view_tag()})
        else:  # stores made before these tags existed, or with an older results view
            missing = {k: v for k, v in {EXPERIMENT_KIND_TAG: TRAINING_KIND, **results_view_tag()}.items()
                       if found.tags.get(k) != v}
            for key, value in missing.items():
                mlflow.MlflowClient(self.tracking_uri).set_experiment_tag(found.experiment_id, key, value)
        self.experiment = experiment
        self.experiment_id = mlflow.set_experiment(experiment).experiment_id

    @contextlib.contextmanager
    def run(self, name: str, *, tags: dict[str, str] | None = None, params: Any = None,
            nested: bool = False) -> Iterator[str]:
        """Start a (nested) run; yields its run id. Failures mark the run FAILED and re-raise."""
        with self._mlflow.start_run(run_name=name, nested=nested, tags=tags or {}) as active:
            if params is not None:
                self.log_params(params)
            yield active.info.run_id

    def log_params(self, params: Any) -> None:
        items = list(param_strings(params).items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._mlflow.log_params(dict(items[start:start + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """Log to the active run; with ``model_id`` the values are also the metrics of that logged model (its
        row in the experiment's Models tab)."""
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None}
        self._mlflow.log_metrics(clean, step=step, model_id=model_id)

    def log_model(self, folder: str | os.PathLike, name: str, params: Any = None,
                  tags: dict[str, str] | None = None) -> str:
        """Log the model folder ``folder`` as an MLflow logged model of the active run; returns its model id.

        The model is linked to the run that made it (its source run and one of the run's outputs), carries
        ``params`` (flattened like the run's) and ``tags``, and its files are its artifacts, so
        ``models:/<model id>`` (and a registered version of it) downloads the folder. Metrics logged with
        ``log_metrics(..., model_id=)`` become the model's. A failure while uploading leaves it FAILED.
        """
        from mlflow import MlflowClient
        from mlflow.entities import LoggedModelOutput

        run_id = self.active_run_id
        if run_id is None:
            raise RuntimeError(f"log_model {name}: no active MLflow run to link the model to")
        client = MlflowClient(self.tracking_uri)
        model = client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                           params=param_strings(params) if params is not None else None,
                                           tags=tags, model_type=MODEL_TYPE)
        try:
            client.log_model_artifacts(model.model_id, str(folder))
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        except BaseException:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, figure, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    @property
    def active_run_id(self) -> str | None:
        run = self._mlflow.active_run()
        return run.info.run_id if run else None


class TolerantTracker:
    """A :class:`Tracker` whose logging never raises: an MLflow error (a tracking server restarting, a full
    disk) becomes a warning and the work goes on, without that record.

    Under torchrun only rank 0 tracks. An MLflow error raised on rank 0 inside a DDP stage would leave the other
    ranks in the stage's collectives until the process group's timeout; a multi-day sweep trial must not die of
    a tracking hiccup, so its stages log through this. Everything else is the wrapped tracker's.
    """

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)

    def _quietly(self, what: str, call, *args, **kwargs) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a lost record, never a lost trial
            first = (str(err).strip().splitlines() or [""])[0]
            log.warning("MLflow %s failed (%s: %s); going on without it", what, type(err).__name__, first[:300])
            return None

    def log_params(self, params: Any) -> None:
        self._quietly("log_params", self._tracker.log_params, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None) -> None:
        linked = {"model_id": model_id} if model_id is not None else {}
        self._quietly("log_metrics", self._tracker.log_metrics, metrics, step=step, **linked)

    def log_model(self, folder: str | os.PathLike, name: str, params: Any = None,
                  tags: dict[str, str] | None = None) -> str | None:
        """The wrapped tracker's logged model id; None when MLflow failed (the stage goes on without it)."""
        return self._quietly(f"log_model {name}", self._tracker.log_model, folder, name, params, tags)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._quietly("set_tags", self._tracker.set_tags, tags)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._quietly("log_artifact", self._tracker.log_artifact, path, artifact_path)

    def log_figure(self, figure, name: str) -> None:
        self._quietly("log_figure", self._tracker.log_figure, figure, name)

    @contextlib.contextmanager
    def run(self, name: str, **kwargs) -> Iterator[str | None]:
        """The wrapped tracker's run; when MLflow cannot start it, None (the body runs all the same). An
        exception of the body ends the run FAILED and goes on up; a failure to end the run is a warning."""
        context = self._tracker.run(name, **kwargs)
        run_id = self._quietly(f"start of run {name}", context.__enter__)
        if run_id is None:
            yield None
            return
        try:
            yield run_id
        except BaseException:
            if not self._quietly(f"end of run {name}", context.__exit__, *sys.exc_info()):
                raise
        else:
            self._quietly(f"end of run {name}", context.__exit__, None, None, None)


def results_view_tag(columns: Iterable[str] = RESULT_COLUMNS) -> dict[str, str]:
    """The experiment tag of the saved runs-table view :data:`RESULTS_VIEW`: the result metrics as columns in
    the order given, then the run's duration (MLflow's column ids are ``metrics.`name```, ``attributes.`X```)."""
    import json

    selected = [*(f"metrics.`{c}`" for c in columns), "attributes.`Duration`"]
    # columnOrder keeps the order given (the UI would otherwise sort the metric columns by name)
    return {f"mlflow.sharedViewState.{RESULTS_VIEW}": json.dumps({"selectedColumns": selected,
                                                                  "columnOrder": selected})}


# MLflow 3's UI shows its "Model training" side (runs table, model metrics) or its GenAI side (traces, judges,
# "Evaluations") by the ``workflowType`` of the page's address, else by what the browser last chose with the
# sidebar switch (GenAI in a fresh browser): the experiment's kind tag no longer decides. Every link svlib prints
# carries it, run pages too.
_TRAINING_SIDE = "workflowType=machine_learning"


def runs_page(server_url: str, experiment_id: str, view: str | None = RESULTS_VIEW) -> str:
    """The UI page of an experiment's runs table (``#/experiments/<id>`` alone opens MLflow 3's overview),
    in the saved view ``view`` (the result columns) unless None."""
    page = f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{_TRAINING_SIDE}"
    return page + (f"&viewStateShareKey={view}" if view else "")


def run_page(server_url: str, experiment_id: str, run_id: str) -> str:
    """The UI page of one run, on the model-training side."""
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{_TRAINING_SIDE}"


def models_page(server_url: str, experiment_id: str) -> str:
    """The experiment's Models tab: its logged models (every stage's model) with their params and metrics."""
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/models?{_TRAINING_SIDE}"


def experiments_page(server_url: str) -> str:
    """The list of experiments on the model-training side (the server's root is MLflow's GenAI welcome page)."""
    return f"{server_url.rstrip('/')}/#/experiments?{_TRAINING_SIDE}"


# where `make mlflow-ui` (python -m svlib.tracking ui) serves the embedded store
UI_HOST, UI_PORT = "127.0.0.1", 5000


def ui_url(tracking_uri: str) -> str:
    """The UI of ``tracking_uri``: the server itself for an http(s) store, else where ``make mlflow-ui`` serves."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else f"http://{UI_HOST}:{UI_PORT}"


def where_to_look(tracking_uri: str, experiment: str, experiment_id: str, run_id: str | None,
                  files: Iterable[str | os.PathLike] = ()) -> list[str]:
    """The lines a finished job prints: its result files, its MLflow run id, and the UI links of its runs table
    (saved view), its run and its models (for the embedded store: after ``make mlflow-ui``)."""
    url = ui_url(tracking_uri)
    served = "" if url == tracking_uri.rstrip("/") else " (serve it first: make mlflow-ui)"
    lines = [f"results: {path}" for path in files]
    lines.append(f"MLflow: experiment {experiment!r} (id {experiment_id}) in {tracking_uri}{served}")
    lines.append(f"  runs table: {runs_page(url, experiment_id)}")
    if run_id is not None:
        lines.append(f"  run {run_id}: {run_page(url, experiment_id, run_id)}")
    lines.append(f"  models: {models_page(url, experiment_id)}")
    return lines


def rounded(key: str, value: float) -> float:
    """``value`` at the precision the runs table should show for metric ``key`` (EER % 2, minDCF 3,
    minutes 1 decimal, counts as integers); other metrics unchanged."""
    value = float(value)
    if key.startswith("params_") or key.endswith("_params"):
        return float(round(value))
    for part, decimals in _ROUND.items():
        if part in key:
            return round(value, decimals)
    return value


def test_list_of(record: dict, list_name: str = "test") -> str | None:
    """The test list a stage record's ``test_*`` columns show: ``list_name`` when the stage evaluated it, else
    its first evaluated list other than ``val``; None when it evaluated none."""
    lists = [name for name in (record.get("test") or {}) if name != "val"]
    return list_name if list_name in lists else (lists[0] if lists else None)


def _eer_columns(prefix: str, summary: dict) -> dict[str, float]:
    # ``<prefix>_eer`` and, when the evaluation gives one, its speaker-level bootstrap 95 % interval (``eer_ci_pct``)
    out = {f"{prefix}_eer": summary["eer_pct"]}
    if summary.get("eer_ci_pct") is not None:
        out[f"{prefix}_eer_lo"], out[f"{prefix}_eer_hi"] = map(float, summary["eer_ci_pct"])
    return out


def stage_headline(record: dict, list_name: str = "test") -> dict[str, float]:
    """The runs table's result columns (:data:`STAGE_COLUMNS`) of one stage from its record (``result.json``),
    rounded (:func:`rounded`): ``test_eer`` with its interval and ``test_mindcf`` on :func:`test_list_of`;
    ``val_eer`` with its interval from the stage's own evaluation of the val list (an evaluation stage), else its
    model-selection EER (``best_val_eer_pct``, a training stage: no interval, selection runs without one);
    ``sparsity`` (its ``achieved_sparsity``), ``params_encoder`` and ``wall_min`` (the stage's minutes) where the
    record has them."""
    tests = record.get("test") or {}
    out: dict[str, float] = {}
    if tests.get("val") is not None:
        out |= _eer_columns("val", tests["val"])
    elif record.get("best_val_eer_pct") is not None:
        out["val_eer"] = record["best_val_eer_pct"]
    chosen = test_list_of(record, list_name)
    if chosen is not None:
        out |= _eer_columns("test", tests[chosen]) | {"test_mindcf": tests[chosen]["mindcf_0.01"]}
    if record.get("achieved_sparsity") is not None:
        out["sparsity"] = record["achieved_sparsity"]
    if record.get("params_encoder") is not None:
        out["params_encoder"] = record["params_encoder"]
    if record.get("minutes") is not None:
        out["wall_min"] = record["minutes"]
    return {k: rounded(k, v) for k, v in out.items()}


def headline_metrics(summary: dict, list_name: str = "test") -> dict[str, float]:
    """The result columns of a pipeline's parent run, from its summary (``experiments.pipeline.run``): those of
    its final stage, the last one evaluated on the test lists (:func:`stage_headline`, so the parent's
    ``test_eer`` is that stage's), with the whole recipe's minutes (``wall_minutes``) as ``wall_min``."""
    final = None
    for record in summary.get("stages", {}).values():
        if test_list_of(record, list_name) is not None:
            final = record
    out = {k: v for k, v in stage_headline(final, list_name).items() if k != "wall_min"} if final else {}
    if final is not None and "val_eer" not in out:
        # the final evaluation without a val list: the best model-selection EER of the stages before it
        selected = [r["best_val_eer_pct"] for r in summary["stages"].values() if r.get("best_val_eer_pct") is not None]
        if selected:
            out["val_eer"] = rounded("val_eer", selected[-1])
    if summary.get("wall_minutes") is not None:
        out["wall_min"] = rounded("wall_min", summary["wall_minutes"])
    return out


def copy_metrics(client, source_run: str, target_run: str) -> int:
    """Copy every metric history (all steps) of ``source_run`` into ``target_run``; returns the points copied.

    A sweep trial retried after its worker died reuses the finished stages of the dead trial: their numbers
    are copied into the retry's stage runs so that the retry shows them.
    """
    from mlflow.entities import Metric

    points = []
    for key in client.get_run(source_run).data.metrics:
        points += [Metric(m.key, m.value, m.timestamp, m.step) for m in client.get_metric_history(source_run, key)]
    for start in range(0, len(points), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(target_run, metrics=points[start:start + 1000])
    return len(points)


OUT_DIR_TAG = "svlib.out_dir"  # the resolved out_dir of a pipeline's runs (parent and stages): its rerun finds them
HOST_TAG = "svlib.host"        # the host of the pipeline's rank 0


def close_stale_runs(tracking_uri: str, experiment_id: str, out_dir: str | os.PathLike, host: str) -> list[str]:
    """Mark KILLED every run of ``experiment_id`` still RUNNING with tags ``svlib.out_dir`` = ``out_dir`` and
    ``svlib.host`` = ``host``.

    A pipeline killed by SIGKILL (or one whose rank 0 died) cannot close its runs, and MLflow shows them
    RUNNING forever. Call this while holding the out_dir's lock (``experiments.common.exclusive_out_dir``): the
    lock proves no live pipeline writes there, so every such run is an orphan of a dead one. The host too,
    because the lock covers one filesystem: the same path on another machine's scratch disk, tracked to one
    team server, is another pipeline's live run. Returns their ids.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    target = str(Path(out_dir).resolve())
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        if run.data.tags.get(OUT_DIR_TAG) == target and run.data.tags.get(HOST_TAG) == host:
            client.set_tag(run.info.run_id, "svlib.closed_by", "rerun (its pipeline had died)")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.info("closed %d MLflow run(s) of %s left RUNNING by a dead pipeline", len(closed), target)
    return closed


# ----------------------------------------------------------------------------------------- moving a store

# (table, column) pairs of MLflow's SQL schema that hold artifact locations
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "source"),
                     ("model_versions", "storage_location"))


def reroot_store(db_path: str | os.PathLike, artifacts: str | os.PathLike | None = None) -> dict[str, int]:
    """Point a moved or copied SQLite store at its artifacts again.

    MLflow keeps absolute ``file://`` artifact locations in the database, so after ``cp -r mlruns elsewhere``
    the copy still reads (and writes!) the old folder's artifacts. Every experiment's location
    ``file:///old/.../<name>`` becomes ``<artifacts>/<name>`` (default: ``artifacts/`` beside the database),
    and so does every location under it (runs, logged models, registered model versions). Returns
    ``{experiment name: rows changed}``; a store already rooted there changes nothing.
    """
    import sqlite3
    from urllib.parse import unquote, urlparse

    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no such MLflow database")
    root = Path(artifacts) if artifacts is not None else db_path.parent / "artifacts"
    changed: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
        columns = [(t, c) for t, c in _LOCATION_COLUMNS
                   if t in tables and c in {r[1] for r in db.execute(f"pragma table_info({t})")}]
        for name, location in db.execute("select name, artifact_location from experiments").fetchall():
            if not location or not location.startswith("file:"):
                continue  # a server's mlflow-artifacts: or an object store: nothing tied to this disk
            new = (root.resolve() / Path(unquote(urlparse(location).path)).name).as_uri()
            if new == location:
                continue
            count = 0
            for table, column in columns:
                rows = db.execute(f"select rowid, {column} from {table} where {column} is not null").fetchall()
                for rowid, value in rows:
                    if value == location or value.startswith(location + "/"):
                        db.execute(f"update {table} set {column} = ? where rowid = ?",
                                   (new + value[len(location):], rowid))
                        count += 1
            changed[name] = count
    return changed


# ------------------------------------------------------------------------------------------------- the UI

# Printed under the links: what no link can carry (MLflow keeps the switch in the browser's local storage).
SIDE_NOTE = ("note: the links open MLflow's \"Model training\" side; a run clicked in the table opens on the side "
             "this browser last chose (GenAI in a fresh one): if it shows Evaluations/Judges, open {root} and pick "
             "\"Model training\" in the sidebar switch once; the browser keeps it")


def ui_lines(tracking_uri: str, url: str) -> list[str]:
    """What ``python -m svlib.tracking ui`` prints once the server answers: per experiment of the store, its runs
    table (in the result view) and its Models tab; then the experiments list and :data:`SIDE_NOTE`."""
    from mlflow import MlflowClient

    lines = [f"MLflow UI of {tracking_uri} at {url} (Ctrl-C stops it)"]
    for experiment in MlflowClient(tracking_uri).search_experiments(max_results=1000):
        if experiment.name == "Default":
            continue
        lines.append(f"  {experiment.name} (id {experiment.experiment_id}): {runs_page(url, experiment.experiment_id)}")
        lines.append(f"  {' ' * len(experiment.name)}   models: {models_page(url, experiment.experiment_id)}")
    if len(lines) == 1:
        lines.append("  (no experiment yet: run `make demo` or a pipeline first)")
    lines.append(f"  all experiments: {experiments_page(url)}")
    return lines + [SIDE_NOTE.format(root=url + "/")]


def serve_ui(db: str | os.PathLike, port: int = UI_PORT) -> int:
    """Serve the SQLite store ``db`` (artifacts beside it) on 127.0.0.1:``port`` until Ctrl-C, printing its links.

    Plain ``mlflow ui`` in the repo opens ``./mlflow.db``, a new empty store (MLflow 3's default), not svlib's
    ``mlruns/mlflow.db``: this serves the right one and says where each experiment's runs are."""
    import signal
    import time

    from .services import start_mlflow_server, stop_process

    def _stop(signum, frame):  # SIGTERM stops the server too, like Ctrl-C (it runs in its own session)
        raise KeyboardInterrupt

    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no MLflow store here (run `make demo` or a pipeline first, or give --db)")
    uri = f"sqlite:///{db.resolve()}"
    proc, url = start_mlflow_server(uri, db.resolve().parent / "artifacts", port, timeout=180,
                                    log_path=db.resolve().parent / "mlflow-server.log")
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        print("\n".join(ui_lines(uri, url)), flush=True)
        while proc.poll() is None:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop_process(proc)
        signal.signal(signal.SIGTERM, previous)
    return 0


def main(argv=None) -> int:
    import argparse
    import sys

    from .services import ServiceError

    parser = argparse.ArgumentParser(prog="python -m svlib.tracking", description="MLflow store maintenance")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reroot", help="after moving/copying mlruns/: point the store at the artifacts beside it")
    r.add_argument("db", help="the SQLite database, e.g. mlruns/mlflow.db")
    r.add_argument("--artifacts", default=None, help="artifact folder (default: artifacts/ beside the database)")
    u = sub.add_parser("ui", help="serve svlib's store (not plain `mlflow ui`'s ./mlflow.db) and print its links")
    u.add_argument("--db", default=DEFAULT_URI[len("sqlite:///"):], help="the SQLite database (default %(default)s)")
    u.add_argument("--port", type=int, default=UI_PORT, help="port on 127.0.0.1 (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.command == "ui":
            return serve_ui(args.db, args.port)
        changed = reroot_store(args.db, args.artifacts)
    except (OSError, ValueError, ServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, count in changed.items():
        print(f"{name}: {count} locations rewritten")
    if not changed:
        print("nothing to change: the store already points at its artifacts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
