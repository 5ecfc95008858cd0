"""The analysis figures as a paper prints them (issue 21, "Plots"): the labels drawn, the tick values, the legend
entries and where the legend sits, read off the matplotlib objects after a draw, never off pixels."""
from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")  # noqa: E402 - before pyplot is imported anywhere in this process

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from svlib import analysis as A

TEACHER = {"run_id": "teacher", "label": "teacher:s2", "params_encoder": 406_720.0, "eer_pct": 36.7,
           "mindcf_0.01": 0.95, "mindcf_0.05": 0.9}


def _points(rows) -> pd.DataFrame:
    return pd.DataFrame([{"source": source, "run_id": run_id, "label": label, "stage": None, "target_sparsity": target,
                          "achieved_sparsity": achieved, "params_encoder": params, "eer_pct": eer, "mindcf_0.01": dcf,
                          "mindcf_0.05": dcf, "val_eer_pct": eer, "budget": np.nan, "pareto": source != "dense"}
                         for source, run_id, label, target, achieved, params, eer, dcf in rows])


# the demo's s2 and a sweep's dense trial on one point; the pruned stages that share one shrunk encoder; two grid
# targets that reached the same sparsity (the overprinted "ps3/ps2/eval_pruned" and "0.80/0.90" of the issue)
CURVE = _points([("dense", "s2", "s2", np.nan, 0.0, 406_720, 8.1, 0.66),
                 ("trial", "t0", "trial 0", 0.0, 0.0, 406_720, 8.12, 0.69),
                 ("pruned", "ps1", "ps1", 0.6, 0.58, 170_000, 9.0, 0.70),
                 ("pruned", "ps2", "ps2", 0.6, 0.58, 170_000, 9.01, 0.70),
                 ("pruned", "ps3", "ps3", 0.6, 0.58, 170_000, 9.0, 0.70),
                 ("pruned", "eval_pruned", "eval_pruned", 0.6, 0.58, 170_000, 9.05, 0.71),
                 ("trial", "t5", "trial 5", 0.8, 0.82, 72_000, 8.05, 0.68),
                 ("trial", "t6", "trial 6", 0.9, 0.83, 70_500, 8.0, 0.679)])


def _ticks(ax, which: str = "x") -> list[str]:
    """The tick labels drawn inside the axis' limits (after a draw)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    return [t.get_text() for t, loc in zip(axis.get_ticklabels(), axis.get_ticklocs()) if low - 1e-9 <= loc <= high + 1e-9]


def _legend_clear_of_axes(fig) -> None:
    """The figure's one legend lies outside every panel, so it covers no line, bar or point."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.legends) == 1 and not any(ax.get_legend() for ax in fig.axes)
    box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        if ax.get_visible():
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_pruning_curve_labels_ticks_and_legend():
    fig = A.plot_pruning_curve(CURVE, TEACHER)
    fig.canvas.draw()
    params_ax, sparsity_ax = fig.axes[0], fig.axes[1]
    assert [ax.get_ylabel() for ax in fig.axes] == ["Test EER (%)"] * 2 + ["Test minDCF (P_target 0.01)"] * 2
    assert [ax.get_xlabel() for ax in fig.axes] == ["Encoder parameters", "Achieved sparsity"] * 2
    # parameters in human units, no "1e5" offset beside the axis
    assert _ticks(params_ax) == ["100k", "150k", "200k", "250k", "300k", "350k", "400k"]
    assert params_ax.xaxis.get_offset_text().get_text() == ""
    # sparsity is a fraction: the axis is [0, 1], whatever the points
    assert sparsity_ax.get_xlim() == (0.0, 1.0)
    assert _ticks(sparsity_ax) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    # one legend, the teacher's star and dashed line in it, its stage named once, with units
    assert A.figure_series(fig) == ["dense", "pruned", "trial", "Pareto front", "teacher s2 (EER 36.70 %, minDCF 0.950)"]
    star = fig.legends[0].legend_handles[-1]
    assert (star.get_marker(), star.get_linestyle()) == ("*", "--")
    _legend_clear_of_axes(fig)
    plt.close(fig)


def test_pruning_curve_point_labels_never_overprint():
    fig = A.plot_pruning_curve(CURVE, TEACHER)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        texts = [t.get_text() for t in ax.texts]
        # coinciding points share one label; nothing is written twice
        assert "ps1, ps2, ps3" in " ".join(texts) and len(texts) == len(set(texts)), texts
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), texts
    eer_params = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(eer_params) == ["0.80, 0.90", "ps1, ps2, ps3, eval_pruned", "s2, 0.00"]
    plt.close(fig)


def test_dense_only_pruning_curve_has_no_negative_sparsity():
    # the demo alone: every point dense at sparsity 0 (matplotlib's autoscale put them mid-axis, at -0.04 ... 0.04)
    fig = A.plot_pruning_curve(CURVE[CURVE["source"] == "dense"].reset_index(drop=True), TEACHER)
    fig.canvas.draw()
    for ax in fig.axes[1::2]:
        assert ax.get_xlim() == (0.0, 1.0)
        assert all(float(t) >= 0 for t in _ticks(ax))
    assert A.figure_series(fig) == ["dense", "teacher s2 (EER 36.70 %, minDCF 0.950)"]
    plt.close(fig)


def test_human_count():
    assert [A.human_count(v) for v in (0, 950, 40_000, 406_720, 1.5e6, 580.5e6, 2e9)] == \
        ["0", "950", "40k", "407k", "1.5M", "580M", "2G"]


def test_figure_names_carry_the_experiment(tmp_path):
    assert A.figure_path(tmp_path, "demo", "det_curves") == tmp_path / "demo_det_curves.png"
    assert A.figure_path(tmp_path, ["demo", "demo-prune-grid"], "pruning_curve").name == \
        "demo+demo-prune-grid_pruning_curve.png"
    assert A.figure_path(tmp_path, "my exp/1", "x").name == "my-exp-1_x.png"


def test_missing_experiment_names_the_command_that_makes_it(tmp_path):
    from tests import fake_store

    built = fake_store.build(tmp_path)
    with pytest.raises(LookupError) as err:  # the demo is there, the TPE sweep is not
        A.require_runs(A.load_runs(built["uri"], ["demo", "demo-prune"]))
    assert str(err.value).endswith("'demo-prune' is made by `python -m sweeps.prune_sweep --config "
                                   "sweeps/configs/demo.yaml`; or point tracking_uri/experiment elsewhere")
    assert A.experiment_command("demo-prune-grid") == "python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml --grid"
    assert A.experiment_command("demo") == "make demo"
    assert A.experiment_command("smoke") == "python -m experiments.pipeline --config experiments/configs/smoke/pipeline.yaml"
    assert A.experiment_command("nope") is None


# ------------------------------------------------------------------------ a pipeline store: structures and curves

STRUCTURES = {"prune1": [3, 40], "graft": [2, 32], "ps1": [2, 32], "ps2": [2, 32]}  # heads, ffn per layer (3 layers)


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory):
    """s1 (30 steps), s2 (1,850 steps), a distilling prune1 (200 steps), graft/ps1/ps2 sharing one shrunk
    encoder, and an eval stage that logs its val EER once (step 0)."""
    from svlib.tracking import Tracker

    root = tmp_path_factory.mktemp("plots")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker("paper", tracking_uri=uri)
    with tracker.run("pipeline:paper", tags={"kind": "pipeline"}):
        for stage, steps, loss in (("s1", 30, 8.0), ("s2", 1850, 5.0)):
            with tracker.run(stage, nested=True, tags={"stage": stage, "kind": "train"}):
                every = 10 if steps < 100 else 50
                for step in range(every, steps + 1, every):
                    tracker.log_metrics({"train_loss": loss - step / steps}, step=step)
                tracker.log_metrics({"val_eer_pct": 10.0}, step=steps)
        for stage, (heads, ffn) in STRUCTURES.items():
            with tracker.run(stage, nested=True, tags={"stage": stage, "kind": "prune" if stage == "prune1" else "train"}):
                if stage == "prune1":
                    for step in range(20, 201, 20):
                        tracker.log_metrics({"train_loss": -0.9 + step / 1000, "distill_loss": -1.0 + step / 1000,
                                             "expected_sparsity": step / 400}, step=step)
                path = root / stage / "structure.json"
                path.parent.mkdir()
                path.write_text(json.dumps({"layers": [{"heads": heads, "ffn1": ffn, "ffn2": ffn, "conv": 16}] * 3,
                                            "dense": {"heads": 4, "ffn1": 64, "ffn2": 64, "conv": 16}}))
                tracker.log_artifact(path)
        with tracker.run("eval", nested=True, tags={"stage": "eval", "kind": "evaluate"}):
            tracker.log_metrics({"val_eer_pct": 7.5})
    return A.load_runs(uri, "paper")


def test_identical_structures_are_one_row_and_bars_read_whole_layers(pipeline_store):
    structures = A.load_structures(pipeline_store, include_dense=False)
    assert [s["label"] for s in structures.values()] == ["prune1", "graft, ps1, ps2"]  # not three identical rows
    fig = A.plot_structure_bars(structures)
    fig.canvas.draw()
    for ax in fig.axes:
        assert _ticks(ax) == ["0", "1", "2"], ax.get_title()  # layers, not -0.25 ... 1.25
        assert all(re.fullmatch(r"\d+", t) for t in _ticks(ax, "y")), (ax.get_title(), _ticks(ax, "y"))
        assert ax.get_xlabel() == "Layer"
    assert [ax.get_title() for ax in fig.axes] == ["attention heads kept per layer", "FFN 1 units kept per layer",
                                                   "FFN 2 units kept per layer", "conv channels kept per layer"]
    assert A.figure_series(fig) == ["prune1", "graft, ps1, ps2"]
    _legend_clear_of_axes(fig)
    plt.close(fig)


def test_training_curves_per_stage_progress_and_distillation_apart(pipeline_store):
    runs = A.stage_runs(pipeline_store)
    hist = A.metric_histories(runs, ["train_loss", "val_eer_pct", A.DISTILL_LOSS])
    # the distilling stage's loss is its own metric, not drawn on the AAM loss' axis
    assert list(dict.fromkeys(hist.loc[hist["metric"] == "train_loss", "label"])) == ["s1", "s2"]
    assert set(hist.loc[hist["metric"] == A.DISTILL_LOSS, "label"]) == {"prune1"}
    fig = A.plot_training_curves(hist, ["train_loss", "val_eer_pct", A.DISTILL_LOSS], ncols=3)
    fig.canvas.draw()
    loss_ax, val_ax, distill_ax = fig.axes[:3]
    # every stage spans the whole axis: 30 steps are not squashed beside 1,850
    assert [(line.get_label(), max(line.get_xdata())) for line in loss_ax.lines] == \
        [("s1 (30 steps)", 1.0), ("s2 (1,850 steps)", 1.0)]
    assert min(loss_ax.lines[0].get_xdata()) == pytest.approx(1 / 3)
    assert _ticks(loss_ax) == ["0%", "20%", "40%", "60%", "80%", "100%"]
    assert loss_ax.get_xlabel() == "Progress through the stage (its steps)"
    # the eval stage's val EER is a level across the panel, not a point at step 0
    evaluation = [line for line in val_ax.lines if line.get_label() == "eval (evaluation)"]
    assert len(evaluation) == 1 and list(evaluation[0].get_ydata()) == [7.5, 7.5]
    assert list(evaluation[0].get_xdata()) == [0, 1] and evaluation[0].get_linestyle() == ":"
    assert [line.get_label() for line in distill_ax.lines] == ["prune1 (200 steps)"]
    assert A.figure_series(fig) == ["s1 (30 steps)", "s2 (1,850 steps)", "eval (evaluation)", "prune1 (200 steps)"]
    _legend_clear_of_axes(fig)
    plt.close(fig)


def test_det_legend_lies_below_the_curves(tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for name, separation in (("weak", 0.2), ("strong", 2.0)):  # the weak system's EER is about 45 %
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(f"e{i} t{i} {rng.normal(separation * (i % 2), 1.0):.4f} "
                                f"{'target' if i % 2 else 'nontarget'}\n" for i in range(400)))
        files[name] = path
    fig = A.plot_det_curves(files)
    assert [s.split(" (")[0] for s in A.figure_series(fig)] == ["weak", "strong"]
    _legend_clear_of_axes(fig)
    plt.close(fig)


@pytest.mark.parametrize("script, data_flag, name", [("pruning_curve", "--result", "pruning_curve"),
                                                     ("sparsity_curve", "--out", "sparsity_curve")])
def test_bench_figures_redraw_from_their_committed_json(script, data_flag, name, tmp_path):
    """bench/results/*.png are drawn by the code above: ``--plot-only`` redraws one from its JSON, training nothing."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    data = tmp_path / f"{name}.json"
    shutil.copy(REPO / "bench" / "results" / f"{name}.json", data)
    before = data.read_bytes()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--plot-only", data_flag, str(data),
                           "--plot", str(tmp_path / f"{name}.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"redrew {tmp_path / name}.png from {data}" in proc.stdout
    assert (tmp_path / f"{name}.png").stat().st_size > 30_000 and data.read_bytes() == before
