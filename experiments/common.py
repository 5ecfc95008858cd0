"""What every stage shares: the data section, stage folders and their result files, MLflow logging glue.

A stage writes into its own folder ``<out>/<stage>/``::

    model/          the speaker model (svlib model folder) the next stage starts from
    head.safetensors  the AAM classifier weights (training stages), so the next stage can continue them
    ckpt/           training checkpoints (resume)
    result.json     written last: its presence means the stage is complete (the pipeline skips it)

Under ``torchrun`` every rank runs the pipeline. Training and distillation run on all ranks (DDP); whatever
writes a stage folder, evaluates or talks to MLflow runs on rank 0 only, and the other ranks wait for it in
:func:`rank_zero_result` / :func:`share_from_rank_zero`, a broadcast of rank 0's result that doubles as the
stage's barrier: a rank leaves it only after rank 0 has written the folder, and then holds the same record.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from svlib.config import ConfigError, check_relative, save_config
from svlib.data.lists import DataDir, ListError, Trials, read_trials
from svlib.files import write_json
from svlib.train.engine import setup_distributed

RESULT = "result.json"
LOCK = ".svlib.lock"   # <out_dir>/.svlib.lock: held by the pipeline running there (see exclusive_out_dir)
T = TypeVar("T")


@dataclass
class DataConfig:
    """Kaldi-style data dirs and trial lists, relative to the repo root (``make prepare`` writes them)."""

    train: str | None = None
    val: str | None = None
    val_trials: str | None = None
    test: str | None = None
    test_trials: dict[str, str] = field(default_factory=dict)  # name -> trial list
    noise_list: str | None = None  # `name category path` (prepare musan)
    rir_list: str | None = None    # `name category path` (prepare rirs)

    def __post_init__(self) -> None:
        for key in ("train", "val", "val_trials", "test", "noise_list", "rir_list"):
            check_relative(getattr(self, key), f"data.{key}")
        for name, path in self.test_trials.items():
            check_relative(path, f"data.test_trials.{name}")

    def load_dir(self, key: str) -> DataDir:
        path = getattr(self, key)
        if path is None:
            raise ValueError(f"data.{key} is not set in the config")
        return DataDir.load(path)

    def validation(self) -> tuple[DataDir, Trials] | None:
        if self.val is None or self.val_trials is None:
            return None
        return self.load_dir("val"), read_trials(self.val_trials)

    def tests(self) -> tuple[DataDir, dict[str, Trials]] | None:
        if self.test is None or not self.test_trials:
            return None
        return self.load_dir("test"), {name: read_trials(path) for name, path in self.test_trials.items()}

    def check_inputs(self) -> None:
        """Every path the pipeline will read, checked before its first stage, so a misspelled ``data.test``
        costs a second, not an s1 training: data dirs hold ``wav.scp`` and ``utt2spk``, lists exist, and every
        utterance of a trial list is in its data dir. One :class:`ConfigError` lists every problem."""
        problems = []
        for key in ("train", "val", "test"):
            path = getattr(self, key)
            if path is None:
                continue
            if not Path(path).is_dir():
                problems.append(f"data.{key}: {path}: no such data directory")
            elif missing := [name for name in ("wav.scp", "utt2spk") if not (Path(path) / name).is_file()]:
                problems.append(f"data.{key}: {path}: no {' or '.join(missing)} in it")
        trial_lists = [("val_trials", self.val_trials, "val")]
        trial_lists += [(f"test_trials.{name}", path, "test") for name, path in self.test_trials.items()]
        for key, path, _ in trial_lists + [("noise_list", self.noise_list, None), ("rir_list", self.rir_list, None)]:
            if path is not None and not Path(path).is_file():
                problems.append(f"data.{key}: {path}: no such file")
        if problems:
            raise ConfigError("; ".join(problems))
        loaded: dict[str, set[str]] = {}  # data dir key -> its utterances, each dir read once
        for key, path, dir_key in trial_lists:
            if path is None or getattr(self, dir_key) is None:
                continue
            try:
                if dir_key not in loaded:
                    loaded[dir_key] = set(DataDir.load(getattr(self, dir_key)).utt2spk)
                unknown = sorted(read_trials(path).utterances - loaded[dir_key])
            except ListError as err:
                problems.append(f"data.{key}: {err}")
                continue
            if unknown:
                problems.append(f"data.{key}: {path}: {len(unknown)} utterance(s) not in data.{dir_key} "
                                f"({getattr(self, dir_key)}), e.g. {unknown[0]!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    def list_files(self) -> list[str]:
        paths = [self.train, self.val, self.val_trials, self.test, self.noise_list, self.rir_list]
        return [p for p in paths + list(self.test_trials.values()) if p is not None and os.path.exists(p)]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_process_group(timeout_minutes: float | None = None) -> tuple[int, int]:
    """Join the torchrun process group if there is one (idempotent); returns (rank, world size).

    ``timeout_minutes`` bounds every collective, the waits for rank 0 included: it must exceed the longest
    rank-0-only step (a test-set evaluation). None: ``SVLIB_DIST_TIMEOUT_MINUTES`` or torch's default.
    """
    rank, world, _ = setup_distributed(timeout_minutes=timeout_minutes)
    return rank, world


def setup_stage_device(name: str = "auto", timeout_minutes: float | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one; returns (rank, world size, this rank's device)."""
    rank, world, local_rank = setup_distributed(timeout_minutes=timeout_minutes)
    device = pick_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per rank under torchrun
    return rank, world, device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankError(RuntimeError):
    """Raised on the other ranks when rank 0 failed in work only it does; the message is rank 0's error."""


@dataclass
class _Failure:
    message: str


def share_from_rank_zero(value: T) -> T:
    """Collective: every rank returns rank 0's ``value`` (the others pass anything, e.g. None).

    A broadcast from rank 0, so it is also a barrier the other ranks leave only once rank 0 got here. If rank 0
    sends a failure (see :func:`rank_zero_result`), the other ranks raise :class:`RankError` with its message.
    """
    rank, world = rank_and_world()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], _Failure) and rank != 0:
        raise RankError(f"rank 0 failed: {box[0].message}")
    return box[0]


def rank_zero_result(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only; every rank returns its result (see :func:`share_from_rank_zero`).

    If ``work`` raises, rank 0 first tells the others (they raise :class:`RankError` naming the error instead of
    waiting in the broadcast until the process-group timeout) and then re-raises.
    """
    rank, world = rank_and_world()
    if world == 1:
        return work()
    if rank != 0:
        return share_from_rank_zero(None)
    try:
        value = work()
    except BaseException as err:
        share_from_rank_zero(_Failure(f"{type(err).__name__}: {err}"))
        raise
    return share_from_rank_zero(value)


class OutDirBusy(RuntimeError):
    """Another pipeline holds the out_dir's lock (the message names its host and PID), or the ranks do not see
    one shared folder."""


def _lock_holder() -> str:
    return f"host {socket.gethostname()} pid {os.getpid()}"


@contextlib.contextmanager
def exclusive_out_dir(out: Path):
    """Collective: hold ``<out>/.svlib.lock`` for the block, one pipeline per out_dir.

    Two pipelines writing the same stage folders corrupt each other (a stage's result.json from one run beside
    the other's model, a hang in a collective), and killing a torchrun parent used to leave its ranks running,
    so "kill it and rerun" made exactly that. Rank 0 takes an exclusive ``flock`` (released by the kernel when
    its process dies, so a kill leaves no stale lock; on NFS Linux maps it to a POSIX lock the server keeps)
    and writes its host and PID into the file; the others raise :class:`OutDirBusy` naming that holder. Every
    other rank then reads the file: seeing rank 0's line proves the out_dir is one folder shared by all nodes
    (stage folders written by rank 0 are read by every rank), anything else is an error."""
    rank, _ = rank_and_world()
    path = out / LOCK
    handle: list[int] = []

    def acquire() -> str:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not written its name yet"
            os.close(fd)
            raise OutDirBusy(f"{out}: another pipeline is running on this out_dir ({holder}); wait for it or stop "
                             "it, or give another out_dir") from None
        holder = _lock_holder()
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{holder}\n".encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # releases the lock too
            raise
        handle.append(fd)
        return holder

    holder = rank_zero_result(acquire)
    try:
        if rank != 0:
            seen = path.read_text().strip() if path.is_file() else "no lock file"
            if seen != holder:
                raise OutDirBusy(f"{out}: rank {rank} ({_lock_holder()}) reads {seen!r} in {LOCK}, but rank 0 "
                                 f"wrote {holder!r}: out_dir must be one folder shared by every node")
        yield holder
    finally:
        for fd in handle:
            os.close(fd)  # closing the descriptor releases the flock


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def interrupt_on_sigterm():
    """SIGTERM (a scheduler's stop, ``kill``, torchrun stopping the job) unwinds like Ctrl-C inside the block:
    ``finally`` clauses and context managers run, so MLflow runs are closed and locks released, instead of the
    process vanishing with its runs left RUNNING."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def release_memory() -> None:
    """Collect garbage and hand the freed heap back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    A long-lived process that runs stage after stage (a sweep's ranks, trial after trial) otherwise keeps the
    high-water mark of its largest stage as resident memory: glibc keeps freed blocks of its heap for reuse, so
    the next stage's memory adds to what the last one freed but never returned."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def leave_process_group() -> None:
    """Tear the process group down at the end of a torchrun job (torch warns about a group left open).

    The barrier first: a rank that destroys its gloo group while a peer is still finishing its last collective
    can abort the peer at exit ("terminate called without an active exception", exit code -6)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def read_result(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(stage_dir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(stage_dir: str | os.PathLike, result: dict[str, Any]) -> Path:
    return write_json(Path(stage_dir) / RESULT, result)


def write_stage_config(stage_dir: Path, cfg: Any, tracker=None) -> None:
    """The resolved stage config, written (and logged) by rank 0 only: every rank calls this."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    if rank_and_world()[0] != 0:
        return
    save_config(cfg, stage_dir / "config.yaml")
    if tracker is not None:
        tracker.log_artifact(stage_dir / "config.yaml")


def metrics_of(results: dict[str, dict], prefix: str = "") -> dict[str, float]:
    """``{list: summary}`` -> flat MLflow metrics ``{prefix}{list}_eer_pct`` etc. (scores left out)."""
    flat = {}
    for name, summary in results.items():
        for key in ("eer_pct", "mindcf_0.01", "mindcf_0.05"):
            flat[f"{prefix}{name}_{key}"] = float(summary[key])
            # speaker-level bootstrap interval (svlib.scoring.bootstrap.ci_fields), when evaluated with one
            ci = summary.get("eer_ci_pct" if key == "eer_pct" else f"{key}_ci")
            if ci is not None:
                flat[f"{prefix}{name}_{key}_ci_low"], flat[f"{prefix}{name}_{key}_ci_high"] = map(float, ci)
    return flat


# stage kinds whose ``model/`` folder is a speaker model the next user can embed with (a classification prune1's
# model/ holds the dense, unmasked encoder beside its gates: not a model of its own)
MODEL_KINDS = ("train", "merge", "graft")


def log_stage_results(tracker, name: str, kind: str, stage_dir: Path, record: dict[str, Any], params: Any = None,
                      scored_model: str | None = None) -> str | None:
    """Rank 0, inside the stage's MLflow run: the stage's model folder as a logged model (stages of
    :data:`MODEL_KINDS`, named ``name``, with the stage's params) and the runs table's result columns
    (``svlib.tracking.stage_headline``: val / test EER with intervals, minDCF, size, minutes), which are also the
    metrics of that model, or of ``scored_model`` (the model id an evaluation stage scored). Returns the new
    model's id (None: the stage wrote no model, or MLflow failed to take it)."""
    from svlib.model.speaker import MANIFEST
    from svlib.tracking import stage_headline

    model_id = None
    if kind in MODEL_KINDS and (stage_dir / "model" / MANIFEST).is_file():
        model_id = _logged_model(tracker, stage_dir, name, kind, params)
    tracker.log_metrics(stage_headline(record), model_id=model_id or scored_model)
    return model_id


LOGGED_MODEL = "mlflow_model.json"  # <stage>/mlflow_model.json: the stage's logged model, per tracking store


def _logged_model(tracker, stage_dir: Path, name: str, kind: str, params: Any) -> str | None:
    """The id of ``stage_dir``'s model as a logged model of ``tracker``'s store: the one logged earlier (a rerun
    skips the finished stage, and must not upload its 2.3 GB folder again for every rerun), else a new upload.
    A failed upload (quota, an upload limit) is a warning: the stage's work is done and on disk."""
    import logging

    record_path = stage_dir / LOGGED_MODEL
    known = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if known.get(tracker.tracking_uri):
        return known[tracker.tracking_uri]
    try:
        model_id = tracker.log_model(stage_dir / "model", name, params, tags={"stage": name, "kind": kind})
    except Exception as err:  # noqa: BLE001
        logging.getLogger("experiments").warning("stage %s: its model was not logged to MLflow: %s", name, err)
        return None
    if model_id is not None:
        write_json(record_path, known | {tracker.tracking_uri: model_id})
    return model_id


def max_relative_diff(reference, other) -> float:
    """``max_i max|r_i - o_i| / max|r_i|`` over tensors (or one tensor): the equality checks of merge, shrink
    and graft. Float32 re-association error grows with the activations' size (an absolute 1e-4 trips at full
    size on a correct model), so each tensor's difference is measured against its own largest magnitude."""
    pairs = zip(reference, other) if isinstance(reference, (list, tuple)) else [(reference, other)]
    return max(((r - o).abs().max() / r.abs().max().clamp_min(1e-30)).item() for r, o in pairs)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def minutes(self) -> float:
        return (time.perf_counter() - self.start) / 60.0


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> str:
    """A plain fixed-width table (also returned, for logs)."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ([title] if title else []) + ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
