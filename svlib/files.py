"""Small-file writes that never leave half a file behind.

Stage results, model manifests, model cards, calibrations, Kaldi lists and benchmark JSONs are all written
through a temporary file in the same folder that is then renamed over the target (``os.replace`` is atomic
on one file system): a reader, or a rerun after a kill, sees the old file or the new one, never a torn one.
The temporary name is unique per call (``tempfile.mkstemp``), so two processes (two ranks, two sweep
workers) writing the same file at once each rename a complete file of their own: the last rename wins,
nobody truncates the other's half-written temp file or renames it away from under it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO


def _replace_atomic(path: str | os.PathLike, fill: Callable[[int, str], Any]) -> Path:
    """``fill(fd, tmp)`` writes a unique temporary file beside ``path`` (and closes ``fd``); it then gets the
    umask's mode and is renamed over ``path``. On any error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        fill(fd, tmp)
        os.chmod(tmp, umask_mode())  # mkstemp creates 0600; the result gets what open(path, "w") would give
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _write_atomic(path: str | os.PathLike, fill: Callable[[TextIO], Any]) -> Path:
    def write_text(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            fill(f)

    return _replace_atomic(path, write_text)


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a unique temporary file beside ``path``, renamed over it.

    Every safetensors file the project writes goes through here: a killed writer leaves the old file (or none),
    never a truncated one, and the file gets the umask's mode (safetensors itself creates 0600 files, which
    teammates in the same group could not read).
    """
    from safetensors.torch import save_file  # torch-free callers of this module do not pay for the import

    def write_tensors(fd: int, tmp: str) -> None:
        os.close(fd)  # safetensors opens the path itself
        save_file(tensors, tmp, metadata=metadata)

    return _replace_atomic(path, write_tensors)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` via a unique temporary file beside it; parent folders are created."""
    return _write_atomic(path, lambda f: f.write(text))


def write_lines_atomic(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """One line per item, streamed (a VoxCeleb2 wav.scp need not be joined in memory first)."""
    return _write_atomic(path, lambda f: f.writelines(line + "\n" for line in lines))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Indented JSON; numpy / torch scalars are written as floats."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (``../`` where it lies outside), for JSON records that must not hold the
    absolute paths of one machine (benchmark results are committed and compared across machines)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def umask_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file. Read without changing it where Linux
    shows it (``/proc/self/status``, kernel >= 4.7: setting it, even briefly, races with other threads
    creating files); elsewhere the only portable way is to set and restore it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def respect_umask(*paths: str | os.PathLike) -> None:
    """Give files that were created 0600 (``tempfile.mkstemp``, safetensors, HF ``save_pretrained``) the mode
    an ordinary write would have, so teammates in the same group can read shared embeddings and models."""
    mode = umask_mode()
    for path in paths:
        os.chmod(path, mode)
