"""What a kill, a second pipeline or a broken disk does to a pipeline: one pipeline per out_dir, ranks that die
with their launcher, MLflow runs that never stay RUNNING, and one line instead of a traceback.

Most cases use a pipeline whose one stage is a finished folder (``kind: use``), so they take a second; a stage
that never returns (``run_stage`` patched to sleep, in a child process) stands for a long training stage.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from experiments import pipeline
from experiments.common import LOCK, exclusive_out_dir, log_stage_results
from tests.conftest import REPO
from tests.test_files import full_disk

# A pipeline whose stage never returns: the parent run and the stage's nested run are open while it sleeps.
STUCK = """
import sys, time
from experiments import pipeline
def stuck(*args, **kwargs):
    print("stage started", flush=True)
    time.sleep(600)
pipeline.run_stage = stuck
sys.exit(pipeline.main(sys.argv[1:]))
"""


def _config(folder: Path) -> Path:
    """``folder/p.yaml``: out_dir ``exp/p``, one ``use`` stage of ``folder/done`` (paths relative to ``folder``)."""
    (folder / "done").mkdir(exist_ok=True)
    (folder / "done" / "result.json").write_text('{"stage": "done"}\n')
    config = folder / "p.yaml"
    config.write_text("name: p\nout_dir: exp/p\nbaselines: false\ndata: {}\n"
                      "stages:\n  - {name: a, kind: use, path: done}\n")
    return config


def _child(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"} | env)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_second_pipeline_on_a_busy_out_dir_stops_at_once_naming_the_holder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    holder = _child([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                     "from experiments.common import exclusive_out_dir\n"
                     "with exclusive_out_dir(Path('exp/p')):\n    print('held', flush=True); time.sleep(600)"], tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        assert pipeline.main(["--config", str(config), "--no-tracking"]) == 2
        assert time.perf_counter() - start < 10
        line = _one_line(capsys)
        assert line == (f"error: exp/p: another pipeline is running on this out_dir (host {os.uname().nodename} pid "
                        f"{holder.pid}); wait for it or stop it, or give another out_dir")
        assert not (tmp_path / "exp" / "p" / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: no stale lock to clear by hand
    assert pipeline.main(["--config", str(config), "--no-tracking"]) == 0
    assert (tmp_path / "exp" / "p" / "summary.json").is_file()
    assert (tmp_path / "exp" / "p" / LOCK).read_text().strip() == f"host {os.uname().nodename} pid {os.getpid()}"


def test_one_process_cannot_hold_the_lock_twice(tmp_path):
    """flock locks belong to open files, not processes: a second hold in the same process is refused too."""
    with exclusive_out_dir(tmp_path / "out"):
        with pytest.raises(RuntimeError, match="another pipeline is running on this out_dir"):
            with exclusive_out_dir(tmp_path / "out"):
                pass
    with exclusive_out_dir(tmp_path / "out"):  # released on leaving the block
        pass


def _runs(uri: str) -> dict[str, tuple[str, str]]:
    """run name -> (status, run id) of the ``p`` experiment."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("p")
    if experiment is None:
        return {}
    return {r.info.run_name: (r.info.status, r.info.run_id) for r in client.search_runs([experiment.experiment_id])}


def _start_stuck(tmp_path: Path, uri: str) -> subprocess.Popen:
    child = _child([sys.executable, "-c", STUCK, "--config", "p.yaml"], tmp_path, MLFLOW_TRACKING_URI=uri)
    line = child.stdout.readline().strip()
    assert line == "stage started", child.stderr.read() if child.poll() is not None else line
    assert {name: status for name, (status, _) in _runs(uri).items()} == {"pipeline:p": "RUNNING", "a": "RUNNING"}
    return child


def test_sigterm_closes_the_pipeline_runs(tmp_path):
    _config(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = _start_stuck(tmp_path, uri)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 130
    assert "interrupted: rerun the same command to resume" in child.stderr.read()
    assert {name: status for name, (status, _) in _runs(uri).items()} == {"pipeline:p": "FAILED", "a": "FAILED"}


def test_a_rerun_closes_the_runs_a_killed_pipeline_left_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    child = _start_stuck(tmp_path, uri)
    orphans = {status_id[1] for status_id in _runs(uri).values()}
    child.kill()  # SIGKILL: nothing of the child runs any more, its runs stay RUNNING
    child.wait()
    assert {status for status, _ in _runs(uri).values()} == {"RUNNING"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pipeline.main(["--config", str(config)]) == 0
    client = MlflowClient(uri)
    for run_id in orphans:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["svlib.closed_by"].startswith("rerun")
    fresh = [r for r in client.search_runs([client.get_experiment_by_name("p").experiment_id])
             if r.info.run_id not in orphans]
    assert sorted((r.info.run_name, r.info.status) for r in fresh) == [("a", "FINISHED"), ("pipeline:p", "FINISHED")]


def test_runs_of_another_out_dir_are_left_alone(tmp_path, monkeypatch):
    """Only the runs of this out_dir are closed: another pipeline's live runs in the same experiment are not."""
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("p")
    host = os.uname().nodename
    other = client.create_run(experiment, tags={"svlib.out_dir": str(tmp_path / "exp" / "q"), "svlib.host": host})
    # the same path on another machine (its scratch disk, tracked to one team server): its lock is not ours
    elsewhere = client.create_run(experiment, tags={"svlib.out_dir": str(tmp_path / "exp" / "p"),
                                                    "svlib.host": f"not-{host}"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pipeline.main(["--config", str(config)]) == 0
    assert client.get_run(other.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"


class _Store:
    """The part of a Tracker that log_stage_results uses, counting uploads; ``fail`` makes them raise."""

    tracking_uri = "sqlite:///store.db"

    def __init__(self, fail: bool = False) -> None:
        self.uploads, self.fail, self.metrics = 0, fail, []

    def log_model(self, folder, name, params=None, tags=None) -> str:
        self.uploads += 1
        if self.fail:
            raise RuntimeError("upload limit exceeded")
        return f"m-{self.uploads}"

    def log_metrics(self, metrics, step=None, model_id=None) -> None:
        self.metrics.append(model_id)


def test_a_rerun_does_not_upload_a_finished_stages_model_again(tmp_path):
    from svlib.model.speaker import MANIFEST

    (tmp_path / "s2" / "model").mkdir(parents=True)
    (tmp_path / "s2" / "model" / MANIFEST).write_text("{}")
    record = {"best_val_eer_pct": 5.0}
    failing = _Store(fail=True)
    assert log_stage_results(failing, "s2", "train", tmp_path / "s2", record) is None  # a warning, not a crash
    store = _Store()
    assert log_stage_results(store, "s2", "train", tmp_path / "s2", record) == "m-1"
    assert log_stage_results(store, "s2", "train", tmp_path / "s2", record) == "m-1"  # the rerun: no upload
    assert store.uploads == 1 and store.metrics == ["m-1", "m-1"]


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_ranks_die_with_their_launcher(tmp_path):
    """SIGKILL of torchrun's agent used to leave both ranks running to the end of their work."""
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys, time\nfrom svlib.train.engine import setup_distributed\n"
                      "rank = setup_distributed()[0]\n"
                      "open(f'{sys.argv[1]}/rank{rank}.pid', 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    launcher = _child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(worker), str(tmp_path)], tmp_path)
    try:
        deadline = time.monotonic() + 120
        pid_files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
        while not all(p.is_file() and p.read_text() for p in pid_files):
            assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()
            time.sleep(0.2)
        ranks = [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in ranks)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in ranks), "ranks outlived their launcher"
    finally:
        launcher.kill()
        for p in tmp_path.glob("rank*.pid"):
            if p.read_text() and _alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)


def test_a_read_only_out_dir_is_one_line(tmp_path, monkeypatch, capsys):
    """Root ignores file modes, so the refusal is the kernel's answer, raised where the first write happens."""
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith("exp/p") and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert pipeline.main(["--config", str(config), "--no-tracking"]) == 2
    assert _one_line(capsys) == "error: [Errno 13] Permission denied: 'exp/p/.svlib.lock'"


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    full_disk(monkeypatch)  # 64 bytes left: summary.json does not fit
    assert pipeline.main(["--config", str(config), "--no-tracking"]) == 2
    assert _one_line(capsys) == "error: exp/p/summary.json: cannot write (No space left on device)"
    assert not (tmp_path / "exp" / "p" / "summary.json").exists()
