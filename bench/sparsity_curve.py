"""The pruning-versus-EER curve of the demo model: the target-sparsity grid of the pruning sweep, on 2 CPU cores.

    OMP_NUM_THREADS=2 python bench/sparsity_curve.py [--config sweeps/configs/demo.yaml] [--storage URL] \
        [--mlflow-uri URI] [--no-wait]

(OMP_NUM_THREADS defaults to 1 here, for a machine shared with another job; the committed run used 2 on an idle
machine, recorded as ``threads`` in the JSON.)

Runs ``python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml --grid`` in-process over the fixed
teacher ``exp/demo/s2`` (target sparsity 0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9; 0.0 is the teacher through the
same short fine-tune) and writes

* ``bench/results/sparsity_curve.json``: ``points`` (per grid point: ``target``, ``achieved_sparsity``,
  ``params`` (encoder), ``eer_pct`` and ``mindcf`` (test list, minDCF at p=0.01), ``val_eer_pct``,
  ``minutes``, ``pareto``), ``teacher_eer_pct`` (s2's own test EER), failed points, wall minutes;
* ``bench/results/sparsity_curve.png``: test EER / minDCF vs encoder parameters and vs achieved sparsity,
  the teacher as a dashed line, the study's Pareto front (validation EER vs parameters) highlighted, each
  point with its speaker-level bootstrap 95 % interval (``svlib.scoring.bootstrap``; per point
  ``eer_ci_pct`` and ``mindcf_ci`` = [low, high], ``teacher_eer_ci_pct``, the setting in ``ci``): from the
  evaluation's ``result.json`` when it recorded one, else from its stored ``scores/<list>.txt``.

``--replot`` redraws the figure from the existing JSON, adding the intervals of every point whose trial
folder still holds its scores (no sweep is run); points without stored scores are listed in ``ci_note``.
``--plot-only`` redraws it from the JSON as it is (the intervals it holds), reading nothing else.

It first waits for the demo pipeline (``exp/demo/eval/result.json`` and no ``experiments.pipeline`` process on
the demo config) and for ``bench/pruning_curve.py`` to finish: one heavy job on the machine at a time. The
sweep resumes: rerun the same command after an interruption and only the missing points run. MLflow goes to
its own store (``sqlite:///sweeps/runs/mlflow.db``), not the demo's ``mlruns/``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # shared 2-core machine: one thread, before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "sweeps" / "configs" / "demo.yaml"
RESULT = REPO / "bench" / "results" / "sparsity_curve.json"
PLOT = REPO / "bench" / "results" / "sparsity_curve.png"
MLFLOW_URI = "sqlite:///sweeps/runs/mlflow.db"
BUSY = ("experiments.pipeline --config experiments/configs/demo/pipeline.yaml", "pruning_curve")


def busy() -> list[str]:
    """The other heavy jobs still running (by command line), this process excluded."""
    found = []
    for pattern in BUSY:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        found += [f"{pattern} (pid {pid})" for pid in out if int(pid) != os.getpid()]
    return found


def wait_for_demo(teacher_done: Path, poll_s: float = 30.0, max_wait_s: float = 4 * 3600) -> None:
    start = time.monotonic()
    while True:
        waiting = busy() + ([] if teacher_done.is_file() else [f"{teacher_done} to exist"])
        if not waiting:
            return
        if time.monotonic() - start > max_wait_s:
            raise TimeoutError(f"still waiting after {max_wait_s:.0f} s for: {', '.join(waiting)}")
        print(f"[sparsity_curve] waiting for: {', '.join(waiting)}", flush=True)
        time.sleep(poll_s)


def stored_interval(folder: Path, list_name: str, replicates: int, seed: int) -> tuple[dict | None, str]:
    """The speaker-bootstrap 95 % interval of ``folder``'s evaluation of ``list_name``: the one its
    ``result.json`` recorded, else one computed from its ``scores/<list>.txt``; ``(None, why)`` without either."""
    from svlib.scoring.bootstrap import score_file_ci

    record_path = folder / "result.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    summary = (record.get("test") or {}).get(list_name) or {}
    if summary.get("eer_ci_pct") is not None:
        return {"eer_ci_pct": summary["eer_ci_pct"], "mindcf_ci": summary.get("mindcf_0.01_ci")}, "result.json"
    scores = folder / "scores" / f"{list_name}.txt"
    if scores.is_file():
        ci = score_file_ci(scores, replicates=replicates, seed=seed)
        return {"eer_ci_pct": ci["eer_pct"], "mindcf_ci": ci["mindcf_0.01"]}, "scores"
    return None, f"no {os.path.relpath(scores, REPO)}"


def attach_intervals(result: dict, root: Path, list_name: str, replicates: int, seed: int) -> list[str]:
    """Put each point's (and the teacher's) interval into ``result``; returns the points that have none."""
    from sweeps.prune_sweep import EVAL

    missing = []
    for p in result["points"]:
        found, source = stored_interval(root / p["trial_dir"] / EVAL, list_name, replicates, seed)
        p.update(found or {"eer_ci_pct": None, "mindcf_ci": None})
        p["ci_source"] = source if found else None
        if not found:
            missing.append(f"target {p['target']} ({source})")
    teacher, source = stored_interval(root / result["teacher"], list_name, replicates, seed)
    result["teacher_eer_ci_pct"] = teacher["eer_ci_pct"] if teacher else None
    result["teacher_mindcf_ci"] = teacher["mindcf_ci"] if teacher else None
    if not teacher:
        missing.append(f"teacher ({source})")
    result["ci"] = {"method": "speaker-level two-way bootstrap, percentile 95 % (svlib.scoring.bootstrap)",
                    "replicates": replicates, "seed": seed}
    result["ci_note"] = (f"no interval for {len(missing)} of {len(result['points']) + 1}: {', '.join(missing)}; "
                         "rerun bench/sparsity_curve.py (the sweep) for them") if missing else None
    return missing


def _ci_keys(prefix: str, name: str, ci) -> dict:
    return {} if ci is None else {f"{prefix}{name}_ci_low": ci[0], f"{prefix}{name}_ci_high": ci[1]}


def plot_points(result: dict) -> list[dict]:
    """The JSON's points in the form ``prune_sweep.plot_sweep`` draws (intervals included)."""
    return [{"number": p["trial"], "mlflow_run_id": None, "target_sparsity": p["target"],
             "achieved_sparsity": p["achieved_sparsity"], "params_encoder": p["params"], "test_eer_pct": p["eer_pct"],
             "test_mindcf_0.01": p["mindcf"], "test_mindcf_0.05": p["mindcf_0.05"], "val_eer_pct": p["val_eer_pct"],
             "pareto": p["pareto"]} | _ci_keys("test_", "eer_pct", p.get("eer_ci_pct"))
            | _ci_keys("test_", "mindcf_0.01", p.get("mindcf_ci")) for p in result["points"]]


def plot_teacher(result: dict) -> dict | None:
    if result.get("teacher_eer_pct") is None:
        return None
    return {"run_id": None, "label": Path(result["teacher"]).name, "params_encoder": result["teacher_params"],
            "eer_pct": result["teacher_eer_pct"], "mindcf_0.01": result["teacher_mindcf"]} \
        | _ci_keys("", "eer_pct", result.get("teacher_eer_ci_pct")) | _ci_keys("", "mindcf_0.01", result.get("teacher_mindcf_ci"))


def replot(args) -> int:
    from svlib.files import write_json
    from sweeps import prune_sweep

    result = json.loads(Path(args.out).read_text())
    missing = attach_intervals(result, REPO, args.test_list, args.ci_replicates, args.ci_seed)
    if len(missing) == len(result["points"]) + 1:
        print(f"[sparsity_curve] {result['ci_note']}; {args.out} and {args.plot} left as they are")
        return 0
    write_json(args.out, result)
    prune_sweep.plot_sweep(plot_points(result), plot_teacher(result), args.plot, title="demo sparsity curve")
    print(f"[sparsity_curve] intervals added ({result['ci_note'] or 'all points'}); wrote {args.out} and {args.plot}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG.relative_to(REPO)))
    parser.add_argument("--storage", default=None, help="Optuna storage (default sqlite:///sweeps/<study>.db)")
    parser.add_argument("--mlflow-uri", default=MLFLOW_URI)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for the demo jobs")
    parser.add_argument("--out", default=str(RESULT.relative_to(REPO)))
    parser.add_argument("--plot", default=str(PLOT.relative_to(REPO)))
    parser.add_argument("--replot", action="store_true",
                        help="no sweep: add the intervals from the stored scores to --out and redraw --plot")
    parser.add_argument("--ci-replicates", type=int, default=1000)
    parser.add_argument("--ci-seed", type=int, default=0)
    parser.add_argument("--test-list", default="test", help="with --replot: the trial list of the points")
    parser.add_argument("--plot-only", action="store_true",
                        help="no sweep, no intervals recomputed: redraw --plot from --out as it is")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    if args.replot:
        return replot(args)
    if args.plot_only:
        from sweeps import prune_sweep

        result = json.loads(Path(args.out).read_text())
        prune_sweep.plot_sweep(plot_points(result), plot_teacher(result), args.plot, title="demo sparsity curve")
        print(f"[sparsity_curve] redrew {args.plot} from {args.out}")
        return 0

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from experiments.common import Timer
    from svlib.config import load_config
    from svlib.files import write_json
    from sweeps import prune_sweep

    cfg = load_config(args.config, prune_sweep.SweepConfig)
    if not args.no_wait:
        wait_for_demo(REPO / "exp" / "demo" / "eval" / "result.json")
    timer = Timer()
    load_before = os.getloadavg()
    out = prune_sweep.run_sweep(cfg, storage=args.storage, grid=True, tracking_uri=args.mlflow_uri)
    report = out["report"]
    teacher = report["teacher_reference"]
    points = [{"target": p["target_sparsity"], "achieved_sparsity": p["achieved_sparsity"],
               "params": int(p["params_encoder"]), "eer_pct": p["test_eer_pct"], "mindcf": p["test_mindcf_0.01"],
               "mindcf_0.05": p["test_mindcf_0.05"], "val_eer_pct": p["val_eer_pct"], "pareto": p["pareto"],
               "trial": p["number"], "trial_dir": p["trial_dir"]} for p in report["points"]]
    minutes = {}
    for p in points:
        record = json.loads((REPO / p["trial_dir"] / "result.json").read_text())
        p["minutes"] = record["minutes"]
        minutes[p["trial"]] = record["minutes"]
    points.sort(key=lambda p: p["target"])
    result = {
        "study": out["study"], "config": args.config, "teacher": cfg.teacher,
        "teacher_eer_pct": teacher["eer_pct"] if teacher else None,
        "teacher_mindcf": teacher["mindcf_0.01"] if teacher else None,
        "teacher_params": int(teacher["params_encoder"]) if teacher else None,
        "teacher_val_eer_pct": teacher.get("val_eer_pct") if teacher else None,
        "points": points, "grid": cfg.grid,
        "missing_targets": sorted(set(cfg.grid) - {p["target"] for p in points}),
        "trials": report["trials"],
        "wall_minutes_this_run": timer.minutes, "trial_minutes_total": sum(minutes.values()),
        "threads": int(os.environ["OMP_NUM_THREADS"]), "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "notes": "eer_pct/mindcf: the test list (minDCF p=0.01), never optimised; pareto: the study's front on "
                 "(val_eer_pct, params). 0.0 = the teacher through the same short fine-tune; teacher_eer_pct = "
                 "the teacher's own test EER (its stage result).",
    }
    attach_intervals(result, REPO, cfg.test_list, args.ci_replicates, args.ci_seed)
    write_json(args.out, result)
    prune_sweep.plot_sweep(plot_points(result), plot_teacher(result), args.plot, title="demo sparsity curve")
    from experiments.common import print_table
    print_table([{k: p[k] for k in ("target", "achieved_sparsity", "params", "eer_pct", "mindcf", "val_eer_pct",
                                    "minutes")} for p in points],
                ["target", "achieved_sparsity", "params", "eer_pct", "mindcf", "val_eer_pct", "minutes"],
                title=f"sparsity curve (teacher test EER {result['teacher_eer_pct']})")
    print(f"[sparsity_curve] {result['trial_minutes_total']:.1f} trial minutes; wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
