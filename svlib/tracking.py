"""MLflow tracking: one parent run per pipeline or study, one nested run per stage or trial.

The embedded store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (relative
to the working directory, i.e. the repo root); ``MLFLOW_TRACKING_URI`` points everything at a team's
tracking server instead. Stages never talk to MLflow directly: they receive a ``Tracker`` (or ``None`` in
unit tests) so that the same code runs tracked and untracked.
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
RESULT_COLUMNS = ("final_test_eer_pct", "final_test_eer_pct_ci_low", "final_test_eer_pct_ci_high",
                  "final_val_eer_pct", "final_val_eer_pct_ci_low", "final_val_eer_pct_ci_high",
                  "final_test_mindcf_0.01", "params_encoder", "wall_minutes",
                  "best_val_eer_pct", "best_test_eer_pct", "best_params_encoder", "pareto_size", "test_eer_pct")
# Decimals of the headline metrics as the runs table shows them (an EER of 12.0044 % reads 12.0).
_ROUND = {"eer_pct": 2, "mindcf": 3, "minutes": 1}
# MLflow refuses longer param values; a list of 25 layer indices can get close.
_MAX_PARAM_CHARS = 6000


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
        flat = flatten(params) if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()) else params
        clean = {k: str(v)[:_MAX_PARAM_CHARS] for k, v in flat.items()}
        items = list(clean.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._mlflow.log_params(dict(items[start:start + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if v is not None}
        self._mlflow.log_metrics(clean, step=step)

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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._quietly("log_metrics", self._tracker.log_metrics, metrics, step=step)

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
    """The experiment tag of the saved runs-table view :data:`RESULTS_VIEW`: the run name, start time and the
    result metrics as columns (MLflow's column ids are ``attributes.`X```, ``metrics.`name```)."""
    import json

    selected = ["attributes.`Duration`", *(f"metrics.`{c}`" for c in columns)]
    # columnOrder keeps the order given (the UI would otherwise sort the metric columns by name)
    return {f"mlflow.sharedViewState.{RESULTS_VIEW}": json.dumps({"selectedColumns": selected,
                                                                  "columnOrder": selected})}


def runs_page(server_url: str, experiment_id: str, view: str | None = RESULTS_VIEW) -> str:
    """The UI page of an experiment's runs table (``#/experiments/<id>`` alone opens MLflow 3's overview),
    in the saved view ``view`` (the result columns) unless None."""
    # workflowType: the UI's "Model training" side (a fresh browser otherwise opens the GenAI one)
    page = f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    return page + (f"&viewStateShareKey={view}" if view else "")


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


def _intervals(prefix: str, summary: dict) -> dict[str, float]:
    # the speaker-level bootstrap interval of each metric when the evaluation gives one (``eer_ci_pct``,
    # ``mindcf_0.01_ci``: [low, high]), named like experiments.common.metrics_of: ``<metric>_ci_low/_high``
    out = {}
    for key in ("eer_pct", "mindcf_0.01", "mindcf_0.05"):
        ci = summary.get("eer_ci_pct" if key == "eer_pct" else f"{key}_ci")
        if ci is not None:
            out[f"{prefix}{key}_ci_low"], out[f"{prefix}{key}_ci_high"] = map(float, ci)
    return out


def headline_metrics(summary: dict, list_name: str = "test") -> dict[str, float]:
    """The columns a researcher wants in the runs table of a pipeline's parent run, from its summary
    (``experiments.pipeline.run``): the last evaluated stage's ``final_{list}_eer_pct`` / ``_mindcf_0.01`` /
    ``_mindcf_0.05`` (and intervals when the evaluation gives them), ``final_val_eer_pct`` (that stage's val
    list, else its best validation EER), its ``params_encoder`` and the recipe's ``wall_minutes``, rounded
    (:func:`rounded`)."""
    out: dict[str, float] = {}
    final = None
    for name, record in summary.get("stages", {}).items():
        if (record.get("test") or {}).get(list_name) is not None:
            final = record
    if final is not None:
        tests = final["test"]
        for split in (list_name, "val"):
            if tests.get(split) is None:
                continue
            for key in ("eer_pct", "mindcf_0.01", "mindcf_0.05"):
                out[f"final_{split}_{key}"] = tests[split][key]
            out |= _intervals(f"final_{split}_", tests[split])
        if "final_val_eer_pct" not in out and final.get("best_val_eer_pct") is not None:
            out["final_val_eer_pct"] = final["best_val_eer_pct"]
        if final.get("params_encoder") is not None:
            out["params_encoder"] = final["params_encoder"]
    if summary.get("wall_minutes") is not None:
        out["wall_minutes"] = summary["wall_minutes"]
    return {k: rounded(k, v) for k, v in out.items()}


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


def close_stale_runs(tracking_uri: str, experiment_id: str, out_dir: str | os.PathLike) -> list[str]:
    """Mark KILLED every run of ``experiment_id`` still RUNNING with tag ``svlib.out_dir`` = ``out_dir``.

    A pipeline killed by SIGKILL (or one whose rank 0 died) cannot close its runs, and MLflow shows them
    RUNNING forever. Call this while holding the out_dir's lock (``experiments.common.exclusive_out_dir``): the
    lock proves no live pipeline writes there, so every such run is an orphan of a dead one. Returns their ids.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    target = str(Path(out_dir).resolve())
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        if run.data.tags.get(OUT_DIR_TAG) == target:
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


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m svlib.tracking", description="MLflow store maintenance")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reroot", help="after moving/copying mlruns/: point the store at the artifacts beside it")
    r.add_argument("db", help="the SQLite database, e.g. mlruns/mlflow.db")
    r.add_argument("--artifacts", default=None, help="artifact folder (default: artifacts/ beside the database)")
    args = parser.parse_args(argv)
    try:
        changed = reroot_store(args.db, args.artifacts)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, count in changed.items():
        print(f"{name}: {count} locations rewritten")
    if not changed:
        print("nothing to change: the store already points at its artifacts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
