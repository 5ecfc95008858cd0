"""KD-guided structured pruning of the demo model vs a random structure of the same size, on sv-bench.

    python bench/demo_pruning.py [--targets 0.5 0.7 0.8] [--teacher exp/demo/s2] [--out exp/demo_pruning]

Needs the demo pipeline's stage-2 folder (``make demo``). For each target sparsity it runs the pipeline
``experiments/configs/demo_prune/pipeline.yaml`` with prune1's target replaced (stage YAMLs copied, the
changed one rewritten, into ``<out>/t<NN>/configs``):

* KD:     prune1 -> shrink -> prune2 -> graft -> ps1 -> ps2 -> ps3 -> eval_pruned
* random: random_prune (the teacher's encoder cut with random masks keeping as many heads / FFN units /
          conv channels per kind as the KD structure) -> graft_random -> ps1..ps3_random -> eval_random

and reports the test-trial EER of both, the achieved sparsity and the encoder sizes in
``bench/results/demo_pruning.json`` (key ``points``, with the validation EERs beside the test ones, plus
``teacher_eer_pct``). Every stage folder is reused
when finished and resumed from its checkpoint when interrupted: rerun the same command after a kill.
"""
from __future__ import annotations

import argparse
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


def test_eer(record: dict | None, list_name: str = TEST_LIST) -> float | None:
    """EER on one trial list of a stage record; ``val`` gives the validation list where it was scored."""
    test = (record or {}).get("test", {}).get(list_name)
    return None if test is None else float(test["eer_pct"])


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
    points = []
    for target in args.targets:
        cfg, config_dir = target_config(target, teacher, Path(args.out))
        summary = pipeline.run(cfg, config_dir, tracker)
        stages = summary["stages"]
        points.append({
            "target": target,
            "achieved_sparsity": stages["prune1"]["achieved_sparsity"],
            "expected_sparsity": stages["prune1"]["expected_sparsity"],
            "eer_pct_kd": test_eer(stages["eval_pruned"]),
            "eer_pct_random": test_eer(stages["eval_random"]),
            "val_eer_pct_kd": test_eer(stages["eval_pruned"], "val"),
            "val_eer_pct_random": test_eer(stages["eval_random"], "val"),
            "params": stages["shrink"]["params_encoder"],
            "params_random": stages["random_prune"]["params_encoder"],
            "params_teacher": stages["shrink"]["dense_params_encoder"],
            # this target's own stages (the "use" stage's record is the teacher's, with its training time)
            "minutes": sum(stages[spec.name].get("minutes", 0.0) for spec in cfg.stages if spec.kind != "use"),
        })
    result = {"teacher": teacher.as_posix(), "teacher_eer_pct": test_eer(teacher_record),
              "teacher_val_eer_pct": teacher_record.get("best_val_eer_pct"),
              "test_list": TEST_LIST, "points": points,
              # the recipe's cost (stage minutes, also of stages an earlier call finished) vs this call's time
              "minutes_total": sum(p["minutes"] for p in points), "wall_minutes_this_call": timer.minutes,
              "threads": torch.get_num_threads()}
    columns = ["target", "achieved_sparsity", "params", "eer_pct_kd", "eer_pct_random", "val_eer_pct_kd",
               "val_eer_pct_random", "minutes"]
    result["table"] = print_table(points, columns, title=f"demo pruning (teacher {teacher}: test EER "
                                                         f"{result['teacher_eer_pct']:.2f} %)")
    print(f"wrote {write_json(args.result, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
