"""Optuna sweeps tracing the pruning-versus-EER curve over one FIXED teacher.

    python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml [--storage URL] [--grid] [--n-trials N] \
        [--worker K] [--mlflow-uri URI | --no-tracking]

The teacher is a finished dense stage folder (``model/`` + ``head.safetensors``, e.g. ``exp/demo/s2``); it is
read by every trial and never retrained. Each trial runs, in its own folder ``<out_dir>/<study>/trial_<n>/``,
the experiments' own stage functions::

    teacher ──prune1 (masks + KD + Lagrangian, the trial's target)──▶ shrink ──prune2 (KD)──▶ graft
            ──the short fine-tune stages (ps1, ps2, ...)──▶ eval_pruned (val + test trial lists)

A trial of target sparsity 0 skips the pruning: the teacher gets the same short fine-tune and evaluation,
so the dense end of the curve is measured the same way as the pruned points.

Search space (``space:`` in the sweep YAML, :class:`SearchSpace`): the target sparsity and, when given a
range, the distillation L1 and cosine weights, the distilled layer set (named choices) and the learning
rates of the log-alphas and of the Lagrange multipliers. ``--grid`` sweeps the target sparsity alone over
``grid:`` (the study ``<name>-grid``, every other knob at the stage YAML's value).

Objectives (both minimised): the validation EER (``val_eer_pct``) and the encoder parameter count
(``params_encoder``); the Pareto front is :func:`sweeps.study.pareto_front`. The test EER is logged, never
optimised. Storage: ``--storage`` (any SQLAlchemy URL; default ``sqlite:///sweeps/<study>.db``); ``n_trials``
counts COMPLETE trials, so running the same command again resumes an interrupted sweep and redoes nothing.
A trial that raises is recorded FAILED and the sweep goes on.

MLflow (experiment = the study name): a ``study:<name>`` parent run (with the study's headline metrics,
:func:`study_headline`), one nested ``trial-<n> t=<target>`` run per trial (``(retry of <k>)`` for a retry;
:func:`sweeps.study.tracked_objective`) with the trial's params, the metrics ``val_eer_pct``,
``params_encoder``, ``test_eer_pct``, ``achieved_sparsity``, ``target_sparsity`` (...) and the artifacts
``structure.json``/``structure.png``; the stage runs are nested inside the trial run. The teacher is a
finished run ``teacher:<stage>`` (tags ``kind=use``, ``teacher=true``, its own numbers) under the study run, for
the notebooks' reference line.

After the worker stops, ``<out_dir>/<study>/report.json`` (points, Pareto front, teacher) and
``<out_dir>/<study>/curve.png`` (EER vs encoder parameters and vs achieved sparsity, teacher as a reference
line, Pareto front highlighted) are written from the study.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from experiments import evaluate as evaluate_stage
from experiments import graft as graft_stage
from experiments import prune as prune_stage
from experiments import train as train_stage
from experiments.common import DataConfig, Timer, read_result, write_result
from svlib.config import ConfigError, check_relative, load_config
from sweeps.study import (SweepError, close_orphaned_runs, grid_sampler, open_study, pareto_front, run_worker,
                          tracked_objective)

__all__ = ["FloatRange", "SearchSpace", "SweepConfig", "METRICS", "DIRECTIONS", "EVAL", "study_name", "trial_dir",
           "suggest", "stage_configs", "run_trial", "make_objective", "run_sweep", "log_teacher_run", "sweep_points",
           "teacher_reference", "write_report", "plot_sweep", "main"]

log = logging.getLogger("sweeps.prune_sweep")

METRICS = ("val_eer_pct", "params_encoder")   # the two objectives, both minimised
DIRECTIONS = ("minimize", "minimize")
TRIAL_FILE = "trial.json"                     # in each trial folder: the study uid, trial number and params
# The trial's evaluation stage, named as the pipeline's evaluation of a pruned model: ``svlib.analysis`` takes
# a stage named ``eval`` for the dense teacher's numbers.
EVAL = "eval_pruned"
_UID_ATTR = "sweep_uid"


# ------------------------------------------------------------------------------------------ config

@dataclass
class FloatRange:
    """``trial.suggest_float(name, low, high, log=log)``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ConfigError(f"range: low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"range: a log range needs low > 0, got {self.low}")


@dataclass
class SearchSpace:
    """What a (non-grid) trial samples. An absent (null) entry stays at the prune1/prune2 YAML's value."""

    target_sparsity: FloatRange = field(default_factory=lambda: FloatRange(0.3, 0.9))
    l1_weight: FloatRange | None = None
    cos_weight: FloatRange | None = None
    # named hidden-state sets (null = all states); the trial picks a name (suggest_categorical)
    layers: dict[str, list[int] | None] | None = None
    lr_log_alpha: FloatRange | None = None
    lr_lambda: FloatRange | None = None    # the multipliers' learning-rate MAGNITUDE (used negated: ascent)

    def __post_init__(self) -> None:
        t = self.target_sparsity
        if not (0.0 <= t.low and t.high < 1.0):
            raise ConfigError(f"space.target_sparsity: must lie in [0, 1), got [{t.low}, {t.high}]")
        if self.layers is not None and not self.layers:
            raise ConfigError("space.layers: give at least one named layer set (or leave it out)")
        for name in ("l1_weight", "cos_weight", "lr_log_alpha", "lr_lambda"):
            r = getattr(self, name)
            if r is not None and r.low < 0:
                raise ConfigError(f"space.{name}: must be >= 0, got low {r.low}")


@dataclass
class SweepConfig:
    """A pruning sweep: the fixed teacher, the data, the per-trial stage configs and the search space."""

    name: str                                 # study name (also the MLflow experiment)
    teacher: str                              # finished dense stage folder: model/ (+ head.safetensors)
    data: DataConfig
    prune1: prune_stage.DistillStageConfig    # needs its 'prune:' section (the target is the trial's)
    finetune: list[train_stage.TrainStageConfig]   # the short fine-tune (ps1, ps2, ...), in order
    prune2: prune_stage.DistillStageConfig | None = None   # null: no second distillation
    space: SearchSpace = field(default_factory=SearchSpace)
    grid: list[float] = field(default_factory=lambda: [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9])
    n_trials: int = 20                        # COMPLETE trials the study should hold (all workers)
    seed: int = 0
    out_dir: str = "sweeps/runs"              # trial folders: <out_dir>/<study>/trial_<n>/
    test_list: str = "test"                   # data.test_trials entry reported as test_eer_pct
    heartbeat_interval: int = 60              # s; a dead worker's trial is retried after 2x this
    device: str = "auto"

    def __post_init__(self) -> None:
        check_relative(self.teacher, "teacher")
        check_relative(self.out_dir, "out_dir")
        if self.prune1.prune is None:
            raise ConfigError("prune1: needs a 'prune:' section (masks + sparsity target)")
        if self.prune2 is not None and self.prune2.prune is not None:
            raise ConfigError("prune2: plain distillation, no 'prune:' section")
        if not self.finetune:
            raise ConfigError("finetune: give at least one fine-tuning stage (e.g. a short ps1)")
        if self.data.val is None or self.data.val_trials is None:
            raise ConfigError("data: val and val_trials are needed (the validation EER is the objective)")
        if self.test_list not in self.data.test_trials:
            raise ConfigError(f"test_list: {self.test_list!r} is not in data.test_trials "
                              f"{sorted(self.data.test_trials)}")
        if not self.grid or len(set(self.grid)) != len(self.grid) or not all(0.0 <= g < 1.0 for g in self.grid):
            raise ConfigError(f"grid: distinct target sparsities in [0, 1), got {self.grid}")
        if self.n_trials < 1:
            raise ConfigError(f"n_trials: must be >= 1, got {self.n_trials}")
        self.prune1.stage = "prune1"
        if self.prune2 is not None:
            self.prune2.stage = "prune2"
        names = [s.stage if s.stage != "train" else f"ps{i + 1}" for i, s in enumerate(self.finetune)]
        if len(set(names)) != len(names) or set(names) & {"prune1", "shrink", "prune2", "graft", EVAL}:
            raise ConfigError(f"finetune: stage names must be distinct and not prune1/shrink/prune2/graft/{EVAL}: "
                              f"{names}")
        for stage, name in zip(self.finetune, names):
            stage.stage = name
            if stage.model is not None:
                raise ConfigError(f"finetune.{name}: no 'model:' (the stage starts from the grafted model)")
        for stage in (self.prune1, self.prune2, *self.finetune):
            if stage is not None and stage.device == "auto":
                stage.device = self.device


def study_name(cfg: SweepConfig, grid: bool = False) -> str:
    """The study (and MLflow experiment) name: ``name``, or ``name-grid`` for the target-sparsity grid."""
    return f"{cfg.name}-grid" if grid else cfg.name


def trial_dir(cfg: SweepConfig, study: str, number: int) -> Path:
    return Path(cfg.out_dir) / study / f"trial_{number}"


# ------------------------------------------------------------------------------------------ one trial

def suggest(trial: optuna.Trial, cfg: SweepConfig, grid: bool) -> dict[str, Any]:
    """The trial's knobs: ``target_sparsity`` always; the others only in a non-grid sweep and when ranged."""
    if grid:
        return {"target_sparsity": trial.suggest_float("target_sparsity", min(cfg.grid), max(cfg.grid))}
    space = cfg.space
    out = {"target_sparsity": trial.suggest_float("target_sparsity", space.target_sparsity.low,
                                                  space.target_sparsity.high, log=space.target_sparsity.log)}
    for name in ("l1_weight", "cos_weight", "lr_log_alpha", "lr_lambda"):
        r = getattr(space, name)
        if r is not None:
            out[name] = trial.suggest_float(name, r.low, r.high, log=r.log)
    if space.layers is not None:
        out["layers"] = trial.suggest_categorical("layers", sorted(space.layers))
    return out


def stage_configs(cfg: SweepConfig, knobs: dict[str, Any]):
    """prune1 / prune2 configs with the trial's knobs applied (copies: the sweep config is never changed)."""
    prune1 = copy.deepcopy(cfg.prune1)
    prune2 = copy.deepcopy(cfg.prune2)
    prune1.prune.target_sparsity = float(knobs["target_sparsity"])
    if "lr_log_alpha" in knobs:
        prune1.prune.lr_log_alpha = float(knobs["lr_log_alpha"])
    if "lr_lambda" in knobs:
        prune1.prune.lr_lambda = -abs(float(knobs["lr_lambda"]))
    for stage in (prune1, prune2):
        if stage is None:
            continue
        if "l1_weight" in knobs:
            stage.distill.l1_weight = float(knobs["l1_weight"])
        if "cos_weight" in knobs:
            stage.distill.cos_weight = float(knobs["cos_weight"])
        if "layers" in knobs:
            stage.distill.layers = cfg.space.layers[knobs["layers"]]
    return prune1, prune2


def _retried_number(trial: optuna.Trial) -> int | None:
    """The trial a heartbeat retry replaces (its folder holds the finished stages to reuse)."""
    try:
        return trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
    except Exception:  # noqa: BLE001 - an older optuna without the attr: the retry starts afresh
        return None


def _claim_folder(folder: Path, uid: str, number: int, knobs: dict) -> None:
    """Make ``folder`` this trial's: a folder left by another study (same name, other storage) is moved aside."""
    marker = folder / TRIAL_FILE
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old.get("study_uid") == uid and old.get("params") == knobs:
            return  # a retry of this very trial: its finished stages are reused
        stale = folder.with_name(f"{folder.name}.stale-{int(time.time())}")
        log.warning("%s belongs to another study or other params; moved to %s", folder, stale)
        folder.rename(stale)
    elif folder.is_dir() and any(folder.iterdir()):
        stale = folder.with_name(f"{folder.name}.stale-{int(time.time())}")
        log.warning("%s exists without %s; moved to %s", folder, TRIAL_FILE, stale)
        folder.rename(stale)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"study_uid": uid, "trial": number, "params": knobs}, indent=2) + "\n")


def _study_uid(study: optuna.Study) -> str:
    uid = study.user_attrs.get(_UID_ATTR)
    if uid is None:
        study.set_user_attr(_UID_ATTR, uuid.uuid4().hex)
        uid = study.user_attrs[_UID_ATTR]  # read back: with racing workers, one value wins for everyone
    return uid


def _stage(tracker, name: str, kind: str, folder: Path, params, fn, previous_run: str | None = None):
    """Run one stage function, as a nested MLflow run under the trial's when tracking.

    A stage finished by an earlier attempt (``result.json``: a heartbeat retry reuses what the dead trial
    finished) logs nothing itself, so its numbers are brought into the new run: every metric history of the
    same stage's run under ``previous_run`` (the dead trial's run), else the final numbers of its result.
    """
    if tracker is None:
        return fn(None)
    reused = read_result(folder) is not None
    tags = {"stage": name, "kind": kind, "reused": str(reused)}
    with tracker.run(name, nested=True, tags=tags, params=params) as run_id:
        record = fn(tracker)
        if reused:
            _log_reused_stage(tracker, run_id, name, record, previous_run)
        return record


def _log_reused_stage(tracker, run_id: str, name: str, record: dict, previous_run: str | None) -> None:
    from mlflow import MlflowClient

    from experiments.common import metrics_of
    from svlib.tracking import copy_metrics

    client = MlflowClient(tracker.tracking_uri)
    if previous_run is not None:
        old = client.search_runs([client.get_run(previous_run).info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{previous_run}' and tags.stage = '{name}'",
                                 max_results=1)
        if old and copy_metrics(client, old[0].info.run_id, run_id):
            tracker.set_tags({"metrics_copied_from": old[0].info.run_id})
            return
    metrics = metrics_of(record.get("test") or {})
    metrics |= {k: float(record[k]) for k in ("params_encoder", "params_total", "achieved_sparsity",
                                              "best_val_eer_pct", "max_abs_diff", "minutes")
                if record.get(k) is not None}
    tracker.log_metrics(metrics)


def run_trial(cfg: SweepConfig, knobs: dict[str, Any], folder: Path, tracker=None,
              previous_run: str | None = None) -> dict[str, Any]:
    """Every stage of one trial in ``folder``; returns the trial's numbers (also written to ``result.json``).

    Finished stages (``result.json``) are reused, interrupted ones resume from their checkpoints: a retried
    trial costs only what its predecessor did not finish; ``previous_run`` (the predecessor's MLflow trial
    run) lends the reused stages its metrics (:func:`_stage`).
    """
    tracked_stage = functools.partial(_stage, previous_run=previous_run)
    done = read_result(folder)
    if done is not None and done.get("params") == knobs:
        return done
    timer = Timer()
    teacher = Path(cfg.teacher)
    if read_result(teacher) is None or not (teacher / "model").is_dir():
        raise FileNotFoundError(f"teacher {teacher}: not a finished stage folder with model/ (run its pipeline first)")
    train_dir = cfg.data.load_dir("train")
    # fine-tuning stages validate (model selection) but leave the test lists to the final evaluation
    ft_data = dataclasses.replace(cfg.data, test=None, test_trials={})
    target = float(knobs["target_sparsity"])
    d = {name: folder / name for name in ("prune1", "shrink", "prune2", "graft", EVAL)}
    if target > 0.0:
        prune1, prune2 = stage_configs(cfg, knobs)
        tracked_stage(tracker, "prune1", "prune", d["prune1"], prune1, lambda t: prune_stage.run_distill(
            prune1, cfg.data, d["prune1"], init=teacher, teacher=teacher, tracker=t))
        tracked_stage(tracker, "shrink", "shrink", d["shrink"], {"init": "prune1"}, lambda t: prune_stage.run_shrink(
            d["prune1"], d["shrink"], check_dir=train_dir, tracker=t))
        encoder_stage = d["shrink"]
        if prune2 is not None:
            tracked_stage(tracker, "prune2", "prune", d["prune2"], prune2, lambda t: prune_stage.run_distill(
                prune2, cfg.data, d["prune2"], init=d["shrink"], teacher=teacher, tracker=t))
            encoder_stage = d["prune2"]
        tracked_stage(tracker, "graft", "graft", d["graft"], {"init": encoder_stage.name, "teacher": str(teacher)},
               lambda t: graft_stage.run(encoder_stage, teacher, d["graft"], check_dir=train_dir, tracker=t))
        init = d["graft"]
        structure = json.loads((d["shrink"] / prune_stage.STRUCTURE).read_text())
        title = f"target {target:g}"
    else:  # the dense end of the curve: the teacher itself, through the same fine-tune
        init = teacher
        encoder = prune_stage.load_stage_encoder(teacher).encoder
        structure = prune_stage.structure_record(prune_stage.layer_sizes(encoder), encoder.config)
        title = "dense teacher"
    # every trial folder carries the per-layer structure of its encoder (the trial run's artifact)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / prune_stage.STRUCTURE).write_text(json.dumps(structure, indent=2) + "\n")
    prune_stage.plot_structure(structure, folder / prune_stage.STRUCTURE_PNG, title)
    for stage in cfg.finetune:
        out, start = folder / stage.stage, init
        tracked_stage(tracker, stage.stage, "train", out, stage, lambda t, stage=stage, out=out, start=start: train_stage.run(
            stage, ft_data, out, init=start, tracker=t))
        init = out
    evaluated = tracked_stage(tracker, EVAL, "evaluate", d[EVAL], {"init": init.name},
                       lambda t: evaluate_stage.run(init, cfg.data, d[EVAL], tracker=t, device=cfg.device))
    tests = evaluated["test"]
    val, test = tests["val"], tests[cfg.test_list]
    record = {"params": knobs, "target_sparsity": target,
              "achieved_sparsity": float(structure["achieved_sparsity"]),
              "params_encoder": int(evaluated["params_encoder"]),
              "dense_params_encoder": int(structure["dense_params_encoder"]),
              "val_eer_pct": float(val["eer_pct"]), "val_mindcf_0.01": float(val["mindcf_0.01"]),
              "test_eer_pct": float(test["eer_pct"]), "test_mindcf_0.01": float(test["mindcf_0.01"]),
              "test_mindcf_0.05": float(test["mindcf_0.05"]), "layers": structure["layers"],
              "minutes": timer.minutes}
    for key, ci in (("test_eer_pct", test.get("eer_ci_pct")), ("test_mindcf_0.01", test.get("mindcf_0.01_ci"))):
        if ci is not None:  # speaker-level bootstrap 95 % interval of the evaluation stage
            record[f"{key}_ci_low"], record[f"{key}_ci_high"] = float(ci[0]), float(ci[1])
    if record["params_encoder"] != structure["params_encoder"]:
        raise RuntimeError(f"{folder}: evaluated encoder has {record['params_encoder']} parameters, the structure "
                           f"says {structure['params_encoder']}")
    write_result(folder, record)
    return record


def make_objective(cfg: SweepConfig, study: str, *, grid: bool = False, tracker=None):
    """``objective(trial) -> (val_eer_pct, params_encoder)``; wrap it with :func:`tracked_objective` for MLflow
    (``tracker`` here only nests the stage runs and logs the trial's extra metrics and artifacts)."""

    def objective(trial: optuna.Trial):
        knobs = suggest(trial, cfg, grid)
        number = _retried_number(trial)
        folder = trial_dir(cfg, study, trial.number if number is None else number)
        _claim_folder(folder, _study_uid(trial.study), trial.number if number is None else number, knobs)
        trial.set_user_attr("trial_dir", folder.as_posix())
        trial.set_user_attr("run_label", f"t={knobs['target_sparsity']:.2g}")  # the MLflow run's name
        record = run_trial(cfg, knobs, folder, tracker, previous_run=trial.user_attrs.get("retry_of_mlflow_run_id"))
        extras = {k: record[k] for k in ("target_sparsity", "achieved_sparsity", "test_eer_pct", "test_mindcf_0.01",
                                         "test_mindcf_0.05", "val_mindcf_0.01", "dense_params_encoder", "minutes")}
        extras |= {k: v for k, v in record.items() if k.endswith(("_ci_low", "_ci_high"))}
        for key, value in extras.items():
            trial.set_user_attr(key, value)
        if tracker is not None and tracker.active_run_id is not None:
            tracker.log_metrics(extras)
            tracker.log_artifact(folder / prune_stage.STRUCTURE)
            tracker.log_artifact(folder / prune_stage.STRUCTURE_PNG)
            tracker.log_artifact(folder / TRIAL_FILE)
        return record["val_eer_pct"], float(record["params_encoder"])

    return objective


# ------------------------------------------------------------------------------------------ report

def teacher_reference(cfg: SweepConfig) -> dict | None:
    """The teacher's own numbers from its ``result.json`` (as ``svlib.analysis.teacher_reference`` gives them)."""
    record = read_result(cfg.teacher)
    test = ((record or {}).get("test") or {}).get(cfg.test_list)
    if record is None or test is None or record.get("params_encoder") is None:
        return None
    return {"run_id": None, "label": Path(cfg.teacher).name, "params_encoder": float(record["params_encoder"]),
            "eer_pct": float(test["eer_pct"]), "mindcf_0.01": float(test["mindcf_0.01"]),
            "mindcf_0.05": float(test["mindcf_0.05"]), "val_eer_pct": record.get("best_val_eer_pct")}


def log_teacher_run(tracker, name: str, cfg: SweepConfig, study: optuna.Study | None = None) -> str | None:
    """The fixed teacher as a finished run under the study's parent run (once per study): run name
    ``teacher:<folder name>``, tags ``stage`` = the teacher folder's name, ``kind=use``, ``teacher=true``; its
    ``params_encoder`` and test/validation numbers from its ``result.json`` and its encoder's
    ``model/encoder/config.json`` (the dense structure). The notebooks (``svlib.analysis.teacher_reference``) find the reference line there."""
    from mlflow import MlflowClient

    from experiments.common import metrics_of
    from sweeps.study import study_parent_run

    record = read_result(cfg.teacher)
    if record is None:
        return None
    parent = study_parent_run(tracker, name, study)
    client = MlflowClient(tracker.tracking_uri)
    experiment = client.get_experiment_by_name(tracker.experiment)
    found = client.search_runs([experiment.experiment_id], f"tags.kind = 'use' and tags.optuna_study = '{name}'",
                               max_results=1)
    if found:
        return found[0].info.run_id
    stage = Path(cfg.teacher).name
    run = client.create_run(experiment.experiment_id, run_name=f"teacher:{stage}", tags={
        "mlflow.parentRunId": parent, "stage": stage, "kind": "use", "optuna_study": name, "teacher": "true"})
    client.log_param(run.info.run_id, "path", cfg.teacher)
    metrics = metrics_of({k: v for k, v in (record.get("test") or {}).items()})
    if record.get("params_encoder") is not None:
        metrics["params_encoder"] = float(record["params_encoder"])
    if record.get("best_val_eer_pct") is not None:
        metrics["best_val_eer_pct"] = float(record["best_val_eer_pct"])
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    encoder_config = Path(cfg.teacher) / "model" / "encoder" / "config.json"
    if encoder_config.is_file():  # the notebooks' dense reference structure (a few hundred bytes)
        client.log_artifact(run.info.run_id, str(encoder_config), "model/encoder")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def sweep_points(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per COMPLETE trial (by number): params, sizes, val/test EER and minDCF, ``pareto``."""
    front = {item["number"] for item in pareto_front(study)}
    points = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        attrs = t.user_attrs
        points.append({"number": t.number, "params": dict(t.params),
                       "target_sparsity": attrs.get("target_sparsity", t.params.get("target_sparsity")),
                       "achieved_sparsity": attrs.get("achieved_sparsity"), "params_encoder": t.values[1],
                       "val_eer_pct": t.values[0], "test_eer_pct": attrs.get("test_eer_pct"),
                       "test_mindcf_0.01": attrs.get("test_mindcf_0.01"),
                       "test_mindcf_0.05": attrs.get("test_mindcf_0.05"),
                       "mlflow_run_id": attrs.get("mlflow_run_id"), "trial_dir": attrs.get("trial_dir"),
                       "pareto": t.number in front}
                      | {k: v for k, v in attrs.items() if k.endswith(("_ci_low", "_ci_high"))})
    return points


def plot_sweep(points: list[dict], teacher: dict | None, path: str | os.PathLike, title: str = "") -> Path:
    """EER / minDCF (test) vs encoder parameters and vs achieved sparsity (``svlib.analysis.plot_pruning_curve``),
    the study's Pareto front (chosen on the validation EER) highlighted, the teacher a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from svlib.analysis import plot_pruning_curve

    frame = pd.DataFrame([{
        "source": "trial", "run_id": p["mlflow_run_id"] or f"trial-{p['number']}", "label": f"trial {p['number']}",
        "stage": None, "target_sparsity": p["target_sparsity"], "achieved_sparsity": p["achieved_sparsity"],
        "params_encoder": p["params_encoder"], "eer_pct": p["test_eer_pct"], "mindcf_0.01": p["test_mindcf_0.01"],
        "mindcf_0.05": p["test_mindcf_0.05"], "val_eer_pct": p["val_eer_pct"], "pareto": p["pareto"]}
        | {f"{m}_ci_{side}": p.get(f"test_{m}_ci_{side}") for m in ("eer_pct", "mindcf_0.01") for side in ("low", "high")}
        for p in points],
        columns=["source", "run_id", "label", "stage", "target_sparsity", "achieved_sparsity", "params_encoder",
                 "eer_pct", "mindcf_0.01", "mindcf_0.05", "val_eer_pct", "pareto", "eer_pct_ci_low", "eer_pct_ci_high",
                 "mindcf_0.01_ci_low", "mindcf_0.01_ci_high"])
    front = frame.loc[frame["pareto"].astype(bool), "run_id"].tolist() if len(frame) else []
    fig = plot_pruning_curve(frame, teacher, pareto_run_ids=front, split="test")
    if title:
        fig.suptitle(f"{title}: test EER / minDCF vs size (Pareto front on validation EER)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_headline(report: dict) -> dict[str, float]:
    """The study parent run's result columns: complete trials, Pareto-front size, and the front's best
    validation-EER trial (its number, val / test EER, test minDCF, encoder parameters), rounded."""
    from svlib.tracking import rounded

    out = {"trials_complete": float(report["trials"].get("COMPLETE", 0)),
           "pareto_size": float(len(report["pareto_front"]))}
    front = [p for p in report["points"] if p["pareto"]]
    if front:
        best = min(front, key=lambda p: (p["val_eer_pct"], p["number"]))
        out |= {"best_trial": float(best["number"]), "best_val_eer_pct": best["val_eer_pct"],
                "best_test_eer_pct": best["test_eer_pct"], "best_test_mindcf_0.01": best["test_mindcf_0.01"],
                "best_params_encoder": best["params_encoder"], "best_achieved_sparsity": best["achieved_sparsity"]}
    teacher = report.get("teacher_reference") or {}
    if teacher.get("eer_pct") is not None:
        out["teacher_test_eer_pct"] = teacher["eer_pct"]
    return {k: rounded(k, v) for k, v in out.items() if v is not None}


def log_study_headline(tracker, name: str, report: dict, study: optuna.Study | None = None) -> str:
    """Put :func:`study_headline` on the study's parent run (the runs table's columns); returns its id."""
    from mlflow import MlflowClient

    from sweeps.study import study_parent_run

    parent = study_parent_run(tracker, name, study)
    client = MlflowClient(tracker.tracking_uri)
    for key, value in study_headline(report).items():
        client.log_metric(parent, key, value)
    return parent


def write_report(cfg: SweepConfig, study: optuna.Study, folder: str | os.PathLike | None = None) -> dict:
    """``report.json`` + ``curve.png`` in ``<out_dir>/<study>/`` (or ``folder``); returns the report."""
    folder = Path(folder) if folder is not None else Path(cfg.out_dir) / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    points = sweep_points(study)
    counts = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    teacher = teacher_reference(cfg)
    report = {"study": study.study_name, "teacher": cfg.teacher, "teacher_reference": teacher,
              "objectives": dict(zip(METRICS, DIRECTIONS)), "trials": {k: v for k, v in counts.items() if v},
              "points": points, "pareto_front": pareto_front(study)}
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    if points:
        plot_sweep(points, teacher, folder / "curve.png", title=study.study_name)
    return report


# ------------------------------------------------------------------------------------------ sweep

def run_sweep(cfg: SweepConfig, *, storage: str | None = None, grid: bool = False, n_trials: int | None = None,
              worker: int = 0, tracking_uri: str | None = None, track: bool = True,
              max_failures: int | None = None, report: bool = True) -> dict:
    """One worker of the sweep (start several with different ``worker`` on the same storage).

    ``n_trials`` (default: the config's; with ``grid`` every grid point) counts COMPLETE trials; with ``grid``
    it may not exceed the grid's points. ``report.json`` / ``curve.png`` are written however the worker
    stops, interrupted (KeyboardInterrupt, SIGTERM through :func:`main`) included.

    Returns ``{"study", "storage", "worker": WorkerReport as dict, "report": report or None}``.
    """
    name = study_name(cfg, grid)
    if grid and n_trials is not None and n_trials > len(cfg.grid):
        raise SweepError(f"--n-trials {n_trials} with --grid: the grid has {len(cfg.grid)} points, each run once "
                         f"(give at most {len(cfg.grid)}, or leave --n-trials out)")
    sampler = grid_sampler(cfg.grid, "target_sparsity", seed=cfg.seed) if grid else None
    study = open_study(name, storage, DIRECTIONS, seed=cfg.seed, worker=worker, sampler=sampler,
                       metric_names=list(METRICS), heartbeat_interval=cfg.heartbeat_interval)
    tracker = None
    if track:
        from sweeps.study import _make_tracker
        tracker = _make_tracker(name, tracking_uri)
    objective = make_objective(cfg, name, grid=grid, tracker=tracker)
    on_stale = None
    if tracker is not None:
        log_teacher_run(tracker, name, cfg, study)
        objective = tracked_objective(tracker, name, objective)
        on_stale = lambda s: close_orphaned_runs(s, tracker.tracking_uri)  # noqa: E731
    total = (n_trials or len(cfg.grid)) if grid else (n_trials or cfg.n_trials)
    written = None
    try:
        done = run_worker(study, objective, total, max_failures=max_failures, on_stale=on_stale)
    finally:  # an interrupted worker still leaves the study's report and curve
        if report:
            written = write_report(cfg, study)
            if tracker is not None:
                log_study_headline(tracker, name, written, study)
    log.info("worker %d: %s", worker, done)
    return {"study": name, "storage": storage, "worker": dataclasses.asdict(done), "report": written}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.prune_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (SweepConfig)")
    parser.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///sweeps/<study>.db)")
    parser.add_argument("--grid", action="store_true",
                        help="grid over the config's target sparsities (study <name>-grid)")
    parser.add_argument("--n-trials", type=int, default=None,
                        help="COMPLETE trials wanted (default: the config's n_trials; with --grid: every grid point, "
                             "and at most the grid's size: a grid point is never run twice)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (offsets the sampler seed)")
    parser.add_argument("--max-failures", type=int, default=None)
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: svlib's default store)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: the running trial is marked FAIL, its MLflow run
    # closed, and report.json / curve.png are written before the worker exits.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        cfg = load_config(args.config, SweepConfig)
        out = run_sweep(cfg, storage=args.storage, grid=args.grid, n_trials=args.n_trials, worker=args.worker,
                        tracking_uri=args.mlflow_uri, track=not args.no_tracking, max_failures=args.max_failures)
    except (ConfigError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the running trial is FAILED (a worker retries it); report.json and curve.png written",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = out["report"]
    print(json.dumps({"study": out["study"], "worker": out["worker"], "trials": report["trials"],
                      "pareto_front": [{"number": p["number"], "params": p["params"], "values": p["values"]}
                                       for p in report["pareto_front"]]}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
