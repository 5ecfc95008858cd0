"""The whole recipe in one command: every stage a nested MLflow run under one parent run.

    python -m experiments.pipeline --config experiments/configs/demo/pipeline.yaml [--report bench/results/demo_pipeline.json]

Stages are chained by folders only (``<out_dir>/<stage>/``, see ``experiments.common``). A finished stage
has a ``result.json`` and is skipped when the pipeline runs again; an interrupted training stage resumes
from its last checkpoint. So a killed pipeline is restarted with the same command.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from experiments import evaluate as evaluate_stage
from experiments import graft as graft_stage
from experiments import merge as merge_stage
from experiments import prune as prune_stage
from experiments import train as train_stage
from experiments.baselines import fbank_baseline, random_init_baseline
from experiments.common import DataConfig, Timer, metrics_of, print_table, read_result
from svlib.config import ConfigError, check_relative, load_config, to_dict
from svlib.tracking import Tracker, data_fingerprint, git_commit, headline_metrics

STAGE_KINDS = ("train", "merge", "evaluate", "prune", "shrink", "graft", "random_prune", "use")
# kinds with a stage YAML, and the config class it is validated into
CONFIG_CLASSES = {"train": train_stage.TrainStageConfig, "prune": prune_stage.DistillStageConfig}


@dataclass
class StageSpec:
    """One stage. Kinds: ``train`` (s1-s3, ps1-ps3), ``merge``, ``evaluate``, ``prune`` (prune1 with a
    ``prune:`` section in its YAML, prune2 without), ``shrink``, ``graft``, ``random_prune`` (same-size
    random-structure baseline of ``init``'s structure.json), ``use`` (a finished stage folder from elsewhere,
    e.g. another pipeline's s2, taken as is)."""

    name: str
    kind: Literal["train", "merge", "evaluate", "prune", "shrink", "graft", "random_prune", "use"]
    config: str | None = None   # stage YAML, relative to the pipeline YAML's folder (train and prune stages)
    init: str | None = None     # an earlier stage whose output this one starts from
    # the dense stage a pruned encoder derives from: the distillation teacher (prune; default: init), the
    # back-end and head donor (graft), the encoder cut at random (random_prune)
    teacher: str | None = None
    path: str | None = None     # ``use`` stages: the folder, relative to the repo
    seed: int = 0               # ``random_prune``: the draw
    # ``random_prune``: match the KD structure's totals per unit kind (random widths too) or its widths per layer
    match: Literal["kind", "layer"] = "kind"


@dataclass
class PipelineConfig:
    name: str
    out_dir: str
    data: DataConfig
    stages: list[StageSpec]
    baselines: bool = True       # random-init model and mean/std-fbank cosine on the test trials
    device: str = "auto"

    def __post_init__(self) -> None:
        check_relative(self.out_dir, "out_dir")
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
            if spec.kind in ("merge", "evaluate", "prune", "shrink", "graft", "random_prune") and spec.init is None:
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


def load_stage_configs(cfg: PipelineConfig, config_dir: Path) -> dict:
    """Validate every stage YAML before anything runs: a typo in s3.yaml must not cost an s1 training."""
    out = {}
    for spec in cfg.stages:
        if spec.kind in CONFIG_CLASSES:
            stage_cfg = load_config(config_dir / spec.config, CONFIG_CLASSES[spec.kind])
            stage_cfg.stage = spec.name
            if stage_cfg.device == "auto":
                stage_cfg.device = cfg.device
            out[spec.name] = stage_cfg
    return out


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
        return prune_stage.run_shrink(init, stage_dir, check_dir=cfg.data.load_dir("train"), tracker=tracker)
    if spec.kind == "random_prune":
        return prune_stage.run_random_prune(init, teacher, stage_dir, seed=spec.seed, match=spec.match,
                                            tracker=tracker)
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
        row[f"{list_name}_mindcf_0.01"] = summary["mindcf_0.01"]
        row[f"{list_name}_mindcf_0.05"] = summary["mindcf_0.05"]
    if record.get("best_val_eer_pct") is not None:
        row["val_eer_pct"] = record["best_val_eer_pct"]
    return row


def run(cfg: PipelineConfig, config_dir: Path, tracker: Tracker | None = None) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage_cfgs = load_stage_configs(cfg, config_dir)
    timer = Timer()
    tags = {"kind": "pipeline", "git_commit": git_commit(), "data_fingerprint": data_fingerprint(cfg.data.list_files())}
    summary: dict = {"name": cfg.name, "stages": {}}

    def body():
        dirs = stage_dirs(cfg)
        for spec in cfg.stages:
            reused = read_result(dirs[spec.name]) is not None
            if tracker is None:
                record = run_stage(spec, stage_cfgs.get(spec.name), cfg, out, None)
            else:
                stage_tags = tags | {"stage": spec.name, "kind": spec.kind, "reused": str(reused)}
                params = stage_cfgs[spec.name] if spec.name in stage_cfgs else {
                    k: v for k, v in (("init", spec.init), ("teacher", spec.teacher), ("path", spec.path)) if v}
                with tracker.run(spec.name, nested=True, tags=stage_tags, params=params):
                    record = run_stage(spec, stage_cfgs.get(spec.name), cfg, out, tracker)
                    if reused:  # a resumed pipeline still shows every stage's numbers in its parent run
                        tracker.log_metrics(metrics_of(record.get("test") or {}) | {
                            k: float(record[k]) for k in ("achieved_sparsity", "params_encoder") if k in record})
            summary["stages"][spec.name] = record
        if cfg.baselines:
            first_train = next((s for s in cfg.stages if s.kind == "train" and stage_cfgs[s.name].model is not None), None)
            runs = {"fbank": lambda: fbank_baseline(cfg.data)}
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
        # Every stage's own minutes, also for stages finished by an earlier (interrupted) invocation, so
        # the total is what the recipe costs, not what this call happened to redo.
        summary["wall_minutes"] = sum(float(r.get("minutes") or 0.0) for r in summary["stages"].values()) \
            + sum(summary.get("baseline_minutes", {}).values())
        summary["this_call_minutes"] = timer.minutes
        rows = [test_row(name, record) for name, record in summary["stages"].items()]
        rows += [test_row(f"baseline:{name}", {"test": res, "minutes": summary["baseline_minutes"][name]})
                 for name, res in summary.get("baselines", {}).items()]
        columns = ["stage"] + sorted({k for r in rows for k in r if k != "stage" and k != "minutes"}) + ["minutes"]
        summary["table"] = print_table(rows, columns, title=f"pipeline {cfg.name}: test trials per stage")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
        if tracker is not None:
            # the runs table's result columns: final test/val EER, minDCF, encoder size, wall minutes (rounded)
            tracker.log_metrics(headline_metrics(summary))
            tracker.log_artifact(out / "summary.json")

    if tracker is None:
        body()
    else:
        with tracker.run(f"pipeline:{cfg.name}", tags=tags, params={"pipeline": to_dict(cfg)}):
            body()
    return summary


def report(summary: dict, path: Path, list_name: str = "test") -> dict:
    """The benchmark JSON the issue asks for: per-stage test EER/minDCF and minutes, baselines, wall time."""
    stages = {}
    final = None
    for name, record in summary["stages"].items():
        test = (record.get("test") or {}).get(list_name)
        stages[name] = {"minutes": record.get("minutes")}
        if test is not None:
            stages[name] |= {"eer_pct": test["eer_pct"], "mindcf_0.01": test["mindcf_0.01"], "mindcf_0.05": test["mindcf_0.05"]}
            final = test["eer_pct"]
    base = summary.get("baselines", {})
    out = {
        "final_test_eer_pct": final,
        "baseline_random_init_eer_pct": base.get("random_init", {}).get(list_name, {}).get("eer_pct"),
        "baseline_fbank_eer_pct": base.get("fbank", {}).get(list_name, {}).get("eer_pct"),
        "wall_minutes": summary["wall_minutes"],
        "stages": stages,
        "baselines": {k: v.get(list_name) | {"minutes": summary["baseline_minutes"][k]} for k, v in base.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML")
    parser.add_argument("--report", help="also write the benchmark summary JSON here")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
        if summary.get("eer_ci_pct") is not None:  # speaker-level bootstrap 95 % interval
            row[f"{list_name}_eer_ci"] = "[{:.2f}, {:.2f}]".format(*summary["eer_ci_pct"])
    parser.add_argument("--experiment", help="MLflow experiment (default: the pipeline name)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, PipelineConfig)
        load_stage_configs(cfg, Path(args.config).parent)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tracker = None if args.no_tracking else Tracker(args.experiment or cfg.name)
    summary = run(cfg, Path(args.config).parent, tracker)
    if args.report:
        report(summary, Path(args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
