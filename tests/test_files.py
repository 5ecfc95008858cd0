"""Atomic small-file writes (svlib.files): what every result, manifest, card, calibration and list goes through."""
from __future__ import annotations

import json

import numpy as np

from svlib.files import write_json, write_lines_atomic, write_text_atomic


def test_write_json_creates_folders_converts_numpy_and_leaves_no_temp(tmp_path):
    path = write_json(tmp_path / "a" / "b" / "r.json", {"eer_pct": np.float32(12.5), "n": 3})
    assert path == tmp_path / "a" / "b" / "r.json"
    assert json.loads(path.read_text()) == {"eer_pct": 12.5, "n": 3}
    assert path.read_text().endswith("}\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_rewrite_replaces_the_whole_file(tmp_path):
    path = write_text_atomic(tmp_path / "t.txt", "a much longer first version\n")
    write_text_atomic(path, "short\n")
    assert path.read_bytes() == b"short\n"


def test_lines_are_streamed_with_unix_line_ends(tmp_path):
    path = write_lines_atomic(tmp_path / "wav.scp", (f"u{i} /x/{i}.wav" for i in range(3)))
    assert path.read_bytes() == b"u0 /x/0.wav\nu1 /x/1.wav\nu2 /x/2.wav\n"
