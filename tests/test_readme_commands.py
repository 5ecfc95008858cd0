"""Every command of the README and the guide (docs/*.md): run here, run by another test, or excused with a reason.

The tracking, sweep and notebook commands run here as written (port numbers aside) against a small store:
tests/fake_store.py's (the demo pipeline and a 3-trial grid sweep, written by the MLflow client); each command
runs in a scratch folder laid out like the repo root (``mlruns/``, ``notebooks/``, ``sweeps/``, ``exp/``). Every
other command line of a code block is listed in RUN_ELSEWHERE (the test file that runs it at test size) or
NOT_RUN (why no test can: GPUs, VoxCeleb2, a network, a benchmark's hours), and
test_every_command_in_a_code_block_is_run_by_a_test fails on a command in neither list.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from svlib.services import free_port, stop_process, wait_http
from tests import fake_store
from tests.conftest import DOC_PAGES, REPO

PAGES = {page: page.read_text() for page in DOC_PAGES}
DOCS = "\n".join(PAGES.values())
BIN = Path(sys.executable).parent

# Command lines of the pages' code blocks, by how they start, and the test file that runs that command (through
# its CLI's main or a subprocess, at test size), with a string that file must hold (the subcommand or option it
# runs). The longest matching start wins.
RUN_ELSEWHERE = {
    "python -m svlib.corpora.prepare manifest": ("test_prepare.py", '"manifest", "--manifest"'),
    "python -m svlib.corpora.prepare demo ": ("test_demo_data.py", '"demo", "--sv-bench"'),
    "python -m svlib.corpora.prepare demo-table": ("test_demo_data.py", '"demo-table", "--summary"'),
    "python -m svlib.corpora.prepare voxceleb": ("test_prepare.py", '"voxceleb", "--root"'),
    "python -m svlib.corpora.prepare cnceleb": ("test_cnceleb.py", '"cnceleb", "--root"'),
    "python -m svlib.corpora.download": ("test_demo_sources.py", "downloading the public corpora"),
    "python -m svlib.corpora.public_corpora": ("test_public_corpora.py", "build_public"),
    "python bench/full_size_rehearsal.py --size tiny": ("test_rehearsal.py", '"--size", "tiny"'),
    "python bench/gpu.py --dry": ("test_gpu_dry.py", "--dry"),
    "python bench/readme_tables.py": ("test_readme_tables.py", '"--check"'),
    "python -m sweeps.prune_sweep --config sweeps/configs/w2vbert.yaml --grid --plan": ("test_sweep_plan.py", "--plan"),
    "python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml": ("test_prune_sweep.py", "run_sweep("),
    "python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml --snapshots": (
        "test_prune_sweep.py", "def test_snapshots_trace_the_grid_in_one_trial"),
    "python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml --storage postgresql": (
        "test_sweep_storage.py", '@pytest.fixture(params=["sqlite", "postgresql"])'),
    "python -m sweeps.study pareto": ("test_prune_sweep.py", "sweeps.study pareto"),
    "torchrun --nproc_per_node 8 -m experiments.pipeline --config experiments/configs/smoke/pipeline.yaml": (
        "test_pipeline_torchrun.py", "launch_command"),
    "torchrun --nproc_per_node 4 -m experiments.pipeline --config experiments/configs/smoke/pipeline.yaml": (
        "test_pipeline_torchrun.py", "launch_command"),
    ".venv/bin/python -m svlib.tracking ui": ("test_readme_commands.py",
                                              "def test_readme_mlflow_ui_serves_the_store_and_prints_its_links"),
    ".venv/bin/jupyter execute": ("test_readme_commands.py", '("jupyter execute", "exp/figures/det_curves.png")'),
    ".venv/bin/papermill": ("test_readme_commands.py", '("papermill notebooks", "exp/pruning_curve.ipynb")'),
    "svlib info": ("test_cli_model.py", '"info"'),
    "svlib calibrate-model": ("test_cli_model.py", '"calibrate-model"'),
    "svlib verify": ("test_cli_model.py", '"verify"'),
    "svlib embed": ("test_cli_model.py", '"embed"'),
    "svlib embed --model M --scp data/cnceleb": ("test_cnceleb.py", '["embed", "--model"'),
    "svlib score": ("test_cli_score.py", '"score"'),
    "svlib score --trials T --embeddings emb.npz --ci": ("test_cli_score.py", '"--ci"'),
    "svlib score --trials data/cnceleb": ("test_cnceleb.py", '"--enroll"'),
    "svlib compare": ("test_cli_score.py", '"compare"'),
}
NOT_RUN = {
    "make setup": "creates .venv and installs torch and the dependencies from the network",
    "make test": "the test suite itself",
    "make demo": "the demo corpora (or the network) and a quarter of an hour of training; its two steps run at test "
                 "size in test_demo_sources.py (prepare-demo) and test_pipeline_smoke.py (the pipeline)",
    "python -m experiments.pipeline --config experiments/configs/demo_prune/pipeline.yaml":
        "starts from make demo's exp/demo/s2; the same stage kinds run on the smoke pipeline (test_pipeline_smoke.py)",
    "python bench/pruning_curve.py": "a benchmark: rewrites bench/results/pruning_curve.json (tens of minutes)",
    "python bench/prune_speed.py": "a benchmark at full size: two 580M encoders, rewrites bench/results/prune_speed.json",
    "python bench/full_size_rehearsal.py": "the 580M model through every stage: 15 GiB and a quarter of an hour",
    "python bench/sweep_scale.py": "the 580M sweep on 2 ranks: 20 GiB and ten minutes",
    "python bench/sparsity_curve.py": "a benchmark: the demo grid sweep on make demo's teacher (tens of minutes)",
    "python bench/gpu.py": "needs a GPU (its --dry form runs in test_gpu_dry.py)",
    # the reference recipe and its no-LoRA ablation (their configs validate in test_shipped_configs.py)
    "torchrun --nproc_per_node 8 -m experiments.pipeline --config experiments/configs/w2vbert/":
        "needs 8 GPUs, VoxCeleb2 and the pretrained W2V-BERT 2.0 weights",
    "torchrun --nproc_per_node 4 -m experiments.pipeline --config experiments/configs/w2vbert/":
        "needs 4 GPUs, VoxCeleb2 and the pretrained W2V-BERT 2.0 weights",
    "torchrun --standalone --nproc_per_node 8 -m sweeps.prune_sweep":
        "needs an 8-GPU node, VoxCeleb2 and PostgreSQL; the smoke sweep runs under torchrun in test_sweep_torchrun.py",
    "srun torchrun": "needs a Slurm cluster of GPU nodes",
    "svlib convert-reference": "needs the authors' model_lmft_0.14.pth (not distributed here); test_registry.py "
                               "converts a checkpoint of that layout with the function the command calls",
}
COMMAND_STARTS = ("python ", "svlib ", "make ", "torchrun ", "srun ", ".venv/bin/")


def code_block_commands(text: str) -> list[str]:
    """The command lines of a page's code blocks: continuation lines joined, comments dropped."""
    commands, fence, pending = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:]
            continue
        if fence is None or fence == "text":
            continue
        line = pending + line.split("  #")[0].strip()
        pending = line[:-1] + " " if line.endswith("\\") else ""
        if not pending and line.startswith(COMMAND_STARTS):
            commands.append(" ".join(line.split()))
    return commands


def covering_entry(command: str) -> str | None:
    """The longest start in RUN_ELSEWHERE or NOT_RUN that ``command`` begins with."""
    starts = [s for s in (*RUN_ELSEWHERE, *NOT_RUN) if command == s.strip() or command.startswith(s)]
    return max(starts, key=len) if starts else None


def test_the_command_scanner_joins_continuations_and_skips_output_blocks():
    text = "```bash\nsvlib embed --model m \\\n    --scp x  # note\n# comment\nexport X=1\n```\n```text\npython no\n```"
    assert code_block_commands(text) == ["svlib embed --model m --scp x"]


def test_every_command_in_a_code_block_is_run_by_a_test():
    """A page may only show a command that some test runs, or one whose reason for not being run is written here."""
    seen, unlisted = set(), []
    for page, text in PAGES.items():
        for command in code_block_commands(text):
            entry = covering_entry(command)
            if entry is None:
                unlisted.append(f"{page.relative_to(REPO)}: {command}")
            seen.add(entry)
    assert not unlisted, "commands no test runs (add a test, or a reason to NOT_RUN):\n" + "\n".join(unlisted)
    unused = sorted((set(RUN_ELSEWHERE) | set(NOT_RUN)) - seen)
    assert not unused, f"entries for commands no page shows: {unused}"
    for start, (test_file, marker) in RUN_ELSEWHERE.items():
        assert marker in (REPO / "tests" / test_file).read_text(), (start, test_file, marker)


def _command(pattern: str) -> list[str]:
    """The pages' line (code block or inline code) that runs ``pattern``, split as a shell would."""
    for line in DOCS.splitlines():
        for code in re.findall(r"`([^`]+)`", line) or [line]:
            if pattern in code:
                words = shlex.split(code.split("  #")[0])
                starts = [i for i, w in enumerate(words) if w.startswith(".venv/bin/") or w == "python"]
                if starts:
                    return words[starts[0]:]
    raise AssertionError(f"no page has a command with {pattern!r}")


def _exe(words: list[str]) -> list[str]:
    # `.venv/bin/x` in the pages is this interpreter's environment here
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


def test_readme_mlflow_ui_serves_the_store_and_prints_its_links(root, tmp_path):
    """The guide's UI command serves mlruns/mlflow.db (plain `mlflow ui` opens an empty ./mlflow.db) and prints
    each experiment's runs-table link with its real id: no page hard-codes one."""
    from svlib.tracking import models_page, runs_page

    words = _command("svlib.tracking ui")
    assert words[1:] == ["-m", "svlib.tracking", "ui", "--db", "mlruns/mlflow.db", "--port", "5000"]
    assert "#/experiments/1/" not in DOCS and "/mlflow.db" in (REPO / ".gitignore").read_text().splitlines()
    port = free_port()  # the page's command, on a free port
    cmd = _exe(words)
    cmd[cmd.index("--port") + 1] = str(port)
    log = open(tmp_path / "ui.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http(url + "/health", timeout=180, proc=proc), (tmp_path / "ui.log").read_text()[-2000:]
        deadline = time.monotonic() + 60
        while "all experiments:" not in (tmp_path / "ui.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        printed = (tmp_path / "ui.log").read_text()
        experiment = _get_json(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=demo")["experiment"]
        assert {t["key"]: t["value"] for t in experiment["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        assert f"  demo (id {experiment['experiment_id']}): {runs_page(url, experiment['experiment_id'])}\n" in printed
        assert f"models: {models_page(url, experiment['experiment_id'])}\n" in printed
        assert f"all experiments: {url}/#/experiments?workflowType=machine_learning" in printed
        assert "mlflow.sharedViewState.svlib-results" in {t["key"] for t in experiment["tags"]}
        with urllib.request.urlopen(url + "/", timeout=30) as resp:
            assert resp.status == 200
    finally:
        stop_process(proc)
        log.close()
    assert not wait_http(url + "/health", timeout=2)  # SIGTERM to the command stopped its server too


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


def test_the_guide_says_how_to_make_every_experiment_of_the_papermill_example():
    """Right after `make demo` the store holds the demo only: the page with the papermill line names the command
    of every other experiment it plots (the notebook's error names it too, svlib.analysis.experiment_command)."""
    from svlib.analysis import experiment_command

    words = _command("papermill notebooks")
    names = re.fullmatch(r"experiment: \[(.*)\]", words[words.index("-y") + 1]).group(1).split(", ")
    assert names == ["demo", "demo-prune-grid"]
    for name in names:
        command = experiment_command(name)
        assert command == "make demo" or f"`{command}`" in PAGES[REPO / "docs" / "tracking.md"], (name, command)
    assert experiment_command("demo-prune-grid") == "python -m sweeps.prune_sweep --config sweeps/configs/demo.yaml --grid"
