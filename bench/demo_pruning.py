"""KD-guided structured pruning of the demo model vs a random structure of the same size, on sv-bench.

    python bench/demo_pruning.py [--targets 0.5 0.7 0.8] [--teacher exp/demo/s2] [--out exp/demo_pruning]

Needs the demo pipeline's stage-2 folder (``make demo``). For each target sparsity it runs the pipeline
``experiments/configs/demo_prune/pipeline.yaml`` with prune1's target replaced (stage YAMLs copied, the
changed one rewritten, into ``<out>/t<NN>/configs``):

* KD:     prune1 -> shrink -> prune2 -> graft -> ps1 -> ps2 -> ps3 -> eval_pruned
* random (``match: kind``): random_prune (the teacher's encoder cut with random masks keeping as many heads /
          FFN units / conv channels per kind as the KD structure) -> graft_random -> ps1..ps3_random -> eval_random
* random (``match: layer``): random_layer (the KD structure's widths layer by layer, only which units are kept
          is random) -> graft_random_layer -> ps1..ps3_random_layer -> eval_random_layer

and reports, in ``bench/results/demo_pruning.json`` (key ``points``), the test-trial EER and minDCF of each
with its speaker-level bootstrap 95 % interval, the paired bootstrap of the EER difference KD - random on the
same trials (``eer_diff_ci``: per-kind match, ``eer_diff_ci_layer``: per-layer match; an interval below 0
means KD is better, one containing 0 means no measurable difference), the validation EERs, the achieved
sparsity and the encoder sizes, plus ``teacher_eer_pct``. Every stage folder is reused when finished and
resumed from its checkpoint when interrupted: rerun the same command after a kill.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import pipeline  # noqa: E402
from experiments.common import Timer, print_table, read_result  # noqa: E402
from experiments.prune import DistillStageConfig  # noqa: E402
from svlib.files import write_json  # noqa: E402
from svlib.config import load_config, save_config  # noqa: E402

CONFIG = REPO / "experiments" / "configs" / "demo_prune" / "pipeline.yaml"
RESULT = REPO / "bench" / "results" / "demo_pruning.json"
TEST_LIST = "test"


def target_config(target: float, teacher: Path, out: Path) -> tuple[pipeline.PipelineConfig, Path]:
    """The demo_prune pipeline for one target: its own out_dir and a config folder with prune1's target set."""
    cfg = load_config(CONFIG, pipeline.PipelineConfig)
    run_dir = out / f"t{round(target * 100):02d}"
    config_dir = run_dir / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    for spec in cfg.stages:
        if spec.config is not None:
            shutil.copy2(CONFIG.parent / spec.config, config_dir / spec.config)
        if spec.kind == "use":
            spec.path = teacher.as_posix()
        if spec.kind == "prune":
            stage = load_config(CONFIG.parent / spec.config, DistillStageConfig)
            if stage.prune is not None:
                stage.prune.target_sparsity = target
                save_config(stage, config_dir / spec.config)
    cfg.out_dir = run_dir.as_posix()
    cfg.name = f"{cfg.name}_t{round(target * 100):02d}"
    return cfg, config_dir


def test_eer(record: dict | None, list_name: str = TEST_LIST, key: str = "eer_pct"):
    """A metric (EER by default) on one trial list of a stage record; ``val``: the validation list."""
    test = (record or {}).get("test", {}).get(list_name)
    return None if test is None else test.get(key)


def paired_eer_difference(kd_stage: Path, random_stage: Path, trials_path: str, utt2spk: dict,
                          replicates: int = 1000) -> dict:
    """Paired speaker-level bootstrap of EER(KD) - EER(random) from the two eval stages' score files."""
    from svlib.data.lists import read_trials
    from svlib.scoring.bootstrap import paired_score_files

    eer = paired_score_files(kd_stage / "scores" / f"{TEST_LIST}.txt", random_stage / "scores" / f"{TEST_LIST}.txt",
                             read_trials(trials_path), utt2spk, trials_path, replicates)["eer_pct"]
    return {"diff": eer["diff"], "ci": eer["ci"], "p_value": eer["p_value"], "kd_wins": eer["ci"][1] < 0.0,
            "random_wins": eer["ci"][0] > 0.0}


def verdict(points: list[dict], match: str) -> str:
    """One sentence: at which targets KD beats the ``match`` (kind / layer) random structure, loses, or ties."""
    paired = [(p["target"], p["paired"][match]) for p in points]
    wins = [t for t, d in paired if d["kd_wins"]]
    losses = [t for t, d in paired if d["random_wins"]]
    ties = [t for t, d in paired if not (d["kd_wins"] or d["random_wins"])]
    return (f"KD better at {wins or 'no target'}; random better at {losses or 'no target'}; no significant "
            f"difference at {ties or 'no target'} (paired 95 % interval of EER(KD) - EER(random))")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.8])
    parser.add_argument("--teacher", default="exp/demo/s2", help="the demo pipeline's stage-2 folder")
    parser.add_argument("--out", default="exp/demo_pruning")
    parser.add_argument("--result", default=str(RESULT.relative_to(REPO)))
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--experiment", default="demo_pruning", help="MLflow experiment")
    args = parser.parse_args(argv)

    teacher = Path(args.teacher)
    teacher_record = read_result(teacher)
    if teacher_record is None or not (teacher / "model").is_dir():
        print(f"error: {teacher} is not a finished stage-2 folder (no result.json / model/). Run the demo "
              "pipeline first: make demo (python -m experiments.pipeline --config "
              "experiments/configs/demo/pipeline.yaml)", file=sys.stderr)
        return 2
    tracker = None
    if not args.no_tracking:
        from svlib.tracking import Tracker
        tracker = Tracker(args.experiment)

    timer = Timer()
    load_before = os.getloadavg()
    points = []
    utt2spk = None  # the test list's speakers: the same for every target, read once
    for target in args.targets:
        cfg, config_dir = target_config(target, teacher, Path(args.out))
        summary = pipeline.run(cfg, config_dir, tracker)
        stages = summary["stages"]
        run_dir = Path(cfg.out_dir)
        trials_path = cfg.data.test_trials[TEST_LIST]
        point = {"target": target,
                 "achieved_sparsity": stages["prune1"]["achieved_sparsity"],
                 "expected_sparsity": stages["prune1"]["expected_sparsity"]}
        for suffix, stage in (("kd", "eval_pruned"), ("random", "eval_random"), ("random_layer", "eval_random_layer")):
            point[f"eer_pct_{suffix}"] = test_eer(stages[stage])
            point[f"eer_ci_{suffix}"] = test_eer(stages[stage], key="eer_ci_pct")
            point[f"mindcf_0.01_{suffix}"] = test_eer(stages[stage], key="mindcf_0.01")
            point[f"val_eer_pct_{suffix}"] = test_eer(stages[stage], "val")
        if utt2spk is None:
            utt2spk = cfg.data.load_dir("test").utt2spk
        diff = paired_eer_difference(run_dir / "eval_pruned", run_dir / "eval_random", trials_path, utt2spk)
        diff_layer = paired_eer_difference(run_dir / "eval_pruned", run_dir / "eval_random_layer", trials_path,
                                           utt2spk)
        point |= {"eer_diff": diff["diff"], "eer_diff_ci": diff["ci"], "eer_diff_p": diff["p_value"],
                  "eer_diff_layer": diff_layer["diff"], "eer_diff_ci_layer": diff_layer["ci"],
                  "eer_diff_p_layer": diff_layer["p_value"], "paired": {"kind": diff, "layer": diff_layer},
                  "params": stages["shrink"]["params_encoder"],
                  "params_random": stages["random_prune"]["params_encoder"],
                  "params_random_layer": stages["random_layer"]["params_encoder"],
                  "params_teacher": stages["shrink"]["dense_params_encoder"],
                  # this target's own stages (the "use" stage's record is the teacher's, with its training time)
                  "minutes": sum(stages[spec.name].get("minutes", 0.0) for spec in cfg.stages if spec.kind != "use")}
        points.append(point)
    load_after = os.getloadavg()
    result = {"teacher": teacher.as_posix(), "teacher_eer_pct": test_eer(teacher_record),
              "teacher_eer_ci": test_eer(teacher_record, key="eer_ci_pct"),
              "teacher_val_eer_pct": teacher_record.get("best_val_eer_pct"),
              "test_list": TEST_LIST, "test_speakers": test_eer(teacher_record, key="ci_speakers"),
              "points": points,
              "kd_vs_random_kind": verdict(points, "kind"),
              "kd_vs_random_layer": verdict(points, "layer"),
              # the recipe's cost (stage minutes, also of stages an earlier call finished) vs this call's time
              "minutes_total": sum(p["minutes"] for p in points), "wall_minutes_this_call": timer.minutes,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_before": list(load_before), "load_average_after": list(load_after)}
    rows = [p | {"diff_ci_kind": "[{:+.2f}, {:+.2f}]".format(*p["eer_diff_ci"]),
                 "diff_ci_layer": "[{:+.2f}, {:+.2f}]".format(*p["eer_diff_ci_layer"])} for p in points]
    columns = ["target", "achieved_sparsity", "params", "eer_pct_kd", "eer_pct_random", "eer_pct_random_layer",
               "diff_ci_kind", "diff_ci_layer", "val_eer_pct_kd", "val_eer_pct_random", "minutes"]
    result["table"] = print_table(rows, columns, title=f"demo pruning (teacher {teacher}: test EER "
                                                         f"{result['teacher_eer_pct']:.2f} %)")
    print(f"KD vs random (per-kind match): {result['kd_vs_random_kind']}")
    print(f"KD vs random (per-layer match): {result['kd_vs_random_layer']}")
    print(f"wrote {write_json(args.result, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
