"""The MLflow UI/REST server over the smoke pipeline's store: parent run, nested stage runs, metric histories.

The store is the one the session's ``smoke_run`` fixture filled (docs/CONTRACTS.md "MLflow schema"); the
server runs as a subprocess on 127.0.0.1 and is stopped by its process group. What the REST API returns is
checked against the same store read directly through MLflow.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from svlib.services import ServiceError, free_port, process_group_alive, start_mlflow_server, stop_process
from svlib.tracking import headline_metrics

DENSE_STAGES = {"s1", "merge", "s2", "s3", "eval"}
PRUNE_STAGES = {"prune1", "shrink", "prune2", "graft", "ps1", "ps2", "ps3", "eval_pruned"}
STAGES = DENSE_STAGES | PRUNE_STAGES


def _get(url: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as resp:
        return json.loads(resp.read())


def _post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def _port_open(url: str) -> bool:
    host, port = urllib.parse.urlparse(url).netloc.split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_mlflow_server_serves_pipeline_runs(smoke_run, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = smoke_run["tracking_uri"]
    direct = MlflowClient(uri)
    # the store's own artifact locations are absolute file URIs, so the server's --artifacts-destination
    # (a scratch folder here) only matters for uploads through it
    proc, url = start_mlflow_server(uri, tmp_path / "artifacts", timeout=120)
    try:
        assert url.startswith("http://127.0.0.1:")
        experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name",
                          experiment_name=smoke_run["experiment"])["experiment"]
        runs = _post(url, "/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parents = [r for r in runs if tags[r["info"]["run_id"]].get("kind") == "pipeline"]
        assert len(parents) == 1 and "mlflow.parentRunId" not in tags[parents[0]["info"]["run_id"]]
        parent_id = parents[0]["info"]["run_id"]
        assert all(r["info"]["status"] == "FINISHED" for r in runs)
        # the UI opens the "Model training" view; the parent row carries the result columns, rounded
        assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        assert parents[0]["info"]["run_name"] == "pipeline:smoke"
        headline = {m["key"]: m["value"] for m in parents[0]["data"]["metrics"]}
        summary = smoke_run["summary"]
        final = summary["stages"]["eval_pruned"]["test"]
        assert {k: headline[k] for k in headline_metrics(summary)} == headline_metrics(summary)
        assert headline["test_eer"] == round(final["test"]["eer_pct"], 2)
        assert headline["val_eer"] == round(final["val"]["eer_pct"], 2)
        assert headline["test_mindcf"] == round(final["test"]["mindcf_0.01"], 3)
        assert headline["params_encoder"] == summary["stages"]["eval_pruned"]["params_encoder"]
        assert headline["wall_min"] == round(summary["wall_minutes"], 1)

        # nested stage runs are found through the parent tag, exactly as the UI groups them
        children = {tags[r["info"]["run_id"]]["stage"]: r for r in runs
                    if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent_id}
        assert set(children) == STAGES and len(runs) == 1 + len(STAGES)
        for stage, run in children.items():
            assert run["info"]["run_name"] == stage
            assert len(tags[run["info"]["run_id"]]["data_fingerprint"]) == 16
        params = {p["key"]: p["value"] for p in children["s1"]["data"]["params"]}
        assert params["train.optim.lr_frontend"] == "0.001"

        # The UI plots histories: every step must be there, not only the last value.
        s1 = children["s1"]["info"]["run_id"]
        history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=s1, metric_key="train_loss")["metrics"]
        served = [(m["step"], m["value"]) for m in sorted(history, key=lambda m: m["step"])]
        assert [step for step, _ in served] == [2, 4, 6]
        assert served == [(m.step, m.value) for m in sorted(direct.get_metric_history(s1, "train_loss"),
                                                            key=lambda m: m.step)]
        s2 = children["s2"]["info"]["run_id"]
        history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=s2, metric_key="lr_frontend")["metrics"]
        assert len(history) >= 2 and len({m["value"] for m in history}) > 1  # a schedule, not a constant
        latest = {m["key"]: m["value"] for m in children["eval"]["data"]["metrics"]}
        assert latest["test_eer_pct"] == pytest.approx(smoke_run["summary"]["stages"]["eval"]["test"]["test"]["eer_pct"])
        assert {"test_mindcf_0.01", "test_mindcf_0.05", "params_total"} <= set(latest)

        # merge logs its check and the sizes
        merge = {m["key"]: m["value"] for m in children["merge"]["data"]["metrics"]}
        assert merge["merge_max_abs_diff"] == pytest.approx(smoke_run["summary"]["stages"]["merge"]["max_abs_diff"])
        assert merge["params_encoder"] == smoke_run["summary"]["stages"]["s2"]["params_encoder"]
        # artifacts the UI lists for the eval runs (dense and pruned) and, as the README says, the training stages
        for stage in ("eval", "eval_pruned", "s1", "s2", "s3", "ps3"):
            run_id = children[stage]["info"]["run_id"]
            files = {f["path"] for f in _get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])}
            assert {"det.png", "scores"} <= files, stage

        # The pruning stages: kinds, the schedule as a history, the per-layer structure, the smaller encoder.
        summary = smoke_run["summary"]["stages"]
        kinds = {stage: tags[run["info"]["run_id"]]["kind"] for stage, run in children.items()}
        assert {kinds[s] for s in ("prune1", "prune2")} == {"prune"} and kinds["shrink"] == "shrink"
        assert kinds["graft"] == "graft" and kinds["eval_pruned"] == "evaluate"
        prune1 = children["prune1"]["info"]["run_id"]
        params = {p["key"]: p["value"] for p in children["prune1"]["data"]["params"]}
        assert float(params["prune.target_sparsity"]) == summary["prune1"]["target_sparsity"]
        history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=prune1, metric_key="target_sparsity")
        target = [m["value"] for m in sorted(history["metrics"], key=lambda m: m["step"])]
        assert len(target) >= 3 and target == sorted(target) and target[0] < target[-1]  # the warm-up ramp
        assert target[-1] == pytest.approx(summary["prune1"]["target_sparsity"])
        for key in ("expected_sparsity", "lambda1", "distill_l1"):
            history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=prune1, metric_key=key)["metrics"]
            assert len(history) == len(target), key
        for stage in ("prune1", "shrink"):
            run_id = children[stage]["info"]["run_id"]
            files = {f["path"] for f in _get(url, "/api/2.0/mlflow/artifacts/list", run_id=run_id).get("files", [])}
            assert {"structure.json", "structure.png"} <= files, stage
            latest = {m["key"]: m["value"] for m in children[stage]["data"]["metrics"]}
            assert latest["achieved_sparsity"] == pytest.approx(summary[stage]["achieved_sparsity"])
            assert latest["params_encoder"] == summary[stage]["params_encoder"] < summary["s2"]["params_encoder"]
        (tmp_path / "dl").mkdir()
        local = direct.download_artifacts(children["shrink"]["info"]["run_id"], "structure.json", str(tmp_path / "dl"))
        with open(local) as f:
            assert json.load(f)["layers"] == summary["prune1"]["sizes"]  # shrink removed what prune1 masked
        latest = {m["key"]: m["value"] for m in children["eval_pruned"]["data"]["metrics"]}
        assert latest["test_eer_pct"] == pytest.approx(summary["eval_pruned"]["test"]["test"]["eer_pct"])

        # The UI itself (what a browser or a screenshot gets).
        with urllib.request.urlopen(url + "/", timeout=30) as resp:
            assert resp.status == 200 and b"<html" in resp.read(2000).lower()
    finally:
        stop_process(proc)
    assert proc.poll() is not None
    assert not process_group_alive(proc.pid), "mlflow server left processes behind"
    assert not _port_open(url)


def test_start_failure_is_reported_with_the_server_log(tmp_path):
    with pytest.raises(ServiceError, match="mlflow server .* exited") as err:
        start_mlflow_server(f"bogus://{tmp_path}/nowhere", tmp_path / "artifacts", timeout=60)
    assert "log" in str(err.value)


def test_start_refuses_other_hosts(tmp_path):
    with pytest.raises(ServiceError, match="127.0.0.1"):
        start_mlflow_server("sqlite:///x.db", tmp_path, host="0.0.0.0")


def test_stop_process_ends_the_whole_group():
    # A parent that forks a child and ignores SIGTERM: stop_process must escalate and leave nothing.
    script = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert process_group_alive(proc.pid)
        code = stop_process(proc, timeout=1.0)
        assert code == -signal.SIGKILL
        assert not process_group_alive(proc.pid)
    finally:
        if process_group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
