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


# Each writer rewrites one file many times with its own content (large enough that one write is many
# syscalls); the content ends with a marker so a torn file (one writer's head, another's tail, or a
# truncated one) is recognised.
WRITER = """
import sys
from svlib.files import write_text_atomic
path, letter, times = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = letter * 200_000 + "|end\\n"
for _ in range(times):
    write_text_atomic(path, body)
"""


def test_two_processes_writing_one_file_never_tear_it_or_crash(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    target = tmp_path / "result.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), letter, "150"], cwd=REPO,
                                stderr=subprocess.PIPE, text=True) for letter in "ab"]
    seen = set()
    while any(w.poll() is None for w in writers):
        if target.exists():
            text = target.read_text()
            # a reader sees one writer's whole file, never a mix or a prefix
            assert text in ("a" * 200_000 + "|end\n", "b" * 200_000 + "|end\n"), (len(text), text[:1], text[-8:])
            seen.add(text[0])
    for w in writers:
        assert w.wait() == 0, w.stderr.read()
    assert target.read_text()[-5:] == "|end\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind
    assert seen  # the reader did look while they wrote


def test_the_final_file_gets_the_umask_mode_not_mkstemps_0600(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        path = write_json(tmp_path / "r.json", {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o640
        os.umask(0o002)
        write_json(path, {"a": 2})  # a rewrite takes the current umask too
        assert path.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
