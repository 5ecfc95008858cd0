"""A cheap MLflow store with the full svlib schema, written by the MLflow client (no pipeline is run):

* experiment ``demo``: the pipeline parent ``pipeline:demo`` and its stages s1, s2, s3 (training histories) and
  eval (scores/test.txt, scores/val.txt, det.png, the dense ``model/encoder/config.json``);
* experiment ``demo-prune-grid``: a 3-trial grid sweep as ``sweeps.prune_sweep`` logs it: the study parent, the
  teacher run ``teacher:s2`` (tag teacher=true, the dense encoder config), and trials 0-2 (targets 0, 0.3, 0.6)
  with ``structure.json``, each holding the stage runs prune1 (pruned trials only; the pruning schedule and its
  own structure.json), ps1 (train_loss) and eval_pruned (score files).

Used by tests/test_notebooks.py and tests/test_analysis.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DEMO, SWEEP = "demo", "demo-prune-grid"
TARGETS = (0.0, 0.3, 0.6)
LAYERS, HEADS, FFN, HIDDEN = 3, 4, 64, 32
ENCODER_CONFIG = {"num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FFN,
                  "hidden_size": HIDDEN}


def _structure(target: float) -> dict:
    keep = 1.0 - target
    layers = [{"heads": max(1, round(HEADS * keep)), "ffn1": round(FFN * keep), "ffn2": round(FFN * keep * 0.9),
               "conv": round(HIDDEN * keep)} for _ in range(LAYERS)]
    return {"layers": layers, "dense": {"heads": HEADS, "ffn1": FFN, "ffn2": FFN, "conv": HIDDEN},
            "achieved_sparsity": target, "params_encoder": int(10_000 * keep), "dense_params_encoder": 10_000}


def _scores(path: Path, separation: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(40):
            target = i % 2 == 0
            score = rng.normal(separation if target else 0.0, 1.0)
            f.write(f"e{i} t{i} {score:.5f} {'target' if target else 'nontarget'}\n")


def build(root: Path) -> dict:
    """Write the store under ``root``; returns ``{"uri", "ids": {name: run_id}}``."""
    from mlflow import MlflowClient

    from svlib.tracking import Tracker

    root = Path(root)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    files = root / "files"
    (files / "model" / "encoder").mkdir(parents=True)
    (files / "model" / "encoder" / "config.json").write_text(json.dumps(ENCODER_CONFIG))
    ids: dict[str, str] = {}

    demo = Tracker(DEMO, tracking_uri=uri)
    with demo.run("pipeline:demo", tags={"kind": "pipeline"}) as ids["pipeline"]:
        for n, stage in enumerate(("s1", "s2", "s3")):
            with demo.run(stage, nested=True, tags={"stage": stage, "kind": "train"}) as ids[stage]:
                for step in range(1, 6):
                    demo.log_metrics({"train_loss": 5.0 - n - 0.5 * step, "lr_frontend": 1e-3 / step}, step=step)
                demo.log_metrics({"val_eer_pct": 30.0 - 5 * n}, step=5)
                demo.log_metrics({"params_encoder": 10_000.0, "test_eer_pct": 20.0 - 3 * n, "test_mindcf_0.01": 0.9,
                                  "test_mindcf_0.05": 0.8})
        with demo.run("eval", nested=True, tags={"stage": "eval", "kind": "evaluate"}, params={"init": "s3"}) as ids["eval"]:
            demo.log_metrics({"test_eer_pct": 14.0, "test_mindcf_0.01": 0.9, "test_mindcf_0.05": 0.8,
                              "params_total": 12_000.0})
            _scores(files / "eval" / "scores" / "test.txt", 2.0, 0)
            _scores(files / "eval" / "scores" / "val.txt", 2.5, 1)
            demo.log_artifact(files / "eval" / "scores", "scores")
            demo.log_artifact(files / "model", "model")

    sweep = Tracker(SWEEP, tracking_uri=uri)
    client = MlflowClient(uri)
    study = client.create_run(sweep.experiment_id, run_name=f"study:{SWEEP}",
                              tags={"kind": "study", "optuna_study": SWEEP})
    ids["study"] = study.info.run_id
    client.set_terminated(ids["study"], "FINISHED")
    teacher = client.create_run(sweep.experiment_id, run_name="teacher:s2", tags={
        "mlflow.parentRunId": ids["study"], "stage": "s2", "kind": "use", "optuna_study": SWEEP, "teacher": "true"})
    ids["teacher"] = teacher.info.run_id
    for key, value in {"params_encoder": 10_000.0, "test_eer_pct": 17.0, "test_mindcf_0.01": 0.95,
                       "test_mindcf_0.05": 0.85}.items():
        client.log_metric(ids["teacher"], key, value)
    client.log_artifact(ids["teacher"], str(files / "model" / "encoder" / "config.json"), "model/encoder")
    client.set_terminated(ids["teacher"], "FINISHED")
    for n, target in enumerate(TARGETS):
        structure = _structure(target)
        folder = files / f"trial_{n}"
        folder.mkdir()
        (folder / "structure.json").write_text(json.dumps(structure))
        tags = {"kind": "trial", "optuna_study": SWEEP, "optuna_trial": str(n), "mlflow.parentRunId": ids["study"]}
        with sweep.run(f"trial-{n} t={target:g}", tags=tags, params={"target_sparsity": target}) as ids[f"trial{n}"]:
            eer = 17.0 + 8 * target ** 2
            sweep.log_metrics({"val_eer_pct": eer + 1, "params_encoder": float(structure["params_encoder"]),
                               "test_eer_pct": eer, "test_mindcf_0.01": 0.95, "test_mindcf_0.05": 0.85,
                               "achieved_sparsity": target, "target_sparsity": target,
                               # a speaker-bootstrap 95 % interval, as the evaluation stage logs one
                               "test_eer_pct_ci_low": eer - 2.0, "test_eer_pct_ci_high": eer + 2.5})
            sweep.log_artifact(folder / "structure.json")
            if target > 0:
                with sweep.run("prune1", nested=True, tags={"stage": "prune1", "kind": "prune"}):
                    for step in range(1, 5):
                        sweep.log_metrics({"expected_sparsity": target * step / 4, "target_sparsity": target * step / 4,
                                           "lambda1": -0.01 * step}, step=step)
                    sweep.log_artifact(folder / "structure.json")
            with sweep.run("ps1", nested=True, tags={"stage": "ps1", "kind": "train"}):
                for step in range(1, 4):
                    sweep.log_metrics({"train_loss": 3.0 + target - 0.4 * step}, step=step)
            with sweep.run("eval_pruned", nested=True, tags={"stage": "eval_pruned", "kind": "evaluate"},
                           params={"init": "ps1"}) as ids[f"eval{n}"]:
                sweep.log_metrics({"test_eer_pct": eer, "val_eer_pct": eer + 1})
                _scores(folder / "scores" / "test.txt", 2.0 - target, 10 + n)
                _scores(folder / "scores" / "val.txt", 2.2 - target, 20 + n)
                sweep.log_artifact(folder / "scores", "scores")
    return {"uri": uri, "ids": ids, "root": root}
