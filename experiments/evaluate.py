"""The evaluation stage: embeddings of full utterances, cosine scores, EER/minDCF per trial list, DET plot.

    python -m experiments.evaluate --init exp/demo/s3 --data experiments/configs/demo/data.yaml --out exp/demo/eval
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.common import DataConfig, Timer, metrics_of, pick_device, print_table, read_result, write_result
from svlib.config import ConfigError, load_config
from svlib.evaluate import EvalConfig, evaluate
from svlib.files import write_lines_atomic
from svlib.model.frontend import count_parameters
from svlib.model.speaker import load_model
from svlib.scoring.metrics import plot_det


def write_scores(path: Path, trials, scores) -> Path:
    """``enroll test score target|nontarget`` per trial, written atomically (a rerun never sees half a list)."""
    return write_lines_atomic(path, (f"{e} {t} {s:.6f} {'target' if label else 'nontarget'}"
                                     for e, t, label, s in zip(trials.enroll, trials.test, trials.labels, scores)))


def save_scores(out_dir: Path, trials: dict, results: dict, title: str, tracker=None) -> Path:
    """``scores/<list>.txt`` for every evaluated list and one DET plot of them all (``det.png``) in
    ``out_dir``, logged as the run's ``scores/`` and ``det.png`` artifacts; returns the plot's path."""
    (out_dir / "scores").mkdir(parents=True, exist_ok=True)
    for name, res in results.items():
        write_scores(out_dir / "scores" / f"{name}.txt", trials[name], res["scores"])
    det = plot_det({name: (r["scores"], r["labels"]) for name, r in results.items()}, out_dir / "det.png", title=title)
    if tracker is not None:
        tracker.log_artifact(out_dir / "scores", "scores")
        tracker.log_artifact(det)
    return det


def run(init: str | Path, data: DataConfig, out_dir: str | Path, *, cfg: EvalConfig | None = None,
        tracker=None, device: str = "auto") -> dict:
    out_dir, init = Path(out_dir), Path(init)
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    tests = data.tests()
    if tests is None:
        raise ConfigError("evaluate: data.test and data.test_trials must be set")
    test_dir, trials = tests
    model = load_model(init / "model").to(pick_device(device))
    results = evaluate(model, test_dir, trials, cfg)
    validation = data.validation()
    all_trials = dict(trials)
    if validation is not None:
        all_trials["val"] = validation[1]
        results |= evaluate(model, validation[0], {"val": validation[1]}, cfg)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_scores(out_dir, all_trials, results, f"DET: {init.name}")
    rows = [{"trials": name, "eer_pct": r["eer_pct"], "mindcf_0.01": r["mindcf_0.01"], "mindcf_0.05": r["mindcf_0.05"],
             "num_trials": r["num_trials"]} for name, r in results.items()]
    print_table(rows, ["trials", "num_trials", "eer_pct", "mindcf_0.01", "mindcf_0.05"], title=f"evaluation of {init}")
    record = {"stage": "eval", "source": str(init), "params_total": count_parameters(model),
              "params_encoder": count_parameters(model.frontend),
              "test": {name: {k: v for k, v in r.items() if k not in ("scores", "labels")} for name, r in results.items()},
              "minutes": timer.minutes}
    if tracker is not None:
        tracker.log_metrics(metrics_of(results) | {"params_total": float(record["params_total"])})
        tracker.log_artifact(out_dir / "scores", "scores")
        tracker.log_artifact(out_dir / "det.png")
    write_result(out_dir, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="stage folder holding model/")
    parser.add_argument("--data", required=True, help="data YAML (DataConfig)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        data = load_config(args.data, DataConfig)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run(args.init, data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
