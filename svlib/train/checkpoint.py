"""Training checkpoints: atomic saves, clear load errors, and "the latest one" for resuming.

A checkpoint is written to a temporary file in the target directory, flushed and fsync'ed, and only then
renamed over the final name (``os.replace`` is atomic on POSIX within one file system). A run killed in the
middle of a save therefore leaves either the old file or the new one, never half of one, and the file
``latest_checkpoint`` returns is always complete. The directory is fsync'ed after the rename as well, so
the rename itself survives a power loss.

Checkpoints are loaded with ``weights_only=True``: they hold only tensors and plain Python values, and a
training directory shared between people should not be able to run code on load.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from svlib.files import remove_stale_temp_files, replace_atomic

CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or cannot be read; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteRecorder:
    """A file handle that remembers the ``OSError`` of a failed write: ``torch.save`` swallows it into
    ``RuntimeError: unexpected pos 704 vs 598`` (a full disk), which says neither what nor where."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str):  # flush, tell, seek...: the handle's own
        return getattr(self.handle, name)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (creating its directory); a failed write raises
    ``svlib.files.WriteError`` naming ``path``.

    Temporary files that killed writers left in the directory go first (``remove_stale_temp_files``: only
    this host's, of PIDs that no longer run), so a run killed during saves does not pile them up."""
    path = Path(path)
    remove_stale_temp_files(path.parent)

    def write_state(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as handle:
            recorder = _WriteRecorder(handle)
            try:
                torch.save(state, recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
            handle.flush()
            os.fsync(handle.fileno())

    # a failure removes the temporary file (KeyboardInterrupt included): none pile up next to the checkpoints
    replace_atomic(path, write_state)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; any failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for truncated / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated?): {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, got {type(state).__name__}")
    return state


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Step checkpoints in ``directory`` (``ckpt_<step>.pt``), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = CKPT_PATTERN.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The step checkpoint with the highest step, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step checkpoints (``best.pt`` is never touched); returns the deleted."""
    if keep <= 0:
        return []
    old = list_checkpoints(directory)[:-keep]
    for path in old:
        path.unlink(missing_ok=True)
    return old
