"""Small-file writes that never leave half a file behind.

Stage results, model manifests, model cards, calibrations, Kaldi lists and benchmark JSONs are all written
through a temporary file in the same folder that is then renamed over the target (``os.replace`` is atomic
on one file system): a reader, or a rerun after a kill, sees the old file or the new one, never a torn one.
The temporary name is unique per call (``tempfile.mkstemp``), so two processes (two ranks, two sweep
workers) writing the same file at once each rename a complete file of their own: the last rename wins,
nobody truncates the other's half-written temp file or renames it away from under it.

A failed write raises ``WriteError`` (an ``OSError`` with the errno kept) naming the file the caller asked
for: the system's own error names the temporary file (a read-only folder) or no file at all (a full disk).
The temporary name holds its writer's PID and host (``.r.json.<pid>@<host>.<random>.tmp``), so the file a
``kill -9`` leaves behind can later be recognised as stale and removed (``remove_stale_temp_files``).
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO


class WriteError(OSError):
    """A file that could not be written, named as the caller named it (not its temporary file).

    ``errno`` and ``strerror`` are the system's (``errno.ENOSPC`` for a full disk, ``EACCES``/``EROFS`` for
    a read-only folder); ``str()`` is one line: ``<path>: cannot write (<reason>)``."""

    def __init__(self, path: str | os.PathLike, cause: BaseException) -> None:
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(getattr(cause, "errno", None), reason, str(path))

    def __str__(self) -> str:
        return f"{self.filename}: cannot write ({self.strerror})"

    def __reduce__(self):
        # OSError would rebuild it as WriteError(errno, strerror, filename), which __init__ does not take: a
        # WriteError raised in a multiprocessing worker must survive the trip back to the parent
        return _rebuild_write_error, (self.filename, self.errno, self.strerror)


def _rebuild_write_error(path: str, errno_: int | None, reason: str) -> WriteError:
    return WriteError(path, OSError(errno_, reason))


# .<target>.<pid>@<host>.<mkstemp's random part: letters, digits, '_'>.tmp
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)@(?P<host>[^.@/]+)\.\w+\.tmp$")


def _host() -> str:
    """This machine's name as it appears in temporary names (dots would make the name ambiguous)."""
    return socket.gethostname().replace(".", "_") or "localhost"


def temp_prefix(path: str | os.PathLike) -> str:
    """``mkstemp`` prefix of a temporary file for ``path``: hidden, and naming its writer (PID and host)."""
    return f".{Path(path).name}.{os.getpid()}@{_host()}."


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (a process of another user counts). A zombie does not: a killed
    writer whose parent never reaps it (a torchrun rank orphaned in a container whose PID 1 is no init)
    writes nothing more. PID 0 and below are no process, and asking about them would signal a process
    group, so they count as alive: never removed."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # /proc/<pid>/stat: "pid (comm) state ...", and comm may hold spaces and parentheses
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS), or it exited just now: the next save decides
        return True
    return state != "Z"


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files in ``directory`` whose writer was killed (``kill -9``, OOM, power cut
    of a process: nothing ran its cleanup); returns them.

    Only files that are provably stale go: written on this host (their name says so) by a PID that no longer
    runs. A temporary file of a live writer, of another host sharing the folder (its PIDs mean nothing
    here) or with a name from before the PID was recorded is left alone, so two ranks or two hosts never
    remove each other's write in progress. (Two PID namespaces under one host name, e.g. containers on the
    host network, look alike; two writers of one folder at once is what the pipeline's lock forbids.)"""
    host, removed = _host(), []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:  # another cleaner got there first
            continue
        removed.append(Path(entry.path))
    return removed


def replace_atomic(path: str | os.PathLike, fill: Callable[[int, str], Any]) -> Path:
    """``fill(fd, tmp)`` writes a unique temporary file beside ``path`` (and closes ``fd``); it then gets the
    umask's mode and is renamed over ``path``. On any error the temporary file is removed, and an
    ``OSError`` becomes a ``WriteError`` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as err:  # a read-only folder: the system's error names the temporary file
        raise WriteError(path, err) from err
    try:
        fill(fd, tmp)
        os.chmod(tmp, umask_mode())  # mkstemp creates 0600; the result gets what open(path, "w") would give
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:  # gone already, or the folder turned read-only: the original error is the news
            pass
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err  # "No space left on device" from a write names no file
        raise
    return path


def _write_atomic(path: str | os.PathLike, fill: Callable[[TextIO], Any]) -> Path:
    def write_text(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            fill(f)

    return replace_atomic(path, write_text)


def save_tensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a unique temporary file beside ``path``, renamed over it.

    Every safetensors file the project writes goes through here: a killed writer leaves the old file (or none),
    never a truncated one, and the file gets the umask's mode (safetensors itself creates 0600 files, which
    teammates in the same group could not read).
    """
    # torch-free callers of this module do not pay for the import
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write_tensors(fd: int, tmp: str) -> None:
        os.close(fd)  # safetensors opens the path itself
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # its I/O errors are text: "... No space left on device (os error 28)"
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1]))) from err

    return replace_atomic(path, write_tensors)


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
