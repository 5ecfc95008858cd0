"""Shared fixtures: the read-only speech data lives beside the repo in ../shared/data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


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
