"""Optuna sweeps tracing the pruning-versus-EER curve over one FIXED teacher.

    torchrun --nproc_per_node 8 -m sweeps.prune_sweep --config sweeps/configs/w2vbert.yaml --grid \
        [--storage URL] [--budget B] [--n-trials N] [--worker K] [--mlflow-uri URI | --no-tracking]
    python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml            # one process, CPU or one GPU
    python -m sweeps.prune_sweep --config C --grid --plan [--gpus 8] [--card H100] [--budget B]
    python -m sweeps.prune_sweep --config C --grid --promote 2 --budget 0.5   # or --trials 3,5

A trial spans every rank of its torchrun job (:mod:`sweeps.distributed`): rank 0 alone talks to Optuna and
MLflow and orders the other ranks through the trial; the DDP stages train on all ranks, shrink, graft and the
evaluation run on rank 0. Several jobs (one per node) share one study through ``--storage`` (PostgreSQL, or
env ``SVLIB_SWEEP_STORAGE``); each is one worker with its own ``--worker`` index. ``--plan`` prints what the
sweep costs (steps, samples, audio hours, GPU-hours per stage, trial and study: :mod:`sweeps.plan`) without
training. ``budget`` (the config's, or ``--budget``) is the fraction of the stage YAMLs' epochs a trial trains;
``--promote K --budget B`` enqueues the K best trials of the Pareto front into the linked study
``<name>-b<B>``, which re-runs them at that budget (MLflow shows both, a ``budget`` column).

The teacher is a finished dense stage folder (``model/`` + ``head.safetensors``, e.g. ``exp/demo/s2``); it is
read by every trial and never retrained. Each trial runs, in its own folder ``<out_dir>/<study>/trial_<n>/``,
the experiments' own stage functions::

    teacher ──prune1 (masks + KD + Lagrangian, the trial's target)──▶ shrink ──prune2 (KD)──▶ graft
            ──the short fine-tune stages (ps1, ps2, ...)──▶ eval_pruned (val + test trial lists)

A trial of target sparsity 0 skips the pruning: the teacher gets the same short fine-tune and evaluation,
so the dense end of the curve is measured the same way as the pruned points. A stage section may start from
a pipeline's stage YAML (``prune1: {from: ../../experiments/configs/prune/prune1.yaml}``, relative to the sweep
YAML: :func:`load_sweep_config`).

Search space (``space:`` in the sweep YAML, :class:`SearchSpace`): the target sparsity and, when given a
range, the distillation L1 and cosine weights, the distilled layer set (named choices) and the learning
rates of the log-alphas and of the Lagrange multipliers. ``--grid`` sweeps the target sparsity alone over
``grid:`` (the study ``<name>-grid``, every other knob at the stage YAML's value).

Objectives (both minimised): the validation EER (``val_eer_pct``) and the encoder parameter count
(``params_encoder``); the Pareto front is :func:`sweeps.study.pareto_front`. The test EER is logged, never
optimised. Storage: ``--storage`` (any SQLAlchemy URL; default ``sqlite:///sweeps/<study>.db``); ``n_trials``
counts COMPLETE trials, so running the same command again resumes an interrupted sweep and redoes nothing.
A trial that raises on any rank is recorded FAILED (its one-line ``fail_reason``) and the sweep goes on; a worker
whose every trial failed exits 1, one that leaves while other workers' trials still run exits 3.

MLflow (experiment = the study name without its budget suffix): a ``study:<name>`` parent run (with the study's headline metrics,
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
import json
import logging
import math
import os
import shutil
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
from experiments.common import (DataConfig, RankError, Timer, interrupt_on_sigterm, leave_process_group,
                                rank_and_world, rank_zero_result, read_result, release_memory, setup_process_group,
                                write_result)
from svlib.config import ConfigError, check_relative, from_dict, merge_overrides, read_yaml
from svlib.data.augment import AugmentConfig
from svlib.files import write_json
from svlib.tracking import TolerantTracker
from svlib.train.engine import one_line
from sweeps.distributed import LostRank, Order, TrialFailed, agree_outcome, broadcast_order, follow
from sweeps.plan import check_budget, format_plan, plan_sweep, scale_budget
from sweeps.study import (GridExhausted, SweepError, WorkerReport, close_orphaned_runs, grid_sampler, load_study,
                          open_study, pareto_front, run_worker, tracked_objective, worker_exit)

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
    # prune1's objective (``experiments.prune.OBJECTIVES``): ``distill`` (the reference, KD) and/or
    # ``classification`` (task-loss pruning without a teacher: no prune2, graft takes prune1's back-end and head;
    # its head and augmentation are the first fine-tuning stage's). null: prune1's YAML decides.
    objective: list[str] | None = None

    def __post_init__(self) -> None:
        if self.objective is not None and (not self.objective or set(self.objective) - set(prune_stage.OBJECTIVES)):
            raise ConfigError(f"space.objective: choose among {list(prune_stage.OBJECTIVES)}, got {self.objective}")
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
    # The fraction of the stage YAMLs' epochs a trial trains (every epoch count and epoch-counted length,
    # ``sweeps.plan.scale_budget``; lengths in steps are kept). 0.1: a full-size trial is a tenth of the
    # reference's 20 + 20 pruning epochs and its fine-tune; ``--promote`` re-runs the best trials at a higher one.
    budget: float = 0.1
    # A finished stage's ckpt/ folder only serves to resume that stage, which a finished stage never is: the
    # trial removes it once the stage is done (a 580M student's checkpoints are ~7 GB a stage, ~40 GB a trial).
    # true: keep them (e.g. to inspect the optimizer state).
    keep_checkpoints: bool = False
    # torchrun: how long a rank waits in a collective (the followers wait while rank 0 evaluates a trial or
    # talks to Optuna/MLflow); null: env SVLIB_DIST_TIMEOUT_MINUTES, else torch's default (10 minutes).
    dist_timeout_minutes: float | None = None

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
        check_budget(self.budget, "budget")
        if self.dist_timeout_minutes is not None and self.dist_timeout_minutes <= 0:
            raise ConfigError(f"dist_timeout_minutes: must be > 0, got {self.dist_timeout_minutes}")
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


def study_name(cfg: SweepConfig, grid: bool = False, budget: float | None = None, snapshots: bool = False) -> str:
    """The study name: ``name``, ``name-grid`` for the target-sparsity grid or ``name-snapshots`` for the one-run
    curve (also the MLflow experiment), with ``-b<budget>`` when the budget is not the config's (the linked
    study ``--promote`` fills)."""
    base = f"{cfg.name}-snapshots" if snapshots else f"{cfg.name}-grid" if grid else cfg.name
    return base if budget is None or budget == cfg.budget else f"{base}-b{budget:g}"


def load_sweep_config(path: str | os.PathLike, overrides: dict | None = None) -> SweepConfig:
    """Read a sweep YAML into :class:`SweepConfig`, ``overrides`` deep-merged in first.

    A stage section (``prune1``, ``prune2`` or an item of ``finetune``) may start from a stage YAML of the
    pipelines: ``{from: ../../experiments/configs/prune/prune1.yaml, train: {...}}`` is that file with the rest
    of the section deep-merged over it (the path relative to the sweep YAML's folder, as a pipeline names its
    stage YAMLs), so the full-size sweep runs the reference's own stage configs.
    """
    data = read_yaml(path)
    if overrides:
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: overrides must be a mapping, got {overrides!r}")
        data = merge_overrides(data, overrides)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    folder = Path(path).parent
    try:
        for key in ("prune1", "prune2"):
            data[key] = _stage_section(data.get(key), key, folder)
        if isinstance(data.get("finetune"), list):
            data["finetune"] = [_stage_section(s, f"finetune[{i}]", folder) for i, s in enumerate(data["finetune"])]
        return from_dict(SweepConfig, data)
    except ConfigError as err:
        raise ConfigError(f"{path}{' (with overrides)' if overrides else ''}: {err}") from None


def _stage_section(section: Any, where: str, folder: Path) -> Any:
    if not isinstance(section, dict) or "from" not in section:
        return section
    rest = {k: v for k, v in section.items() if k != "from"}
    source = folder / check_relative(section["from"], f"{where}.from")
    return merge_overrides(read_yaml(source), rest)


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
    if space.objective is not None:
        out["objective"] = trial.suggest_categorical("objective", list(space.objective))
    return out


def stage_configs(cfg: SweepConfig, knobs: dict[str, Any]):
    """prune1, prune2 and the fine-tune stages with the trial's knobs and budget applied (copies: the sweep
    config is never changed). ``knobs["budget"]`` (default the config's) scales every stage's epochs."""
    budget = float(knobs.get("budget", cfg.budget))
    prune1 = scale_budget(cfg.prune1, budget)
    prune2 = None if cfg.prune2 is None else scale_budget(cfg.prune2, budget)
    finetune = [scale_budget(stage, budget) for stage in cfg.finetune]
    prune1.prune.target_sparsity = float(knobs["target_sparsity"])
    prune1.prune.snapshots = [float(v) for v in knobs["snapshots"]] if knobs.get("snapshots") else None
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
    prune1.objective = knobs.get("objective", prune1.objective)
    if prune1.objective == "classification":
        if prune1.prune.snapshots:
            raise SweepError("--snapshots with objective classification: a snapshot would be grafted onto the back-end "
                             "trained to the run's end, not its own; trace a task-loss curve with --grid")
        # no teacher: no second distillation; the classifier is trained as the fine-tune's first stage has it (the
        # back-end's rate is prune1's train.optim.lr_backend)
        prune2 = None
        prune1.head = prune1.head or copy.deepcopy(finetune[0].head)
        if prune1.augment == AugmentConfig():
            prune1.augment = copy.deepcopy(finetune[0].augment)
    else:  # a YAML written for classification, distilling in this trial: what only classification reads goes
        prune1.head, prune1.augment = None, AugmentConfig()
    return prune1, prune2, finetune


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
        if reused and run_id is not None:
            try:  # rank 0 alone here while the others go on: a tracking error must not raise
                _log_reused_stage(tracker, run_id, name, record, previous_run)
            except Exception as err:  # noqa: BLE001
                log.warning("could not copy the metrics of the reused stage %s: %s", name, one_line(err))
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

    Under torchrun every rank calls this with the same arguments (``tracker`` on rank 0 only): the DDP stages
    (prune1, prune2, the fine-tune) train on every rank, shrink / graft / evaluation and every write of the
    trial folder run on rank 0 behind ``rank_zero_result``, and every rank returns rank 0's record.

    Finished stages (``result.json``) are reused, interrupted ones resume from their checkpoints: a retried
    trial costs only what its predecessor did not finish; ``previous_run`` (the predecessor's MLflow trial
    run) lends the reused stages its metrics (:func:`_stage`).
    """
    # rank 0's MLflow calls inside a stage must not raise while the other ranks are in its collectives
    tracker = TolerantTracker(tracker) if tracker is not None else None

    def tracked(name: str, kind: str, stage_dir: Path, *args):  # every rank runs it; its checkpoints go once done
        record = _stage(tracker, name, kind, stage_dir, *args, previous_run=previous_run)
        if not cfg.keep_checkpoints and rank_and_world()[0] == 0:
            # the stage ended with rank 0's broadcast record: every rank is past it, none reads ckpt/ again
            shutil.rmtree(stage_dir / "ckpt", ignore_errors=True)
        release_memory()  # the next stage starts from what this one needs, not from its high-water mark
        return record

    def on_rank_zero(*args):  # a stage only rank 0 runs; the others wait for (and return) its record
        record = rank_zero_result(lambda: _stage(tracker, *args, previous_run=previous_run))
        release_memory()
        return record

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
    prune1, prune2, finetune = stage_configs(cfg, knobs)
    if target > 0.0:
        tracked("prune1", "prune", folder / "prune1", prune1, lambda t: prune_stage.run_distill(
            prune1, cfg.data, folder / "prune1", init=teacher, teacher=teacher, tracker=t))

    def point(where: Path, pruned: Path | None, suffix: str = "") -> dict:
        """shrink ``pruned`` (prune1's folder or one of its snapshots; None: the dense teacher) -> prune2 ->
        graft -> the fine-tune -> evaluation, in ``where``; the point's record (``where/result.json``)."""
        d = {name: where / name for name in ("shrink", "prune2", "graft", EVAL)}
        if pruned is not None:
            on_rank_zero("shrink" + suffix, "shrink", d["shrink"], {"init": "prune1" if not suffix else pruned.as_posix()},
                         lambda t: prune_stage.run_shrink(pruned, d["shrink"], check_dir=train_dir, tracker=t))
            encoder_stage = d["shrink"]
            if prune2 is not None:
                tracked("prune2" + suffix, "prune", d["prune2"], prune2, lambda t: prune_stage.run_distill(
                    prune2, cfg.data, d["prune2"], init=d["shrink"], teacher=teacher, tracker=t))
                encoder_stage = d["prune2"]
            # task-loss pruning trained its own back-end and classifier: graft takes them from prune1
            donor = folder / "prune1" if prune1.objective == "classification" else teacher
            on_rank_zero("graft" + suffix, "graft", d["graft"], {"init": encoder_stage.name, "teacher": str(donor)},
                         lambda t: graft_stage.run(encoder_stage, donor, d["graft"], check_dir=train_dir, tracker=t))
            init = d["graft"]
        else:  # the dense end of the curve: the teacher itself, through the same fine-tune
            init = teacher
        title = "dense teacher" if pruned is None else f"target {target:g}{suffix}"
        structure = rank_zero_result(lambda: _write_structure(where, d["shrink"] if pruned else None, teacher, title))
        for stage in finetune:
            out, start = where / stage.stage, init
            tracked(stage.stage + suffix, "train", out, stage, lambda t, stage=stage, out=out, start=start:
                    train_stage.run(stage, ft_data, out, init=start, tracker=t))
            init = out
        evaluated = on_rank_zero(EVAL + suffix, "evaluate", d[EVAL], {"init": init.name},
                                 lambda t: evaluate_stage.run(init, cfg.data, d[EVAL], tracker=t, device=cfg.device))
        return rank_zero_result(lambda: _trial_record(cfg, knobs, where, structure, evaluated, timer.minutes))

    levels = knobs.get("snapshots")
    if not levels:
        return point(folder, folder / "prune1" if target > 0.0 else None)
    # the one-run curve: every snapshot of the one prune1 as a point; the trial's values are the highest one's
    points = [point(folder / f"snapshot_{level:.3f}", prune_stage.snapshot_dir(folder / "prune1", level),
                    f"@{level:g}") | {"snapshot": float(level)} for level in levels]

    def record() -> dict:
        top = folder / f"snapshot_{levels[-1]:.3f}"
        for name in (prune_stage.STRUCTURE, prune_stage.STRUCTURE_PNG):  # the trial's artifacts: its top point's
            shutil.copy2(top / name, folder / name)
        out = {**points[-1], "points": points, "minutes": timer.minutes}
        write_result(folder, out)
        return out

    return rank_zero_result(record)


def _write_structure(folder: Path, shrink_dir: Path | None, teacher: Path, title: str) -> dict:
    """Rank 0: the per-layer structure of the trial's encoder (the shrunk one, else the teacher's), written
    to the trial folder with its plot (the trial run's artifacts)."""
    if shrink_dir is not None:
        structure = json.loads((shrink_dir / prune_stage.STRUCTURE).read_text())
    else:
        encoder = prune_stage.load_stage_encoder(teacher).encoder
        structure = prune_stage.structure_record(prune_stage.layer_sizes(encoder), encoder.config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / prune_stage.STRUCTURE).write_text(json.dumps(structure, indent=2) + "\n")
    prune_stage.plot_structure(structure, folder / prune_stage.STRUCTURE_PNG, title)
    return structure


def _trial_record(cfg: SweepConfig, knobs: dict, folder: Path, structure: dict, evaluated: dict,
                  minutes: float) -> dict[str, Any]:
    """Rank 0: the trial's numbers from its evaluation, checked against its structure, written as ``result.json``."""
    tests = evaluated["test"]
    val, test = tests["val"], tests[cfg.test_list]
    record = {"params": knobs, "target_sparsity": float(knobs["target_sparsity"]),
              "budget": float(knobs.get("budget", cfg.budget)),
              "achieved_sparsity": float(structure["achieved_sparsity"]),
              "params_encoder": int(evaluated["params_encoder"]),
              "dense_params_encoder": int(structure["dense_params_encoder"]),
              "val_eer_pct": float(val["eer_pct"]), "val_mindcf_0.01": float(val["mindcf_0.01"]),
              "test_eer_pct": float(test["eer_pct"]), "test_mindcf_0.01": float(test["mindcf_0.01"]),
              "test_mindcf_0.05": float(test["mindcf_0.05"]), "layers": structure["layers"],
              "minutes": minutes}
    for key, ci in (("test_eer_pct", test.get("eer_ci_pct")), ("test_mindcf_0.01", test.get("mindcf_0.01_ci"))):
        if ci is not None:  # speaker-level bootstrap 95 % interval of the evaluation stage
            record[f"{key}_ci_low"], record[f"{key}_ci_high"] = float(ci[0]), float(ci[1])
    if record["params_encoder"] != structure["params_encoder"]:
        raise RuntimeError(f"{folder}: evaluated encoder has {record['params_encoder']} parameters, the structure "
                           f"says {structure['params_encoder']}")
    write_result(folder, record)
    return record


def snapshot_levels(cfg: SweepConfig) -> list[float]:
    """The one-run curve's snapshots: the grid's targets above 0 (the run's target is the highest)."""
    levels = sorted(g for g in cfg.grid if g > 0.0)
    if not levels:
        raise SweepError(f"--snapshots: the grid {cfg.grid} has no target above 0")
    return levels


def make_objective(cfg: SweepConfig, study: str, *, grid: bool = False, tracker=None, budget: float | None = None,
                   enqueued_only: bool = False, snapshots: bool = False):
    """``objective(trial) -> (val_eer_pct, params_encoder)``, run on rank 0; wrap it with :func:`tracked_objective`
    for MLflow (``tracker`` here only nests the stage runs and logs the trial's extra metrics and artifacts).

    Under torchrun it first orders the other ranks (waiting in :func:`sweeps.distributed.follow`) to run the
    same trial, and every trial ends with :func:`sweeps.distributed.agree_outcome`: a failure on any rank fails
    the trial (:class:`TrialFailed`, whose one-line reason ``run_worker`` keeps as ``fail_reason``) on every rank.
    ``objective.in_trial`` says whether the other ranks are inside a trial (so nothing else may be broadcast).
    ``enqueued_only`` (a promoted study): a trial that is not an enqueued one (two workers raced for the last
    waiting trial, and Optuna made the loser a fresh one) ends at once as ``GridExhausted``, before any rank
    trains, and ``run_worker`` does not count it as a failure.
    """
    budget = cfg.budget if budget is None else float(budget)
    levels = snapshot_levels(cfg) if snapshots else None

    def objective(trial: optuna.Trial):
        if enqueued_only and "fixed_params" not in trial.storage.get_trial_system_attrs(trial._trial_id):
            raise GridExhausted(f"{study}: no enqueued trial left for this worker (another took the last)")
        if levels:
            knobs = {"target_sparsity": trial.suggest_float("target_sparsity", levels[-1], levels[-1]),
                     "snapshots": levels, "budget": budget}
        else:
            knobs = suggest(trial, cfg, grid) | {"budget": budget}
        number = _retried_number(trial)
        folder = trial_dir(cfg, study, trial.number if number is None else number)
        _claim_folder(folder, _study_uid(trial.study), trial.number if number is None else number, knobs)
        trial.set_user_attr("trial_dir", folder.as_posix())
        trial.set_user_attr("budget", budget)
        trial.set_user_attr("run_label", "snapshots" if levels else f"t={knobs['target_sparsity']:.2g}")  # MLflow
        if tracker is not None and tracker.active_run_id is not None:
            tracker.log_params({"budget": budget})   # the runs table's fidelity column
            tracker.set_tags({"budget": f"{budget:g}"})
        broadcast_order(Order("trial", {"knobs": knobs, "folder": folder.as_posix()}))
        objective.in_trial = True
        error = record = None
        try:
            record = run_trial(cfg, knobs, folder, tracker, previous_run=trial.user_attrs.get("retry_of_mlflow_run_id"))
        except Exception as err:  # noqa: BLE001 - every rank learns of it in agree_outcome
            error = err
        try:
            agree_outcome(error)  # a TrialFailed goes up: run_worker records its one-line reason (fail_reason)
        finally:
            objective.in_trial = False  # after LostRank too: run_sweep broadcasts nothing on a broken group
        extras = {k: record[k] for k in ("target_sparsity", "achieved_sparsity", "test_eer_pct", "test_mindcf_0.01",
                                         "test_mindcf_0.05", "val_mindcf_0.01", "dense_params_encoder", "minutes")}
        extras |= {k: v for k, v in record.items() if k.endswith(("_ci_low", "_ci_high"))}
        for key, value in extras.items():
            trial.set_user_attr(key, value)
        if levels:  # every point of the curve, for the analysis (svlib.analysis reads trial_dir/result.json too)
            trial.set_user_attr("points", [{k: p[k] for k in ("snapshot", "achieved_sparsity", "val_eer_pct",
                                                               "test_eer_pct", "params_encoder")}
                                           for p in record["points"]])
        if tracker is not None and tracker.active_run_id is not None:
            tracker.log_metrics(extras)
            tracker.log_artifact(folder / prune_stage.STRUCTURE)
            tracker.log_artifact(folder / prune_stage.STRUCTURE_PNG)
            tracker.log_artifact(folder / TRIAL_FILE)
        return record["val_eer_pct"], float(record["params_encoder"])

    objective.in_trial = False
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
    write_json(folder / "report.json", report)   # atomic: every worker of the study rewrites it
    if points:
        plot_sweep(points, teacher, folder / "curve.png", title=study.study_name)
    return report


# ------------------------------------------------------------------------------------------ sweep

def exit_code(done: dict) -> tuple[int, str]:
    """The worker's exit status and its one-line reason from its :class:`sweeps.study.WorkerReport` (as a
    dict): :func:`sweeps.study.worker_exit`'s (0; 1 every trial it ran failed; 3 it left trials unfinished)."""
    return worker_exit(WorkerReport(**done))


def promote(cfg: SweepConfig, *, budget: float, grid: bool = False, storage: str | None = None,
            best: int | None = None, trials: list[int] | None = None) -> list[dict[str, Any]]:
    """Enqueue trials of the study at the config's budget into the linked study at ``budget``
    (:func:`study_name`: ``<name>-b<budget>``), which re-runs them there (:func:`run_sweep` at ``budget`` finds
    the study's ``promoted_from`` and runs its enqueued trials only).

    ``trials``: these COMPLETE trials; else the ``best`` first of the Pareto front by validation EER. Each is
    enqueued once (``skip_if_exists``) with the user attrs ``promoted_from_study`` / ``promoted_from_trial``;
    the linked study's user attr ``promoted_from`` names the source. Returns what was chosen.
    """
    if budget == cfg.budget:
        raise SweepError(f"--promote: give --budget other than the config's {cfg.budget:g} (the fidelity to re-run at)")
    source_name = study_name(cfg, grid)
    source = load_study(source_name, storage)
    complete = {t.number: t for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    if trials:
        missing = [n for n in trials if n not in complete]
        if missing:
            raise SweepError(f"--trials: {missing} are not COMPLETE trials of {source_name} "
                             f"(complete: {sorted(complete)})")
        chosen = [complete[n] for n in trials]
    else:
        if best is None or best < 1:
            raise SweepError(f"--promote: give a number of trials >= 1, got {best}")
        front = sorted(pareto_front(source), key=lambda p: (p["values"][METRICS[0]], p["number"]))
        if not front:
            raise SweepError(f"--promote: {source_name} has no COMPLETE trial yet")
        chosen = [complete[p["number"]] for p in front[:best]]
    target = open_study(study_name(cfg, grid, budget), storage, DIRECTIONS, seed=cfg.seed, metric_names=list(METRICS),
                        heartbeat_interval=cfg.heartbeat_interval)
    target.set_user_attr("promoted_from", source_name)
    for t in chosen:
        target.enqueue_trial(dict(t.params), user_attrs={"promoted_from_study": source_name,
                                                         "promoted_from_trial": t.number}, skip_if_exists=True)
    return [{"number": t.number, "params": dict(t.params), "values": list(t.values)} for t in chosen]


def _promoted_count(study: optuna.Study) -> int:
    return sum("promoted_from_trial" in t.user_attrs for t in study.get_trials(deepcopy=False))


def run_sweep(cfg: SweepConfig, *, storage: str | None = None, grid: bool = False, n_trials: int | None = None,
              worker: int = 0, tracking_uri: str | None = None, track: bool = True,
              max_failures: int | None = None, report: bool = True, budget: float | None = None,
              wait_for_others: float = math.inf, snapshots: bool = False) -> dict:
    """One worker of the sweep (start several with different ``worker`` on the same storage).

    Under torchrun every rank calls this: rank 0 runs the worker (Optuna, MLflow, the report) and orders the
    other ranks through each trial (:mod:`sweeps.distributed`); every rank returns the outcome, ``code`` included
    (:func:`exit_code`). ``n_trials`` (default: the config's; with ``grid`` every grid point) counts COMPLETE
    trials; with ``grid`` it may not exceed the grid's points. ``budget`` (default the config's) selects the
    study at that fidelity (:func:`study_name`); a study filled by :func:`promote` runs its enqueued trials
    only. ``report.json`` / ``curve.png`` are written however the worker stops, interrupted (KeyboardInterrupt,
    SIGTERM through :func:`main`) included. ``snapshots``: the one-run curve (study ``<name>-snapshots``, one
    trial, :func:`make_objective`) instead of a sweep.

    Returns ``{"study", "storage", "worker": WorkerReport as dict, "report": report or None, "code"}``.
    """
    budget = cfg.budget if budget is None else check_budget(budget, "--budget")
    if snapshots and grid:
        raise SweepError("--snapshots traces the grid's targets in one trial: give it without --grid")
    name = study_name(cfg, grid, budget, snapshots)
    if grid and n_trials is not None and n_trials > len(cfg.grid):
        raise SweepError(f"--n-trials {n_trials} with --grid: the grid has {len(cfg.grid)} points, each run once "
                         f"(give at most {len(cfg.grid)}, or leave --n-trials out)")
    rank, _ = setup_process_group(cfg.dist_timeout_minutes)
    if rank != 0:
        stop = follow(lambda order: run_trial(cfg, order["knobs"], Path(order["folder"])),
                      on_failure=lambda failed: log.warning("rank %d: trial failed: %s", rank, failed))
        return {"study": name, "storage": storage, "worker": stop.payload.get("worker", {}), "report": None,
                "code": int(stop.payload.get("code", 2)), "stopped_because": stop.reason}
    leader = _Leader(cfg, name, budget, grid=grid, storage=storage, worker=worker, tracking_uri=tracking_uri,
                     track=track, snapshots=snapshots)
    try:
        out = leader.run(n_trials=n_trials, max_failures=max_failures, report=report, wait_for_others=wait_for_others)
    except BaseException as err:
        # the other ranks wait for an order between trials; inside a trial (or with a broken process group)
        # they are in the trial's collectives, and torchrun stops them with this rank; a signal (torchrun's
        # SIGTERM, Ctrl-C) reaches every rank itself
        if not leader.in_trial and not isinstance(err, (LostRank, KeyboardInterrupt)):
            broadcast_order(Order("stop", {"code": 2}, reason=one_line(err)))
        raise
    broadcast_order(Order("stop", {"code": out["code"], "worker": out["worker"]}, reason=out["worker"]["stopped_because"]))
    return out


class _Leader:
    """Rank 0's part of :func:`run_sweep`: the study, the tracker, the worker loop and the report."""

    def __init__(self, cfg: SweepConfig, name: str, budget: float, *, grid: bool, storage: str | None, worker: int,
                 tracking_uri: str | None, track: bool, snapshots: bool = False) -> None:
        self.cfg, self.name, self.budget, self.grid, self.storage = cfg, name, budget, grid, storage
        self.snapshots = snapshots
        self.worker, self.tracking_uri, self.track = worker, tracking_uri, track
        self.objective = None

    @property
    def in_trial(self) -> bool:
        return bool(getattr(self.objective, "in_trial", False))

    def run(self, *, n_trials: int | None, max_failures: int | None, report: bool, wait_for_others: float) -> dict:
        cfg, name, grid = self.cfg, self.name, self.grid
        existing = _existing_study(name, self.storage)
        promoted = existing is not None and "promoted_from" in existing.user_attrs
        # a promoted study holds enqueued points of any value: no grid sampler there
        sampler = grid_sampler(cfg.grid, "target_sparsity", seed=cfg.seed) if grid and not promoted else None
        if self.snapshots:
            sampler = grid_sampler(snapshot_levels(cfg)[-1:], "target_sparsity", seed=cfg.seed)
        study = open_study(name, self.storage, DIRECTIONS, seed=cfg.seed, worker=self.worker, sampler=sampler,
                           metric_names=list(METRICS), heartbeat_interval=cfg.heartbeat_interval)
        tracker = None
        if self.track:
            from sweeps.study import _make_tracker
            # both fidelities of a study in one MLflow experiment, side by side (the budget column)
            tracker = _make_tracker(study_name(cfg, grid, snapshots=self.snapshots), self.tracking_uri)
        self.objective = make_objective(cfg, name, grid=grid, tracker=tracker, budget=self.budget,
                                        enqueued_only=promoted, snapshots=self.snapshots)
        objective, on_stale = self.objective, None
        if tracker is not None:
            log_teacher_run(tracker, name, cfg, study)
            objective = tracked_objective(tracker, name, objective)
            on_stale = lambda s: close_orphaned_runs(s, tracker.tracking_uri)  # noqa: E731
        if promoted:
            total = _promoted_count(study)
        elif self.snapshots:
            total = 1
        else:
            total = (n_trials or len(cfg.grid)) if grid else (n_trials or cfg.n_trials)
        written = None
        try:
            done = run_worker(study, objective, total, max_failures=max_failures, on_stale=on_stale,
                              on_idle=lambda: broadcast_order(Order("idle")), wait_for_others=wait_for_others,
                              only_enqueued=promoted)
        finally:  # an interrupted worker still leaves the study's report and curve
            if report:
                written = write_report(cfg, study)
                if tracker is not None:
                    log_study_headline(tracker, name, written, study)
        log.info("worker %d: %s", self.worker, done)
        worker = dataclasses.asdict(done)
        return {"study": name, "storage": self.storage, "worker": worker, "report": written, "code": exit_code(worker)[0]}


def _existing_study(name: str, storage: str | None) -> optuna.Study | None:
    try:
        return load_study(name, storage)
    except SweepError:
        return None


def _trial_numbers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"--trials {text!r}: expected trial numbers, e.g. 3,5") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sweeps.prune_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep YAML (SweepConfig)")
    parser.add_argument("--overrides", default=None, help="YAML deep-merged over the sweep YAML (e.g. a rehearsal's)")
    parser.add_argument("--storage", default=os.environ.get("SVLIB_SWEEP_STORAGE"),
                        help="SQLAlchemy URL (default: env SVLIB_SWEEP_STORAGE, else sqlite:///sweeps/<study>.db)")
    parser.add_argument("--grid", action="store_true",
                        help="grid over the config's target sparsities (study <name>-grid)")
    parser.add_argument("--snapshots", action="store_true",
                        help="the whole curve from one trial (study <name>-snapshots): one prune1 ramps to the grid's "
                             "highest target and every grid target above 0 is a snapshot, shrunk and fine-tuned "
                             "like a grid point")
    parser.add_argument("--n-trials", type=int, default=None,
                        help="COMPLETE trials wanted (default: the config's n_trials; with --grid: every grid point, "
                             "and at most the grid's size: a grid point is never run twice)")
    parser.add_argument("--budget", type=float, default=None,
                        help="fraction of the stage YAMLs' epochs each trial trains (default: the config's); another "
                             "budget than the config's works on the linked study <name>-b<budget>")
    parser.add_argument("--promote", type=int, default=None, metavar="K",
                        help="enqueue the K best Pareto trials (by validation EER) of the study at the config's "
                             "budget into <name>-b<budget> (give --budget) and run them there")
    parser.add_argument("--trials", default=None, help="with --promote: these trial numbers instead (e.g. 3,5)")
    parser.add_argument("--plan", action="store_true",
                        help="print the sweep's cost (steps, samples, audio hours, GPU-hours) without training")
    parser.add_argument("--gpus", type=int, default=8, help="--plan: GPUs per trial (the torchrun world size)")
    parser.add_argument("--card", default="H100", help="--plan: the GPU (bench/results/gpu_<card>.json if measured)")
    parser.add_argument("--train-utterances", type=int, default=None,
                        help="--plan: utterances of data.train (default: counted from its wav.scp)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index (offsets the sampler seed)")
    parser.add_argument("--max-failures", type=int, default=None)
    parser.add_argument("--wait-for-others", type=float, default=math.inf, metavar="SECONDS",
                        help="how long to wait for other workers' running trials before leaving (exit 3 if any "
                             "is still running; default: until they finish or their heartbeat stops)")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI (default: svlib's default store)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # SIGTERM unwinds like Ctrl-C: the running trial is marked FAIL, its MLflow runs closed, and report.json /
    # curve.png are written before the worker exits.
    with interrupt_on_sigterm():
        try:
            cfg = load_sweep_config(args.config, read_yaml(args.overrides) if args.overrides else None)
            if args.plan:
                budget = cfg.budget if args.budget is None else check_budget(args.budget, "--budget")
                n_trials = len(cfg.grid) if args.grid else (args.n_trials or cfg.n_trials)
                print(format_plan(plan_sweep(cfg, world_size=args.gpus, budget=budget, n_trials=n_trials, card=args.card,
                                             train_utterances=args.train_utterances,
                                             grid=cfg.grid if args.grid else None)))
                return 0
            if args.promote is not None or args.trials:
                if args.budget is None:
                    raise SweepError("--promote: give --budget, the fidelity to re-run the chosen trials at")
                setup_process_group(cfg.dist_timeout_minutes)
                chosen = rank_zero_result(lambda: promote(cfg, budget=args.budget, grid=args.grid, storage=args.storage,
                                                          best=args.promote, trials=_trial_numbers(args.trials)))
                if rank_and_world()[0] == 0:
                    print(json.dumps({"promoted": chosen, "to": study_name(cfg, args.grid, args.budget)}, default=float))
            out = run_sweep(cfg, storage=args.storage, grid=args.grid, n_trials=args.n_trials, worker=args.worker,
                            tracking_uri=args.mlflow_uri, track=not args.no_tracking, max_failures=args.max_failures,
                            budget=args.budget, wait_for_others=args.wait_for_others, snapshots=args.snapshots)
        except (ConfigError, SweepError, RankError) as err:
            print(f"error: {err}", file=sys.stderr)
            leave_process_group()  # the other ranks got the same error (or rank 0's stop order) and leave too
            return 2
        except KeyboardInterrupt:
            print("interrupted: the running trial is FAILED (a worker retries it); report.json and curve.png written",
                  file=sys.stderr)
            return 130
    leave_process_group()
    worker = out["worker"]
    if out["report"] is not None:  # rank 0
        report = out["report"]
        print(json.dumps({"study": out["study"], "worker": worker, "trials": report["trials"],
                          "pareto_front": [{"number": p["number"], "params": p["params"], "values": p["values"]}
                                           for p in report["pareto_front"]]}, indent=1, default=float))
        message = exit_code(worker)[1]
        if message:
            print(message, file=sys.stderr)
    return out["code"]


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record as record_errors

    # under torchrun, a failing rank's traceback goes into torchrun's failure summary (its error file)
    sys.exit(record_errors(main)())
