"""The MLflow UI/REST server over an svlib store: parent run, nested stage runs and their metric histories.

The store is filled here through ``svlib.tracking.Tracker`` with the MLflow schema of docs/CONTRACTS.md;
the server runs as a subprocess on 127.0.0.1 and is stopped by its process group.
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

EXPERIMENT = "ui-smoke"
S1_LOSS = [2.0, 1.5, 1.1, 0.9, 0.8]
S2_EER = {0: 9.5, 2: 7.25, 4: 6.0}


def _fill_store(uri: str) -> dict[str, str]:
    from svlib.tracking import Tracker

    tracker = Tracker(EXPERIMENT, tracking_uri=uri)
    ids = {}
    with tracker.run("pipeline", tags={"kind": "pipeline"}, params={"name": EXPERIMENT, "seed": 1}) as parent:
        ids["pipeline"] = parent
        with tracker.run("s1", nested=True, tags={"stage": "s1"}, params={"train": {"lr_frontend": 1e-4}}) as s1:
            ids["s1"] = s1
            for step, loss in enumerate(S1_LOSS):
                tracker.log_metrics({"train_loss": loss, "lr_backend": 1e-3 / (step + 1)}, step=step)
        with tracker.run("s2", nested=True, tags={"stage": "s2"}) as s2:
            ids["s2"] = s2
            for step, eer in S2_EER.items():
                tracker.log_metrics({"val_eer_pct": eer, "train_loss": 1.0 / (step + 1)}, step=step)
    return ids


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


def test_mlflow_server_serves_pipeline_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ids = _fill_store(uri)

    proc, url = start_mlflow_server(uri, tmp_path / "artifacts", timeout=120)
    try:
        assert url.startswith("http://127.0.0.1:")
        experiment = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
        runs = _post(url, "/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(by_name) == {"pipeline", "s1", "s2"}
        assert {name: r["info"]["run_id"] for name, r in by_name.items()} == ids
        assert all(r["info"]["status"] == "FINISHED" for r in runs)

        tags = {name: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for name, r in by_name.items()}
        assert tags["pipeline"]["kind"] == "pipeline" and "mlflow.parentRunId" not in tags["pipeline"]
        for stage in ("s1", "s2"):
            assert tags[stage]["mlflow.parentRunId"] == ids["pipeline"]
            assert tags[stage]["stage"] == stage
        params = {p["key"]: p["value"] for p in by_name["s1"]["data"]["params"]}
        assert params == {"train.lr_frontend": "0.0001"}

        # The UI plots histories: every step must be there, not only the last value.
        history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=ids["s1"], metric_key="train_loss")["metrics"]
        assert [(m["step"], m["value"]) for m in sorted(history, key=lambda m: m["step"])] == list(enumerate(S1_LOSS))
        history = _get(url, "/api/2.0/mlflow/metrics/get-history", run_id=ids["s2"], metric_key="val_eer_pct")["metrics"]
        assert {m["step"]: m["value"] for m in history} == S2_EER
        latest = {m["key"]: m["value"] for m in by_name["s2"]["data"]["metrics"]}
        assert latest["val_eer_pct"] == S2_EER[4]

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
