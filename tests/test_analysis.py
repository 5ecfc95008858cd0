"""svlib.analysis on a small store written with the full MLflow schema, pruning runs and sweep trials included
(the smoke store has neither; tests/test_notebooks.py covers that case)."""
from __future__ import annotations

import json
import warnings

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - before pyplot is imported anywhere in this process

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from svlib import analysis as A

TEACHER_PARAMS = 1000.0
STRUCTURE = {"layers": [{"heads": 2, "ffn1": 40, "ffn2": 10, "conv": 32}, {"heads": [0], "ffn1": 0, "ffn2": 64, "conv": 8}],
             "dense": {"heads": 2, "ffn1": 64, "ffn2": 64, "conv": 32}}
# (target, achieved, params, test eer): trial 2 is dominated by trial 1 (smaller and better)
TRIALS = [(0.3, 0.31, 690.0, 2.2), (0.5, 0.52, 480.0, 2.6), (0.4, 0.45, 550.0, 2.9)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from svlib.tracking import Tracker

    root = tmp_path_factory.mktemp("analysis")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker("prune-demo", tracking_uri=uri)
    ids = {}
    with tracker.run("pipeline", tags={"kind": "pipeline"}):
        with tracker.run("s3", nested=True, tags={"stage": "s3", "kind": "train"}) as ids["s3"]:
            for step, loss in [(1, 3.0), (2, 2.0), (3, 1.5)]:
                tracker.log_metrics({"train_loss": loss, "lr_frontend": 1e-4 * step}, step=step)
            tracker.log_metrics({"params_encoder": TEACHER_PARAMS, "test_eer_pct": 2.0, "test_mindcf_0.01": 0.2})
        with tracker.run("prune1", nested=True, tags={"stage": "prune1", "kind": "prune"},
                         params={"prune": {"target_sparsity": 0.5}}) as ids["prune1"]:
            for step in range(1, 5):
                tracker.log_metrics({"expected_sparsity": 0.1 * step, "target_sparsity": 0.125 * step,
                                     "lambda1": -0.01 * step, "train_loss": 1.0 / step}, step=step)
            tracker.log_metrics({"params_encoder": 600.0, "test_eer_pct": 2.5, "test_mindcf_0.01": 0.25})
            path = root / "structure.json"
            path.write_text(json.dumps(STRUCTURE))
            tracker.log_artifact(path)
        # the eval stage logs no params_encoder: it is taken from its init stage
        with tracker.run("eval", nested=True, tags={"stage": "eval", "kind": "evaluate"},
                         params={"init": "prune1"}) as ids["eval"]:
            tracker.log_metrics({"test_eer_pct": 2.4, "test_mindcf_0.01": 0.24})
            scores = root / "scores"
            scores.mkdir()
            (scores / "test.txt").write_text("a b 0.9 target\na c 0.1 nontarget\nb c 0.4 nontarget\nc d 0.7 target\n")
            tracker.log_artifact(scores, "scores")
    with tracker.run("study", tags={"kind": "study", "optuna_study": "prune-demo"}) as study:
        for n, (target, achieved, params, eer) in enumerate(TRIALS):
            tags = {"kind": "trial", "optuna_study": "prune-demo", "optuna_trial": str(n)}
            with tracker.run(f"trial-{n}", nested=True, tags=tags, params={"target_sparsity": target}) as ids[f"trial{n}"]:
                # a stage nested in a trial reports too; the trial run is the point, not this one
                with tracker.run("prune1", nested=True, tags={"stage": "prune1"}):
                    tracker.log_metrics({"test_eer_pct": 99.0, "params_encoder": 1.0})
                tracker.log_metrics({"achieved_sparsity": achieved, "params_encoder": params, "test_eer_pct": eer,
                                     "val_eer_pct": eer + 0.1})
    ids["study"] = study
    return {"uri": uri, "ids": ids, "root": root, "runs": A.load_runs(uri, "prune-demo")}


def test_load_runs_reads_the_schema(store):
    runs = store["runs"]
    assert len(runs) == 1 + 3 + 1 + 3 * 2
    assert runs.attrs["tracking_uri"] == store["uri"]
    assert list(A.stage_runs(runs)["stage"]) == ["s3", "prune1", "eval"]  # latest pipeline, in start order
    assert list(A.stage_runs(runs, ["prune1"], pipeline=None)["stage"]) == ["prune1"] * 4
    assert list(A.trial_runs(runs, "prune-demo")["optuna_trial"]) == ["0", "1", "2"]
    assert A.load_runs(store["uri"], "no-such-experiment").empty


def test_absent_sqlite_store_is_not_created(tmp_path):
    runs = A.load_runs(f"sqlite:///{tmp_path}/nothing/mlflow.db", "demo")
    assert runs.empty and "stage" in runs
    assert not (tmp_path / "nothing").exists()
    assert "no runs" in A.missing_note(runs, ["train_loss"])


def test_resolve_uri_finds_relative_sqlite(tmp_path, monkeypatch):
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").touch()
    sub = tmp_path / "notebooks"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert A.resolve_uri("sqlite:///mlruns/mlflow.db", roots=[tmp_path]) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert A.resolve_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert A.resolve_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_teacher_and_pruning_points(store):
    runs = store["runs"]
    teacher = A.teacher_reference(runs)
    assert teacher["run_id"] == store["ids"]["s3"] and teacher["params_encoder"] == TEACHER_PARAMS
    assert teacher["eer_pct"] == 2.0 and teacher["mindcf_0.01"] == 0.2
    pts = A.pruning_points(runs).set_index("label")
    # trial-nested stage runs are not points; every trial and pipeline stage with an EER is
    assert sorted(pts.index) == ["eval", "prune1", "s3", "trial 0", "trial 1", "trial 2"]
    assert 99.0 not in pts["eer_pct"].to_numpy()
    assert pts.loc["s3", "source"] == "dense" and pts.loc["s3", "achieved_sparsity"] == 0.0
    assert pts.loc["prune1", "source"] == "pruned"
    assert pts.loc["prune1", "target_sparsity"] == 0.5  # from the last target_sparsity metric / stage config
    assert pts.loc["prune1", "achieved_sparsity"] == pytest.approx(0.4)  # 1 - 600 / 1000
    assert pts.loc["eval", "params_encoder"] == 600.0 and pts.loc["eval", "source"] == "pruned"
    assert pts.loc["trial 1", "achieved_sparsity"] == 0.52  # logged, not derived
    assert pts.loc["trial 1", "target_sparsity"] == 0.5 and pts.loc["trial 0", "val_eer_pct"] == pytest.approx(2.3)
    # prune1 (600, 2.5) loses to eval (600, 2.4); trial 2 (550, 2.9) to trial 1 (480, 2.6); dense is no candidate
    assert pts["pareto"].to_dict() == {"s3": False, "prune1": False, "eval": True, "trial 0": True,
                                       "trial 1": True, "trial 2": False}
    assert A.pruning_points(runs.iloc[0:0]).empty


@pytest.mark.parametrize("params, eer, expected", [
    ([1, 2, 3], [3, 2, 1], [True, True, True]),
    ([1, 2, 3], [1, 2, 3], [True, False, False]),
    ([2, 2, 1], [1, 2, 3], [True, False, True]),     # same size, worse EER: dominated
    ([1, 2, 1], [5, 5, 5], [True, False, True]),     # same EER, bigger: dominated; duplicates both kept
    ([1, np.nan, 3], [3, 0, 1], [True, False, True]),
    ([], [], []),
])
def test_pareto_mask(params, eer, expected):
    assert A.pareto_mask(params, eer).tolist() == expected


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    p, e = rng.integers(0, 6, 200).astype(float), rng.integers(0, 6, 200).astype(float)
    brute = [not any((p[j] <= p[i] and e[j] <= e[i] and (p[j] < p[i] or e[j] < e[i])) for j in range(200))
             for i in range(200)]
    assert A.pareto_mask(p, e).tolist() == brute
    with pytest.raises(ValueError):
        A.pareto_mask([1, 2], [1])


def test_study_pareto_reads_optuna(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=storage, directions=["minimize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["test_eer_pct", "params_encoder"])
    for n, (eer, params) in enumerate([(2.0, 900), (3.0, 500), (3.5, 600)]):
        trial = study.ask({"target_sparsity": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("mlflow_run_id", f"run{n}")
        study.tell(trial, [eer, params])
    front = A.study_pareto(storage, "s")
    assert front["mlflow_run_id"].tolist() == ["run0", "run1"]
    assert front["values.params_encoder"].tolist() == [900, 500]
    assert A.study_pareto(f"sqlite:///{tmp_path}/absent.db", "s").empty
    assert not (tmp_path / "absent.db").exists()


def test_parse_structure_layouts():
    kept, dense = A.parse_structure(STRUCTURE)
    assert kept.to_dict("list") == {"heads": [2, 1], "ffn1": [40, 0], "ffn2": [10, 64], "conv": [32, 8]}
    assert dense["ffn1"].tolist() == [64, 64]
    kept2, dense2 = A.parse_structure({"heads": [1, 2], "ffn1": [3, 4], "ffn2": [5, 6], "conv_channels": [7, 8]})
    assert kept2.loc[1].tolist() == [2, 4, 6, 8] and dense2 is None
    kept3, dense3 = A.parse_structure([{"heads": {"kept": 1, "total": 4}, "ffn1": 2, "ffn2": 3, "conv": 4}])
    assert kept3.loc[0, "heads"] == 1 and dense3.loc[0, "heads"] == 4
    with pytest.raises(ValueError, match="layout"):
        A.parse_structure("nope")


def test_load_structures_reads_artifacts_and_adds_teacher(store, tmp_path):
    runs = store["runs"]
    # the teacher has no model/ artifact in this store: only the pruned structure is found
    found = A.load_structures(runs, points=A.pruning_points(runs))
    assert list(found) == [store["ids"]["prune1"]]  # keyed by run id; the trial-nested prune1 runs are left out
    entry = found[store["ids"]["prune1"]]
    assert entry["label"] == "prune1 (sparsity 0.40)"
    assert entry["kept"]["conv"].tolist() == [32, 8] and entry["dense"]["conv"].tolist() == [32, 32]
    fig = A.plot_structure_heatmap(found)
    assert len(fig.axes) == 2 * len(A.KINDS)  # a heatmap and its colour bar per kind
    fig.savefig(tmp_path / "h.png")
    fig2 = A.plot_structure_bars(found)
    fig2.savefig(tmp_path / "b.png")
    plt.close("all")
    assert (tmp_path / "h.png").stat().st_size > 5000 and (tmp_path / "b.png").stat().st_size > 5000
    with pytest.raises(ValueError):
        A.plot_structure_heatmap({})


def test_histories_and_training_curves(store, tmp_path):
    runs = A.stage_runs(store["runs"])
    hist = A.metric_histories(runs, ["train_loss", "expected_sparsity", "lambda2"])
    s3 = hist[(hist["label"] == "s3") & (hist["metric"] == "train_loss")]
    assert s3[["step", "value"]].values.tolist() == [[1, 3.0], [2, 2.0], [3, 1.5]]
    assert hist[hist["metric"] == "expected_sparsity"]["value"].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert "lambda2" not in set(hist["metric"])
    note = A.missing_note(runs, ["train_loss", "lambda2"])
    assert "lambda2" in note and "train_loss" not in note
    assert A.missing_note(runs, ["train_loss"]) == ""
    fig = A.plot_training_curves(hist, ["train_loss", "expected_sparsity", "lambda2"], ncols=2)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "no run logged lambda2" in texts
    assert [len(ax.lines) for ax in fig.axes[:3]] == [2, 1, 0]
    plt.close(fig)


def test_pruning_curve_plot(store, tmp_path):
    runs = store["runs"]
    pts = A.pruning_points(runs)
    fig = A.plot_pruning_curve(pts, A.teacher_reference(runs), pareto_run_ids=[store["ids"]["trial1"]])
    assert len(fig.axes) == 4
    ax = fig.axes[0]
    front = [line for line in ax.lines if line.get_color() == "tab:red"]
    assert len(front) == 1 and front[0].get_xdata().tolist() == [480.0]  # the study's front, not the computed one
    assert any(s.startswith("teacher s3 (EER 2.00 %") for s in A.figure_series(fig))
    fig.savefig(tmp_path / "p.png")
    plt.close(fig)
    empty = A.plot_pruning_curve(A.pruning_points(runs.iloc[0:0]), None)
    assert "no evaluated runs" in [t.get_text() for t in empty.axes[0].texts]
    plt.close(empty)


def test_scores_and_det(store, tmp_path):
    files = A.score_files(store["runs"], tmp_path / "dl")
    assert list(files) == ["eval/test"]
    scores, labels = A.read_scores(files["eval/test"])
    assert scores.tolist() == [0.9, 0.1, 0.4, 0.7] and labels.tolist() == [1, 0, 0, 1]
    fig = A.plot_det_curves({"a": files["eval/test"], "b": files["eval/test"]})
    legend = A.figure_series(fig)
    assert legend[0].startswith("a (EER 0.00%")  # perfectly separated scores
    plt.close(fig)
    bad = tmp_path / "bad.txt"
    bad.write_text("a b 0.5 maybe\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        A.read_scores(bad)
    assert A.score_files(store["runs"], tmp_path / "dl", lists=["val"]) == {}
    assert isinstance(A.pruning_points(store["runs"]), pd.DataFrame)


# ------------------------------------------------------------------ a demo pipeline and a 3-trial sweep together

@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    from tests import fake_store

    built = fake_store.build(tmp_path_factory.mktemp("sweep"))
    built["runs"] = A.load_runs(built["uri"], [fake_store.DEMO, fake_store.SWEEP])
    return built


def test_labels_are_unique_per_run_across_experiments_and_trials(sweep_store):
    runs = sweep_store["runs"].set_index("run_id")
    ids = sweep_store["ids"]
    assert runs["label"].is_unique
    assert runs.at[ids["trial1"], "label"] == "trial 1"
    assert runs.at[ids["eval2"], "label"] == "trial 2/eval_pruned"
    assert runs.at[ids["teacher"], "label"] == "teacher:s2"
    assert runs.at[ids["s2"], "label"] == "s2" and runs.at[ids["eval"], "label"] == "eval"
    assert set(runs["experiment"]) == {"demo", "demo-prune-grid"}


def test_the_sweeps_teacher_is_the_reference_and_every_trial_is_kept(sweep_store, tmp_path):
    runs, ids = sweep_store["runs"], sweep_store["ids"]
    teacher = A.teacher_reference(runs)
    assert teacher["run_id"] == ids["teacher"] and teacher["eer_pct"] == 17.0  # not the demo's s3 (14 %)
    files = A.score_files(runs, tmp_path, lists=["test"])
    assert sorted(files) == ["eval/test", "trial 0/eval_pruned/test", "trial 1/eval_pruned/test",
                             "trial 2/eval_pruned/test"]
    assert len({p.read_text() for p in files.values()}) == 4  # four different score files, none overwritten
    fig = A.plot_det_curves(files)
    assert len(A.figure_series(fig)) == 4
    structures = A.load_structures(runs, points=A.pruning_points(runs))
    labels = [s["label"] for s in structures.values()]
    assert labels == ["teacher s2 (dense)", "trial 0 (sparsity 0.00)", "trial 1 (sparsity 0.30)",
                      "trial 2 (sparsity 0.60)"]
    limited = A.limit_structures(structures, 3)  # the teacher stays, the trials are spread
    assert [s["label"] for s in limited.values()] == ["teacher s2 (dense)", "trial 0 (sparsity 0.00)",
                                                      "trial 2 (sparsity 0.60)"]
    assert len(A.figure_series(A.plot_structure_heatmap(structures))) == 4
    plt.close("all")


def test_require_runs_names_what_is_missing(sweep_store, tmp_path):
    A.require_runs(sweep_store["runs"])
    with pytest.raises(LookupError, match="'nope' not in the store"):
        A.require_runs(A.load_runs(sweep_store["uri"], ["demo", "nope"]))
    with pytest.raises(LookupError, match="no such store"):
        A.require_runs(A.load_runs(f"sqlite:///{tmp_path}/absent/mlflow.db", "demo"))
    assert not (tmp_path / "absent").exists()


def test_pruning_curve_draws_bootstrap_intervals():
    """``<metric>_ci_low/high`` columns become vertical bars (no legend entry); the teacher's interval a band."""
    from matplotlib.collections import LineCollection

    pts = pd.DataFrame({"source": ["trial", "trial"], "run_id": ["a", "b"], "label": ["t0", "t1"], "stage": [None, None],
                        "target_sparsity": [0.3, 0.5], "achieved_sparsity": [0.3, 0.5], "params_encoder": [700.0, 500.0],
                        "eer_pct": [10.0, 12.0], "mindcf_0.01": [0.5, 0.6], "mindcf_0.05": [0.4, 0.5],
                        "val_eer_pct": [11.0, 13.0], "pareto": [True, True],
                        "eer_pct_ci_low": [8.0, np.nan], "eer_pct_ci_high": [12.5, np.nan]})
    teacher = {"label": "s2", "params_encoder": 1000.0, "eer_pct": 9.0, "mindcf_0.01": 0.45,
               "eer_pct_ci_low": 7.0, "eer_pct_ci_high": 11.0}
    fig = A.plot_pruning_curve(pts, teacher)
    ax = fig.axes[0]  # eer_pct vs params
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 1 and [s.tolist() for s in bars[0].get_segments()] == [[[700.0, 8.0], [700.0, 12.5]]]
    band = [p for p in ax.patches if p.get_alpha() == 0.07]
    assert len(band) == 1 and band[0].get_extents().height > 0
    assert not [c for c in fig.axes[2].collections if isinstance(c, LineCollection)]  # no minDCF intervals given
    assert "trial" in A.figure_series(fig) and len(A.figure_series(fig)) == 3  # trial, Pareto front, teacher
    plt.close(fig)


def _method_result() -> dict:
    """A hand-made bench/pruning_curve.py result: 3 methods at 2 targets, the dense point, 2 controls, snapshots."""
    points = [{"method": "kd", "target": 0.0, "achieved_sparsity": 0.0, "eer_pct": 5.0, "eer_ci": [4.0, 6.0]}]
    for method, offset in (("kd", 0.0), ("random", 1.0), ("task", 0.5)):
        for target in (0.5, 0.9):
            eer = 5.0 + offset + 4 * (target - 0.5)
            points.append({"method": method, "target": target, "achieved_sparsity": target + 0.002,
                           "eer_pct": eer, "eer_ci": [eer - 1, eer + 1]})
    snaps = [{"target": t, "achieved_sparsity": t, "eer_pct": 5.5, "eer_ci": [4.5, 6.5]} for t in (0.5, 0.9)]
    return {"teacher": {"params_encoder": 400_000, "eer_pct": 5.0, "eer_ci": [4.0, 6.0]}, "test_list": "test",
            "controls": {"encoder_removed": {"eer_pct": 9.0, "eer_ci": [8.0, 10.0]},
                         "random_init": {"eer_pct": 14.0, "eer_ci": [12.0, 16.0]}},
            "points": points, "knee_sparsity": 0.902, "snapshot_vs_grid": {"points": snaps}}


def test_method_curve_is_read_back_from_mlflow_and_plotted(tmp_path):
    from svlib.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert A.load_curve_summary(uri, "pruning_curve") is None  # no experiment yet
    result = _method_result()
    path = tmp_path / "pruning_curve.json"
    path.write_text(json.dumps(result))
    tracker = Tracker("pruning_curve", tracking_uri=uri)
    with tracker.run("curve_summary", tags={"kind": A.CURVE_SUMMARY_KIND}):
        tracker.log_artifact(path)
    assert A.load_curve_summary(uri, "pruning_curve") == result
    fig = A.plot_method_curve(result)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["teacher (s2) 5.00 %", "control: encoder removed 9.00 %", "control: random init 14.00 %",
                      "KD (reference)", "random structure", "task loss, no teacher", "KD, one-run snapshots"]
    assert fig.axes[0].get_xlabel() == "Encoder parameters (log scale)" and fig.axes[1].get_xlabel() == "Encoder sparsity"
    assert fig.axes[0].get_ylabel() == "Test EER (%), 95 % interval"
    # the top axis reads the bottom one as sparsity: the tick at the dense size is sparsity 0; human units below
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["400k", "200k", "120k", "80k", "40k", "20k", "12k"]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["0.00", "0.50", "0.70", "0.80", "0.90", "0.95",
                                                                     "0.97"]
    plt.close(fig)
