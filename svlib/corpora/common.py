"""Helpers that every corpus module needs: list paths, seeded choices, segment cuts, the first-file check.

Public on purpose: a corpus module (``svlib.corpora.<corpus>``) imports these and nothing private of another
corpus module, so adding a corpus means one new module beside the others.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from svlib.audio import AudioError, load_audio
from svlib.data.lists import ListError

__all__ = ["check_first_decodes", "csv_rows", "cut_segments", "listed_file", "pick", "relative_path", "subdirs",
           "inside_folder"]


def relative_path(path: Path, relative_to: str | os.PathLike | None) -> str:
    """``path`` as a list writes it: relative to ``relative_to`` (default: the working directory), with ``/``."""
    base = os.path.abspath(relative_to if relative_to is not None else os.getcwd())
    rel = os.path.relpath(os.path.abspath(path), base)
    return rel.replace(os.sep, "/")


def listed_file(path: str, relative_to) -> str:
    """A path as written to a list (relative to ``relative_to`` / the cwd) -> the file to open."""
    return path if os.path.isabs(path) else os.path.join(relative_to if relative_to is not None else os.getcwd(), path)


def subdirs(path: Path) -> list[Path]:
    """The visible sub-folders of ``path``, sorted (a corpus layout's speakers, videos, rooms)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def pick(items: list[str], n: int, seed: int, stream: int) -> list[str]:
    """``n`` of ``items`` (sorted first, so only the seed decides); separate streams keep choices independent."""
    items = sorted(items)
    rng = np.random.default_rng([seed, stream])
    order = rng.permutation(len(items))
    return sorted(items[i] for i in order[: min(n, len(items))])


def cut_segments(duration: float, segment_seconds: float) -> list[tuple[float, float]]:
    """Equal non-overlapping pieces of at least ``segment_seconds`` (as many as fit), times in whole ms."""
    n = max(1, int(duration // segment_seconds))
    edges = [math.floor(duration * i / n * 1000) / 1000 for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def check_first_decodes(list_path: str | os.PathLike, audio_path: str, relative_to=None) -> None:
    """Decode one second of the first file of a list, or fail with the list, the file and the decoder's reason."""
    try:
        load_audio(listed_file(audio_path, relative_to), max_seconds=1.0)
    except AudioError as err:
        raise ListError(f"{list_path}: its first file cannot be decoded, so training would fail on it: {err}") from None


def csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str | None]]]:
    """``(line number, row)`` of a corpus's CSV manifest whose header must name ``required``; a row with more
    fields than the header has them under the key None, one with fewer has None values (``csv.DictReader``)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ListError(f"{path}:1: header lacks column(s) {missing}; has {reader.fieldnames}")
        for row in reader:
            yield reader.line_num, row


def inside_folder(manifest: Path, line: int, rel: str) -> str:
    """``rel`` (a manifest's path column), refused unless it is relative and stays inside the manifest's folder."""
    if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise ListError(f"{manifest}:{line}: path must be relative and inside the manifest's folder, got {rel!r}")
    return rel
