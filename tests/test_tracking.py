"""svlib.tracking: what the MLflow UI opens on, the headline columns, and stores that survive being moved."""
from __future__ import annotations

import json
import shutil

import pytest

from svlib import tracking
from svlib.tracking import Tracker, headline_metrics, reroot_store, rounded


def test_experiments_open_on_the_model_training_view(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker("demo", tracking_uri=uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("demo")
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracker.experiment_id == experiment.experiment_id
    # an experiment made before the tag existed gets it on the next run
    old = client.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    Tracker("old", tracking_uri=uri)
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.runs_page("http://127.0.0.1:5000/", "7", view=None) == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    # the saved runs-table view whose columns are the result metrics, and the link that opens it
    assert tracking.runs_page("http://h:1", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=svlib-results"
    view = json.loads(experiment.tags["mlflow.sharedViewState.svlib-results"])
    assert view["selectedColumns"] == view["columnOrder"] == [
        "metrics.`val_eer`", "metrics.`val_eer_lo`", "metrics.`val_eer_hi`", "metrics.`test_eer`",
        "metrics.`test_eer_lo`", "metrics.`test_eer_hi`", "metrics.`test_mindcf`", "metrics.`sparsity`",
        "metrics.`params_encoder`", "metrics.`wall_min`", "metrics.`pareto_size`", "attributes.`Duration`"]
    assert "mlflow.sharedViewState.svlib-results" in client.get_experiment(old).tags


def test_result_column_headers_stay_distinct_when_the_ui_cuts_them():
    """MLflow cuts a metric header at about 15 characters (1,600 px window): the result columns must still read
    apart there (three ``final_test_eer_pct...`` columns all read ``final_test_eer_p…``)."""
    assert max(len(c) for c in tracking.RESULT_COLUMNS) <= 17
    cut = [c[:15] for c in tracking.RESULT_COLUMNS]
    assert len(set(cut)) == len(cut)


def test_links_open_the_model_training_side():
    """A run or models link carries workflowType=machine_learning: without it MLflow 3 opens a run on the side
    the browser last chose, GenAI in a fresh one ("Evaluations", Judges)."""
    assert tracking.run_page("http://h:1/", "3", "abc") == "http://h:1/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.models_page("http://h:1", "3") == "http://h:1/#/experiments/3/models?workflowType=machine_learning"
    assert tracking.experiments_page("http://h:1") == "http://h:1/#/experiments?workflowType=machine_learning"
    lines = tracking.where_to_look("sqlite:///x/mlflow.db", "demo", "3", "abc", ["exp/demo/summary.json"])
    assert lines == [
        "results: exp/demo/summary.json",
        "MLflow: experiment 'demo' (id 3) in sqlite:///x/mlflow.db (serve it first: make mlflow-ui)",
        "  runs table: http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=svlib-results",
        "  run abc: http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning",
        "  models: http://127.0.0.1:5000/#/experiments/3/models?workflowType=machine_learning"]
    # a team server is its own UI
    assert tracking.where_to_look("http://mlflow:5000/", "demo", "3", None)[:2] == [
        "MLflow: experiment 'demo' (id 3) in http://mlflow:5000/",
        "  runs table: http://mlflow:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=svlib-results"]


EVAL_RECORD = {"params_encoder": 2_340_001, "minutes": 0.51234, "test": {
    "test": {"eer_pct": 12.00444, "mindcf_0.01": 0.98712, "mindcf_0.05": 0.86849, "eer_ci_pct": [10.5, 13.6149],
             "mindcf_0.01_ci": [0.95, 0.99912]},
    "test_ls10": {"eer_pct": 20.0, "mindcf_0.01": 1.0, "mindcf_0.05": 1.0},
    "val": {"eer_pct": 14.6449, "mindcf_0.01": 0.9, "mindcf_0.05": 0.8, "eer_ci_pct": [11.111, 17.777]}}}


def test_every_stage_fills_the_result_columns():
    """A stage's row: val / test EER with their intervals, minDCF, size and minutes, rounded, under the names the
    pipeline's row uses too."""
    from svlib.tracking import stage_headline

    assert stage_headline(EVAL_RECORD) == {
        "val_eer": 14.64, "val_eer_lo": 11.11, "val_eer_hi": 17.78, "test_eer": 12.0, "test_eer_lo": 10.5,
        "test_eer_hi": 13.61, "test_mindcf": 0.987, "params_encoder": 2_340_001.0, "wall_min": 0.5}
    # a training stage: its model-selection EER (no interval), the test list it evaluated
    train = {"best_val_eer_pct": 15.337, "params_encoder": 9, "minutes": 3.04,
             "test": {"test": {"eer_pct": 8.10107197, "mindcf_0.01": 0.5, "mindcf_0.05": 0.4, "eer_ci_pct": [6.0, 9.99]}}}
    assert stage_headline(train) == {"val_eer": 15.34, "test_eer": 8.1, "test_eer_lo": 6.0, "test_eer_hi": 9.99,
                                     "test_mindcf": 0.5, "params_encoder": 9.0, "wall_min": 3.0}
    # another list when there is no "test"; a pruning stage's sparsity; a merge: its size and minutes only
    assert stage_headline(EVAL_RECORD, "test_ls10")["test_eer"] == 20.0
    assert stage_headline({"test": {"vox1_o": {"eer_pct": 1.234, "mindcf_0.01": 0.1}}})["test_eer"] == 1.23
    assert stage_headline({"achieved_sparsity": 0.071234, "params_encoder": 5})["sparsity"] == 0.071
    assert stage_headline({"params_encoder": 5, "minutes": 0.01}) == {"params_encoder": 5.0, "wall_min": 0.0}


def test_headline_metrics_of_a_pipeline_summary():
    summary = {"stages": {
        "s2": {"test": {"test": {"eer_pct": 12.4444, "mindcf_0.01": 0.99312, "mindcf_0.05": 0.8651}},
               "best_val_eer_pct": 15.337, "params_encoder": 2_340_001},
        "merge": {"minutes": 0.01},
        "eval": EVAL_RECORD},
        "wall_minutes": 15.2371}
    # the final stage's columns, with the recipe's minutes
    assert headline_metrics(summary) == {
        "val_eer": 14.64, "val_eer_lo": 11.11, "val_eer_hi": 17.78, "test_eer": 12.0, "test_eer_lo": 10.5,
        "test_eer_hi": 13.61, "test_mindcf": 0.987, "params_encoder": 2_340_001.0, "wall_min": 15.2}
    # no val list in the final evaluation: its best validation EER stands in
    del summary["stages"]["eval"]
    assert headline_metrics(summary)["val_eer"] == 15.34
    assert headline_metrics({"stages": {}}) == {}
    assert rounded("train_loss", 1.23456) == 1.23456 and rounded("expected_params", 10.6) == 11.0


def _store_with_an_artifact(root):
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker("smoke", tracking_uri=uri)
    (root / "cfg.yaml").write_text("lr: 0.001\n")
    with tracker.run("s1", tags={"stage": "s1"}) as run_id:
        tracker.log_artifact(root / "cfg.yaml")
        tracker.log_metrics({"train_loss": 1.0}, step=1)
    (root / "cfg.yaml").unlink()
    return run_id


def test_a_moved_store_reads_its_artifacts_after_reroot(tmp_path, capsys):
    from mlflow import MlflowClient

    old = tmp_path / "old" / "mlruns"
    old.mkdir(parents=True)
    run_id = _store_with_an_artifact(old)
    new = tmp_path / "moved" / "mlruns"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    uri = f"sqlite:///{new}/mlflow.db"
    client = MlflowClient(uri)
    assert str(old) in client.get_run(run_id).info.artifact_uri  # MLflow stored the absolute location
    with pytest.raises(Exception):
        client.download_artifacts(run_id, "cfg.yaml", str(tmp_path))
    assert tracking.main(["reroot", str(new / "mlflow.db")]) == 0
    assert "smoke: 2 locations rewritten" in capsys.readouterr().out  # the experiment and its one run
    run = client.get_run(run_id)
    assert run.info.artifact_uri == (new / "artifacts" / "smoke" / run_id / "artifacts").as_uri()
    assert (tmp_path / "dl").mkdir() is None
    local = client.download_artifacts(run_id, "cfg.yaml", str(tmp_path / "dl"))
    assert open(local).read() == "lr: 0.001\n"
    assert client.get_metric_history(run_id, "train_loss")[0].value == 1.0
    assert reroot_store(new / "mlflow.db") == {}  # already rooted: nothing changes
    # a new run in the moved store writes beside it, never into the old (gone) folder
    Tracker("smoke", tracking_uri=uri)
    assert client.get_experiment_by_name("smoke").artifact_location == (new / "artifacts" / "smoke").as_uri()
    assert tracking.main(["reroot", str(tmp_path / "none.db")]) == 2
    assert "no such MLflow database" in capsys.readouterr().err


def test_a_tolerant_tracker_turns_mlflow_errors_into_warnings(tmp_path, caplog):
    """TolerantTracker (a sweep trial's stages log through it): a failing MLflow call is a warning, never an
    exception; the run body's own exception still goes up and ends the run FAILED."""
    from contextlib import contextmanager

    from mlflow import MlflowClient

    from svlib.tracking import TolerantTracker

    class Unreachable:
        tracking_uri = "http://127.0.0.1:9"

        def log_metrics(self, metrics, step=None):
            raise ConnectionError("tracking server down\nretry later")

        @contextmanager
        def run(self, name, **kwargs):
            raise ConnectionError("cannot start run")
            yield  # pragma: no cover

    down = TolerantTracker(Unreachable())
    down.log_metrics({"loss": 1.0}, step=3)
    with down.run("prune1", nested=True) as run_id:
        ran = True
    assert ran and run_id is None and down.tracking_uri == "http://127.0.0.1:9"
    assert "MLflow log_metrics failed (ConnectionError: tracking server down)" in caplog.text
    assert "start of run prune1 failed" in caplog.text

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    up = TolerantTracker(Tracker("tolerant", tracking_uri=uri))
    with pytest.raises(ValueError, match="the stage's own"):
        with up.run("stage") as run_id:
            up.log_metrics({"loss": 2.0}, step=1)
            raise ValueError("the stage's own error")
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["loss"] == 2.0
