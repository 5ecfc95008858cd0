"""Committed benchmark results hold no machine's absolute paths (the standards: JSON under bench/results/ is
compared across machines and must say where things are relative to the repository)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
# a string that is a POSIX absolute path ("/work/main/data", "/x.json"), or that embeds a home/scratch folder
ABSOLUTE = re.compile(r"^/[\w.\-]+(/[\w.\-]*)*/?$")
MACHINE_FOLDERS = ("/work/", "/tmp/", "/root/", "/home/", "/Users/")


def strings(value, where: str = ""):
    """Every string in a JSON value (keys too), with where it sits (``a.b[2]``)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"{where}.{key} (key)", key
            yield from strings(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from strings(item, f"{where}[{i}]")


def absolute_paths(value) -> list[str]:
    return [f"{where}: {text!r}" for where, text in strings(value)
            if ABSOLUTE.match(text) or any(folder in text for folder in MACHINE_FOLDERS)]


def test_the_detector_catches_absolute_paths_and_passes_relative_ones():
    found = absolute_paths({"data": "/work/main/data/sv-bench", "model": "exp/demo/s3/model",
                            "runs": [{"cmd": "python bench/x.py --out /tmp/r.json"}], "unit": "samples/s",
                            "/home/me/cache": 1, "note": "1/2 of the heads", "root": "/", "plot": "/srv/p.png"})
    assert found == [".data: '/work/main/data/sv-bench'", ".runs[0].cmd: 'python bench/x.py --out /tmp/r.json'",
                     "./home/me/cache (key): '/home/me/cache'", ".plot: '/srv/p.png'"]


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_benchmark_results_hold_no_absolute_paths(path):
    assert absolute_paths(json.loads(path.read_text())) == [], path.name
