"""Screenshots of the MLflow UI (and optuna-dashboard) over a smoke-pipeline store, for the README.

    apt-get install -y chromium                       # Debian; any Chromium/Chrome with --headless works
    .venv/bin/python docs/screenshots.py [--workdir DIR] [--out docs]

Runs the smoke pipeline (tiny model, sv-mini, ~1 min on 2 cores) into ``DIR/mlruns/mlflow.db`` unless that
store already holds the ``smoke`` experiment, serves it with ``mlflow server`` on 127.0.0.1 (started and
stopped by PID through ``svlib.services``) and takes headless-Chromium screenshots:

* ``docs/mlflow_runs.png``     the experiment's runs table with the result columns (svlib's saved view): the
  pipeline run with its headline metrics, its stage runs folded under it;
* ``docs/mlflow_metrics.png``  the train_loss chart of the s1, s2 and s3 stage runs;
* ``docs/optuna_dashboard.png`` only if ``optuna-dashboard`` is installed: a small two-objective study.

Nothing listens beyond 127.0.0.1 and every server this script starts is stopped before it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # experiments/ and svlib/ from this checkout

from svlib.services import free_port, start_mlflow_server, stop_process, wait_http  # noqa: E402
from svlib.tracking import Tracker, runs_page  # noqa: E402

SMOKE = REPO / "experiments" / "configs" / "smoke" / "pipeline.yaml"
MANIFEST = REPO.parent / "shared" / "data" / "sv-mini" / "manifest.csv"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--force-device-scale-factor=1"]


def fill_store(workdir: Path) -> str:
    """Run the smoke pipeline into ``workdir`` (skipped when its store already has the experiment)."""
    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))
    if (workdir / "mlruns" / "mlflow.db").exists():
        from mlflow import MlflowClient

        if MlflowClient(uri).get_experiment_by_name("smoke") is not None:
            Tracker("smoke", tracking_uri=uri)  # a store from before the view tags gets them
            return uri
    if not MANIFEST.exists():
        sys.exit(f"sv-mini not found at {MANIFEST}")
    subprocess.run([sys.executable, "-m", "svlib.data.prepare", "manifest", "--manifest", str(MANIFEST),
                    "--out", "data/sv-mini"], cwd=workdir, env=env, check=True)
    subprocess.run([sys.executable, "-m", "experiments.pipeline", "--config", str(SMOKE), "--experiment", "smoke"],
                   cwd=workdir, env=env, check=True)
    return uri


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found: apt-get install -y chromium")


def screenshot(url: str, path: Path, size=(1920, 1000), budget_ms: int = 20000) -> Path:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url]
        subprocess.run(cmd, check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"wrote {path} ({path.stat().st_size} bytes) <- {url}")
    return path


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
        # Runs table, in the "Model training" view with svlib's saved view of the result columns (the link the
        # README gives). MLflow 3.x folds the stage runs under the pipeline run behind an expander that a
        # headless --screenshot cannot click; the pipeline row carries the headline metrics and the
        # "N matching runs" count shows the stage runs are there.
        screenshot(runs_page(url, eid), out / "mlflow_runs.png", size=(1900, 700))
        # train_loss of the three training stages on one chart (the metric page of s2's train_loss, with s1/s3 added)
        trained = [by_stage[s] for s in ("s1", "s2", "s3")]
        metric_query = urllib.parse.urlencode({"runs": json.dumps(trained), "metric": json.dumps("train_loss"),
                                               "experiments": json.dumps([eid]),
                                               "plot_metric_keys": json.dumps(["train_loss"]), "x_axis": "step"},
                                              quote_via=urllib.parse.quote)
        screenshot(f"{url}/#/metric/train_loss?{metric_query}", out / "mlflow_metrics.png")
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
