"""MLflow tracking: one parent run per pipeline or study, one nested run per stage or trial.

The embedded store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (relative
to the working directory, i.e. the repo root); ``MLFLOW_TRACKING_URI`` points everything at a team's
tracking server instead. Stages never talk to MLflow directly: they receive a ``Tracker`` (or ``None`` in
unit tests) so that the same code runs tracked and untracked.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator

from .config import flatten

DEFAULT_URI = "sqlite:///mlruns/mlflow.db"
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
        if mlflow.get_experiment_by_name(experiment) is None:
            if artifact_root is None and self.tracking_uri.startswith("sqlite:///"):
                db_dir = Path(self.tracking_uri[len("sqlite:///"):]).resolve().parent
                artifact_root = (db_dir / "artifacts" / experiment).as_uri()
            mlflow.create_experiment(experiment, artifact_location=artifact_root)
        self.experiment = experiment
        mlflow.set_experiment(experiment)

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
