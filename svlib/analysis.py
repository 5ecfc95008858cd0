"""Queries and plots over an svlib MLflow store (and Optuna study) for the notebooks in ``notebooks/``.

The notebooks only pick parameters and call these functions, so the logic is unit-tested here and the
notebooks stay short. Everything reads the MLflow schema of docs/CONTRACTS.md:

* a parent run per pipeline (tag ``kind=pipeline``) or study (``kind=study``), a nested run per stage
  (tag ``stage``) or sweep trial (``kind=trial``, ``optuna_study``, ``optuna_trial``);
* metrics ``{split}_eer_pct`` / ``{split}_mindcf_0.01`` / ``{split}_mindcf_0.05``, ``params_encoder``,
  pruning metrics per step (``expected_sparsity``, ``target_sparsity``, ``lambda1`` ...), and for trials
  ``achieved_sparsity`` and the param ``target_sparsity``;
* artifacts ``scores/NAME.txt`` (``enroll test score target|nontarget``), ``structure.json`` and
  ``model/encoder/config.json`` (HF config; a shrunk encoder carries ``svlib_pruned_layers``).

A store that lacks some of these (no pruning runs yet, no sweep) gives empty frames, never an error:
:func:`missing_note` turns that into a sentence the notebooks print.

Plot functions draw with ``matplotlib.pyplot`` (so Jupyter's inline backend shows them) and return the
figure; they never select a backend themselves.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "PRUNE_STAGES", "TEACHER_STAGES", "KINDS", "resolve_uri", "figures_folder", "figure_path", "load_runs",
    "experiment_command", "run_labels", "require_runs",
    "figure_series", "limit_structures", "stage_runs", "trial_runs",
    "metric_histories", "pruning_points", "teacher_reference", "pareto_mask", "study_pareto",
    "plot_pruning_curve", "parse_structure", "load_structures", "plot_structure_heatmap", "plot_structure_bars",
    "plot_training_curves", "score_files", "read_scores", "plot_det_curves", "missing_note",
    "CURVE_SUMMARY_KIND", "load_curve_summary", "plot_method_curve",
]

REPO = Path(__file__).resolve().parents[1]
# Stages whose output is a pruned (or being pruned) encoder, in pipeline order.
PRUNE_STAGES = ("prune1", "shrink", "prune2", "graft", "ps1", "ps2", "ps3")
# Where the dense teacher's numbers live, preferred first (s1 still carries unmerged LoRA params).
TEACHER_STAGES = ("s3", "eval", "s2", "merge")
KINDS = ("heads", "ffn1", "ffn2", "conv")
# What a distilling pruning stage logs as its distillation loss (its ``train_loss`` adds the sparsity penalty).
DISTILL_LOSS = "distill_loss"
_KIND_ALIASES = {"heads": "heads", "attention_heads": "heads", "num_heads": "heads", "attn": "heads",
                 "ffn1": "ffn1", "ffn_1": "ffn1", "ffn2": "ffn2", "ffn_2": "ffn2",
                 "conv": "conv", "conv_channels": "conv", "channels": "conv"}
_BASE_COLUMNS = ["run_id", "run_name", "experiment_id", "experiment", "status", "start_time", "end_time",
                 "parent_run_id", "stage", "kind", "optuna_study", "optuna_trial", "artifact_uri", "label"]


# ------------------------------------------------------------------------------------------------ runs

def resolve_uri(uri: str, roots: Sequence[str | os.PathLike] = ()) -> str:
    """Make a relative ``sqlite:///path`` absolute: found under the cwd or its parent, else under ``roots``,
    else the repo.

    Notebooks run with their own folder (``notebooks/``) as the cwd, while the store lives beside it
    (``mlruns/`` at the root of the checkout). Other URIs (absolute sqlite, http, postgresql) are returned unchanged.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):].startswith("/") or uri.endswith(":memory:"):
        return uri
    rel = uri[len(prefix):]
    for root in (Path.cwd(), Path.cwd().parent, *map(Path, roots), REPO):
        if (root / rel).exists():
            return prefix + str((root / rel).resolve())
    return prefix + str((Path.cwd() / rel).resolve())


def figures_folder(uri: str, figures_dir: str | os.PathLike | None = None) -> Path:
    """Where a notebook saves its PNGs: ``figures_dir``, else ``exp/figures`` beside the SQLite store's
    ``mlruns/`` (the repo's for the default store), else the repo's ``exp/figures``. Created."""
    if figures_dir:
        out = Path(figures_dir)
    elif uri.startswith("sqlite:///") and uri[len("sqlite:///"):].startswith("/"):
        out = Path(uri[len("sqlite:///"):]).parent.parent / "exp" / "figures"
    else:
        out = REPO / "exp" / "figures"
    out.mkdir(parents=True, exist_ok=True)
    return out


def figure_path(folder: str | os.PathLike, experiment: str | Sequence[str], name: str) -> Path:
    """``folder/<experiment>_<name>.png``: the experiment(s) a figure shows are in its file name, so the
    figures of a second experiment (or of the demo plus a sweep) never overwrite the first's.

    A list of experiments is joined with ``+`` (``demo+demo-prune-grid_pruning_curve.png``); characters a
    file name should not hold become ``-``.
    """
    names = [experiment] if isinstance(experiment, str) else list(experiment)
    stem = "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(n)).strip("-") or "experiment" for n in names)
    return Path(folder) / f"{stem}_{name}.png"


def _sqlite_missing(uri: str) -> bool:
    # Opening a sqlite URI that names no file would silently create an empty store: treat it as absent.
    return uri.startswith("sqlite:///") and not uri.endswith(":memory:") and not Path(uri[len("sqlite:///"):]).exists()


def load_runs(tracking_uri: str, experiment: str | Sequence[str]) -> pd.DataFrame:
    """Every run of ``experiment`` (a name or several, e.g. the demo pipeline and a sweep) as one row, like
    ``mlflow.search_runs``.

    Columns: ``run_id, run_name, experiment_id, experiment, status, start_time, end_time, parent_run_id, stage,
    kind, optuna_study, optuna_trial, artifact_uri, label`` plus ``metrics.*`` (latest values), ``params.*`` and
    ``tags.*``; ``label`` (:func:`run_labels`) names each run uniquely. An absent store or experiment gives an
    empty frame with the base columns (:func:`require_runs` turns that into an error). Rows are sorted by
    start time. ``df.attrs``: ``tracking_uri`` (for the artifact helpers), ``experiments`` (the names asked
    for) and ``missing_experiments``.
    """
    from mlflow import MlflowClient

    names = [experiment] if isinstance(experiment, str) else list(experiment)
    empty = pd.DataFrame(columns=_BASE_COLUMNS)
    empty.attrs.update(tracking_uri=tracking_uri, experiments=names, missing_experiments=list(names))
    if _sqlite_missing(tracking_uri):
        return empty
    client = MlflowClient(tracking_uri)
    found = {n: client.get_experiment_by_name(n) for n in names}
    ids = [e.experiment_id for e in found.values() if e is not None]
    id_names = {e.experiment_id: n for n, e in found.items() if e is not None}
    empty.attrs["missing_experiments"] = [n for n, e in found.items() if e is None]
    if not ids:
        return empty
    rows, token = [], None
    for _page in range(10_000):  # bounded: 10M runs is far beyond any store a notebook reads
        page = client.search_runs(ids, max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "experiment_id": run.info.experiment_id,
                   "experiment": id_names.get(run.info.experiment_id), "status": run.info.status, "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
                   "end_time": pd.to_datetime(run.info.end_time, unit="ms") if run.info.end_time else pd.NaT,
                   "parent_run_id": tags.get("mlflow.parentRunId"), "stage": tags.get("stage"),
                   "kind": tags.get("kind"), "optuna_study": tags.get("optuna_study"),
                   "optuna_trial": tags.get("optuna_trial"), "artifact_uri": run.info.artifact_uri}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    df = pd.DataFrame(rows, columns=None) if rows else empty.copy()
    for col in _BASE_COLUMNS:
        if col not in df:
            df[col] = None
    df = df.sort_values("start_time", kind="stable").reset_index(drop=True)
    df["label"] = run_labels(df).to_numpy()
    df.attrs.update(empty.attrs)
    return df


def run_labels(runs: pd.DataFrame) -> pd.Series:
    """A unique, readable name per run (index = the frame's), so that no figure keys two runs alike.

    Sweep trials: ``trial <n>``; a stage run inside a trial: ``trial <n>/<stage>``; a sweep's teacher:
    ``teacher:<stage>``; a pipeline stage: ``<stage>``; other runs: the run name. Labels that still collide
    (two experiments, two pipelines, two studies) get the experiment name in front, then the run name's
    parent, then the run id's first 8 characters.
    """
    if runs.empty:
        return pd.Series([], index=runs.index, dtype=object)
    by_id = runs.set_index("run_id")

    def base(row) -> str:
        if row.get("kind") == "trial":
            return f"trial {row.get('optuna_trial')}"
        parent = row.get("parent_run_id")
        if row.get("stage") is not None and parent in by_id.index and by_id.at[parent, "kind"] == "trial":
            return f"trial {by_id.at[parent, 'optuna_trial']}/{row['stage']}"
        if row.get("kind") == "use" and row.get("stage") is not None and row.get("tags.teacher") == "true":
            return f"teacher:{row['stage']}"
        return str(row.get("stage") or row.get("run_name"))

    labels = pd.Series([base(r) for _, r in runs.iterrows()], index=runs.index, dtype=object)
    for prefix in (runs.get("experiment"), runs.get("parent_run_id").map(
            lambda p: by_id.at[p, "run_name"] if p in by_id.index else None), runs["run_id"].str[:8]):
        dup = labels.duplicated(keep=False)
        if not dup.any() or prefix is None:
            continue
        labels[dup] = [f"{pre}/{lab}" if pre else lab for pre, lab in zip(prefix[dup], labels[dup])]
    return labels


def require_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` when every experiment asked for is in the store, else a ``LookupError`` naming the store and
    the missing experiments: a headless run (``jupyter execute``, papermill) then exits non-zero instead of
    saving empty figures."""
    missing = runs.attrs.get("missing_experiments") or ([] if not runs.empty else runs.attrs.get("experiments", []))
    if missing or runs.empty:
        uri = runs.attrs.get("tracking_uri")
        where = "no such store" if uri and _sqlite_missing(uri) else "not in the store"
        makers = [f"{name!r} is made by `{command}`" for name in missing if (command := experiment_command(name))]
        hint = "; ".join(makers) or "run the pipeline or sweep that logs it"
        raise LookupError(f"experiment(s) {', '.join(map(repr, missing)) or '?'} {where} at {uri}: {hint}; "
                          "or point tracking_uri/experiment elsewhere")
    return runs


def _config_names(pattern: str) -> dict[str, Path]:
    """``{name: config file}`` for the repo's configs matching ``pattern`` that set a top-level ``name:``."""
    found = {}
    for path in sorted(REPO.glob(pattern)):
        match = re.search(r"^name:\s*['\"]?([^'\"\s#]+)", path.read_text(), flags=re.MULTILINE)
        if match:
            found[match.group(1)] = path.relative_to(REPO)
    return found


def _make_target(config: Path) -> str | None:
    # the Makefile target whose recipe runs ``config`` (``make demo`` for the demo pipeline)
    makefile = REPO / "Makefile"
    target = None
    for line in makefile.read_text().splitlines() if makefile.is_file() else ():
        if re.match(r"^[A-Za-z0-9_.-]+:", line):
            target = line.split(":", 1)[0]
        elif line.startswith("\t") and str(config) in line and target:
            return target
    return None


def experiment_command(name: str) -> str | None:
    """The command that logs the MLflow experiment ``name``, read off the repo's configs, or None.

    A pipeline's experiment is its config's ``name`` (``make demo``, or ``python -m experiments.pipeline
    --config ...``); a sweep's is its study: the sweep config's ``name``, with ``-grid`` for ``--grid`` and
    ``-snapshots`` for ``--snapshots``. A notebook asked for an experiment that is not in the store names it,
    so the fix for a missing sweep is the sweep, not ``make demo`` again.
    """
    pipelines = _config_names("experiments/configs/*/pipeline.yaml")
    if name in pipelines:
        target = _make_target(pipelines[name])
        return f"make {target}" if target else f"python -m experiments.pipeline --config {pipelines[name]}"
    for sweep, config in _config_names("sweeps/configs/*.yaml").items():
        for suffix, flag in (("", ""), ("-grid", " --grid"), ("-snapshots", " --snapshots")):
            if name == sweep + suffix:
                return f"python -m sweeps.prune_sweep --config {config}{flag}"
    return None


def figure_series(fig) -> list[str]:
    """What a figure plots, one entry per series: legend entries of every axes, and the rows of heatmaps
    (their y tick labels), first appearance order; a notebook prints it so a headless run can be checked."""
    out: list[str] = list(dict.fromkeys(t.get_text() for legend in fig.legends for t in legend.get_texts()))
    for ax in fig.axes:
        legend = ax.get_legend()
        names = [t.get_text() for t in legend.get_texts()] if legend is not None else []
        if ax.images:
            names += [t.get_text() for t in ax.get_yticklabels()]
        out += [n for n in names if n and n not in out]
    return out


def _keep_attrs(new: pd.DataFrame, old: pd.DataFrame) -> pd.DataFrame:
    new.attrs.update(old.attrs)
    return new


def stage_runs(runs: pd.DataFrame, stages: Iterable[str] | None = None, *, pipeline: str | None = "latest") -> pd.DataFrame:
    """Stage runs (tag ``stage``), optionally only ``stages``, of one pipeline parent run.

    ``pipeline``: ``"latest"`` (the most recently started ``kind=pipeline`` run), a parent run id, or
    ``None`` for stage runs of every pipeline (and of sweep trials).
    """
    if runs.empty:
        return runs
    out = runs[runs["stage"].notna()]
    if stages is not None:
        out = out[out["stage"].isin(list(stages))]
    if pipeline is not None:
        parents = runs[runs["kind"] == "pipeline"]
        if pipeline == "latest":
            if parents.empty:
                return _keep_attrs(out.iloc[0:0], runs)
            pipeline = parents.iloc[-1]["run_id"]
        out = out[out["parent_run_id"] == pipeline]
    return _keep_attrs(out, runs)


def trial_runs(runs: pd.DataFrame, study: str | None = None) -> pd.DataFrame:
    """Sweep trial runs (tag ``kind=trial``), optionally of one study."""
    if runs.empty:
        return runs
    out = runs[runs["kind"] == "trial"]
    if study is not None:
        out = out[out["optuna_study"] == study]
    return _keep_attrs(out, runs)


def _label(row: pd.Series) -> str:
    label = row.get("label")
    if isinstance(label, str) and label:
        return label  # from run_labels, unique over the frame load_runs read
    if row.get("kind") == "trial":
        return f"trial {row.get('optuna_trial')}"
    return str(row.get("stage") or row.get("run_name"))


def metric_histories(runs: pd.DataFrame, metrics: Sequence[str], tracking_uri: str | None = None) -> pd.DataFrame:
    """Long frame ``run_id, label, metric, step, value`` with every logged step of ``metrics``.

    Only (run, metric) pairs the run actually has are queried, so asking for absent metrics costs nothing.
    A run that logged ``distill_loss`` (a pruning stage that distils) has no ``train_loss`` rows: its training
    loss is the distillation loss (about -1) plus the sparsity penalty, on another scale than the AAM-softmax
    loss of the training stages, so it is read as ``distill_loss`` and plotted apart.
    """
    from mlflow import MlflowClient

    rows: list[dict] = []
    uri = tracking_uri or runs.attrs.get("tracking_uri")
    if runs.empty or uri is None:
        return pd.DataFrame(columns=["run_id", "label", "metric", "step", "value"])
    client = MlflowClient(uri)
    for order, (_, row) in enumerate(runs.iterrows()):
        distilled = pd.notna(row.get(f"metrics.{DISTILL_LOSS}", np.nan))
        for key in metrics:
            if pd.isna(row.get(f"metrics.{key}", np.nan)) or (key == "train_loss" and distilled):
                continue
            for m in client.get_metric_history(row["run_id"], key):
                rows.append({"run_id": row["run_id"], "label": _label(row), "metric": key,
                             "step": m.step, "value": m.value, "_order": order})
    out = pd.DataFrame(rows, columns=["run_id", "label", "metric", "step", "value", "_order"])
    # runs keep the order of ``runs`` (start time: s1 before s2), so legends and colours follow the pipeline
    out = out.sort_values(["_order", "metric", "step"], kind="stable").drop(columns="_order")
    return out.reset_index(drop=True)


def missing_note(runs: pd.DataFrame, metrics: Sequence[str] = (), what: str = "") -> str:
    """A one-line note naming the ``metrics`` no run has (empty string when all exist)."""
    if runs.empty:
        return f"note: no runs{' for ' + what if what else ''} in this store/experiment."
    absent = [m for m in metrics if f"metrics.{m}" not in runs or runs[f"metrics.{m}"].isna().all()]
    if not absent:
        return ""
    return (f"note: no run{' of ' + what if what else ''} has {', '.join(absent)} yet "
            "(logged by the pruning stages and sweeps); plotted what exists.")


# --------------------------------------------------------------------------------------- pruning curve

def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(df[name], errors="coerce") if name in df else pd.Series(np.nan, index=df.index)


def _target_sparsity(df: pd.DataFrame) -> pd.Series:
    # Sweep trials log it as a param; pipeline prune stages as a per-step metric (its last value is the
    # final target) or inside the flattened stage config (e.g. ``prune.target_sparsity``).
    out = _col(df, "params.target_sparsity")
    out = out.fillna(_col(df, "metrics.target_sparsity"))
    for col in sorted(c for c in df.columns if c.startswith("params.") and c.endswith(".target_sparsity")):
        out = out.fillna(_col(df, col))
    return out


def _fill_params_from_init(df: pd.DataFrame, params: pd.Series) -> pd.Series:
    # The eval stage logs params_total only; its encoder is the one of the stage named by its ``init``
    # param (a sibling run under the same parent).
    if "params.init" not in df:
        return params
    params = params.copy()
    for idx in df.index[params.isna() & df["params.init"].notna()]:
        sib = df[(df["parent_run_id"] == df.at[idx, "parent_run_id"]) & (df["stage"] == df.at[idx, "params.init"])]
        if not sib.empty:
            params[idx] = _col(sib, "metrics.params_encoder").iloc[-1]
    return params


def teacher_reference(runs: pd.DataFrame, split: str = "test", run_id: str | None = None) -> dict | None:
    """The dense teacher's ``{run_id, label, params_encoder, eer_pct, mindcf_0.01, mindcf_0.05}`` or None.

    ``run_id`` picks it; else a sweep's teacher run (tag ``teacher=true``, the latest); otherwise the largest
    encoder among the latest pipeline runs of
    :data:`TEACHER_STAGES` that report both params and ``{split}_eer_pct`` (a pruning pipeline's final
    eval stage has a smaller encoder, so it is not mistaken for the teacher).
    """
    if runs.empty:
        return None
    df = runs.copy()
    df["_params"] = _fill_params_from_init(df, _col(df, "metrics.params_encoder"))
    df["_eer"] = _col(df, f"metrics.{split}_eer_pct")
    teachers = df[(df.get("tags.teacher", pd.Series(None, index=df.index)) == "true") & df["_eer"].notna()]
    if run_id is not None:
        cand = df[df["run_id"] == run_id]
    elif not teachers.empty:  # a sweep names its fixed teacher: that is the reference, not the demo's s3
        cand = teachers.sort_values("start_time", ascending=False).iloc[:1]
    else:
        cand = df[df["stage"].isin(TEACHER_STAGES) & (df["kind"] != "trial") & df["_params"].notna() & df["_eer"].notna()]
        if cand.empty:
            return None
        cand = cand[cand["_params"] == cand["_params"].max()]
        order = {s: i for i, s in enumerate(TEACHER_STAGES)}
        # latest pipeline first, then the preferred stage within it
        cand = cand.assign(_rank=cand["stage"].map(order)).sort_values(["start_time", "_rank"], ascending=[False, True])
        latest_parent = cand.iloc[0]["parent_run_id"]
        cand = cand[cand["parent_run_id"] == latest_parent].sort_values("_rank")
    if cand.empty:
        return None
    row = cand.iloc[0]
    out = {"run_id": row["run_id"], "label": _label(row), "params_encoder": float(row["_params"]),
           "eer_pct": float(row["_eer"]),
           "mindcf_0.01": float(_col(cand, f"metrics.{split}_mindcf_0.01").iloc[0]),
           "mindcf_0.05": float(_col(cand, f"metrics.{split}_mindcf_0.05").iloc[0])}
    for metric in ("eer_pct", "mindcf_0.01", "mindcf_0.05"):  # speaker-bootstrap interval, when logged
        for side in ("low", "high"):
            value = _col(cand, f"metrics.{split}_{metric}_ci_{side}").iloc[0]
            if not pd.isna(value):
                out[f"{metric}_ci_{side}"] = float(value)
    return out


def pruning_points(runs: pd.DataFrame, split: str = "test", teacher: Mapping | None = None) -> pd.DataFrame:
    """One row per evaluated model: ``source`` (dense | pruned | trial), ``run_id``, ``label``,
    ``target_sparsity``, ``achieved_sparsity``, ``params_encoder``, ``eer_pct``, ``mindcf_0.01``,
    ``mindcf_0.05``, ``val_eer_pct``, ``budget`` (a sweep trial's fidelity, the param ``budget``: the fraction
    of the reference's epochs it trained; NaN for pipeline runs), ``pareto``, and the speaker-bootstrap
    intervals ``<metric>_ci_low`` / ``<metric>_ci_high`` (NaN where the run logged none).

    Points are the sweep trial runs and the pipeline stage runs that report ``{split}_eer_pct``; stage runs
    nested in a trial are left out (the trial run carries the numbers). ``achieved_sparsity`` is the
    logged metric when there is one, else ``1 - params_encoder / teacher params``. ``pareto`` marks the
    non-dominated points in (params_encoder, eer_pct) among the pruned and trial ones.
    """
    columns = ["source", "run_id", "label", "stage", "target_sparsity", "achieved_sparsity", "params_encoder",
               "eer_pct", "mindcf_0.01", "mindcf_0.05", "val_eer_pct", "budget", "pareto"]
    ci_columns = [f"{m}_ci_{side}" for m in ("eer_pct", "mindcf_0.01", "mindcf_0.05") for side in ("low", "high")]
    columns += ci_columns
    if runs.empty:
        return pd.DataFrame(columns=columns)
    teacher = teacher if teacher is not None else teacher_reference(runs, split)
    trial_ids = set(runs.loc[runs["kind"] == "trial", "run_id"])
    df = runs[(runs["kind"] == "trial") | (runs["stage"].notna() & ~runs["parent_run_id"].isin(trial_ids))]
    params = _fill_params_from_init(runs, _col(runs, "metrics.params_encoder"))
    # a prune stage may end before its encoder is shrunk: its expected size is the best estimate we have
    params = params.fillna(_col(runs, "metrics.expected_params"))
    out = pd.DataFrame({
        "run_id": df["run_id"], "label": [_label(r) for _, r in df.iterrows()], "stage": df["stage"],
        "target_sparsity": _target_sparsity(df), "achieved_sparsity": _col(df, "metrics.achieved_sparsity"),
        "params_encoder": params.loc[df.index], "eer_pct": _col(df, f"metrics.{split}_eer_pct"),
        "mindcf_0.01": _col(df, f"metrics.{split}_mindcf_0.01"), "mindcf_0.05": _col(df, f"metrics.{split}_mindcf_0.05"),
        "val_eer_pct": _col(df, "metrics.val_eer_pct"),
        "budget": pd.to_numeric(_col(df, "params.budget"), errors="coerce"),
    } | {c: _col(df, f"metrics.{split}_{c}") for c in ci_columns}, index=df.index)
    out = out[out["eer_pct"].notna()]
    if teacher is not None and teacher.get("params_encoder"):
        derived = 1.0 - out["params_encoder"] / float(teacher["params_encoder"])
        out["achieved_sparsity"] = out["achieved_sparsity"].fillna(derived.clip(lower=0.0))
    is_trial = df.loc[out.index, "kind"] == "trial"
    pruned = df.loc[out.index, "stage"].isin(PRUNE_STAGES) | (out["achieved_sparsity"].fillna(0) > 0.005)
    out.insert(0, "source", np.where(is_trial, "trial", np.where(pruned, "pruned", "dense")))
    cand = (out["source"] != "dense") & out["params_encoder"].notna()
    out["pareto"] = False
    if cand.any():
        out.loc[cand, "pareto"] = pareto_mask(out.loc[cand, "params_encoder"], out.loc[cand, "eer_pct"])
    return out[columns].reset_index(drop=True)


def pareto_mask(params: Sequence[float], eer: Sequence[float]) -> np.ndarray:
    """Boolean mask of the points no other point dominates when minimising both ``params`` and ``eer``.

    A point is dominated when another is <= in both and < in one; exact duplicates are all kept. NaN
    points are never on the front.
    """
    p = np.asarray(params, dtype=float)
    e = np.asarray(eer, dtype=float)
    if p.shape != e.shape:
        raise ValueError(f"pareto_mask: {p.shape} params vs {e.shape} eer")
    ok = ~(np.isnan(p) | np.isnan(e))
    mask = np.zeros(p.shape, dtype=bool)
    idx = np.flatnonzero(ok)
    # sort by params then eer: a point is on the front iff its eer beats every point before it
    # (ties in params need the group's best eer, handled by the <= / < pair below)
    order = idx[np.lexsort((e[idx], p[idx]))]
    best = math.inf
    best_p = None
    for i in order:
        if e[i] < best or (e[i] == best and p[i] == best_p):
            mask[i] = True
            best, best_p = e[i], p[i]
    return mask


def study_pareto(storage: str, study_name: str) -> pd.DataFrame:
    """The Pareto front (best trials) of an Optuna study: ``number, mlflow_run_id, params.*, values.*``.

    Read directly with optuna (the ``sweeps`` package need not be importable from a notebook); an absent
    SQLite file gives an empty frame instead of a new, empty study database.
    """
    import optuna

    if _sqlite_missing(storage):
        return pd.DataFrame(columns=["number", "mlflow_run_id"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    names = study.metric_names or ([f"value_{i}" for i in range(len(study.directions))]
                                   if len(study.directions) > 1 else ["value"])
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return pd.DataFrame(columns=["number", "mlflow_run_id"])
    rows = []
    for t in study.best_trials:
        row = {"number": t.number, "mlflow_run_id": t.user_attrs.get("mlflow_run_id")}
        row.update({f"params.{k}": v for k, v in t.params.items()})
        row.update({f"values.{n}": v for n, v in zip(names, t.values)})
        rows.append(row)
    return pd.DataFrame(rows).sort_values("number").reset_index(drop=True)


def _draw_intervals(ax, points: pd.DataFrame, x: str, metric: str, color) -> None:
    """Vertical bars for the speaker-bootstrap 95 % intervals (``<metric>_ci_low/high``) where present;
    no caps and no legend entry, so the figure's series stay those of the points."""
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low not in points or high not in points:
        return
    sel = points[points[low].notna() & points[high].notna() & points[x].notna() & points[metric].notna()]
    if len(sel):  # vlines, not errorbar: a percentile interval need not contain the point estimate
        ax.vlines(sel[x].astype(float), sel[low].astype(float), sel[high].astype(float), colors=color,
                  linewidth=1.0, alpha=0.6, zorder=2)


BUDGET_COLORS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:cyan")


def _point_series(points: pd.DataFrame, styles: Mapping[str, Mapping]) -> list[tuple[str, pd.DataFrame, dict, bool]]:
    """(legend label, rows, marker style, joined by a line) per plotted series: one per source, and the sweep
    trials split by budget when they hold several (a study and its promoted re-runs at a higher budget)."""
    out = []
    for source, style in styles.items():
        sel = points[points["source"] == source] if len(points) else points
        if not len(sel):
            continue
        budgets = sorted(sel["budget"].dropna().unique()) if source == "trial" and "budget" in sel else []
        if len(budgets) < 2:
            out.append((source, sel, dict(style), False))
            continue
        for i, budget in enumerate(budgets):
            out.append((f"trials, budget {budget:g}", sel[sel["budget"] == budget],
                        dict(style, color=BUDGET_COLORS[i % len(BUDGET_COLORS)]), True))
    return out


METRIC_NAMES = {"eer_pct": "EER (%)", "mindcf_0.01": "minDCF (P_target 0.01)", "mindcf_0.05": "minDCF (P_target 0.05)"}


def metric_label(metric: str, split: str = "test") -> str:
    """An axis label a paper can print: ``Test EER (%)``, ``Val minDCF (P_target 0.01)``."""
    return f"{split[:1].upper()}{split[1:]} {METRIC_NAMES.get(metric, metric)}"


def human_count(value: float, _pos: int | None = None) -> str:
    """A parameter count in human units, for tick labels: 40000 -> ``40k``, 406720 -> ``407k``,
    1.5e6 -> ``1.5M`` (a ``FuncFormatter``; scientific ``1e5`` offsets are hard to read off a plot)."""
    size = abs(value)
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if size >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _teacher_name(teacher: Mapping) -> str:
    # a sweep's teacher run is labelled "teacher:s2": the legend says "teacher" once
    label = str(teacher.get("label", ""))
    return label.split(":", 1)[1] if label.startswith("teacher:") else label


def _teacher_legend(teacher: Mapping, metrics: Sequence[str]) -> str:
    """One legend entry for the teacher's line and star across every panel: ``teacher s2 (EER 17.00 %,
    minDCF 0.950)``."""
    short = {"eer_pct": "EER", "mindcf_0.01": "minDCF", "mindcf_0.05": "minDCF(0.05)"}
    values = [f"{short.get(m, m)} {teacher[m]:.2f} %" if m.endswith("_pct") else f"{short.get(m, m)} {teacher[m]:.3f}"
              for m in metrics if teacher.get(m) is not None and not math.isnan(teacher[m])]
    return f"teacher {_teacher_name(teacher)}" + (f" ({', '.join(values)})" if values else "")


def _point_text(row: pd.Series) -> str:
    # trials are told apart by their target; pipeline models by their stage name
    if row["source"] != "trial":
        return str(row["label"])
    return f"{row['target_sparsity']:.2f}" if pd.notna(row["target_sparsity"]) else ""


def _point_labels(ax, items: Sequence[tuple[float, float, str, Any]], tolerance: float = 0.015) -> list:
    """Annotate points so that none overprints another: points within ``tolerance`` of both axes' spans of
    one another (the pruned stages that share one encoder, grid targets that reach the same sparsity) get
    one label listing them all. :func:`_separate_labels` then moves apart the labels that still touch."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    groups: list[list] = []
    for x, y, text, colour in items:
        near = next((g for g in groups if abs(x - g[0][0]) <= tolerance * abs(x1 - x0)
                     and abs(y - g[0][1]) <= tolerance * abs(y1 - y0)), None)
        if near is None:
            groups.append([(x, y, text, colour)])
        else:
            near.append((x, y, text, colour))
    out = []
    for group in groups:
        text = ", ".join(dict.fromkeys(t for _, _, t, _ in group if t))
        if text:
            label = ax.annotate(text, group[0][:2], textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=group[0][3], annotation_clip=False)
            label.set_in_layout(False)  # a long label may run past the axes: it must not shrink them
            out.append(label)
    return out


def _separate_labels(fig, labels: Sequence, max_moves: int = 40) -> None:
    """Move each annotation up, a line at a time, until it overlaps none placed before it (lowest first).

    Text extents exist only once the figure is laid out, so this draws the figure first."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed: list = []
    for label in sorted(labels, key=lambda a: (a.xy[1], a.xy[0])):
        for _ in range(max_moves):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.xyann = (label.xyann[0], label.xyann[1] + box.height * 72.0 / fig.dpi + 1.0)
        placed.append(label.get_window_extent(renderer))


def plot_pruning_curve(points: pd.DataFrame, teacher: Mapping | None = None, *, pareto_run_ids: Iterable[str] | None = None,
                       metrics: Sequence[str] = ("eer_pct", "mindcf_0.01"), split: str = "test"):
    """EER/minDCF against encoder parameters (left column) and achieved sparsity (right column).

    Dense stages are grey squares, pruning-pipeline models circles, sweep trials triangles (annotated
    with their target sparsity; trials of several budgets, e.g. a study and its promoted re-runs, one colour
    per budget, each budget's points joined by a thin line: two fidelities side by side); the Pareto front
    (``pareto_run_ids`` from an Optuna study, else the
    ``pareto`` column) is joined by a line; the teacher is a dashed horizontal line and a star. Points with
    ``<metric>_ci_low/high`` columns get their 95 % interval as a vertical bar.

    Written to be read in a paper: parameters in human units (``40k``, ``400k``), sparsity on [0, 1], labels
    of coinciding points merged and the others kept apart, one legend for every panel outside the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(len(metrics), 2, figsize=(12.5, 3.6 * len(metrics)), squeeze=False, layout="constrained")
    front = points["run_id"].isin(set(pareto_run_ids)) if pareto_run_ids is not None else points.get("pareto", False)
    front = pd.Series(front, index=points.index).fillna(False).astype(bool) if len(points) else pd.Series(dtype=bool)
    styles = {"dense": dict(marker="s", color="0.45"), "pruned": dict(marker="o", color="tab:blue"),
              "trial": dict(marker="^", color="tab:orange")}
    series = _point_series(points, styles)
    colors = {run: style["color"] for _, sel, style, _ in series for run in sel["run_id"]}  # the labels' colours
    teacher_label = _teacher_legend(teacher, metrics) if teacher is not None else ""
    labels = []
    for r, metric in enumerate(metrics):
        for c, x in enumerate(("params_encoder", "achieved_sparsity")):
            ax = axes[r, c]
            for label, sel, style, joined in series:
                # unclipped: a dense point sits on the sparsity axis' left edge (0) and stays whole
                ax.scatter(sel[x], sel[metric], s=36, label=label, alpha=0.85, clip_on=False, **style)
                _draw_intervals(ax, sel, x, metric, style["color"])
                if joined:
                    line = sel[sel[x].notna() & sel[metric].notna()].sort_values(x)
                    ax.plot(line[x], line[metric], color=style["color"], linewidth=0.8, alpha=0.6, zorder=1)
            if len(points) and front.any():
                f = points[front].sort_values(x)
                ax.plot(f[x], f[metric], color="tab:red", linewidth=1.3, zorder=3)
                ax.scatter(f[x], f[metric], s=90, facecolors="none", edgecolors="tab:red", linewidths=1.4,
                           label="Pareto front", zorder=4, clip_on=False)
            if teacher is not None and teacher.get(metric) is not None and not math.isnan(teacher[metric]):
                ax.axhline(teacher[metric], color="k", linestyle="--", linewidth=1)
                if teacher.get(f"{metric}_ci_low") is not None and teacher.get(f"{metric}_ci_high") is not None:
                    ax.axhspan(teacher[f"{metric}_ci_low"], teacher[f"{metric}_ci_high"], color="k", alpha=0.07,
                               linewidth=0)  # the teacher's 95 % interval
                tx = teacher.get("params_encoder") if x == "params_encoder" else 0.0
                if tx is not None:  # the star with a dashed line: the legend shows both as one entry
                    ax.plot([tx], [teacher[metric]], marker="*", markersize=13, linestyle="--", linewidth=1, color="k",
                            zorder=5, clip_on=False, label=teacher_label)
            ax.set_xlabel("Encoder parameters" if x == "params_encoder" else "Achieved sparsity")
            ax.set_ylabel(metric_label(metric, split))
            ax.grid(True, color="0.9")
            if x == "params_encoder":
                ax.xaxis.set_major_formatter(FuncFormatter(human_count))
            else:
                ax.set_xlim(0.0, 1.0)  # a sparsity is a fraction: never a negative axis around dense-only points
            items = [(row[x], row[metric], _point_text(row), colors.get(row["run_id"], styles[row["source"]]["color"]))
                     for _, row in (points.iterrows() if len(points) else ())
                     if pd.notna(row[x]) and pd.notna(row[metric])]
            labels += _point_labels(ax, items)
            if not len(points):
                ax.text(0.5, 0.5, "no evaluated runs", transform=ax.transAxes, ha="center", color="0.5")
    _figure_legend(fig, axes.ravel(), fontsize=8)
    fig.suptitle(f"{metric_label('eer_pct', split).replace(' (%)', '')} / minDCF vs encoder size")
    _separate_labels(fig, labels)
    return fig


# ------------------------------------------------------------------------------------------ methods

# the run bench/pruning_curve.py logs its result (pruning_curve.json) and plot under
CURVE_SUMMARY_KIND = "curve_summary"
METHOD_STYLES = {"kd": ("KD (reference)", "C0", "-", "o"), "random": ("random structure", "C1", "-", "s"),
                 "task": ("task loss, no teacher", "C2", "-", "^"), "snapshot": ("KD, one-run snapshots", "C0", "--", "x")}
CONTROL_COLOURS = {"encoder_removed": "C3", "random_init": "C4"}


def load_curve_summary(tracking_uri: str, experiment: str = "pruning_curve") -> dict | None:
    """The latest method comparison bench/pruning_curve.py logged to ``experiment`` (its pruning_curve.json
    artifact), or None where there is none."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], f"tags.kind = '{CURVE_SUMMARY_KIND}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = _download(tracking_uri, runs[0].info.run_id, "pruning_curve.json", tmp)
        return None if path is None else json.loads(Path(path).read_text())


def plot_method_curve(result: Mapping):
    """Test EER (95 % intervals) against encoder parameters, encoder sparsity on the top axis: one line per
    pruning method, the one-run snapshot curve dashed, the teacher and the controls as horizontal bands (their
    intervals). ``result``: bench/pruning_curve.py's JSON."""
    import matplotlib.pyplot as plt

    dense = result["teacher"]["params_encoder"]
    fig, ax = plt.subplots(figsize=(9.0, 4.6), layout="constrained")
    teacher = result["teacher"]
    ax.axhspan(*teacher["eer_ci"], color="0.85", zorder=0, lw=0)
    ax.axhline(teacher["eer_pct"], color="0.3", lw=1.0, label=f"teacher (s2) {teacher['eer_pct']:.2f} %")
    for name, control in result.get("controls", {}).items():
        colour = CONTROL_COLOURS.get(name, "0.5")
        ax.axhspan(*control["eer_ci"], color=colour, alpha=0.12, zorder=0, lw=0)
        ax.axhline(control["eer_pct"], color=colour, lw=1.0, ls=":",
                   label=f"control: {name.replace('_', ' ')} {control['eer_pct']:.2f} %")
    series = [(m, [p for p in result.get("points", []) if p["method"] == m]) for m in ("kd", "random", "task")]
    series.append(("snapshot", result.get("snapshot_vs_grid", {}).get("points", [])))
    for shift, (method, points) in enumerate(series):
        if not points:
            continue
        label, colour, style, marker = METHOD_STYLES[method]
        points = sorted(points, key=lambda p: p["achieved_sparsity"])
        # methods side by side at the same target (2.5 % apart on the log axis), so no interval hides another
        x = [dense * (1 - p["achieved_sparsity"]) * 1.025 ** (shift - 1.5) for p in points]
        y = [p["eer_pct"] for p in points]
        err = [[p["eer_pct"] - p["eer_ci"][0] for p in points], [p["eer_ci"][1] - p["eer_pct"] for p in points]]
        ax.errorbar(x, y, yerr=err, color=colour, ls=style, marker=marker, ms=5, capsize=3, lw=1.4, label=label)
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.invert_xaxis()  # pruning goes to the right
    ax.set_xlabel("Encoder parameters (log scale)")
    ax.set_ylabel(f"{metric_label('eer_pct', result.get('test_list', 'test'))}, 95 % interval")
    kept = [dense * f for f in (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03)]
    ax.xaxis.set_major_locator(FixedLocator(kept))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([human_count(k) for k in kept])  # 407k, 203k, ...: the units on the axis
    # the same axis read as sparsity: a twin with the same (log, inverted) limits, ticks at round sparsities
    top = ax.twiny()
    top.set_xscale("log")
    top.set_xlim(ax.get_xlim())
    top.xaxis.set_major_locator(FixedLocator(kept))
    top.xaxis.set_minor_locator(NullLocator())
    top.set_xticklabels([f"{1 - k / dense:.2f}" for k in kept])
    top.set_xlabel("Encoder sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Pruning the demo encoder ({human_count(dense)} parameters), {result.get('test_list', 'test')} list",
                 fontsize=10, pad=28)
    fig.legend(loc="outside right center", fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------ structure

def _width(value: Any) -> float:
    if isinstance(value, Mapping):
        for key in ("kept", "num", "n", "width", "size"):
            if key in value:
                return float(value[key])
        raise ValueError(f"structure: cannot read a width from {value!r}")
    if isinstance(value, (list, tuple)):
        return float(len(value))  # a list of kept indices
    return float(value)


def _layers_frame(layers: Sequence[Mapping]) -> pd.DataFrame:
    rows = []
    for i, layer in enumerate(layers):
        row = {"layer": int(layer.get("layer", i))}
        for key, value in layer.items():
            kind = _KIND_ALIASES.get(str(key).lower())
            if kind is not None:
                row[kind] = _width(value)
        rows.append(row)
    df = pd.DataFrame(rows, columns=["layer", *KINDS])
    return df.set_index("layer").astype(float)


def parse_structure(obj: Any) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``structure.json`` content -> ``(kept, dense)`` frames indexed by layer, columns heads/ffn1/ffn2/conv.

    Accepted shapes (the pruning stage writes the first; the others keep older/other writers readable):
    ``{"layers": [{"heads": 3, "ffn1": 512, ...}, ...], "dense"|"original": [...] or {...}}``, a bare list of
    per-layer dicts, or a dict of per-kind lists ``{"heads": [...], ...}``. A width may be a number, a list
    of kept indices, or ``{"kept": n, "total": m}`` (the totals then give ``dense``). ``dense`` is None when
    the file does not say.
    """
    dense = None
    if isinstance(obj, Mapping) and "layers" in obj:
        layers = obj["layers"]
        ref = next((obj[k] for k in ("dense", "original", "full", "total") if k in obj), None)
        if isinstance(ref, Mapping) and not any(isinstance(v, Mapping) for v in ref.values()):
            ref = [ref] * len(layers)
        if ref is not None:
            dense = _layers_frame(ref)
    elif isinstance(obj, Mapping) and any(_KIND_ALIASES.get(str(k).lower()) for k in obj):
        lists = {_KIND_ALIASES[str(k).lower()]: v for k, v in obj.items() if _KIND_ALIASES.get(str(k).lower())}
        n = max(len(v) for v in lists.values())
        layers = [{k: v[i] for k, v in lists.items() if i < len(v)} for i in range(n)]
    elif isinstance(obj, list):
        layers = obj
    else:
        raise ValueError(f"structure: unrecognised layout (top-level {type(obj).__name__})")
    kept = _layers_frame(layers)
    totals = [{k: v["total"] for k, v in layer.items() if isinstance(v, Mapping) and "total" in v} for layer in layers]
    if dense is None and any(totals):
        dense = _layers_frame(totals)
    return kept, dense


def _encoder_config_structure(config: Mapping) -> tuple[pd.DataFrame, pd.DataFrame]:
    # dense widths as svlib.pruning.counting.dense_sizes (kept local: reading a JSON must not import torch)
    full = {"heads": config["num_attention_heads"], "ffn1": config["intermediate_size"],
            "ffn2": config["intermediate_size"], "conv": config["hidden_size"]}
    dense = _layers_frame([full] * int(config["num_hidden_layers"]))
    pruned = config.get("svlib_pruned_layers")
    return (_layers_frame(pruned) if pruned else dense.copy()), dense


def _download(uri: str, run_id: str, path: str, dst: str) -> Path | None:
    import mlflow

    # tqdm bars per small file would bury a notebook's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst,
                                                        tracking_uri=uri))
    except Exception:  # absent artifact: the caller reports what it did not find
        return None


def _artifact_paths(client, run_id: str, folder: str | None = None) -> set[str]:
    try:
        return {a.path for a in client.list_artifacts(run_id, folder)}
    except Exception:
        return set()


def load_structures(runs: pd.DataFrame, tracking_uri: str | None = None, *, include_dense: bool = True,
                    points: pd.DataFrame | None = None) -> dict[str, dict]:
    """Per-layer kept widths of every run that has ``structure.json`` (or a shrunk ``model/encoder``).

    Returns ``{run_id: {"label", "run_id", "run_ids", "names", "kept", "dense", "sparsity", "source"}}`` ordered
    by sparsity (dense first), one entry per distinct structure (:func:`_merge_identical`: runs that kept the
    same widths share one, keyed by the first); a stage run inside a sweep trial is left out (the trial run
    carries the trial's structure), where ``kept``/``dense`` are frames from :func:`parse_structure`.
    ``include_dense`` adds the teacher's dense structure from its ``model/encoder/config.json`` so a store
    without pruning runs still shows something (and pruned runs have a reference). ``points`` (from
    :func:`pruning_points`) supplies the achieved sparsity used in labels.
    """
    from mlflow import MlflowClient

    uri = tracking_uri or runs.attrs.get("tracking_uri")
    found: dict[str, dict] = {}
    if runs.empty or uri is None:
        return found
    client = MlflowClient(uri)
    sparsity = {} if points is None else dict(zip(points["run_id"], points["achieved_sparsity"]))
    teacher = teacher_reference(runs)
    trial_ids = set(runs.loc[runs["kind"] == "trial", "run_id"])
    with tempfile.TemporaryDirectory(prefix="svlib-structure-") as tmp:
        for _, row in runs.iterrows():
            if row["kind"] not in ("trial",) and row["stage"] not in PRUNE_STAGES and row["stage"] != "eval":
                continue
            if row["parent_run_id"] in trial_ids:
                continue
            names = _artifact_paths(client, row["run_id"])
            kept = dense = None
            if "structure.json" in names:
                path = _download(uri, row["run_id"], "structure.json", tmp)
                if path is not None:
                    kept, dense = parse_structure(json.loads(path.read_text()))
            elif "model" in names:
                path = _download(uri, row["run_id"], "model/encoder/config.json", tmp)
                config = json.loads(path.read_text()) if path is not None else {}
                if config.get("svlib_pruned_layers"):
                    kept, dense = _encoder_config_structure(config)
            if kept is None:
                continue
            s = sparsity.get(row["run_id"], float("nan"))
            found[row["run_id"]] = {"names": [_label(row)], "suffix": f" (sparsity {s:.2f})" if pd.notna(s) else "",
                                    "run_id": row["run_id"], "kept": kept, "dense": dense,
                                    "sparsity": s, "source": "trial" if row["kind"] == "trial" else "pruned"}
        if include_dense and teacher is not None and teacher["run_id"] not in found:
            path = _download(uri, teacher["run_id"], "model/encoder/config.json", tmp)
            if path is not None:
                kept, dense = _encoder_config_structure(json.loads(path.read_text()))
                found[teacher["run_id"]] = {"names": [f"teacher {_teacher_name(teacher)}"], "suffix": " (dense)",
                                            "run_id": teacher["run_id"], "kept": kept, "dense": dense, "sparsity": 0.0,
                                            "source": "dense"}
    dense_ref = next((v["kept"] for v in found.values() if v["source"] == "dense"), None)
    for v in found.values():
        if v["dense"] is None and dense_ref is not None and dense_ref.shape == v["kept"].shape:
            v["dense"] = dense_ref
    # merged in run order (a merged row reads "prune1, shrink, graft, ps1"), the teacher first; then by sparsity
    merged = _merge_identical(dict(sorted(found.items(), key=lambda kv: kv[1]["source"] != "dense")))
    return dict(sorted(merged.items(), key=lambda kv: (kv[1]["source"] != "dense", _sparsity_order(kv[1]),
                                                       kv[1]["names"][0])))


def _sparsity_order(entry: Mapping) -> float:
    # the achieved sparsity; without one (no points given), the fraction of widths removed ranks it among the others
    if pd.notna(entry["sparsity"]):
        return float(entry["sparsity"])
    return 1.0 - float(entry["kept"].to_numpy().sum()) / max(float(_dense_widths(entry).to_numpy().sum()), 1.0)


def _merge_identical(structures: Mapping[str, dict]) -> dict[str, dict]:
    """One entry per distinct structure: runs that kept the same widths in every layer (graft and the
    fine-tunes after it share one shrunk encoder; a sweep's dense trial is the teacher's encoder) become one
    row labelled with all their names (``graft, ps1, ps2, ps3 (sparsity 0.42)``), keyed by the first run.
    Sets each entry's ``label`` and ``run_ids``."""
    merged: dict[str, dict] = {}
    by_widths: dict[tuple, str] = {}
    for run_id, entry in structures.items():
        key = (entry["kept"].shape, tuple(entry["kept"].to_numpy().ravel().tolist()))
        first = by_widths.setdefault(key, run_id)
        if first == run_id:
            merged[run_id] = dict(entry, names=list(entry["names"]), run_ids=[run_id])
            continue
        kept = merged[first]
        kept["names"] += entry["names"]
        kept["run_ids"].append(run_id)
        if not kept["suffix"]:
            kept["suffix"], kept["sparsity"] = entry["suffix"], entry["sparsity"]
    for entry in merged.values():
        entry["label"] = ", ".join(entry["names"]) + entry["suffix"]
    return merged


def limit_structures(structures: Mapping[str, Mapping], max_models: int) -> dict[str, Mapping]:
    """At most ``max_models`` of :func:`load_structures`' entries: the dense teacher always, the others
    spread evenly over the sparsities (so a sweep's many trials never push the reference out)."""
    if max_models < 1:
        raise ValueError(f"limit_structures: max_models must be >= 1, got {max_models}")
    dense = [k for k, v in structures.items() if v["source"] == "dense"][:max_models]
    rest = [k for k in structures if k not in dense]
    room = max_models - len(dense)
    if len(rest) > room:
        rest = [rest[i] for i in sorted({round(j * (len(rest) - 1) / max(room - 1, 1)) for j in range(room)})] \
            if room > 0 else []
    keep = set(dense) | set(rest)
    return {k: v for k, v in structures.items() if k in keep}


def _dense_widths(entry: Mapping) -> pd.DataFrame:
    kept, dense = entry["kept"], entry["dense"]
    if dense is None:
        # without the dense widths the best scale is each kind's own maximum
        dense = pd.DataFrame({k: kept[k].max() for k in kept}, index=kept.index)
    return dense


def _fraction(entry: Mapping) -> pd.DataFrame:
    return (entry["kept"] / _dense_widths(entry).replace(0, np.nan)).fillna(0.0)


def plot_structure_heatmap(structures: Mapping[str, Mapping]):
    """One heatmap per kind (heads, ffn1, ffn2, conv): rows = runs (by sparsity), columns = layers,
    colour = fraction kept, text = kept count."""
    import matplotlib.pyplot as plt

    if not structures:
        raise ValueError("plot_structure_heatmap: no structures")
    keys = list(structures)
    labels = [structures[k].get("label", k) for k in keys]
    n_layers = max(len(s["kept"]) for s in structures.values())
    fig, axes = plt.subplots(len(KINDS), 1, figsize=(max(6.0, 0.45 * n_layers + 3), 1.0 + len(KINDS) * (0.45 * len(labels) + 0.9)),
                             squeeze=False)
    for ax, kind in zip(axes[:, 0], KINDS):
        frac = np.full((len(labels), n_layers), np.nan)
        count = np.full((len(labels), n_layers), np.nan)
        for i, key in enumerate(keys):
            f = _fraction(structures[key])[kind].to_numpy()
            frac[i, :len(f)] = f
            k = structures[key]["kept"][kind].to_numpy()
            count[i, :len(k)] = k
        im = ax.imshow(frac, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        if n_layers * len(labels) <= 400:
            for (i, j), v in np.ndenumerate(count):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] < 0.6 else "black")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(n_layers), [str(j) for j in range(n_layers)], fontsize=7)
        ax.set_title(f"{kind}: fraction kept per layer", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    return fig


KIND_TITLES = {"heads": "attention heads", "ffn1": "FFN 1 units", "ffn2": "FFN 2 units", "conv": "conv channels"}


def plot_structure_bars(structures: Mapping[str, Mapping]):
    """Bar charts per kind: kept width per layer, one bar group per layer, one bar per (distinct) structure.

    Layers are whole numbers on the x axis (one tick per layer), and the legend sits outside the panels,
    so no bar is hidden behind it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not structures:
        raise ValueError("plot_structure_bars: no structures")
    fig, axes = plt.subplots(2, 2, figsize=(13, 6.5), squeeze=False, layout="constrained")
    width = 0.8 / len(structures)
    n_layers = max(len(entry["kept"]) for entry in structures.values())
    for ax, kind in zip(axes.ravel(), KINDS):
        for i, (key, entry) in enumerate(structures.items()):
            kept = entry["kept"][kind]
            ax.bar(np.arange(len(kept)) + (i - (len(structures) - 1) / 2) * width, kept.to_numpy(), width,
                   label=entry.get("label", key))
        ax.set_title(f"{KIND_TITLES[kind]} kept per layer", fontsize=9)
        ax.set_xlabel("Layer")
        ax.set_ylabel(f"Kept {KIND_TITLES[kind].split()[-1]}")
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a layer is a whole number, so is a width
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, axis="y", color="0.9")
    _figure_legend(fig, axes[:1, 0], fontsize=7)
    return fig


# ------------------------------------------------------------------------------------ training curves

def _figure_legend(fig, axes, **kwargs) -> None:
    """One legend for every panel (a run keeps its colour across them), outside the axes so it hides no line;
    the first handle of each label, panel order."""
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper", **kwargs)


def plot_training_curves(histories: pd.DataFrame, metrics: Sequence[str], *, ncols: int = 2, logy: Sequence[str] = ()):
    """One panel per metric (in ``metrics`` order), one line per run; x = progress through the run's own stage.

    ``histories`` comes from :func:`metric_histories`. Stages differ a hundredfold in length (the demo's s1 and
    s3: 30 steps, s2: 1,850), so on a shared step axis the short ones are squashed at x = 0: each run is drawn
    against the fraction of its steps (its last logged step), its length in the legend (``s2 (1,850 steps)``).
    A run that logged a metric only at step 0 (an evaluation stage's val EER of the final model) has no
    curve: it is a dotted horizontal line (``eval (evaluation)``), not a point at the start. Metrics no run
    logged get an empty panel saying so, so a figure always has the same layout. One legend for all panels,
    outside them.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    if not metrics:
        raise ValueError("plot_training_curves: no metrics")
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 2.4, 3.2 * nrows), squeeze=False,
                             layout="constrained")  # room for the legend outside the panels
    # one colour per run across every panel
    run_ids = list(dict.fromkeys(histories["run_id"])) if len(histories) else []
    colours = {r: f"C{i % 10}" for i, r in enumerate(run_ids)}
    last_step = histories.groupby("run_id")["step"].max().to_dict() if len(histories) else {}
    for ax, metric in zip(axes.ravel(), metrics):
        sel = histories[histories["metric"] == metric] if len(histories) else histories
        for (run_id, label), grp in (sel.groupby(["run_id", "label"], sort=False) if len(sel) else ()):
            steps = last_step[run_id]
            if steps <= 0:
                ax.axhline(grp["value"].iloc[-1], color=colours[run_id], linestyle=":", linewidth=1.4,
                           label=f"{label} (evaluation)")
                continue
            ax.plot(grp["step"] / steps, grp["value"], marker="." if len(grp) < 30 else None, linewidth=1.2,
                    label=f"{label} ({steps:,} steps)", color=colours[run_id])
        if len(sel) == 0:
            ax.text(0.5, 0.5, f"no run logged {metric}", transform=ax.transAxes, ha="center", va="center", color="0.5")
        elif metric in logy:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=10)
        ax.set_xlim(0.0, 1.0)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_xlabel("Progress through the stage (its steps)")
        ax.grid(True, color="0.9")
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    _figure_legend(fig, axes.ravel(), fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------- DET curves

def score_files(runs: pd.DataFrame, dst: str | os.PathLike, tracking_uri: str | None = None,
                lists: Sequence[str] | None = None) -> dict[str, Path]:
    """Download every run's ``scores/NAME.txt`` into ``dst/<run id>/``; returns ``{"<run label>/<NAME>": path}``
    (labels are unique per run, :func:`run_labels`, so a sweep's trials never overwrite one another)."""
    from mlflow import MlflowClient

    uri = tracking_uri or runs.attrs.get("tracking_uri")
    out: dict[str, Path] = {}
    if runs.empty or uri is None:
        return out
    client = MlflowClient(uri)
    for _, row in runs.iterrows():
        if "scores" not in _artifact_paths(client, row["run_id"]):
            continue
        for path in sorted(_artifact_paths(client, row["run_id"], "scores")):
            name = Path(path).stem
            if lists is not None and name not in lists:
                continue
            local = _download(uri, row["run_id"], path, str(Path(dst) / row["run_id"]))
            if local is not None:
                out[f"{_label(row)}/{name}"] = local
    return out


def read_scores(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A score file ``enroll test score target|nontarget`` (or ``... score 1|0``) -> ``(scores, labels)``;
    bad lines raise ``ValueError`` naming ``file:line`` (``bootstrap.read_score_file``, the one parser)."""
    from svlib.scoring.bootstrap import read_score_file

    parsed = read_score_file(path, labelled=True)
    return parsed.scores, parsed.labels


def plot_det_curves(files: Mapping[str, str | os.PathLike], title: str | None = "DET"):
    """Several score files on one DET plot (EER and minDCF(0.01) in the legend), on a returned pyplot figure
    so a notebook can show it inline."""
    import matplotlib.pyplot as plt

    from svlib.scoring.metrics import draw_det

    if not files:
        raise ValueError("plot_det_curves: no score files")
    fig, ax = plt.subplots(figsize=(6, 6 + 0.18 * len(files)), layout="constrained")  # the legend goes below
    draw_det(ax, {name: read_scores(path) for name, path in files.items()}, title, mindcf_p=0.01, legend_size=7)
    return fig
