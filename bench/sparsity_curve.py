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
  the teacher as a dashed line, the study's Pareto front (validation EER vs parameters) highlighted.

It first waits for the demo pipeline (``exp/demo/eval/result.json`` and no ``experiments.pipeline`` process on
the demo config) and for ``bench/demo_pruning.py`` to finish: one heavy job on the machine at a time. The
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
BUSY = ("experiments.pipeline --config experiments/configs/demo/pipeline.yaml", "demo_pruning")


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG.relative_to(REPO)))
    parser.add_argument("--storage", default=None, help="Optuna storage (default sqlite:///sweeps/<study>.db)")
    parser.add_argument("--mlflow-uri", default=MLFLOW_URI)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for the demo jobs")
    parser.add_argument("--out", default=str(RESULT.relative_to(REPO)))
    parser.add_argument("--plot", default=str(PLOT.relative_to(REPO)))
    args = parser.parse_args(argv)
    os.chdir(REPO)

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
        "threads": int(os.environ["OMP_NUM_THREADS"]),
        "notes": "eer_pct/mindcf: the test list (minDCF p=0.01), never optimised; pareto: the study's front on "
                 "(val_eer_pct, params). 0.0 = the teacher through the same short fine-tune; teacher_eer_pct = "
                 "the teacher's own test EER (its stage result).",
    }
    write_json(args.out, result)
    prune_sweep.plot_sweep(report["points"], teacher, args.plot, title="demo sparsity curve")
    from experiments.common import print_table
    print_table([{k: p[k] for k in ("target", "achieved_sparsity", "params", "eer_pct", "mindcf", "val_eer_pct",
                                    "minutes")} for p in points],
                ["target", "achieved_sparsity", "params", "eer_pct", "mindcf", "val_eer_pct", "minutes"],
                title=f"sparsity curve (teacher test EER {result['teacher_eer_pct']})")
    print(f"[sparsity_curve] {result['trial_minutes_total']:.1f} trial minutes; wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
