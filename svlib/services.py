"""Local helper services: an MLflow tracking server on 127.0.0.1, started and stopped by PID.

Used by the UI test and for README screenshots. The server is started in its own process group
(``start_new_session``) because ``mlflow server`` forks uvicorn workers: stopping only the parent PID
would leave them holding the port.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["ServiceError", "free_port", "start_mlflow_server", "stop_process", "process_group_alive", "wait_http"]

LOCALHOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A helper service that did not start (the message carries the tail of its log)."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port free on ``host`` right now (the OS picks it; another process may still race us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None,
              interval: float = 0.25) -> bool:
    """Poll ``url`` until it answers 200; False on timeout or when ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(interval)
    return False


def _mlflow_executable() -> list[str]:
    # Prefer the console script beside the running interpreter so a venv's mlflow is used even
    # when the venv is not activated.
    script = Path(sys.executable).with_name("mlflow")
    if script.exists():
        return [str(script)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    raise ServiceError("mlflow executable not found (pip install mlflow into this environment)")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def start_mlflow_server(backend_uri: str, artifacts_dir: str | os.PathLike, port: int | None = None, *,
                        host: str = LOCALHOST, timeout: float = 90.0,
                        log_path: str | os.PathLike | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow server`` on ``host:port`` and wait (at most ``timeout`` s) for its /health.

    Returns ``(proc, url)``; stop it with :func:`stop_process`. The server's output goes to
    ``log_path`` (default: ``<artifacts_dir>/../mlflow-server.log``) and is quoted if it fails to start.
    """
    if host != LOCALHOST:
        raise ServiceError(f"start_mlflow_server binds {LOCALHOST} only (got host={host!r})")
    artifacts = Path(artifacts_dir).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else artifacts.parent / "mlflow-server.log"
    last_error = ""
    # A port from free_port() can be taken by someone else before the server binds it: retry a few.
    for _attempt in range(3 if port is None else 1):
        chosen = port or free_port(host)
        cmd = _mlflow_executable() + [
            "server", "--backend-store-uri", backend_uri,
            "--artifacts-destination", artifacts.as_uri(),
            "--host", host, "--port", str(chosen), "--workers", "1",
        ]
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        url = f"http://{host}:{chosen}"
        if wait_http(f"{url}/health", timeout=timeout, proc=proc):
            return proc, url
        code = proc.poll()
        stop_process(proc)
        last_error = (f"mlflow server on {url} {'exited with ' + str(code) if code is not None else 'did not answer /health'}"
                      f" within {timeout:.0f} s; log {log}:\n{_tail(log)}")
        if code is None or "in use" not in _tail(log, 2000):
            break  # only a lost race for the port is worth another try
    raise ServiceError(last_error)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """Stop ``proc`` and its process group: SIGTERM, then SIGKILL after ``timeout`` s. Returns its exit code.

    Only the group led by ``proc`` (it must have been started with ``start_new_session=True``) is signalled;
    for a process that is not a group leader only the process itself is.
    """
    try:
        own_group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        # Already reaped: its group may live on in forked children (a PID is not reused while it names a group).
        own_group = process_group_alive(proc.pid)

    def _signal(sig: int) -> None:
        try:
            if own_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        _signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(signal.SIGKILL)
            proc.wait(timeout=timeout)
    if own_group:
        # Workers the parent forked may outlive it: give them the same grace, then kill what is left.
        _wait_group_gone(proc.pid, timeout)
        if process_group_alive(proc.pid):
            _signal(signal.SIGKILL)
            _wait_group_gone(proc.pid, 5.0)
    return proc.returncode


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while process_group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def process_group_alive(pgid: int) -> bool:
    """True while any non-zombie process of group ``pgid`` exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also sees zombies, which nobody may reap in a container whose PID 1 is not an init: ask /proc.
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
