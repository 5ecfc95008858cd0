"""The README's tracking, sweep and notebook commands, run as written (port numbers aside) against a small store.

The store is tests/fake_store.py's (the demo pipeline and a 3-trial grid sweep, written by the MLflow client);
each command runs in a scratch folder laid out like the repo root (``mlruns/``, ``notebooks/``, ``sweeps/``,
``exp/``). The README's `sweeps.study pareto` line is run in tests/test_prune_sweep.py after a grid sweep.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from svlib.services import free_port, stop_process, wait_http
from tests import fake_store
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent


def _command(pattern: str) -> list[str]:
    """The README line (code block or inline code) that runs ``pattern``, split as a shell would."""
    for line in README.splitlines():
        for code in re.findall(r"`([^`]+)`", line) or [line]:
            if pattern in code:
                words = shlex.split(code.split("  #")[0])
                starts = [i for i, w in enumerate(words) if w.startswith(".venv/bin/") or w == "python"]
                if starts:
                    return words[starts[0]:]
    raise AssertionError(f"README has no command with {pattern!r}")


def _exe(words: list[str]) -> list[str]:
    # `.venv/bin/x` in the README is this interpreter's environment here
    return [str(BIN / Path(words[0]).name) if words[0].startswith(".venv/bin/") else words[0], *words[1:]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    fake_store.build(root)
    shutil.copytree(REPO / "notebooks", root / "notebooks")
    (root / "exp").mkdir()
    return root


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_readme_mlflow_server_serves_the_runs_page(root, tmp_path):
    words = _command("mlflow server --backend-store-uri")
    assert words[1:] == ["server", "--backend-store-uri", "sqlite:///mlruns/mlflow.db", "--host", "127.0.0.1",
                         "--port", "5000", "--workers", "1"]
    port = free_port()  # the README's command, on a free port
    cmd = _exe(words)
    cmd[cmd.index("--port") + 1] = str(port)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(url + "/health", timeout=120, proc=proc), (tmp_path / "server.log").read_text()[-2000:]
        experiment = _get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=demo")["experiment"]
        assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        # the README's link: the runs page of experiment 1 (the first one a fresh store makes) is the demo's
        assert "#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=svlib-results" in README and experiment["experiment_id"] == "1"
        assert "mlflow.sharedViewState.svlib-results" in {t["key"] for t in experiment["tags"]}
        with urllib.request.urlopen(url + "/", timeout=30) as resp:
            assert resp.status == 200
    finally:
        stop_process(proc)
        log.close()


def test_readme_reroot_command_after_moving_the_store(root, tmp_path):
    from mlflow import MlflowClient

    words = _command("svlib.tracking reroot")
    moved = tmp_path / "moved"
    shutil.copytree(root / "mlruns", moved / "mlruns")  # a copy: the original stays for the other tests
    proc = subprocess.run(_exe(words), cwd=moved, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo: " in proc.stdout and "demo-prune-grid: " in proc.stdout
    client = MlflowClient(f"sqlite:///{moved}/mlruns/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.stage = 'eval'")[0]
    assert run.info.artifact_uri.startswith((moved / "mlruns" / "artifacts").as_uri())
    local = client.download_artifacts(run.info.run_id, "scores/test.txt", str(tmp_path))
    assert Path(local).read_text().count("target") == 40


def test_readme_optuna_dashboard_serves_the_grid_study(root, tmp_path):
    import optuna

    words = _command("optuna-dashboard sqlite")
    assert words[1] == "sqlite:///sweeps/demo-prune-grid.db"
    (root / "sweeps").mkdir(exist_ok=True)
    study = optuna.create_study(study_name="demo-prune-grid", storage=words[1].replace("///", f"///{root}/"),
                                directions=["minimize", "minimize"], load_if_exists=True)
    if not study.trials:
        study.tell(study.ask({"target_sparsity": optuna.distributions.FloatDistribution(0, 1)}), [12.0, 1e6])
    port = free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen(_exe(words) + ["--port", str(port)], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/api/studies", timeout=60, proc=proc), \
            (tmp_path / "dashboard.log").read_text()[-2000:]
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["demo-prune-grid"]
    finally:
        stop_process(proc)
        log.close()


def test_readme_notebook_commands_run_headless(root):
    for pattern, product in (("jupyter execute", "exp/figures/demo_det_curves.png"),
                             ("papermill notebooks", "exp/pruning_curve.ipynb")):
        words = _command(pattern)
        proc = subprocess.run(_exe(words), cwd=root, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{words}: {proc.stderr[-3000:]}"
        assert (root / product).stat().st_size > 10_000, words
    import nbformat

    executed = nbformat.read(root / "exp" / "pruning_curve.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "points by source: {'dense': 5, 'trial': 3}" in text  # both experiments of the -y parameter
    assert (root / "exp" / "figures" / "demo+demo-prune-grid_pruning_curve.png").stat().st_size > 10_000


def test_readme_says_how_to_make_every_experiment_of_the_papermill_example():
    """Right after `make demo` the store holds the demo only: the README names the command of every other
    experiment the papermill line plots (the notebook's error names it too, svlib.analysis.experiment_command)."""
    from svlib.analysis import experiment_command

    words = _command("papermill notebooks")
    names = re.fullmatch(r"experiment: \[(.*)\]", words[words.index("-y") + 1]).group(1).split(", ")
    assert names == ["demo", "demo-prune-grid"]
    for name in names:
        command = experiment_command(name)
        assert command == "make demo" or f"`{command}`" in README, (name, command)
    assert experiment_command("demo-prune-grid") == "python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml --grid"
