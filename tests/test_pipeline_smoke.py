"""The whole demo recipe (s1 -> merge -> s2 -> s3 -> eval, then pruning of s2: prune1 -> shrink -> prune2 ->
graft -> ps1 -> ps2 -> ps3 -> eval_pruned) on sv-mini with the tiny model, tracked in MLflow."""
from __future__ import annotations

import json
import time

import mlflow
import pytest

from experiments import pipeline
from experiments.common import read_result
from tests.conftest import SMOKE_CONFIG


def test_every_stage_ran_and_reported(smoke_run):
    summary = smoke_run["summary"]
    assert list(summary["stages"]) == ["s1", "merge", "s2", "s3", "eval", "prune1", "shrink", "prune2", "graft",
                                       "ps1", "ps2", "ps3", "eval_pruned"]
    for name in ("s1", "s2", "s3", "ps1", "ps2", "ps3"):
        record = summary["stages"][name]
        assert record["test"]["test"]["num_trials"] == 435 and record["test"]["test"]["num_target"] == 30
        assert 0.0 <= record["test"]["test"]["eer_pct"] <= 100.0
        # model selection happened on validation
        assert record["best_step"] is not None and record["best_val_eer_pct"] is not None
    # LoRA is gone after the merge, and merging changed no embedding
    assert summary["stages"]["merge"]["max_abs_diff"] < 1e-4
    assert summary["stages"]["merge"]["params_lora"] == 2 * 2 * 4 * (32 + 32)  # 2 layers x (q, v) x r(d_in + d_out)
    assert summary["stages"]["s1"]["params_encoder"] - summary["stages"]["s2"]["params_encoder"] == 1024
    # stage 3 drops speed perturbation: 24 training speakers instead of 3 x 24 classes
    assert summary["stages"]["s2"]["num_classes"] == 72 and summary["stages"]["s3"]["num_classes"] == 24
    evaluated = summary["stages"]["eval"]["test"]
    assert evaluated["test"]["eer_pct"] == pytest.approx(summary["stages"]["s3"]["test"]["test"]["eer_pct"])
    assert set(summary["baselines"]) == {"fbank", "random_init"}
    # each baseline is timed, and the recipe's wall time covers the stages plus those baselines
    assert set(summary["baseline_minutes"]) == {"fbank", "random_init"}
    assert all(m > 0 for m in summary["baseline_minutes"].values())
    assert summary["wall_minutes"] >= sum(r.get("minutes") or 0.0 for r in summary["stages"].values()) \
        + sum(summary["baseline_minutes"].values())
    # pruning: the shrunk encoder equals the masked one, and every later stage keeps its size
    stages = summary["stages"]
    assert stages["shrink"]["max_abs_diff"] <= 1e-4
    pruned = stages["shrink"]["params_encoder"]
    assert 0.05 < stages["prune1"]["achieved_sparsity"] < 0.95
    assert pruned < stages["s2"]["params_encoder"]
    assert stages["prune1"]["params_encoder"] == stages["prune2"]["params_encoder"] == pruned
    assert stages["graft"]["params_encoder"] == stages["ps3"]["params_encoder"] == pruned
    assert stages["eval_pruned"]["params_encoder"] == pruned
    assert stages["eval_pruned"]["test"]["test"]["eer_pct"] == pytest.approx(stages["ps3"]["test"]["test"]["eer_pct"])
    assert stages["ps3"]["num_classes"] == 24
    workdir = smoke_run["workdir"]
    assert (workdir / "exp/smoke/eval/det.png").stat().st_size > 10_000
    lines = (workdir / "exp/smoke/eval/scores/test.txt").read_text().splitlines()
    assert len(lines) == 435 and lines[0].split()[3] in ("target", "nontarget")


def test_report_has_the_benchmark_keys(smoke_run, tmp_path):
    summary = smoke_run["summary"]
    out = pipeline.report(summary, tmp_path / "demo_pipeline.json")
    assert {"final_test_eer_pct", "baseline_random_init_eer_pct", "baseline_fbank_eer_pct", "wall_minutes",
            "stages"} <= set(out)
    assert out["final_test_eer_pct"] == pytest.approx(summary["stages"]["eval_pruned"]["test"]["test"]["eer_pct"])
    assert out["stages"]["s2"]["eer_pct"] == pytest.approx(summary["stages"]["s2"]["test"]["test"]["eer_pct"])
    assert "eer_pct" not in out["stages"]["merge"] and out["stages"]["merge"]["minutes"] >= 0
    assert out["baselines"]["fbank"]["minutes"] == summary["baseline_minutes"]["fbank"]
    # the final stage against the fbank baseline, paired on the same trials from both score files
    paired = out["final_vs_fbank"]["test"]
    assert paired["stage"] == "eval_pruned" and out["final_vs_fbank_eer_diff_ci"] == paired["eer_diff_ci"]
    fbank_eer = summary["baselines"]["fbank"]["test"]["eer_pct"]
    assert paired["eer_diff"] == pytest.approx(out["final_test_eer_pct"] - fbank_eer, abs=1e-9)
    low, high = paired["eer_diff_ci"]
    assert low <= high and paired["final_better"] == (high < 0.0 and "note" not in paired) and 0.0 <= paired["p_value"] <= 1.0
    assert len((smoke_run["workdir"] / "exp/smoke/baselines/fbank/scores/test.txt").read_text().splitlines()) == 435
    machine = out["machine"]  # how to read the minutes: threads, cores and the load around the run
    assert machine["threads"] >= 1 and len(machine["load_average_start"]) == len(machine["load_average_end"]) == 3
    written = json.loads((tmp_path / "demo_pipeline.json").read_text())
    assert written["final_test_eer_pct"] == out["final_test_eer_pct"] and written["stages"].keys() == out["stages"].keys()


def test_mlflow_holds_parent_and_nested_stage_runs(smoke_run):
    mlflow.set_tracking_uri(smoke_run["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=[smoke_run["experiment"]], output_format="list")
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert len(parents) == 1
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"s1", "merge", "s2", "s3", "eval", "prune1", "shrink", "prune2", "graft",
                             "ps1", "ps2", "ps3", "eval_pruned"}
    s1 = children["s1"]
    assert "train_loss" in s1.data.metrics and "val_eer_pct" in s1.data.metrics and "test_eer_pct" in s1.data.metrics
    assert s1.data.params["train.optim.lr_frontend"] == "0.001"
    assert len(s1.data.tags["git_commit"]) >= 7 and len(s1.data.tags["data_fingerprint"]) == 16
    history = mlflow.tracking.MlflowClient().get_metric_history(s1.info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4, 6]
    client = mlflow.tracking.MlflowClient()
    # every stage that evaluates on the test lists keeps its score files and DET plot, as the README says
    for stage in ("s1", "s2", "s3", "ps1", "ps2", "ps3", "eval", "eval_pruned"):
        artifacts = {a.path for a in client.list_artifacts(children[stage].info.run_id)}
        assert {"det.png", "scores"} <= artifacts, (stage, artifacts)
        assert "scores/test.txt" in [a.path for a in client.list_artifacts(children[stage].info.run_id, "scores")]
    merge = children["merge"].data.metrics
    assert merge["merge_max_abs_diff"] < 1e-4 and merge["merge_rel_diff"] < 1e-4
    assert merge["params_encoder"] > 0
    prune1 = children["prune1"]
    assert {"expected_sparsity", "target_sparsity", "lambda1", "lambda2", "distill_l1", "distill_cos",
            "expected_params", "achieved_sparsity"} <= set(prune1.data.metrics)
    assert prune1.data.params["prune.target_sparsity"] == "0.5"
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(prune1.info.run_id)}
    assert {"structure.json", "structure.png"} <= artifacts


def test_rerun_skips_finished_stages_and_resumes_the_rest(smoke_run, monkeypatch):
    workdir = smoke_run["workdir"]
    monkeypatch.chdir(workdir)
    cfg = smoke_run["config"]
    before = read_result(workdir / "exp/smoke/s3")
    # a stage killed after its checkpoints but before its result: only it (and what follows) runs again
    (workdir / "exp/smoke/s3/result.json").unlink()
    (workdir / "exp/smoke/eval/result.json").unlink()
    start = time.perf_counter()
    summary = pipeline.run(cfg, SMOKE_CONFIG.parent, None)
    assert summary["stages"]["s1"] == read_result(workdir / "exp/smoke/s1")  # reused, not retrained
    after = summary["stages"]["s3"]
    # s3 resumed from its final checkpoint: same selected step and the same test EER
    assert after["best_step"] == before["best_step"]
    assert after["test"]["test"]["eer_pct"] == pytest.approx(before["test"]["test"]["eer_pct"], abs=1e-9)
    assert time.perf_counter() - start < 120


def test_pruned_model_folder_loads_in_a_fresh_process(smoke_run):
    # a pruned folder must load through the plain loader, with nothing pruning-related imported first
    import subprocess
    import sys

    folder = smoke_run["workdir"] / "exp/smoke/ps3/model"
    code = ("from svlib.model.speaker import load_model; from svlib.model.frontend import count_parameters; "
            f"print(count_parameters(load_model({str(folder)!r}).frontend))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == smoke_run["summary"]["stages"]["ps3"]["params_encoder"]


def _stage_runs(smoke_run) -> tuple:
    from mlflow import MlflowClient

    client = MlflowClient(smoke_run["tracking_uri"], registry_uri=smoke_run["tracking_uri"])
    experiment = client.get_experiment_by_name(smoke_run["experiment"])
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("kind") == "pipeline")
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return client, experiment, parent, children


def test_every_stage_row_fills_the_result_view(smoke_run):
    """Issue 21: every stage row shows its val and test EER with intervals, rounded, in the saved view's columns,
    under the names the pipeline row uses (one column, every row's value)."""
    from svlib.tracking import RESULTS_VIEW, headline_metrics, stage_headline

    client, experiment, parent, children = _stage_runs(smoke_run)
    summary = smoke_run["summary"]
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{RESULTS_VIEW}"])["selectedColumns"]
    columns = [c[len("metrics.`"):-1] for c in view if c.startswith("metrics.")]
    for stage, run in children.items():
        metrics = run.data.metrics
        assert {k: metrics[k] for k in stage_headline(summary["stages"][stage])} == stage_headline(summary["stages"][stage])
    for stage in ("s1", "s2", "s3", "ps1", "ps2", "ps3"):  # trained and tested: selection EER, test EER + interval
        assert {"val_eer", "test_eer", "test_eer_lo", "test_eer_hi", "test_mindcf", "params_encoder",
                "wall_min"} <= set(children[stage].data.metrics), stage
    for stage in ("eval", "eval_pruned"):  # evaluated on val and test: both with their intervals
        metrics = children[stage].data.metrics
        assert set(columns[:7]) <= set(metrics), stage
        assert metrics["val_eer_lo"] <= metrics["val_eer"] <= metrics["val_eer_hi"]
        assert metrics["test_eer"] == round(summary["stages"][stage]["test"]["test"]["eer_pct"], 2)
    assert children["prune1"].data.metrics["sparsity"] == round(summary["stages"]["prune1"]["achieved_sparsity"], 3)
    # the stages' own, unrounded value stays as logged (the rounded column has its own name)
    assert children["prune1"].data.metrics["achieved_sparsity"] == summary["stages"]["prune1"]["achieved_sparsity"]
    # the pipeline row: its final stage's columns, in the same names
    final = stage_headline(summary["stages"]["eval_pruned"])
    assert {k: parent.data.metrics[k] for k in final if k != "wall_min"} == {k: v for k, v in final.items() if k != "wall_min"}
    assert parent.data.metrics["wall_min"] == headline_metrics(summary)["wall_min"]


def test_stage_models_are_logged_models_of_their_runs(smoke_run):
    """Every stage that writes a speaker model logs it as an MLflow logged model, linked to its run, with the
    stage's params, its size and EERs (an evaluation's EERs on the model it scored): the Models tab compares them."""
    from svlib.tracking import MODEL_TYPE

    client, experiment, _, children = _stage_runs(smoke_run)
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert set(models) == {"s1", "merge", "s2", "s3", "graft", "ps1", "ps2", "ps3"}
    summary = smoke_run["summary"]
    for name, model in models.items():
        assert model.source_run_id == children[name].info.run_id and model.model_type == MODEL_TYPE
        assert str(model.status) in ("READY", "LoggedModelStatus.READY")
        metrics = {m.key: m.value for m in model.metrics}
        assert metrics["params_encoder"] == summary["stages"][name]["params_encoder"], name
        assert model.tags["stage"] == name
    assert models["s1"].params["train.optim.lr_frontend"] == "0.001"
    # the dense s3 and the pruned ps3 side by side, each with the test EER its evaluation measured
    for model, evaluation in (("s3", "eval"), ("ps3", "eval_pruned")):
        metrics = {m.key: m.value for m in models[model].metrics}
        assert metrics["test_eer"] == round(summary["stages"][evaluation]["test"]["test"]["eer_pct"], 2)
        assert metrics["val_eer_lo"] <= metrics["val_eer"] <= metrics["val_eer_hi"]
    dense = {m.key: m.value for m in models["s3"].metrics}["params_encoder"]
    assert {m.key: m.value for m in models["ps3"].metrics}["params_encoder"] < dense
    assert summary["mlflow"]["final_model_id"] == models["ps3"].model_id


def test_registered_final_model_loads_from_models_uri_and_embeds(smoke_run, tmp_path):
    """`--register NAME`: the final model (the one eval_pruned scored) as a registered version linked to its run,
    alias champion; models:/NAME@champion loads it back and embeds a file as the stage folder does."""
    import numpy as np

    from svlib.cli import main as svlib_main
    from svlib.package import load_registered
    from svlib.scoring.metrics import load_embeddings

    uri = smoke_run["tracking_uri"]
    line = pipeline.register_final_model(smoke_run["summary"], "smoke-sv", "champion", uri)
    assert line == "registered model smoke-sv version 1: models:/smoke-sv@champion"
    client, _, _, children = _stage_runs(smoke_run)
    version = client.get_model_version_by_alias("smoke-sv", "champion")
    assert version.run_id == children["ps3"].info.run_id
    model = load_registered("models:/smoke-sv@champion", tracker_uri=uri, dst=tmp_path / "registered")
    assert model.meta["stage"] == "ps3"
    workdir = smoke_run["workdir"]
    wav = next(line.split()[1] for line in (workdir / "data/sv-mini/test/wav.scp").read_text().splitlines())
    wav = str((workdir / wav) if not wav.startswith("/") else wav)
    for name, folder in (("registered", tmp_path / "registered"), ("stage", workdir / "exp/smoke/ps3/model")):
        assert svlib_main(["embed", "--model", str(folder), "--wav", wav, "--out", str(tmp_path / f"{name}.npz")]) == 0
    a, b = (np.stack(list(load_embeddings(tmp_path / f"{n}.npz").values())) for n in ("registered", "stage"))
    assert a.shape == b.shape == (1, model.embed_dim)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_register_checks_its_name_before_running(capsys):
    assert pipeline.main(["--config", str(SMOKE_CONFIG), "--register", "bad name"]) == 2
    assert capsys.readouterr().err.strip() == ("error: register_model: bad model name 'bad name' (no spaces, '/' "
                                               "or '@')")
    assert pipeline.main(["--config", str(SMOKE_CONFIG), "--register", "ok", "--alias", "latest"]) == 2
    assert "bad alias 'latest'" in capsys.readouterr().err
    assert pipeline.main(["--config", str(SMOKE_CONFIG), "--register", "ok", "--no-tracking"]) == 2
    assert "--register needs MLflow tracking" in capsys.readouterr().err


def test_the_command_registers_its_final_model_and_says_where_the_results_are(smoke_run, tmp_path, monkeypatch, capsys):
    """`python -m experiments.pipeline ... --register NAME` (here over the smoke run's finished stages, in a copy
    with a store of its own): it registers the final model and ends with the result files, the run id and the
    MLflow links (the runs table in the result view, the run, the Models tab)."""
    import shutil

    from mlflow import MlflowClient

    from svlib.tracking import models_page, run_page, runs_page

    workdir = smoke_run["workdir"]
    (tmp_path / "data").symlink_to(workdir / "data", target_is_directory=True)
    shutil.copytree(workdir / "exp" / "smoke", tmp_path / "exp" / "smoke", ignore=shutil.ignore_patterns(".svlib.lock"))
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pipeline.main(["--config", str(SMOKE_CONFIG), "--register", "smoke-cli", "--alias", "candidate"]) == 0
    out = capsys.readouterr().out.splitlines()
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("smoke")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("kind") == "pipeline")
    version = client.get_model_version_by_alias("smoke-cli", "candidate")
    assert client.get_run(version.run_id).data.tags["stage"] == "ps3"
    url, eid = "http://127.0.0.1:5000", experiment.experiment_id
    assert out[-6:] == [
        "registered model smoke-cli version 1: models:/smoke-cli@candidate",
        "results: exp/smoke/summary.json",
        f"MLflow: experiment 'smoke' (id {eid}) in {uri} (serve it first: make mlflow-ui)",
        f"  runs table: {runs_page(url, eid)}",
        f"  run {parent.info.run_id}: {run_page(url, eid, parent.info.run_id)}",
        f"  models: {models_page(url, eid)}"]


def _scored(eer: float, speakers: int, note: str | None = None) -> dict:
    """One list's evaluation summary as svlib.evaluate returns it (with the score arrays report() drops)."""
    res = {"eer_pct": eer, "mindcf_0.01": eer / 10, "mindcf_0.05": eer / 20, "num_trials": 100, "num_target": 10,
           "eer_ci_pct": [eer - 2, eer + 2], "mindcf_0.01_ci": [0.1, 0.9], "mindcf_0.05_ci": [0.1, 0.8],
           "ci_speakers": speakers, "ci_replicates": 1000, "scores": [0.5], "labels": [1]}
    return res | ({"ci_note": note} if note else {})


def test_report_holds_every_list_of_every_stage_and_the_val_eers(tmp_path):
    """What the README's demo table prints comes from the report: each stage's and baseline's per-list EERs with
    intervals (not only the headline list's), the val EER each training stage chose its checkpoint by, and
    an evaluation stage's val list."""
    lists = {"test": _scored(8.0, 42), "test_ls10": _scored(2.5, 10, "10 speakers: intervals under-cover")}
    summary = {"stages": {"s1": {"minutes": 0.8, "best_val_eer_pct": 21.5},
                          "merge": {"minutes": 0.01},
                          "eval": {"minutes": 0.3, "test": lists | {"val": _scored(4.7, 33)}}},
               "baselines": {"fbank": {"test": _scored(14.0, 42), "test_ls10": _scored(13.0, 10)}},
               "baseline_minutes": {"fbank": 0.1}, "wall_minutes": 1.21, "machine": {"threads": 2}}
    out = pipeline.report(summary, tmp_path / "demo_pipeline.json")
    assert out["stages"]["s1"] == {"minutes": 0.8, "best_val_eer_pct": 21.5}
    assert out["stages"]["merge"] == {"minutes": 0.01}
    evaluated = out["stages"]["eval"]["lists"]
    assert list(evaluated) == ["test", "test_ls10", "val"]
    assert evaluated["test_ls10"] == {"eer_pct": 2.5, "eer_ci_pct": [0.5, 4.5], "mindcf_0.01": 0.25,
                                      "mindcf_0.01_ci": [0.1, 0.9], "mindcf_0.05": 0.125, "mindcf_0.05_ci": [0.1, 0.8],
                                      "num_trials": 100, "num_target": 10, "ci_speakers": 10,
                                      "ci_note": "10 speakers: intervals under-cover"}
    assert evaluated["val"]["eer_ci_pct"] == [2.7, 6.7]
    # the flat keys of the headline list stay as they were
    assert out["stages"]["eval"]["eer_pct"] == 8.0 and out["final_test_eer_pct"] == 8.0
    assert out["baselines"]["fbank"]["eer_pct"] == 14.0 and out["baselines"]["fbank"]["minutes"] == 0.1
    assert out["baselines"]["fbank"]["lists"]["test_ls10"]["eer_ci_pct"] == [11.0, 15.0]
    assert json.loads((tmp_path / "demo_pipeline.json").read_text()) == out
