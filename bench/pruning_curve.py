"""The pruning curve of the demo model: three pruning methods on the same targets, two controls, and the curve
from one run, each point with its speaker-level bootstrap interval and paired intervals.

    python bench/pruning_curve.py [--teacher exp/demo/s2] [--out exp/pruning_curve] [--methods kd random task]
                                  [--targets 0 0.5 0.7 0.8 0.9 0.95 T] [--no-snapshots] [--seed-runs D ...]
    python bench/pruning_curve.py --plot-only     # redraw the PNG from the committed JSON, nothing trained

Needs the demo pipeline's stage-2 folder (``make demo``). Everything below is one pipeline (its stage YAMLs are
``experiments/configs/demo_prune/*.yaml``, prune1's target rewritten per point into ``<out>/configs``), so a
killed run resumes with the same command: finished stages are reused, interrupted ones resume.

* ``eval_teacher``: the teacher (s2) on the test trials, the reference every paired interval is taken against.
* controls, each through the same graft -> ps1 -> ps2 -> ps3 as a pruned point (``experiments.prune.control_encoder``):
  ``encoder_removed`` (every head, FFN unit and conv channel cut: each layer is its residual path; the highest
  sparsity any pruning can reach) and ``random_init`` (the teacher's architecture, a fresh encoder).
* per target and method (target 0: the teacher's dense encoder through the same fine-tune, one point):
  ``kd`` (the reference: prune1 distils towards s2 -> shrink -> prune2 -> graft), ``random`` (the KD structure's
  widths layer by layer, the units drawn at random, ``random_prune`` with ``match: layer``) and ``task`` (prune1
  with ``objective: classification``: the same masks and Lagrangian, the AAM-softmax of s2's head instead of
  distillation, no teacher, no prune2; graft takes prune1's own back-end and head).
* ``snapshots``: one prune1 (KD) whose target ramps to the highest target and saves the student each time the
  sparsity it constrains crosses a target (``prune.snapshots``); each snapshot then goes through shrink -> prune2 ->
  graft -> ps1..ps3 like a grid point. ``snapshot_vs_grid`` holds, per target, the paired interval of
  EER(snapshot) - EER(grid KD), and ``compute_ratio``: the snapshot curve's minutes over the grid's.

The highest target defaults to one between 0.95 and the encoder-removed control's sparsity (0.98 where the
encoder allows it): the masks cannot remove the feature projection, the LayerNorms or the distance tables.

Writes ``bench/results/pruning_curve.json`` (regenerated whole; keys ``points``, ``controls``, ``knee_sparsity``,
``snapshot_vs_grid``, ``seeds``, ``load``) and ``bench/results/pruning_curve.png``. ``knee_sparsity``: the lowest
sparsity whose KD point is worse than the teacher with a paired interval above 0. ``--seed-runs``: finished
demo pipeline folders (one per seed, e.g. exp/demo and two ``make demo`` runs with other seeds, see
``--run-seed``) whose final test EER is reported under ``seeds``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import pipeline  # noqa: E402
from experiments.common import Timer, print_table, read_result  # noqa: E402
from experiments.prune import DistillStageConfig, control_encoder  # noqa: E402
from svlib.analysis import CURVE_SUMMARY_KIND  # noqa: E402
from svlib.config import from_dict, load_config, read_yaml, save_config  # noqa: E402
from svlib.files import write_json  # noqa: E402

DEMO_PRUNE = REPO / "experiments" / "configs" / "demo_prune"
DEMO = REPO / "experiments" / "configs" / "demo" / "pipeline.yaml"
RESULT = REPO / "bench" / "results" / "pruning_curve.json"
PLOT = REPO / "bench" / "results" / "pruning_curve.png"
TEST_LIST = "test"
METHODS = ("kd", "random", "task")
CONTROLS = ("encoder_removed", "random_init")
FINETUNE = ("ps1", "ps2", "ps3")
# task-loss pruning: the classifier as the teacher's s2 left it, trained on with the teacher's augmentation and
# the AAM margin of the fine-tune that follows (ps1/ps2: 0.2); the back-end at ps2's rate
TASK_HEAD = {"scale": 32.0, "margin": 0.2}
TASK_LR_BACKEND = 5.0e-4
# The AAM loss holds on to the last units harder than distillation: with the KD run's spring (lambda2 3000)
# task-loss prune1 ended at 0.947 for 0.96; 10000 -> 0.952, 30000 -> 0.958 (and 0.500 at 0.5). Chosen on the
# achieved sparsity alone, no EER.
TASK_LAMBDA2 = 30000.0


def tag(target: float) -> str:
    return f"t{round(target * 1000):03d}"


def removed_sparsity(teacher: Path) -> float:
    """The sparsity of the encoder-removed control of ``teacher`` (the highest any pruning can reach)."""
    from svlib.model.frontend import count_parameters
    from svlib.model.speaker import load_model

    encoder = load_model(teacher / "model").frontend.encoder
    dense = count_parameters(encoder)
    return 1.0 - count_parameters(control_encoder(encoder, "encoder_removed")) / dense


def default_targets(teacher: Path) -> list[float]:
    top = removed_sparsity(teacher)
    grid = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95]
    if top >= 0.985:
        grid.append(0.98)
    elif top > 0.955:  # a point between 0.95 and what the masks can reach at all
        grid.append(round((0.95 + top) / 2, 3))
    return [t for t in grid if t < top]


def write_stage_yamls(config_dir: Path, targets: list[float]) -> None:
    """ps1..ps3 and prune2 as shipped; one prune1 per target and method, and the snapshot run's prune1."""
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in (*FINETUNE, "prune2"):
        shutil.copy2(DEMO_PRUNE / f"{name}.yaml", config_dir / f"{name}.yaml")
    augment = read_yaml(DEMO_PRUNE / "ps2.yaml")["augment"]   # the teacher's augmentation, as the fine-tune has
    pruned = [t for t in targets if t > 0]
    for target in pruned:
        kd = load_config(DEMO_PRUNE / "prune1.yaml", DistillStageConfig)
        kd.prune.target_sparsity = target
        save_config(kd, config_dir / f"prune1_{tag(target)}.yaml")
        task = load_config(DEMO_PRUNE / "prune1.yaml", DistillStageConfig, overrides={
            "objective": "classification", "head": TASK_HEAD, "augment": augment,
            "prune": {"lambda2_init": TASK_LAMBDA2}, "train": {"optim": {"lr_backend": TASK_LR_BACKEND}}})
        task.prune.target_sparsity = target
        save_config(task, config_dir / f"prune1_task_{tag(target)}.yaml")
    if pruned:
        snap = load_config(DEMO_PRUNE / "prune1.yaml", DistillStageConfig)
        snap.prune.target_sparsity = max(pruned)
        snap.prune.snapshots = sorted(pruned)
        save_config(snap, config_dir / "prune1_snapshots.yaml")


def finetune_chain(stages: list[dict], start: str, suffix: str) -> str:
    """graft'd folder ``start`` -> ps1..ps3 -> eval; returns the eval stage's name."""
    previous = start
    for ps in FINETUNE:
        stages.append({"name": f"{ps}_{suffix}", "kind": "train", "config": f"{ps}.yaml", "init": previous})
        previous = f"{ps}_{suffix}"
    stages.append({"name": f"eval_{suffix}", "kind": "evaluate", "init": previous})
    return f"eval_{suffix}"


def curve_pipeline(teacher: Path, out: Path, targets: list[float], methods: list[str], snapshots: bool,
                   controls: bool) -> tuple[pipeline.PipelineConfig, Path, dict]:
    """The one pipeline of the benchmark and ``evals``: (kind, target or control) -> its eval stage name."""
    config_dir = out / "configs"
    write_stage_yamls(config_dir, targets)
    stages = [{"name": "s2", "kind": "use", "path": teacher.as_posix()},
              {"name": "eval_teacher", "kind": "evaluate", "init": "s2"}]
    evals: dict = {}
    if controls:
        for control in CONTROLS:
            stages += [{"name": control, "kind": "control", "control": control, "init": "s2"},
                       {"name": f"graft_{control}", "kind": "graft", "init": control, "teacher": "s2"}]
            evals[("control", control)] = finetune_chain(stages, f"graft_{control}", control)
    for target in targets:
        t = tag(target)
        if target == 0.0:  # the dense end: the teacher's own encoder through the same fine-tune
            stages.append({"name": f"graft_kd_{t}", "kind": "graft", "init": "s2", "teacher": "s2"})
            evals[("kd", target)] = finetune_chain(stages, f"graft_kd_{t}", f"kd_{t}")
            continue
        if "kd" in methods or "random" in methods:
            stages += [{"name": f"prune1_{t}", "kind": "prune", "config": f"prune1_{t}.yaml", "init": "s2"},
                       {"name": f"shrink_{t}", "kind": "shrink", "init": f"prune1_{t}"}]
        if "kd" in methods:
            stages += [{"name": f"prune2_{t}", "kind": "prune", "config": "prune2.yaml", "init": f"shrink_{t}",
                        "teacher": "s2"},
                       {"name": f"graft_kd_{t}", "kind": "graft", "init": f"prune2_{t}", "teacher": "s2"}]
            evals[("kd", target)] = finetune_chain(stages, f"graft_kd_{t}", f"kd_{t}")
        if "random" in methods:
            stages += [{"name": f"random_{t}", "kind": "random_prune", "init": f"shrink_{t}", "teacher": "s2",
                        "seed": 0, "match": "layer"},
                       {"name": f"graft_random_{t}", "kind": "graft", "init": f"random_{t}", "teacher": "s2"}]
            evals[("random", target)] = finetune_chain(stages, f"graft_random_{t}", f"random_{t}")
        if "task" in methods:
            stages += [{"name": f"prune1_task_{t}", "kind": "prune", "config": f"prune1_task_{t}.yaml", "init": "s2"},
                       {"name": f"shrink_task_{t}", "kind": "shrink", "init": f"prune1_task_{t}"},
                       {"name": f"graft_task_{t}", "kind": "graft", "init": f"shrink_task_{t}",
                        "teacher": f"prune1_task_{t}"}]
            evals[("task", target)] = finetune_chain(stages, f"graft_task_{t}", f"task_{t}")
    pruned = [t for t in targets if t > 0]
    if snapshots and pruned:
        stages.append({"name": "prune1_snapshots", "kind": "prune", "config": "prune1_snapshots.yaml", "init": "s2"})
        for target in pruned:
            t = tag(target)
            stages += [{"name": f"shrink_snap_{t}", "kind": "shrink", "init": "prune1_snapshots", "snapshot": target},
                       {"name": f"prune2_snap_{t}", "kind": "prune", "config": "prune2.yaml",
                        "init": f"shrink_snap_{t}", "teacher": "s2"},
                       {"name": f"graft_snap_{t}", "kind": "graft", "init": f"prune2_snap_{t}", "teacher": "s2"}]
            evals[("snapshot", target)] = finetune_chain(stages, f"graft_snap_{t}", f"snap_{t}")
    data = read_yaml(DEMO)["data"]
    data["test_trials"] = {TEST_LIST: data["test_trials"][TEST_LIST]}  # the headline list only
    cfg = from_dict(pipeline.PipelineConfig, {"name": "pruning_curve", "out_dir": out.as_posix(), "data": data,
                                              "stages": stages, "baselines": False})
    return cfg, config_dir, evals


# ------------------------------------------------------------------------------------------ numbers

def chain_minutes(summary: dict, names: list[str]) -> float:
    return sum((summary["stages"].get(n) or {}).get("minutes") or 0.0 for n in names)


def chain_of(cfg: pipeline.PipelineConfig, last: str) -> list[str]:
    """Every stage ``last`` depends on (init and teacher, transitively), the shared teacher excluded."""
    specs = {s.name: s for s in cfg.stages}
    todo, seen = [last], []
    while todo:
        name = todo.pop()
        if name in seen or specs[name].kind == "use":
            continue
        seen.append(name)
        todo += [n for n in (specs[name].init, specs[name].teacher) if n is not None]
    return seen


class Scores:
    """Paired bootstrap intervals between eval stages' score files on the test list."""

    def __init__(self, cfg: pipeline.PipelineConfig, replicates: int = 1000):
        from svlib.data.lists import read_trials

        self.trials_path = cfg.data.test_trials[TEST_LIST]
        self.trials = read_trials(self.trials_path)
        self.utt2spk = cfg.data.load_dir("test").utt2spk
        self.out, self.replicates = Path(cfg.out_dir), replicates

    def paired(self, a: str, b: str) -> dict:
        """EER(a) - EER(b), paired speaker-level bootstrap: ``{"diff", "ci", "p_value"}``."""
        from svlib.scoring.bootstrap import paired_score_files

        eer = paired_score_files(self.out / a / "scores" / f"{TEST_LIST}.txt",
                                 self.out / b / "scores" / f"{TEST_LIST}.txt", self.trials, self.utt2spk,
                                 self.trials_path, self.replicates)["eer_pct"]
        return {"diff": eer["diff"], "ci": eer["ci"], "p_value": eer["p_value"]}


def test_numbers(record: dict) -> tuple[float, list[float]]:
    test = record["test"][TEST_LIST]
    return test["eer_pct"], test["eer_ci_pct"]


def verdict(ci: list[float], better: str, worse: str) -> str:
    if ci[1] < 0:
        return f"{better} better"
    if ci[0] > 0:
        return f"{worse} better"
    return "no difference (interval contains 0)"


def seed_overrides(seed: int) -> dict:
    """The demo pipeline with every training stage's seed set to ``seed``, in its own folder."""
    stages = {spec["name"]: {"train": {"seed": seed}} for spec in read_yaml(DEMO)["stages"] if spec["kind"] == "train"}
    return {"out_dir": f"exp/demo_seed{seed}", "stages": stages}


def run_seed(seed: int) -> str:
    """``make demo``'s pipeline at another seed (exp/demo_seed<seed>), resumable; returns its folder."""
    import subprocess

    import yaml

    from svlib.files import write_text_atomic

    overrides = seed_overrides(seed)
    folder = REPO / overrides["out_dir"]
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "overrides.yaml", yaml.safe_dump(overrides, sort_keys=False))
    code = subprocess.call([sys.executable, "-m", "experiments.pipeline", "--config", str(DEMO.relative_to(REPO)),
                            "--overrides", str((folder / "overrides.yaml").relative_to(REPO))], cwd=REPO)
    if code != 0:
        raise RuntimeError(f"demo pipeline at seed {seed} exited with {code}")
    return overrides["out_dir"]


def seed_results(folders: list[str]) -> list[dict]:
    """The final test EER (with its interval) of finished demo pipeline runs, one per seed."""
    out = []
    for folder in folders:
        record = read_result(Path(folder) / "eval")
        if record is None:
            raise FileNotFoundError(f"{folder}: no finished eval stage (run the demo pipeline there first)")
        eer, ci = test_numbers(record)
        seed = read_yaml(Path(folder) / "s3" / "config.yaml")["train"]["seed"]
        summary = Path(folder) / "summary.json"
        machine = json.loads(summary.read_text()).get("machine", {}) if summary.is_file() else {}
        out.append({"run": Path(folder).as_posix(), "seed": seed, "eer_pct": eer, "eer_ci": ci,
                    "threads": machine.get("threads")})
    return out


def draw(result: dict, path: Path) -> None:
    """The figure of ``result`` (the JSON this script writes), as the notebook draws it
    (``svlib.analysis.plot_method_curve``)."""
    import matplotlib
    matplotlib.use("Agg")
    from svlib.analysis import plot_method_curve

    plot_method_curve(result).savefig(path, dpi=150, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="exp/demo/s2", help="the demo pipeline's stage-2 folder")
    parser.add_argument("--out", default="exp/pruning_curve")
    parser.add_argument("--targets", type=float, nargs="+", help="default: 0 0.5 0.7 0.8 0.9 0.95 and the highest")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--no-snapshots", action="store_true")
    parser.add_argument("--no-controls", action="store_true")
    parser.add_argument("--seed-runs", nargs="*", default=[], help="finished demo pipeline folders, one per seed")
    parser.add_argument("--run-seed", type=int, default=None, metavar="SEED",
                        help="only run the demo pipeline at this seed into exp/demo_seed<SEED> (then pass it to "
                             "--seed-runs) and exit")
    parser.add_argument("--result", default=str(RESULT.relative_to(REPO)))
    parser.add_argument("--plot", default=str(PLOT.relative_to(REPO)))
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--experiment", default="pruning_curve", help="MLflow experiment")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: redraw --plot from the existing --result JSON and exit")
    args = parser.parse_args(argv)
    if args.run_seed is not None:
        print(run_seed(args.run_seed))
        return 0
    if args.plot_only:
        draw(json.loads((REPO / args.result).read_text()), REPO / args.plot)
        print(f"[pruning_curve] redrew {args.plot} from {args.result}")
        return 0

    teacher = Path(args.teacher)
    if read_result(teacher) is None or not (teacher / "model").is_dir():
        print(f"error: {teacher} is not a finished stage-2 folder (no result.json / model/); run `make demo` first",
              file=sys.stderr)
        return 2
    targets = sorted(set(args.targets)) if args.targets else default_targets(teacher)
    tracker = None
    if not args.no_tracking:
        from svlib.tracking import Tracker
        tracker = Tracker(args.experiment)
    timer, load_before = Timer(), os.getloadavg()
    cfg, config_dir, evals = curve_pipeline(teacher, Path(args.out), targets, args.methods, not args.no_snapshots,
                                            not args.no_controls)
    summary = pipeline.run(cfg, config_dir, tracker)
    stages, scores = summary["stages"], Scores(cfg)

    teacher_eer, teacher_ci = test_numbers(stages["eval_teacher"])
    from svlib.model.speaker import load_model
    from svlib.model.frontend import count_parameters
    result: dict = {"teacher": {"run": teacher.as_posix(), "eer_pct": teacher_eer, "eer_ci": teacher_ci,
                                "params_encoder": count_parameters(load_model(teacher / "model").frontend),
                                "encoder_removed_sparsity": removed_sparsity(teacher)},
                    "test_list": TEST_LIST, "targets": targets, "methods": args.methods}
    result["controls"] = {}
    for control in CONTROLS:
        name = evals.get(("control", control))
        if name is None:
            continue
        eer, ci = test_numbers(stages[name])
        result["controls"][control] = {
            "eer_pct": eer, "eer_ci": ci, "eer_diff_vs_teacher_ci": scores.paired(name, "eval_teacher")["ci"],
            "achieved_sparsity": stages[control]["achieved_sparsity"],
            "minutes": chain_minutes(summary, chain_of(cfg, name))}

    def point(method: str, target: float, vs_teacher: bool = True) -> dict:
        """A point's numbers; ``vs_teacher``: with the paired bootstrap against the teacher (1,000 replicates of
        273k trials: the snapshot entries, compared with the grid instead, skip it)."""
        name = evals[(method, target)]
        eer, ci = test_numbers(stages[name])
        graft = stages[cfg_stage_init(cfg, name, "graft")]
        out = {"target": target, "method": method, "achieved_sparsity": 1 - graft["params_encoder"] /
               graft["params_encoder_teacher"], "params_encoder": graft["params_encoder"], "eer_pct": eer,
               "eer_ci": ci, "minutes": chain_minutes(summary, chain_of(cfg, name))}
        if vs_teacher:
            paired = scores.paired(name, "eval_teacher")
            out |= {"eer_diff_vs_teacher": paired["diff"], "eer_diff_vs_teacher_ci": paired["ci"]}
        return out

    points = []
    for target in targets:
        for method in (["kd"] if target == 0.0 else args.methods):
            p = point(method, target)
            if method != "kd" and ("kd", target) in evals:
                vs_kd = scores.paired(evals[(method, target)], evals[("kd", target)])
                p |= {"eer_diff_vs_kd": vs_kd["diff"], "eer_diff_vs_kd_ci": vs_kd["ci"],
                      "verdict_vs_kd": verdict(vs_kd["ci"], method, "kd")}
            elif method == "kd":
                p |= {"eer_diff_vs_kd": 0.0, "eer_diff_vs_kd_ci": [0.0, 0.0]}
            points.append(p)
    result["points"] = points
    # prune1 must land on its target: what the deterministic masks keep, within 0.01 (shrink removes exactly that)
    result["prune1_on_target"] = [
        {"stage": name, "target": stages[name]["target_sparsity"], "achieved": stages[name]["achieved_sparsity"],
         "expected": stages[name]["expected_sparsity"],
         "within_0.01": abs(stages[name]["achieved_sparsity"] - stages[name]["target_sparsity"]) <= 0.01}
        for name in (s.name for s in cfg.stages if s.kind == "prune" and s.name.startswith("prune1"))]
    kd_points = sorted((p for p in points if p["method"] == "kd"), key=lambda p: p["achieved_sparsity"])
    worse = [p for p in kd_points if p["eer_diff_vs_teacher_ci"][0] > 0]
    result["knee_sparsity"] = worse[0]["achieved_sparsity"] if worse else None

    snapshot = {"points": []}
    if "prune1_snapshots" in stages:
        grid_minutes = snap_minutes = 0.0
        snap_minutes += chain_minutes(summary, ["prune1_snapshots"])
        for target in (t for t in targets if t > 0):
            name = evals[("snapshot", target)]
            snap = point("snapshot", target, vs_teacher=False)
            snap_minutes += snap["minutes"] - chain_minutes(summary, ["prune1_snapshots"])
            entry = {"target": target, "achieved_sparsity": snap["achieved_sparsity"], "eer_pct": snap["eer_pct"],
                     "eer_ci": snap["eer_ci"]}
            if ("kd", target) in evals:
                vs_grid = scores.paired(name, evals[("kd", target)])
                grid_minutes += chain_minutes(summary, chain_of(cfg, evals[("kd", target)]))
                entry |= {"grid_eer_pct": test_numbers(stages[evals[("kd", target)]])[0],
                          "eer_diff_vs_grid": vs_grid["diff"], "eer_diff_vs_grid_ci": vs_grid["ci"],
                          "verdict": verdict(vs_grid["ci"], "snapshot", "grid")}
            snapshot["points"].append(entry)
        snapshot["snapshot_minutes"], snapshot["grid_minutes"] = snap_minutes, grid_minutes
        snapshot["compute_ratio"] = snap_minutes / grid_minutes if grid_minutes else None
        snapshot["prune1"] = stages["prune1_snapshots"].get("snapshots")
    result["snapshot_vs_grid"] = snapshot
    result["seeds"] = seed_results(args.seed_runs)
    result["minutes"] = timer.minutes  # this call's (finished stages are reused, not rerun)
    # what the whole curve cost: every stage's own minutes, whenever it ran (the load below is this call's)
    result["stage_minutes_total"] = sum((r or {}).get("minutes") or 0.0 for r in stages.values())
    result["load"] = {"threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
                      "cpu_count": os.cpu_count(), "load_average_start": list(load_before),
                      "load_average_end": list(os.getloadavg())}
    rows = [{"method": p["method"], "target": p["target"], "sparsity": p["achieved_sparsity"], "eer_pct": p["eer_pct"],
             "eer_ci": "[{:.2f}, {:.2f}]".format(*p["eer_ci"]),
             "vs_teacher": "[{:+.2f}, {:+.2f}]".format(*p["eer_diff_vs_teacher_ci"]),
             "vs_kd": "[{:+.2f}, {:+.2f}]".format(*p["eer_diff_vs_kd_ci"]) if "eer_diff_vs_kd_ci" in p else "",
             "minutes": p["minutes"]}
            for p in points]
    rows += [{"method": f"control: {n}", "sparsity": c["achieved_sparsity"], "eer_pct": c["eer_pct"],
              "eer_ci": "[{:.2f}, {:.2f}]".format(*c["eer_ci"]),
              "vs_teacher": "[{:+.2f}, {:+.2f}]".format(*c["eer_diff_vs_teacher_ci"]), "minutes": c["minutes"]}
             for n, c in result["controls"].items()]
    rows += [{"method": "snapshot", "target": e["target"], "sparsity": e["achieved_sparsity"], "eer_pct": e["eer_pct"],
              "eer_ci": "[{:.2f}, {:.2f}]".format(*e["eer_ci"]),
              "vs_kd": "[{:+.2f}, {:+.2f}]".format(*e["eer_diff_vs_grid_ci"]) if "eer_diff_vs_grid_ci" in e else ""}
             for e in snapshot["points"]]
    result["table"] = print_table(rows, ["method", "target", "sparsity", "eer_pct", "eer_ci", "vs_teacher", "vs_kd",
                                         "minutes"],
                                  title=f"pruning curve (test list, teacher {teacher_eer:.2f} %; intervals: 95 %, "
                                        "paired ones are EER(row) - EER(teacher / KD))")
    write_json(REPO / args.result, result)
    draw(result, REPO / args.plot)
    if tracker is not None:  # the notebook (notebooks/pruning_curve.ipynb) reads the comparison from MLflow
        with tracker.run("curve_summary", tags={"kind": CURVE_SUMMARY_KIND}):
            tracker.log_artifact(REPO / args.result)
            tracker.log_artifact(REPO / args.plot)
    print(f"knee (lowest KD sparsity worse than the teacher, paired): {result['knee_sparsity']}")
    return 0


def cfg_stage_init(cfg: pipeline.PipelineConfig, last: str, kind: str) -> str:
    """The stage of ``kind`` in ``last``'s chain (e.g. the graft an eval stage descends from)."""
    specs = {s.name: s for s in cfg.stages}
    return next(n for n in chain_of(cfg, last) if specs[n].kind == kind)


if __name__ == "__main__":
    sys.exit(main())
