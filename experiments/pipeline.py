"""The whole recipe in one command: every stage a nested MLflow run under one parent run.

    python -m experiments.pipeline --config experiments/configs/demo/pipeline.yaml [--report bench/results/demo_pipeline.json]
    torchrun --nproc_per_node 8 -m experiments.pipeline --config P.yaml [--until merge | --stages s2,s3] [--overrides O.yaml]

Stages are chained by folders only (``<out_dir>/<stage>/``, see ``experiments.common``). A finished stage
has a ``result.json`` and is skipped when the pipeline runs again; an interrupted training stage resumes
from its last checkpoint. So a killed pipeline is restarted with the same command, and a later invocation
may use another number of ranks (the reference trains s1 on 8 GPUs, s2 and s3 on 4: ``--until merge`` on 8,
then the same command on 4).

Under torchrun, training and distillation stages (``train``, ``prune``) run on every rank (DDP); every other
stage, the baselines, the summary and all MLflow tracking run on rank 0 alone, and each stage ends with a
broadcast of rank 0's record, so no rank starts a stage before rank 0 has written the previous one's folder,
and every rank returns the same summary. A stage failing on rank 0 makes the other ranks raise its error;
a rank failing inside a collective stage exits and torchrun stops the others.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.distributed.elastic.multiprocessing.errors import record as record_errors

from experiments import evaluate as evaluate_stage
from experiments import graft as graft_stage
from experiments import merge as merge_stage
from experiments import prune as prune_stage
from experiments import train as train_stage
from experiments.baselines import fbank_baseline, random_init_baseline

from experiments.common import (RESULT, DataConfig, OutDirBusy, RankError, Timer, exclusive_out_dir,
                                interrupt_on_sigterm, leave_process_group, log_stage_results, metrics_of, print_table,
                                rank_zero_result, read_result, setup_process_group, share_from_rank_zero)
from svlib.config import (ConfigError, check_overrides, check_relative, from_dict, load_config, merge_overrides,
                          read_yaml, to_dict)
from svlib.data.lists import ListError
from svlib.files import write_json
from svlib.package import PackageError, check_registry_name
from svlib.tracking import (HOST_TAG, OUT_DIR_TAG, Tracker, close_stale_runs, data_fingerprint, git_commit, headline_metrics,
                            test_list_of, where_to_look)
from svlib.train.engine import ResumeError

log = logging.getLogger("experiments.pipeline")

STAGE_KINDS = ("train", "merge", "evaluate", "prune", "shrink", "graft", "random_prune", "control", "use")
# kinds with a stage YAML, and the config class it is validated into
CONFIG_CLASSES = {"train": train_stage.TrainStageConfig, "prune": prune_stage.DistillStageConfig}
# kinds every rank runs (DDP training); all other kinds run on rank 0 while the others wait for its record
ALL_RANK_KINDS = ("train", "prune")


@dataclass
class StageSpec:
    """One stage. Kinds: ``train`` (s1-s3, ps1-ps3), ``merge``, ``evaluate``, ``prune`` (prune1 with a
    ``prune:`` section in its YAML, prune2 without), ``shrink``, ``graft``, ``random_prune`` (same-size
    random-structure baseline of ``init``'s structure.json), ``control`` (``init``'s encoder removed or
    re-initialised, ``experiments.prune.control_encoder``: what the encoder is worth), ``use`` (a finished stage folder from elsewhere,
    e.g. another pipeline's s2, taken as is)."""

    name: str
    kind: Literal["train", "merge", "evaluate", "prune", "shrink", "graft", "random_prune", "control", "use"]
    config: str | None = None   # stage YAML, relative to the pipeline YAML's folder (train and prune stages)
    init: str | None = None     # an earlier stage whose output this one starts from
    # the dense stage a pruned encoder derives from: the distillation teacher (prune; default: init), the
    # back-end and head donor (graft), the encoder cut at random (random_prune)
    teacher: str | None = None
    path: str | None = None     # ``use`` stages: the folder, relative to the repo
    seed: int = 0               # ``random_prune``: the draw; ``control: random_init``: the initialisation
    # ``random_prune``: match the KD structure's totals per unit kind (random widths too) or its widths per layer
    match: Literal["kind", "layer"] = "kind"
    # ``control`` stages: which control (``experiments.prune.CONTROLS``)
    control: Literal["encoder_removed", "random_init"] | None = None
    # ``shrink`` stages: shrink ``init``'s snapshot at this sparsity (prune1's ``prune.snapshots``) instead of
    # its final state
    snapshot: float | None = None

    def __post_init__(self) -> None:
        if self.snapshot is not None and self.kind != "shrink":
            raise ConfigError(f"stages.{self.name}: 'snapshot' is for 'shrink' stages (which snapshot of prune1 "
                              "to shrink)")
        if (self.kind == "control") != (self.control is not None):
            raise ConfigError(f"stages.{self.name}: 'control' (encoder_removed or random_init) is for, and "
                              "required by, 'control' stages")


@dataclass
class PipelineConfig:
    name: str
    out_dir: str
    data: DataConfig
    stages: list[StageSpec]
    baselines: bool = True       # random-init model and mean/std-fbank cosine on the test trials
    device: str = "auto"
    # torchrun: how long any rank waits in a collective (init_process_group's timeout). Ranks wait for rank 0
    # while it evaluates, merges or runs the baselines, so this must exceed the longest of those (a VoxCeleb1-E/H
    # evaluation on one GPU); null: env SVLIB_DIST_TIMEOUT_MINUTES, else torch's default (10 minutes).
    dist_timeout_minutes: float | None = None

    def __post_init__(self) -> None:
        check_relative(self.out_dir, "out_dir")
        if self.dist_timeout_minutes is not None and self.dist_timeout_minutes <= 0:
            raise ConfigError(f"dist_timeout_minutes: must be > 0, got {self.dist_timeout_minutes}")
        seen = set()
        for spec in self.stages:
            if spec.name in seen:
                raise ConfigError(f"stages: duplicate stage name {spec.name!r}")
            for key in ("init", "teacher"):
                ref = getattr(spec, key)
                if ref is not None and ref not in seen:
                    raise ConfigError(f"stages.{spec.name}.{key}: {ref!r} is not an earlier stage")
            if spec.kind in CONFIG_CLASSES and spec.config is None:
                raise ConfigError(f"stages.{spec.name}: a {spec.kind} stage needs 'config'")
            if (spec.kind in ("merge", "evaluate", "prune", "shrink", "graft", "random_prune", "control")
                    and spec.init is None):
                raise ConfigError(f"stages.{spec.name}: a {spec.kind} stage needs 'init'")
            if spec.kind in ("graft", "random_prune") and spec.teacher is None:
                raise ConfigError(f"stages.{spec.name}: a {spec.kind} stage needs 'teacher' (the dense stage)")
            if (spec.kind == "use") != (spec.path is not None):
                raise ConfigError(f"stages.{spec.name}: 'path' is for (and required by) 'use' stages")
            if spec.kind == "use":
                check_relative(spec.path, f"stages.{spec.name}.path")
                if spec.init is not None or spec.config is not None:
                    raise ConfigError(f"stages.{spec.name}: a 'use' stage takes only 'path'")
            seen.add(spec.name)


def load_stage_configs(cfg: PipelineConfig, config_dir: Path, overrides: dict[str, dict] | None = None) -> dict:
    """Validate every stage YAML before anything runs: a typo in s3.yaml must not cost an s1 training.
    ``overrides``: stage name -> partial mapping of its YAML, deep-merged in before validation."""
    out = {}
    for spec in cfg.stages:
        if spec.kind in CONFIG_CLASSES:
            stage_cfg = load_config(config_dir / spec.config, CONFIG_CLASSES[spec.kind],
                                    overrides=(overrides or {}).get(spec.name))
            stage_cfg.stage = spec.name
            if stage_cfg.device == "auto":
                stage_cfg.device = cfg.device
            out[spec.name] = stage_cfg
    return out


def load_pipeline(path: str | Path, overrides_path: str | Path | None = None) -> tuple[PipelineConfig, dict]:
    """The pipeline YAML and every stage YAML, validated, with an overrides file laid over them first.

    The overrides file is a mapping of pipeline settings (any key of the pipeline YAML but ``stages``:
    ``out_dir``, ``device``, ``data: {<DataConfig fields>}``, ...) and ``stages: {<stage name>: <partial
    mapping of that stage's YAML>}``. Mappings are deep-merged into the raw YAML (lists and scalars replace)
    before validation, so the merged configs pass every usual check; an unknown key or stage name in the
    overrides is an error with its dotted path. Returns (pipeline config, stage name -> stage config).
    """
    path = Path(path)
    top: dict = {}
    stage_overrides: dict = {}
    if overrides_path is not None:
        overrides = read_yaml(overrides_path)
        try:
            if not isinstance(overrides, dict):
                raise ConfigError(f"expected a mapping, got {overrides!r}")
            top = {k: v for k, v in overrides.items() if k != "stages"}
            check_overrides(PipelineConfig, top, "")
            stage_overrides = overrides.get("stages") or {}
            if not isinstance(stage_overrides, dict):
                raise ConfigError(f"stages: expected a mapping of stage name -> settings, got {stage_overrides!r}")
        except ConfigError as err:
            raise ConfigError(f"{overrides_path}: {err}") from None
    try:
        cfg = from_dict(PipelineConfig, merge_overrides(read_yaml(path), top))
    except ConfigError as err:
        raise ConfigError(f"{path}{f' (with {overrides_path})' if top else ''}: {err}") from None
    kinds = {spec.name: spec.kind for spec in cfg.stages}
    for name, partial in stage_overrides.items():
        where = f"{overrides_path}: stages.{name}"
        if name not in kinds:
            raise ConfigError(f"{where}: no such stage in {path} (stages: {list(kinds)})")
        if kinds[name] not in CONFIG_CLASSES:
            raise ConfigError(f"{where}: a {kinds[name]} stage has no config to override")
        try:
            check_overrides(CONFIG_CLASSES[kinds[name]], partial, f"stages.{name}")
        except ConfigError as err:
            raise ConfigError(f"{overrides_path}: {err}") from None
    return cfg, load_stage_configs(cfg, path.parent, stage_overrides)


def select_stages(cfg: PipelineConfig, stages: str | None = None, until: str | None = None) -> list[str] | None:
    """``--stages a,b`` or ``--until NAME`` -> the stage names to run (None: all of them).

    A selected stage's ``init`` / ``teacher`` must be selected too or already finished (its ``result.json``).
    """
    names = [spec.name for spec in cfg.stages]
    if stages is not None and until is not None:
        raise ConfigError("give --stages or --until, not both")
    if stages is None and until is None:
        return None
    if until is not None:
        if until not in names:
            raise ConfigError(f"--until: no stage {until!r} (stages: {names})")
        chosen = names[: names.index(until) + 1]
    else:
        chosen = [name.strip() for name in stages.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in names]
        if unknown or not chosen:
            raise ConfigError(f"--stages: no stage(s) {unknown} (stages: {names})")
        chosen = [name for name in names if name in chosen]  # pipeline order
    dirs = stage_dirs(cfg)
    for spec in cfg.stages:
        if spec.name not in chosen:
            continue
        for dep in (spec.init, spec.teacher):
            if dep is not None and dep not in chosen and read_result(dirs[dep]) is None:
                raise ConfigError(f"stage {spec.name} starts from {dep}, which is not selected and not finished "
                                  f"({dirs[dep]} has no result.json)")
    return chosen


def check_inputs(cfg: PipelineConfig) -> None:
    """Everything the pipeline reads from outside its out_dir, before its first stage: the data section
    (:meth:`DataConfig.check_inputs`) and the folders of ``use`` stages."""
    cfg.data.check_inputs()
    unfinished = [f"stages.{spec.name}.path: {spec.path} is not a finished stage (no {RESULT})"
                  for spec in cfg.stages if spec.kind == "use" and read_result(spec.path) is None]
    if unfinished:
        raise ConfigError("; ".join(unfinished))


def stage_dirs(cfg: PipelineConfig) -> dict[str, Path]:
    """Every stage's folder: ``<out_dir>/<name>``, or its own ``path`` for a ``use`` stage."""
    return {s.name: Path(s.path) if s.kind == "use" else Path(cfg.out_dir) / s.name for s in cfg.stages}


def run_stage(spec: StageSpec, stage_cfg, cfg: PipelineConfig, out: Path, tracker) -> dict:
    dirs = stage_dirs(cfg)
    stage_dir = dirs[spec.name]
    init = dirs[spec.init] if spec.init is not None else None
    teacher = dirs[spec.teacher] if spec.teacher is not None else None
    if spec.kind == "use":
        record = read_result(stage_dir)
        if record is None:
            raise FileNotFoundError(f"stage {spec.name}: {stage_dir} is not a finished stage (no result.json); "
                                    "run the pipeline that produces it first")
        return record
    if spec.kind == "train":
        return train_stage.run(stage_cfg, cfg.data, stage_dir, init=init, tracker=tracker)
    if spec.kind == "merge":
        return merge_stage.run(init, stage_dir, check_dir=cfg.data.load_dir("train"), tracker=tracker)
    if spec.kind == "prune":
        return prune_stage.run_distill(stage_cfg, cfg.data, stage_dir, init=init, teacher=teacher, tracker=tracker)
    if spec.kind == "shrink":
        if spec.snapshot is not None:
            init = prune_stage.snapshot_dir(init, spec.snapshot)
            if not init.is_dir():
                raise FileNotFoundError(f"stage {spec.name}: no snapshot {spec.snapshot} in {init.parent} (is it in "
                                        f"{spec.init}'s prune.snapshots, and has {spec.init} finished?)")
        return prune_stage.run_shrink(init, stage_dir, check_dir=cfg.data.load_dir("train"), tracker=tracker)
    if spec.kind == "random_prune":
        return prune_stage.run_random_prune(init, teacher, stage_dir, seed=spec.seed, match=spec.match,
                                            tracker=tracker)
    if spec.kind == "control":
        return prune_stage.run_control(init, stage_dir, spec.control, seed=spec.seed, tracker=tracker)
    if spec.kind == "graft":
        return graft_stage.run(init, teacher, stage_dir, check_dir=cfg.data.load_dir("train"), tracker=tracker)
    return evaluate_stage.run(init, cfg.data, stage_dir, tracker=tracker, device=cfg.device)


def test_row(name: str, record: dict) -> dict:
    row = {"stage": name}
    if record.get("minutes") is not None:
        row["minutes"] = record["minutes"]
    for list_name, summary in (record.get("test") or {}).items():
        if list_name == "val":
            continue
        row[f"{list_name}_eer_pct"] = summary["eer_pct"]
        if summary.get("eer_ci_pct") is not None:  # speaker-level bootstrap 95 % interval
            row[f"{list_name}_eer_ci"] = "[{:.2f}, {:.2f}]".format(*summary["eer_ci_pct"])
        row[f"{list_name}_mindcf_0.01"] = summary["mindcf_0.01"]
        row[f"{list_name}_mindcf_0.05"] = summary["mindcf_0.05"]
    if record.get("best_val_eer_pct") is not None:
        row["val_eer_pct"] = record["best_val_eer_pct"]
    return row


def interval_notes(summary: dict) -> str:
    """Below the table, one printed line per test list whose intervals under-cover (``ci_note``: too few
    speakers, svlib.scoring.bootstrap.few_speakers_note); returned with its line breaks for the summary."""
    records = list(summary["stages"].values()) + [{"test": res} for res in summary.get("baselines", {}).values()]
    notes = {name: s["ci_note"] for r in records for name, s in (r.get("test") or {}).items() if s.get("ci_note")}
    lines = [f"note: {name}: {note}" for name, note in sorted(notes.items())]
    for line in lines:
        print(line, flush=True)
    return "".join("\n" + line for line in lines)


def run(cfg: PipelineConfig, config_dir: Path, tracker: Tracker | None = None, *,
        stage_cfgs: dict | None = None, stages: list[str] | None = None) -> dict:
    """Run (or skip, where finished) the pipeline's stages, then the baselines and the summary.

    ``stages``: the names to run (:func:`select_stages`; None: all). A partial run skips the baselines and
    leaves ``summary.json`` alone. Under torchrun every rank calls this and returns the same summary; only
    rank 0 uses ``tracker`` (pass None, or anything, on the others).
    """
    rank, _ = setup_process_group(cfg.dist_timeout_minutes)
    tracker = tracker if rank == 0 else None
    out = Path(cfg.out_dir)
    rank_zero_result(lambda: check_inputs(cfg))
    if stage_cfgs is None:
        stage_cfgs = load_stage_configs(cfg, config_dir)
    selected = [spec for spec in cfg.stages if stages is None or spec.name in stages]
    whole = len(selected) == len(cfg.stages)
    timer = Timer()
    tags = {}
    if tracker is not None:
        tags = {"kind": "pipeline", "git_commit": git_commit(), "data_fingerprint": data_fingerprint(cfg.data.list_files()),
                OUT_DIR_TAG: str(out.resolve()), HOST_TAG: socket.gethostname()}
    # the machine's state, for reading the minutes (shared machines swing 2-5x): threads, cores, load averages
    summary: dict = {"name": cfg.name, "stages": {}, "machine": {
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg())}}
    dirs = stage_dirs(cfg)
    logged_models: dict[str, str] = {}  # stage -> its MLflow logged model's id (rank 0, tracked)
    # an MLflow store, not a stand-in with the tracker's run/log interface (the full-size rehearsal's monitor):
    # only a store keeps logged models and a dead pipeline's runs
    to_store = isinstance(tracker, Tracker)

    def run_tracked(spec: StageSpec) -> dict:
        """This rank's part of one stage, in its own nested MLflow run on rank 0."""
        if tracker is None:
            return run_stage(spec, stage_cfgs.get(spec.name), cfg, out, None)
        reused = read_result(dirs[spec.name]) is not None
        stage_tags = tags | {"stage": spec.name, "kind": spec.kind, "reused": str(reused)}
        params = stage_cfgs[spec.name] if spec.name in stage_cfgs else {
            k: v for k, v in (("init", spec.init), ("teacher", spec.teacher), ("path", spec.path)) if v}
        with tracker.run(spec.name, nested=True, tags=stage_tags, params=params):
            record = run_stage(spec, stage_cfgs.get(spec.name), cfg, out, tracker)
            if reused:  # a resumed pipeline still shows every stage's numbers in its parent run
                tracker.log_metrics(metrics_of(record.get("test") or {}) | {
                    k: float(record[k]) for k in ("achieved_sparsity", "params_encoder") if k in record})
            # the stage's row of the runs table, and its model in the experiment's Models tab (an evaluation's
            # numbers go to the model it scored)
            if to_store:
                scored = logged_models.get(spec.init) if spec.kind == "evaluate" else None
                model_id = log_stage_results(tracker, spec.name, spec.kind, dirs[spec.name], record, params, scored)
                if model_id is not None:
                    logged_models[spec.name] = model_id
        return record

    def finish() -> dict:
        """Rank 0: baselines, the table, summary.json and the parent run's metrics."""
        if cfg.baselines and whole:
            first_train = next((s for s in cfg.stages if s.kind == "train" and stage_cfgs[s.name].model is not None), None)
            runs = {"fbank": lambda: fbank_baseline(cfg.data, scores_dir=out / "baselines" / "fbank")}
            if first_train is not None:
                runs["random_init"] = lambda: random_init_baseline(stage_cfgs[first_train.name], cfg.data)
            summary["baselines"], summary["baseline_minutes"] = {}, {}
            for name, run_baseline in runs.items():
                one = Timer()
                summary["baselines"][name] = run_baseline()
                summary["baseline_minutes"][name] = one.minutes
            if tracker is not None:
                for name, res in summary["baselines"].items():
                    tracker.log_metrics(metrics_of(res, prefix=f"baseline_{name}_"))
            summary["final_vs_fbank"] = compare_with_fbank(cfg, out)
        # Every stage's own minutes, also for stages finished by an earlier (interrupted) invocation, so
        # the total is what the recipe costs, not what this call happened to redo.
        summary["wall_minutes"] = sum(float(r.get("minutes") or 0.0) for r in summary["stages"].values()) \
            + sum(summary.get("baseline_minutes", {}).values())
        summary["this_call_minutes"] = timer.minutes
        summary["machine"]["load_average_end"] = list(os.getloadavg())
        rows = [test_row(name, record) for name, record in summary["stages"].items()]
        rows += [test_row(f"baseline:{name}", {"test": res, "minutes": summary["baseline_minutes"][name]})
                 for name, res in summary.get("baselines", {}).items()]
        columns = ["stage"] + sorted({k for r in rows for k in r if k != "stage" and k != "minutes"}) + ["minutes"]
        summary["table"] = print_table(rows, columns, title=f"pipeline {cfg.name}: test trials per stage")
        summary["table"] += interval_notes(summary)
        if to_store:  # where its runs and its final model are (the printout, --register)
            summary["mlflow"] = {"experiment": tracker.experiment, "experiment_id": tracker.experiment_id,
                                 "run_id": tracker.active_run_id,
                                 "final_model_id": logged_models.get(final_model_stage(cfg, summary) or "")}
        if whole:  # a partial run (--until, --stages) is not the pipeline's summary
            write_json(out / "summary.json", summary)
            if tracker is not None:
                # the runs table's result columns: final test/val EER, minDCF, encoder size, wall minutes (rounded)
                tracker.log_metrics(headline_metrics(summary))
                tracker.log_artifact(out / "summary.json")
        return summary

    def body() -> dict:
        for spec in selected:
            if spec.kind in ALL_RANK_KINDS:
                # every rank trains; the stage ends with rank 0's record on every rank, and this broadcast
                # is the boundary also where the stage was already finished (rank 0 may still be logging it)
                record = share_from_rank_zero(run_tracked(spec))
            else:
                record = rank_zero_result(lambda: run_tracked(spec))
            summary["stages"][spec.name] = record
        return rank_zero_result(finish)

    with exclusive_out_dir(out):  # one pipeline per out_dir; every rank holds or checks it
        if tracker is None:
            return body()
        if to_store:
            try:  # a dead pipeline's, under our lock; a store's hiccup must not stop this pipeline
                close_stale_runs(tracker.tracking_uri, tracker.experiment_id, out, socket.gethostname())
            except Exception as err:  # noqa: BLE001
                log.warning("could not close the runs a dead pipeline left RUNNING: %s", err)
        with tracker.run(f"pipeline:{cfg.name}", tags=tags, params={"pipeline": to_dict(cfg)}):
            return body()


def final_model_stage(cfg: PipelineConfig, summary: dict) -> str | None:
    """The stage whose model the pipeline's headline numbers score: the last stage evaluated on the test lists,
    or, for an evaluation stage, the stage it evaluated (``--register`` registers that stage's model)."""
    specs = {spec.name: spec for spec in cfg.stages}
    final = None
    for name, record in summary["stages"].items():
        if test_list_of(record) is not None:
            final = name
    if final is not None and specs[final].kind == "evaluate":
        return specs[final].init
    return final


def register_final_model(summary: dict, name: str, alias: str | None, tracking_uri: str) -> str:
    """Register the pipeline's final model (:func:`final_model_stage`) from its own run; returns the line to print."""
    from svlib.package import register_logged_model

    model_id = (summary.get("mlflow") or {}).get("final_model_id")
    if model_id is None:
        raise ConfigError(f"--register {name}: pipeline {summary['name']} logged no final model to register (its "
                          "final evaluation scores no train, merge or graft stage of this run)")
    version = register_logged_model(model_id, name, alias, tracking_uri)
    return f"registered model {name} version {version}" + (f": models:/{name}@{alias}" if alias else "")


def compare_with_fbank(cfg: PipelineConfig, out: Path) -> dict:
    """Paired speaker-level bootstrap of EER(final stage) - EER(fbank baseline) per test list, from both score
    files: whether the trained model beats the no-learning baseline on the same trials, with its 95 % interval."""
    from svlib.scoring.bootstrap import paired_score_files

    final = next((s.name for s in reversed(cfg.stages) if (out / s.name / "scores").is_dir()), None)
    tests = cfg.data.tests()
    if final is None or tests is None:
        return {}
    test_dir, trials = tests
    out_lists = {}
    for name, list_trials in trials.items():
        a, b = out / final / "scores" / f"{name}.txt", out / "baselines" / "fbank" / "scores" / f"{name}.txt"
        if not (a.is_file() and b.is_file()):
            continue
        paired = paired_score_files(a, b, list_trials, test_dir.utt2spk, name)
        eer = paired["eer_pct"]
        # "better" is a significance call: not made on a list too small for its interval (bootstrap.MIN_SPEAKERS)
        out_lists[name] = {"stage": final, "eer_diff": eer["diff"], "eer_diff_ci": eer["ci"], "p_value": eer["p_value"],
                           "final_better": eer["significant"] and eer["ci"][1] < 0.0, "speakers": paired["speakers"]}
        out_lists[name] |= {"note": paired["note"]} if "note" in paired else {}
    return out_lists


# what report() keeps of one list's evaluation summary: the numbers a results table prints (no score paths)
LIST_NUMBERS = ("eer_pct", "eer_ci_pct", "mindcf_0.01", "mindcf_0.01_ci", "mindcf_0.05", "mindcf_0.05_ci",
                "num_trials", "num_target", "ci_speakers", "ci_note")


def list_numbers(results: dict | None) -> dict[str, dict]:
    """``{list: evaluation summary}`` -> ``{list: its LIST_NUMBERS}``: every list a stage or baseline was scored on
    (the test lists and, for an evaluation stage, val), so a table of any list is read from the report alone."""
    return {name: {k: res[k] for k in LIST_NUMBERS if res.get(k) is not None} for name, res in (results or {}).items()}


def report(summary: dict, path: Path, list_name: str = "test") -> dict:
    """The benchmark JSON the issue asks for: per-stage test EER/minDCF and minutes, baselines, wall time.

    The flat keys are the headline list's (``list_name``); ``lists`` under each stage and baseline holds every
    list it was scored on, and a training stage's ``best_val_eer_pct`` is the val EER its checkpoint was chosen
    by: the README's demo table is generated from this file (bench/readme_tables.py), so every number it
    prints must be here.
    """
    stages = {}
    final = final_ci = test_speakers = ci_note = None
    for name, record in summary["stages"].items():
        test = (record.get("test") or {}).get(list_name)
        stages[name] = {"minutes": record.get("minutes")}
        if record.get("best_val_eer_pct") is not None:
            stages[name]["best_val_eer_pct"] = record["best_val_eer_pct"]
        if record.get("test"):
            stages[name]["lists"] = list_numbers(record["test"])
        if test is not None:
            stages[name] |= {"eer_pct": test["eer_pct"], "mindcf_0.01": test["mindcf_0.01"], "mindcf_0.05": test["mindcf_0.05"]}
            # speaker-level bootstrap 95 % interval [low, high] and the list's speaker count, when evaluated with one
            stages[name] |= {k: test[k] for k in ("eer_ci_pct", "mindcf_0.01_ci") if test.get(k) is not None}
            final, final_ci, test_speakers = test["eer_pct"], test.get("eer_ci_pct"), test.get("ci_speakers")
            ci_note = test.get("ci_note")
    base = summary.get("baselines", {})
    out = {
        "final_test_eer_pct": final,
        "final_test_eer_ci": final_ci,
        "test_speakers": test_speakers,
        "test_ci_note": ci_note,  # too few speakers for the intervals to hold their level (bootstrap.MIN_SPEAKERS)
        "baseline_random_init_eer_pct": base.get("random_init", {}).get(list_name, {}).get("eer_pct"),
        "baseline_fbank_eer_pct": base.get("fbank", {}).get(list_name, {}).get("eer_pct"),
        "baseline_fbank_eer_ci": base.get("fbank", {}).get(list_name, {}).get("eer_ci_pct"),
        # paired 95 % interval of EER(final) - EER(fbank baseline) on the same trials; below 0: the model is better
        "final_vs_fbank_eer_diff_ci": summary.get("final_vs_fbank", {}).get(list_name, {}).get("eer_diff_ci"),
        "final_vs_fbank": summary.get("final_vs_fbank", {}),
        "wall_minutes": summary["wall_minutes"],
        "machine": summary.get("machine"),
        "stages": stages,
        "baselines": {k: v.get(list_name) | {"minutes": summary["baseline_minutes"][k], "lists": list_numbers(v)}
                      for k, v in base.items()},
    }
    write_json(path, out)
    return out


def launch_command(nproc: int, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m experiments.pipeline ARGS`` with this interpreter (tests,
    benchmarks); ``--standalone`` takes a free port, so two such jobs on one machine do not collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "experiments.pipeline", *args]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML")
    parser.add_argument("--overrides", help="YAML laid over the pipeline and stage YAMLs (see load_pipeline): "
                        "{out_dir, device, data: {...}, stages: {<name>: {...}}, ...}")
    parser.add_argument("--until", metavar="STAGE", help="run the stages up to and including this one")
    parser.add_argument("--stages", help="comma-separated stages to run; what they start from must be finished")
    parser.add_argument("--report", help="also write the benchmark summary JSON here")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--experiment", help="MLflow experiment (default: the pipeline name)")
    parser.add_argument("--register", metavar="NAME", help="register the final model (the one the last evaluation "
                        "scored) in the MLflow model registry as a new version of NAME, from its own run")
    parser.add_argument("--alias", default="champion", help="alias of the registered version (default champion): "
                        "models:/NAME@ALIAS loads it")
    args = parser.parse_args(argv)
    try:
        if args.register is not None:  # before hours of training, not after
            if args.no_tracking:
                raise ConfigError("--register needs MLflow tracking (drop --no-tracking)")
            check_registry_name(args.register, args.alias)
        cfg, stage_cfgs = load_pipeline(args.config, args.overrides)
        selected = select_stages(cfg, args.stages, args.until)
    except (ConfigError, PackageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank, _ = setup_process_group(cfg.dist_timeout_minutes)
    try:
        with interrupt_on_sigterm():  # a SIGTERM closes this pipeline's MLflow runs and releases its lock
            tracker = None if args.no_tracking or rank != 0 else Tracker(args.experiment or cfg.name)
            summary = run(cfg, Path(args.config).parent, tracker, stage_cfgs=stage_cfgs, stages=selected)
    except (ConfigError, ListError, ResumeError, OutDirBusy, RankError, OSError) as err:
        # the user's side (a path, a busy or read-only out_dir, a full disk) or rank 0's error on the others: one
        # line; no leave_process_group, whose barrier a rank still inside a stage would never reach (torchrun
        # stops the others when this rank exits)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume (finished stages are kept in {cfg.out_dir})",
              file=sys.stderr)
        return 130
    code = 0
    if rank == 0:
        if args.report:
            report(summary, Path(args.report))
        if tracker is not None:
            try:
                if args.register:
                    print(register_final_model(summary, args.register, args.alias, tracker.tracking_uri), flush=True)
            except Exception as err:  # noqa: BLE001  (ConfigError, the registry's MlflowException): the work is done
                print(f"error: {err}", file=sys.stderr)
                code = 2
            files = [p for p in (Path(cfg.out_dir) / "summary.json", args.report) if p and Path(p).is_file()]
            for line in where_to_look(tracker.tracking_uri, tracker.experiment, tracker.experiment_id,
                                      summary["mlflow"]["run_id"], files):
                print(line, flush=True)
    leave_process_group()
    return code


if __name__ == "__main__":
    # under torchrun, the failing rank's traceback goes into torchrun's failure summary (its error file)
    sys.exit(record_errors(main)())
