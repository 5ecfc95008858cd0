"""Screenshots of the MLflow UI (and optuna-dashboard) over a smoke-pipeline store, for the README.

    apt-get install -y chromium                       # Debian; any Chromium/Chrome with --headless works
    .venv/bin/python docs/screenshots.py [--workdir DIR] [--out docs]

Runs the smoke pipeline and a 3-point smoke grid sweep (tiny model, sv-mini, ~2 min on 2 cores) into
``DIR/mlruns/mlflow.db`` unless that store already holds their experiments, serves it with ``mlflow server`` on 127.0.0.1 (started and
stopped by PID through ``svlib.services``) and takes headless-Chromium screenshots, driven over the DevTools
protocol so that the page opens in the "Model training" workflow with the MLflow Assistant panel closed:

* ``docs/mlflow_runs.png``     the experiment's runs table at 1,600 px (``svlib.tracking.runs_page``: ``#/experiments/<id>/
  runs?workflowType=machine_learning&viewStateShareKey=svlib-results``) in svlib's saved view: every stage row and
  the pipeline row with val / test EER and their intervals, minDCF, sparsity, size, minutes;
* ``docs/mlflow_run.png``      a stage run opened from its link (``run_page``) in a fresh browser: the "Model
  training" side, not GenAI's "Evaluations";
* ``docs/mlflow_models.png``   the experiment's Models tab: the logged model of every train / merge / graft stage
  (dense s1-s3, pruned graft / ps1-ps3) with its size and EERs;
* ``docs/mlflow_sweep.png``    a smoke grid sweep's runs table: per trial (named ``s=0.07 ← t=0.60``) val EER,
  achieved sparsity and test EER with its interval, the study run spanning its trials;
* ``docs/mlflow_metrics.png``  the train_loss chart of the s1, s2 and s3 stage runs;
* ``docs/optuna_dashboard.png`` only if ``optuna-dashboard`` is installed: a small two-objective study.

Nothing listens beyond 127.0.0.1 and every server this script starts is stopped before it exits.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ and svlib/ from this checkout

from svlib.services import free_port, start_mlflow_server, stop_process, wait_http  # noqa: E402
from svlib.tracking import Tracker, models_page, run_page, runs_page  # noqa: E402

SMOKE = REPO / "experiments" / "configs" / "smoke" / "pipeline.yaml"
SMOKE_SWEEP = REPO / "sweeps" / "configs" / "smoke.yaml"  # its teacher: the smoke pipeline's exp/smoke/s2
MANIFEST = REPO.parent / "shared" / "data" / "sv-mini" / "manifest.csv"
# the expander of a parent run's row in the runs table (its componentId in MLflow 3.x's RunNameCellRenderer)
EXPANDER = '[data-component-id$="runnamecellrenderer.tsx_46"]'
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def fill_store(workdir: Path) -> str:
    """Run the smoke pipeline, then the smoke grid sweep on its s2, into ``workdir`` (each skipped when the store
    already has its experiment)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))
    have = set()
    if (workdir / "mlruns" / "mlflow.db").exists():
        have = {e.name for e in MlflowClient(uri).search_experiments()}
        for name in have & {"smoke", "smoke-prune-grid"}:
            Tracker(name, tracking_uri=uri)  # a store from before the view tags gets them
    if "smoke" not in have:
        if not MANIFEST.exists():
            sys.exit(f"sv-mini not found at {MANIFEST}")
        subprocess.run([sys.executable, "-m", "svlib.corpora.prepare", "manifest", "--manifest", str(MANIFEST),
                        "--out", "data/sv-mini"], cwd=workdir, env=env, check=True)
        subprocess.run([sys.executable, "-m", "experiments.pipeline", "--config", str(SMOKE), "--experiment", "smoke"],
                       cwd=workdir, env=env, check=True)
    if "smoke-prune-grid" not in have:
        subprocess.run([sys.executable, "-m", "sweeps.prune_sweep", "--config", str(SMOKE_SWEEP), "--grid",
                        "--storage", f"sqlite:///{workdir / 'optuna.db'}", "--mlflow-uri", uri],
                       cwd=workdir, env=env, check=True)
    return uri


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found: apt-get install -y chromium")


# localStorage the MLflow 3 UI reads (its useLocalStorage hook stores JSON under ``<key>_v<version>``): the
# "Model training" workflow, and the Assistant panel closed and marked as already auto-opened once (on a
# 127.0.0.1 server the UI otherwise opens it over a third of the page on first load).
UI_STORAGE = {"mlflow.workflowType_v1": "machine_learning", "mlflow.assistant.panelOpen_v1": False,
              "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True}


class _DevTools:
    """A minimal Chrome DevTools Protocol client over one websocket (stdlib only: RFC 6455 text frames)."""

    def __init__(self, ws_url: str):
        parsed = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += self.sock.recv(4096)
        if b" 101 " not in reply.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"devtools websocket refused: {reply[:80]!r}")
        self._buffer = reply.split(b"\r\n\r\n", 1)[1]
        self._next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("devtools websocket closed")
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def _send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                                if n < 1 << 16 else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _receive(self) -> dict:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            if first & 0x0F in (0x1, 0x0):  # text or continuation
                message += payload
                if first & 0x80:
                    return json.loads(message)

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self._send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:  # events arrive in between; keep the reply to this call
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")


def screenshot(url: str, path: Path, size=(1920, 1000), ready_text: str = "", clicks: tuple[str, ...] = (),
               scripts: tuple[str, ...] = (), timeout: float = 60.0, storage: dict | None = None) -> Path:
    """Open ``url`` in headless Chromium with ``storage`` (default :data:`UI_STORAGE`) in its localStorage before
    the page's scripts run, wait until the page shows ``ready_text`` (and stops changing), click the CSS
    selectors ``clicks`` (e.g. a row expander), run the JavaScript ``scripts``, then save a ``size`` PNG to
    ``path``."""
    storage = UI_STORAGE if storage is None else storage
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1", "about:blank"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            if not wait_http(f"http://127.0.0.1:{port}/json/version", timeout=60, proc=proc):
                sys.exit("chromium did not open its devtools port")
            page = next(t for t in _api(f"http://127.0.0.1:{port}", "/json/list") if t["type"] == "page")
            tools = _DevTools(page["webSocketDebuggerUrl"])
            tools.call("Page.enable")
            tools.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                       mobile=False)
            seed = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
                           for k, v in storage.items())
            tools.call("Page.addScriptToEvaluateOnNewDocument", source=seed)
            tools.call("Page.navigate", url=url)
            _wait_for(tools, ready_text, timeout)
            for selector in clicks:
                if tools.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                                  f" if (e) e.click(); return Boolean(e); }})()"):
                    _wait_for(tools, ready_text, timeout)
                else:
                    print(f"  (nothing to click at {selector})")
            for script in scripts:
                tools.evaluate(script)
                time.sleep(1.0)
            shot = tools.call("Page.captureScreenshot", format="png")["data"]
            tools.sock.close()
            path.write_bytes(base64.b64decode(shot))
        finally:
            stop_process(proc)
    print(f"wrote {path} ({path.stat().st_size} bytes) <- {url}")
    return path


def _wait_for(tools: _DevTools, text: str, timeout: float) -> None:
    """Until the page's text contains ``text`` and has not changed for 2 s (charts and tables drawn)."""
    deadline, last, stable_since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < deadline:
        body = tools.evaluate("document.body ? document.body.innerText : ''") or ""
        if body != last:
            last, stable_since = body, time.monotonic()
        elif text in body and time.monotonic() - stable_since > 2.0:
            return
        time.sleep(0.5)
    print(f"  (page not settled on {text!r} after {timeout:.0f} s; shooting anyway)")


def _api(url: str, path: str, body: dict | None = None, **query) -> dict:
    full = f"{url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def mlflow_shots(uri: str, workdir: Path, out: Path) -> None:
    proc, url = start_mlflow_server(uri, workdir / "server-artifacts", timeout=120)
    try:
        exp = _api(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="smoke")["experiment"]
        eid = exp["experiment_id"]
        runs = _api(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [eid], "max_results": 100})["runs"]
        by_stage = {t["value"]: r["info"]["run_id"] for r in runs for t in r["data"].get("tags", []) if t["key"] == "stage"}
        # Runs table at 1,600 px as the README's link opens it ("Model training" side, svlib's saved view of the
        # result columns), the pipeline row expanded to show its stage runs.
        screenshot(runs_page(url, eid), out / "mlflow_runs.png", size=(1600, 820), ready_text="matching runs",
                   clicks=(EXPANDER,))
        # A stage run from its printed link, in a browser that never chose a side (GenAI by default): the link's
        # workflowType keeps it on the model-training side. The Assistant panel stays closed, as elsewhere.
        fresh = {k: v for k, v in UI_STORAGE.items() if k != "mlflow.workflowType_v1"}
        screenshot(run_page(url, eid, by_stage["eval_pruned"]), out / "mlflow_run.png", size=(1600, 820),
                   ready_text="Metrics", storage=fresh)
        # The Models tab: every stage's logged model with its size and EERs (3,000 px: the metric columns come after
        # MLflow's six attribute columns)
        screenshot(models_page(url, eid), out / "mlflow_models.png", size=(3000, 600), ready_text="ps3")
        sweep = _api(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="smoke-prune-grid")["experiment"]
        screenshot(runs_page(url, sweep["experiment_id"]), out / "mlflow_sweep.png", size=(1600, 520),
                   ready_text="matching runs", clicks=(EXPANDER,))
        # train_loss of the three training stages on one chart (the metric page of s2's train_loss, with s1/s3 added)
        trained = [by_stage[s] for s in ("s1", "s2", "s3")]
        metric_query = urllib.parse.urlencode({"runs": json.dumps(trained), "metric": json.dumps("train_loss"),
                                               "experiments": json.dumps([eid]),
                                               "plot_metric_keys": json.dumps(["train_loss"]), "x_axis": "step"},
                                              quote_via=urllib.parse.quote)
        screenshot(f"{url}/#/metric/train_loss?{metric_query}", out / "mlflow_metrics.png", size=(1600, 800),
                   ready_text="Completed Runs")
    finally:
        stop_process(proc)


def optuna_shot(workdir: Path, out: Path) -> None:
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    if not dashboard.exists():
        print("optuna-dashboard not installed (pip install optuna-dashboard): skipped docs/optuna_dashboard.png")
        return
    import optuna

    storage = f"sqlite:///{workdir / 'prune-demo.db'}"
    if not (workdir / "prune-demo.db").exists():
        # a stand-in two-objective pruning sweep: EER rises as the target sparsity removes parameters
        study = optuna.create_study(study_name="prune-demo", storage=storage, directions=["minimize", "minimize"],
                                    sampler=optuna.samplers.GridSampler({"target_sparsity": [0.1 * i for i in range(1, 10)]}))
        study.set_metric_names(["test_eer_pct", "params_encoder_M"])
        study.optimize(lambda t: (1.0 + 4.0 * t.suggest_float("target_sparsity", 0.1, 0.9) ** 3,
                                  580.0 * (1.0 - t.params["target_sparsity"])), n_trials=9)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(workdir / "optuna-dashboard.log", "ab")
    proc = subprocess.Popen([str(dashboard), storage, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        if not wait_http(url + "/dashboard", timeout=60, proc=proc):
            print(f"optuna-dashboard did not start (log {workdir / 'optuna-dashboard.log'})")
            return
        screenshot(f"{url}/dashboard/studies/1", out / "optuna_dashboard.png", size=(1400, 1000))
    finally:
        stop_process(proc)
        log.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the store between runs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="svlib-shots-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    uri = fill_store(workdir)
    mlflow_shots(uri, workdir, args.out)
    optuna_shot(workdir, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
