"""Shared fixtures: the read-only speech data lives beside the repo in ../shared/data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# what a user reads commands and numbers from: the README and the guide it maps (docs/*.md, one page per task)
DOC_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DATA = REPO.parent / "shared" / "data"

# SVLIB_TEST_THREADS=1 when several suites share the two cores (threads spinning against each other's load)
torch.set_num_threads(int(os.environ.get("SVLIB_TEST_THREADS", "2")))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine two OpenMP threads spin against each other's
    load (30x slower here), and subprocess workers then do the same arithmetic bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (CI always has it; clone next to ../shared)")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def sv_mini() -> Path:
    return _require(DATA / "sv-mini")


@pytest.fixture(scope="session")
def sv_bench() -> Path:
    return _require(DATA / "sv-bench")


@pytest.fixture(scope="session")
def veri_test2() -> Path:
    return _require(DATA / "voxceleb-trials" / "veri_test2.txt")


SMOKE_CONFIG = REPO / "experiments" / "configs" / "smoke" / "pipeline.yaml"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, sv_mini):
    """The smoke pipeline (every stage, tiny model, sv-mini), run once per session into a fresh MLflow store.

    Returns a dict with ``workdir`` (where exp/ and data/ live), ``tracking_uri``, ``experiment``, ``summary``.
    Tests that read the store (MLflow server, notebooks) share this one run.
    """
    import os

    from experiments import pipeline
    from svlib.config import load_config
    from svlib.corpora.manifest import prepare_manifest
    from svlib.tracking import Tracker

    workdir = tmp_path_factory.mktemp("smoke")
    old = os.getcwd()
    os.chdir(workdir)
    try:
        prepare_manifest(sv_mini / "manifest.csv", workdir / "data" / "sv-mini", seed=0)
        uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
        cfg = load_config(SMOKE_CONFIG, pipeline.PipelineConfig)
        summary = pipeline.run(cfg, SMOKE_CONFIG.parent, Tracker("smoke", tracking_uri=uri))
    finally:
        os.chdir(old)
    return {"workdir": workdir, "tracking_uri": uri, "experiment": "smoke", "summary": summary, "config": cfg}
