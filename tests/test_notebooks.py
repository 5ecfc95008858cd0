"""The analysis notebooks: committed clean, and each runs headless (nbclient) against the smoke MLflow store.

The smoke store holds the dense pipeline (s1 -> merge -> s2 -> s3 -> eval) and the pruning stages after it
(prune1 -> shrink -> prune2 -> graft -> ps1 -> ps2 -> ps3 -> eval_pruned), but no sweep: the notebooks must plot
the pruned models, their structure and the pruning schedule. A small Optuna study is made here so
pruning_curve's study path runs too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"
NAMES = ["pruning_curve", "pruned_structure", "training_curves"]


def _parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    return tagged[0]


def _defaults(nb) -> dict:
    scope: dict = {}
    exec(nb.cells[_parameters_cell(nb)].source, scope)  # noqa: S102 - our own notebook's literal assignments
    return {k: v for k, v in scope.items() if not k.startswith("__")}


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean_and_parameterised(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit notebooks without outputs"
            ast.parse("\n".join(line for line in cell.source.splitlines() if not line.startswith("%")))
    defaults = _defaults(nb)
    # the documented defaults: the repo's store and the demo experiment
    assert defaults["tracking_uri"] == "sqlite:///mlruns/mlflow.db" and defaults["experiment"] == "demo"
    assert defaults["figures_dir"] is None
    assert _parameters_cell(nb) <= 1, "parameters come first (after the title)"


def _run(name: str, workdir: Path, **params) -> tuple[nbformat.NotebookNode, str]:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    values = _defaults(nb) | params
    unknown = set(params) - set(_defaults(nb))
    assert not unknown, f"{name} has no parameters {unknown}"
    nb.cells[_parameters_cell(nb)].source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    # kernel "python3" is the venv's kernelspec; jupyter_client swaps its argv "python" for sys.executable
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(workdir)}})
    client.execute()
    text = "\n".join(out.get("text", "") for c in nb.cells if c.cell_type == "code" for out in c.outputs
                     if out.output_type == "stream")
    return nb, text


def _displayed(nb) -> str:
    """The text/plain of every displayed object (tables shown with ``display``), for content checks."""
    return "\n".join(out["data"]["text/plain"] for c in nb.cells if c.cell_type == "code" for out in c.outputs
                     if out.output_type in ("display_data", "execute_result") and "text/plain" in out.get("data", {})
                     and not out["data"]["text/plain"].startswith("<Figure"))


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


@pytest.fixture(scope="module")
def smoke_study(smoke_run, tmp_path_factory):
    """A 3-trial Optuna study (two objectives) whose trials point at the smoke run's stage runs."""
    import mlflow
    import optuna

    mlflow.set_tracking_uri(smoke_run["tracking_uri"])
    runs = {r.data.tags["stage"]: r.info.run_id
            for r in mlflow.search_runs(experiment_names=["smoke"], output_format="list") if "stage" in r.data.tags}
    storage = f"sqlite:///{tmp_path_factory.mktemp('study') / 'prune.db'}"
    study = optuna.create_study(study_name="smoke-prune", storage=storage, directions=["minimize", "minimize"])
    for stage, values in (("s1", [40.0, 3e4]), ("s2", [30.0, 4e4]), ("s3", [45.0, 4.5e4])):
        trial = study.ask()
        trial.set_user_attr("mlflow_run_id", runs[stage])
        study.tell(trial, values)
    return storage, runs


def test_pruning_curve_notebook(smoke_run, smoke_study, tmp_path):
    storage, runs = smoke_study
    nb, text = _run("pruning_curve", smoke_run["workdir"], tracking_uri=smoke_run["tracking_uri"], experiment="smoke",
                    figures_dir=str(tmp_path), optuna_storage=storage, optuna_study="smoke-prune")
    assert (tmp_path / "smoke_pruning_curve.png").stat().st_size > 20_000
    assert _images(nb) == 1
    assert "14 runs" in text  # the pipeline parent + 13 stage runs
    assert "note: no pruned models or sweep trials" not in text  # the pruning stages are in the store now
    assert "2 trials on the Pareto front" in text  # s1 (40, 3e4) and s2 (30, 4e4); s3 is dominated
    assert "'label': 's3'" in text  # the dense teacher (the largest encoder, not the pruned eval)
    # the pruned point(s): the ps stages and eval_pruned, smaller than the teacher, with their sparsity
    table = _displayed(nb)
    summary = smoke_run["summary"]["stages"]
    # rows of the points table: index, source, run_id, label, stage, target, achieved, params, eer, ...
    pruned_rows = [row for row in (line.split() for line in table.splitlines()) if row[1:2] == ["pruned"]]
    stages = {row[4] for row in pruned_rows}
    assert {"ps1", "ps2", "ps3", "eval_pruned"} <= stages, table
    sparsity = summary["shrink"]["achieved_sparsity"]
    assert 0.0 < sparsity < 1.0
    for row in pruned_rows:
        assert float(row[6]) == pytest.approx(sparsity, abs=1e-5)
        assert float(row[7]) == summary["shrink"]["params_encoder"] < summary["s2"]["params_encoder"]
    eval_row = next(row for row in pruned_rows if row[4] == "eval_pruned")
    assert float(eval_row[8]) == pytest.approx(summary["eval_pruned"]["test"]["test"]["eer_pct"], abs=1e-5)


def test_pruned_structure_notebook(smoke_run, tmp_path):
    nb, text = _run("pruned_structure", smoke_run["workdir"], tracking_uri=smoke_run["tracking_uri"],
                    experiment="smoke", figures_dir=str(tmp_path))
    assert "note: no structure.json" not in text
    assert "teacher s3 (dense)" in text
    # the pruned layers: prune1's and shrink's structure.json, the shrunk encoder of graft and the ps stages
    # prune1's structure is the one shrink cuts to, graft and the fine-tunes keep: one row, named after all
    assert "prune1, shrink, graft, ps1, ps2, ps3 (sparsity" in text
    sizes = smoke_run["summary"]["stages"]["prune1"]["sizes"]
    kept = {k: [layer[k] for layer in sizes] for k in ("heads", "ffn1", "ffn2", "conv")}
    table = _displayed(nb)
    for kind, widths in kept.items():  # each shown table row: kind, then the kept width per layer
        assert any(line.split() == [kind, *map(str, widths)] for line in table.splitlines()), (kind, widths)
    assert smoke_run["summary"]["stages"]["prune1"]["achieved_sparsity"] > 0  # those widths are a real cut
    for png in ("smoke_structure_heatmap.png", "smoke_structure_bars.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert _images(nb) == 2


def test_training_curves_notebook(smoke_run, tmp_path):
    nb, text = _run("training_curves", smoke_run["workdir"], tracking_uri=smoke_run["tracking_uri"],
                    experiment="smoke", figures_dir=str(tmp_path))
    assert ("13 stage runs: s1, merge, s2, s3, eval, prune1, shrink, prune2, graft, ps1, ps2, ps3, eval_pruned"
            in text)
    assert "note: no run of these stages has" not in text  # training and pruning-schedule metrics all logged
    # the evaluation stages' val + test lists and, as the README says, every training stage's test list
    det = [d.split(" (")[0] for d in _series(text, "DET series:")]
    assert det == ["s1/test", "s2/test", "s3/test", "eval/test", "eval/val", "ps1/test", "ps2/test", "ps3/test",
                   "eval_pruned/test", "eval_pruned/val"]
    assert f"{len(det)} score files: {', '.join(det)}" in text
    for png in ("smoke_training_curves.png", "smoke_pruning_schedule.png", "smoke_det_curves.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert _images(nb) == 3


def test_headless_run_without_the_experiment_fails(tmp_path):
    # A fresh checkout has no mlruns/mlflow.db: a headless run must fail naming it (not save empty figures), and
    # must not create an empty store.
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="no such store"):
        _run("training_curves", tmp_path, tracking_uri=f"sqlite:///{tmp_path}/none/mlflow.db",
             figures_dir=str(tmp_path / "fig"))
    assert not (tmp_path / "none").exists() and not list((tmp_path / "fig").glob("*.png"))


# ------------------------------------------------------------------ a demo pipeline + a 3-trial sweep (fake store)

@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    from tests import fake_store

    return fake_store.build(tmp_path_factory.mktemp("nb-sweep"))


def _series(text: str, prefix: str) -> list[str]:
    """The list a notebook printed as ``<prefix> [...]`` (svlib.analysis.figure_series)."""
    line = next(line for line in text.splitlines() if line.startswith(prefix))
    return ast.literal_eval(line[len(prefix):].strip())


BOTH = ["demo", "demo-prune-grid"]
TRIALS = ["trial 0", "trial 1", "trial 2"]


def test_pruning_curve_notebook_on_a_sweep(sweep_store, tmp_path):
    nb, text = _run("pruning_curve", sweep_store["root"], tracking_uri=sweep_store["uri"], experiment=BOTH,
                    figures_dir=str(tmp_path))
    assert "points by source: {'dense': 5, 'trial': 3}" in text  # s1-s3, eval, the teacher; every trial
    assert "points with a 95 % interval: 3 of 8" in text  # the trials logged test_eer_pct_ci_low/high
    series = _series(text, "series:")
    assert series[:2] == ["dense", "trial"] and "Pareto front" in series
    assert "teacher s2 (EER 17.00 %, minDCF 0.950)" in series, series  # the sweep's teacher, 17 %
    table = _displayed(nb)
    assert sorted({" ".join(row[3:5]) for row in (line.split() for line in table.splitlines())
                   if row[1:2] == ["trial"]}) == TRIALS
    assert (tmp_path / "demo+demo-prune-grid_pruning_curve.png").stat().st_size > 20_000


def test_pruned_structure_notebook_on_a_sweep(sweep_store, tmp_path):
    _nb, text = _run("pruned_structure", sweep_store["root"], tracking_uri=sweep_store["uri"], experiment=BOTH,
                     figures_dir=str(tmp_path))
    rows = ["teacher s2 (dense)", "trial 0 (sparsity 0.00)", "trial 1 (sparsity 0.30)",
            "trial 2 (sparsity 0.60)"]
    assert _series(text, "heatmap rows:") == rows
    assert _series(text, "bar series:") == rows


def test_pruned_structure_notebook_names_the_structures_it_leaves_out(sweep_store, tmp_path):
    _nb, text = _run("pruned_structure", sweep_store["root"], tracking_uri=sweep_store["uri"], experiment=BOTH,
                     figures_dir=str(tmp_path), max_models=2)
    assert "note: 2 of 4 structures left out (max_models = 2): trial 1 (sparsity 0.30); trial 2 (sparsity 0.60)" in text
    assert _series(text, "bar series:") == ["teacher s2 (dense)", "trial 0 (sparsity 0.00)"]


def test_training_curves_notebook_on_a_sweep(sweep_store, tmp_path):
    # every stage run of both experiments (pipeline_run=None): the demo's stages and each trial's
    _nb, text = _run("training_curves", sweep_store["root"], tracking_uri=sweep_store["uri"], experiment=BOTH,
                     figures_dir=str(tmp_path), pipeline_run=None, det_lists=["test"])
    assert _series(text, "training_curves series:") == \
        ["s1 (5 steps)", "s2 (5 steps)", "s3 (5 steps)"] + [f"{t}/ps1 (3 steps)" for t in TRIALS] + \
        [f"{t}/eval_pruned (evaluation)" for t in TRIALS]  # the evaluations' val EER: a level, not a curve
    assert _series(text, "pruning_schedule series:") == ["trial 1/prune1 (4 steps)", "trial 2/prune1 (4 steps)"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        f"demo+demo-prune-grid_{name}.png" for name in ("det_curves", "pruning_schedule", "training_curves")]
    det = _series(text, "DET series:")
    assert [d.split(" (")[0] for d in det] == ["eval/test"] + [f"{t}/eval_pruned/test" for t in TRIALS]


def test_training_curves_notebook_without_pruning_stages(sweep_store, tmp_path):
    # the demo alone (as right after `make demo`): no empty pruning-schedule panels, a note instead; the
    # figures carry the experiment's name, so the sweep's (above) are not overwritten
    _nb, text = _run("training_curves", sweep_store["root"], tracking_uri=sweep_store["uri"], experiment="demo",
                     figures_dir=str(tmp_path))
    assert "note: no pruning stage in these runs" in text and "pruning_schedule series:" not in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["demo_det_curves.png", "demo_training_curves.png"]


def test_headless_run_of_an_absent_experiment_fails(sweep_store, tmp_path):
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="'demo-prune' not in the store.*'demo-prune' is made by `python -m "
                       "sweeps.prune_sweep --config sweeps/configs/demo.yaml`"):
        _run("pruning_curve", sweep_store["root"], tracking_uri=sweep_store["uri"], experiment=["demo", "demo-prune"],
             figures_dir=str(tmp_path))
    assert not list(tmp_path.glob("*.png"))
