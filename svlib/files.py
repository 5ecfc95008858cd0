"""Small-file writes that never leave half a file behind.

Stage results, model manifests, model cards, calibrations, Kaldi lists and benchmark JSONs are all written
through a temporary file in the same folder that is then renamed over the target (``os.replace`` is atomic
on one file system): a reader, or a rerun after a kill, sees the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO


def _write_atomic(path: str | os.PathLike, fill: Callable[[TextIO], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        fill(f)
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` via ``<name>.tmp``; parent folders are created."""
    return _write_atomic(path, lambda f: f.write(text))


def write_lines_atomic(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """One line per item, streamed (a VoxCeleb2 wav.scp need not be joined in memory first)."""
    return _write_atomic(path, lambda f: f.writelines(line + "\n" for line in lines))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Indented JSON; numpy / torch scalars are written as floats."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")
