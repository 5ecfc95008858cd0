"""The training loop: one function, read it top to bottom.

``train(model, head, loader, cfg, out_dir)`` runs ``cfg.steps`` optimizer updates of ``head(model(waves,
lengths), labels)`` with AdamW (separate learning rates for the front-end and everything else), optional
AMP, gradient clipping, an LR schedule and a margin schedule that are pure functions of the step, periodic
checkpoints and validation-based model selection (``best.pt``).

Epochs. A config may give ``epochs`` instead of ``steps`` (and the schedule's lengths, ``val_every`` and
``ckpt_every`` in epochs too). They are converted when ``train`` starts, from the loader's
``steps_per_epoch`` = floor(copies x utterances / (batch size x world size)) (``svlib.data.sampling``), so
one stage config gives the reference's step counts on whatever number of GPUs the stage runs on; both the
epochs and the steps are printed and returned (``TrainResult.steps``, ``.steps_per_epoch``, ``.epochs``).

AMP. ``amp: bf16`` runs the forward under ``torch.autocast`` in bfloat16 on CUDA and on CPU; ``fp16`` (which
needs a loss scaler) only on CUDA, and in float32 elsewhere.

Exact resume. Everything that decides update k+1 after update k is either in the checkpoint or a pure
function of k: weights, optimizer moments, grad-scaler state, the loader position (batch i is a function of
(seed, i, rank)), the RNG states of every rank, and the best validation metric so far. Batches are fetched
with the CPU RNG forked, so the loader (torch's DataLoader seeds its workers from the global generator)
cannot shift the training streams between a fresh and a resumed run. Learning rate and margin are
recomputed from the step. So ``train(steps=k)`` followed by ``train(steps=n, resume=True)``
performs the same arithmetic as ``train(steps=n)``: on CPU the final weights are bitwise equal.

Distributed. Launch with ``torchrun``; call ``setup_distributed()`` before building the loader (it needs
the rank). When a process group exists, ``train`` wraps model and head together in one
DistributedDataParallel (the head's class weights are trained too, so they must be all-reduced as well).
Every rank computes; only rank 0 logs, selects the best model and writes files. ``validate`` is called on
every rank that was given one (all ranks at once, so it may use collectives: ``svlib.evaluate`` embeds
each rank's shard of the validation list and gathers on rank 0); only rank 0's metrics are used.
``setup_distributed(timeout_minutes)`` sets the process group's collective timeout (NCCL's watchdog).
DDP is built with ``gradient_as_bucket_view=True``: the gradients are views into DDP's all-reduce buckets
instead of a second copy of them (one full copy of the gradients less per rank, 2.3 GB for the 580M model).
Clipping, the grad scaler and AdamW work on them in place; after ``zero_grad(set_to_none=True)`` the next
backward makes them bucket views again. The arithmetic, and so exact resume, are unchanged.

Optimizer memory. AdamW is torch's default implementation (``ADAMW_IMPL``): on CPU a per-parameter loop that
allocates no full-size temporary (+0.05 GiB peak over 200M float32 parameters), on CUDA the for-each one (+one
full-size temporary in the step). ``optim.zero: true`` (ZeRO stage 1) shards the AdamW
moments over the ranks: ``torch.distributed.optim.ZeroRedundancyOptimizer`` gives each rank the moments of about
1/world of the parameters (whole tensors, greedily balanced per group); it updates them and broadcasts them to the
other ranks, so every rank still holds all weights and all gradients (DDP all-reduces them as before; clipping
uses the global norm over all of them). Saved per rank: 2 x params x 4 bytes x (1 - 1/world) (580M: 2.16 GiB on
2 ranks, 3.8 GiB on 8), for one more broadcast of the weights per step. The update of each parameter is the same
AdamW arithmetic on its owner: on CPU a zero run's weights equal a plain one's bitwise. Checkpoints keep the full
optimizer state dict (``save`` gathers the shards on rank 0, tensor by tensor, see ``ZeroAdamW``), so a
checkpoint of a zero run resumes with or without zero, on any number of ranks, and the other way round. Without
a process group (one rank: nothing to shard) ``zero`` is ignored, logged once. On resume the hyperparameters and
the implementation (``fused``, ``foreach``) come from the config and the code, never from the checkpoint; only the moments
and step counts are state. The loaded checkpoint is dropped as soon as it is applied (the model weights in it
would otherwise stay alive for the whole run).

A failure on one rank ends the step on every rank with its reason, never a hang. Every step agrees twice,
before its forward and before its backward: each rank catches an ``Exception`` from fetching its batch (a
corrupt file in its shard), moving it to the device and augmenting it, resp. from its forward and loss, then all
ranks all-reduce a one-element failed-or-not flag; if any rank failed, every rank gathers the failing ranks'
one-line reasons and raises ``RankFailure`` (``rank 1 failed at step 4 (batch): OSError: ...``, lowest rank
first; on a failing rank the original exception is its ``__cause__``). Starting the loader (and replaying it on
resume) is agreed on the same way, once. Twice per step, not once, because DDP's forward runs collectives itself
(the buffer broadcast, the one-off bucket rebuild): all ranks must enter it, or none. The process group stays
usable: every rank took part in the same collectives, and the abandoned step's DDP reducer is disarmed (else its
hooks would all-reduce in the next wrapper's backward of the same parameters), so the next ``train()`` (the
next trial of a sweep) runs on the same group. The flag travels on gloo, on the CPU: on the default group when
that is gloo, else on a gloo group over the same ranks that the first ``train()`` creates on every rank (once per
default group, with the timeout ``setup_distributed`` was given). Under NCCL a flag on the default group would
make the host wait for the GPU's queue every step; the gloo flag costs two tiny CPU all-reduces per step (well
under a millisecond each on one node: 0.6 ms between two ranks of a busy 2-core machine) while the batch and
the forward stay queued on the device. KeyboardInterrupt and SystemExit are not caught. Not covered: a failure
inside the backward or the optimizer step of one rank (e.g. a CUDA out-of-memory error in the backward), in a
checkpoint write or a validation with collectives, or a rank that dies, still leaves the other ranks waiting in
their collective until the process-group timeout. Without a process group there is no agreement: exceptions
propagate as they are.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from svlib.config import ConfigError, to_dict
from svlib.losses import MarginSchedule
from svlib.train.checkpoint import (checkpoint_name, latest_checkpoint, list_checkpoints, load_checkpoint,
                                    prune_checkpoints, save_checkpoint)
from svlib.train.schedules import ScheduleConfig, apply_lr, epochs_to_steps, lr_factor

DEFAULT_STEPS = 1000  # when a config gives neither steps nor epochs
TIMEOUT_ENV = "SVLIB_DIST_TIMEOUT_MINUTES"
MAX_LISTED_FAILURES = 4  # a RankFailure names at most this many failing ranks (the rest are counted)


@dataclass
class OptimConfig:
    lr_frontend: float = 5e-5
    lr_backend: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # ZeRO stage 1 under a process group of W > 1 ranks: each rank keeps AdamW's two float32 moments for ~1/W of
    # the parameters only, saving 2 x params x 4 bytes x (1 - 1/W) per rank (580M params: 2.16 GiB at W=2,
    # 3.8 GiB at W=8); checkpoints still hold the full optimizer state. Ignored (logged once) without a group.
    zero: bool = False

    def __post_init__(self) -> None:
        # a negative learning rate trains, uphill, without a word: every bound here is an error up front
        for name in ("lr_frontend", "lr_backend", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")


@dataclass
class TrainConfig:
    steps: int | None = None           # optimizer updates; or give ``epochs``; neither: DEFAULT_STEPS
    epochs: float | None = None        # converted to steps at the start (see the module docstring)
    log_every: int = 10
    ckpt_every: int = 500
    ckpt_every_epochs: float | None = None   # instead of ckpt_every
    keep_checkpoints: int = 3          # step checkpoints kept on disk (best.pt is separate); 0 keeps all
    val_every: int = 0                 # 0: never validate
    val_every_epochs: float | None = None    # instead of val_every
    val_metric: str = "eer_pct"        # key of the dict returned by ``validate``
    val_mode: Literal["min", "max"] = "min"
    grad_clip: float = 5.0             # max global grad norm; 0 disables clipping
    amp: Literal["off", "bf16", "fp16"] = "off"
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    margin: MarginSchedule | None = None   # None: leave the head's margin as constructed
    seed: int = 42
    find_unused_parameters: bool = False   # DDP: set when some trainable parameters get no gradient
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "epochs", "log_every", "ckpt_every", "ckpt_every_epochs", "val_every_epochs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.val_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("val_every and keep_checkpoints must be >= 0")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        if self.val_every_epochs is not None and self.val_every:
            raise ValueError("give val_every or val_every_epochs, not both")

    @property
    def in_epochs(self) -> bool:
        """Whether some length is in epochs: ``in_steps`` needs the data's steps per epoch."""
        return (self.epochs is not None or self.ckpt_every_epochs is not None or self.val_every_epochs is not None
                or self.schedule.in_epochs)

    def in_steps(self, steps_per_epoch: int | None = None) -> "TrainConfig":
        """The same config with every length in steps (``round(epochs * steps_per_epoch)``, at least 1)."""
        if self.in_epochs and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(f"the config gives lengths in epochs but steps_per_epoch is {steps_per_epoch} "
                             "(the loader must have a steps_per_epoch attribute)")

        def steps_of(epochs: float | None, default: int | None) -> int | None:
            return default if epochs is None else max(1, epochs_to_steps(epochs, steps_per_epoch))

        return replace(self, steps=steps_of(self.epochs, self.steps or DEFAULT_STEPS), epochs=None,
                       ckpt_every=steps_of(self.ckpt_every_epochs, self.ckpt_every), ckpt_every_epochs=None,
                       val_every=steps_of(self.val_every_epochs, self.val_every), val_every_epochs=None,
                       schedule=self.schedule.in_steps(steps_per_epoch) if self.schedule.in_epochs else self.schedule)


@dataclass
class TrainResult:
    best_metric: float | None
    best_step: int | None
    final_step: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    checkpoints: list[Path]
    steps: int | None = None               # the run's length in steps (after any epoch conversion)
    steps_per_epoch: int | None = None     # the loader's, at this world size (None: the loader has none)
    epochs: float | None = None            # steps / steps_per_epoch


def resolve_config(cfg: TrainConfig, loader, world_size: int = 1) -> tuple[TrainConfig, int | None, str]:
    """``cfg`` in steps for this ``loader`` (its ``steps_per_epoch`` at the current world size), the steps per
    epoch, and a one-line description of the conversion for the log."""
    spe = getattr(loader, "steps_per_epoch", None)
    resolved = cfg.in_steps(spe)
    parts = [f"{resolved.steps} steps"]
    if spe:
        parts.append(f"{spe} steps/epoch at world size {world_size} = {resolved.steps / spe:.4g} epochs")
    sched = resolved.schedule
    if cfg.in_epochs:
        given = {k: v for k, v in (("epochs", cfg.epochs), ("warmup_epochs", cfg.schedule.warmup_epochs),
                                   ("step_size_epochs", cfg.schedule.step_size_epochs),
                                   ("decay_epochs", cfg.schedule.decay_epochs),
                                   ("val_every_epochs", cfg.val_every_epochs),
                                   ("ckpt_every_epochs", cfg.ckpt_every_epochs)) if v is not None}
        parts.append("from " + ", ".join(f"{k}={v:g}" for k, v in given.items()))
        parts.append(f"warmup_steps={sched.warmup_steps}, step_size={sched.step_size}, decay_steps={sched.decay_steps}, "
                     f"val_every={resolved.val_every}, ckpt_every={resolved.ckpt_every}")
    return resolved, spe, "; ".join(parts)


# ---------------------------------------------------------------------------------------------- distributed

def dist_timeout(timeout_minutes: float | None = None) -> timedelta | None:
    """The collective timeout: ``timeout_minutes``, else env ``SVLIB_DIST_TIMEOUT_MINUTES``, else None (torch's
    default, 10 minutes for NCCL)."""
    if timeout_minutes is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return None
        try:
            timeout_minutes = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of minutes") from None
    if not timeout_minutes > 0 or not math.isfinite(timeout_minutes):
        raise ValueError(f"the process-group timeout must be a positive number of minutes, got {timeout_minutes}")
    return timedelta(minutes=timeout_minutes)


def setup_distributed(timeout_minutes: float | None = None) -> tuple[int, int, int]:
    """Join the process group described by torchrun's env vars; returns (rank, world_size, local_rank).

    Without ``WORLD_SIZE > 1`` nothing is initialised and (0, 1, 0) is returned, so the same script runs
    under plain ``python`` and under ``torchrun``. ``timeout_minutes`` (or env ``SVLIB_DIST_TIMEOUT_MINUTES``)
    bounds how long a collective waits for the other ranks (``init_process_group(timeout=...)``).
    """
    global _group_timeout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = dist_timeout(timeout_minutes)
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
        _group_timeout = timeout
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun
            exit_with_launcher(rank)
    return rank, world, local_rank


LAUNCHER_GRACE_SECONDS = 30.0  # after its SIGTERM, how long an orphaned rank may take to unwind before it exits


def exit_with_launcher(rank: int, poll_seconds: float = 1.0, grace_seconds: float = LAUNCHER_GRACE_SECONDS) -> None:
    """End this rank when the process that launched it dies.

    torchrun's agent stops its workers when it is stopped itself, but a SIGKILL (or an OOM kill) of the agent
    leaves them orphaned: they run on, write stage folders and hold the out_dir's lock, and a rerun then races
    them. A daemon thread polls the parent PID; once it changes (the orphan was re-parented), the rank sends
    itself SIGTERM, which unwinds like Ctrl-C where a caller installed that (MLflow runs closed, locks released),
    and exits outright after ``grace_seconds`` if that is stuck (e.g. in a collective with a dead peer)."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        print(f"rank {rank}: its launcher (pid {launcher}) is gone; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="svlib-launcher-watch", daemon=True).start()


_group_timeout: timedelta | None = None  # what setup_distributed gave init_process_group (the side group's too)
_agreement: tuple[Any, Any] | None = None  # (default group, the group its step agreements run on)


class RankFailure(RuntimeError):
    """A step failed on some rank: raised on every rank, in one line naming the failing ranks (lowest first),
    the step and the reasons, e.g. ``rank 1 failed at step 4 (batch): OSError: utt_x.wav: cannot decode``.

    ``step`` is the update that failed, counted from 1 as the log and the checkpoints count them (step 4: three
    updates were done); the phase is ``loader`` (starting the loader), ``batch`` (fetching, moving and
    augmenting the batch) or ``forward``. ``failures`` maps each failing rank to its ``Type: message``. On a
    failing rank the original exception is ``__cause__``. The process group remains usable."""

    def __init__(self, message: str, step: int | None = None, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.step = step
        self.failures = dict(failures or {})


def _agreement_group():
    """The group the step agreements run on (collective the first time per default group): the default group
    itself when it runs on gloo, else a gloo group over all ranks, so the flag never waits for a GPU."""
    global _agreement
    default = dist.group.WORLD
    if _agreement is None or _agreement[0] is not default:  # a new default group: a new side group
        group = None
        if str(dist.get_backend()).lower() != dist.Backend.GLOO:
            timeout = _group_timeout or dist_timeout()
            group = dist.new_group(backend=dist.Backend.GLOO, **({"timeout": timeout} if timeout else {}))
        _agreement = (default, group)
    return _agreement[1]


def one_line(err: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line; a multi-line message (a DataLoader worker's, which carries the worker's
    traceback) keeps its first and its last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


@contextmanager
def _agreed(group, world: int, step: int, phase: str):
    """Run the ``with`` body as one phase of a step every rank must agree on: alone, an exception propagates as
    it is; under a process group it is held until every rank has run the body, then :func:`_agree` raises
    ``RankFailure`` on every rank if any one failed."""
    error = None
    try:
        yield
    except Exception as exc:
        if world == 1:
            raise
        error = exc
    if world > 1:
        _agree(group, error, step, phase)


def _agree(group, error: Exception | None, step: int, phase: str) -> None:
    """Collective over all ranks: return if no rank's ``error`` is set, else raise ``RankFailure`` on every rank.

    One int all-reduce on ``group`` (gloo, CPU) per call; the one-line reasons are gathered only on a failure."""
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return
    reasons: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(reasons, None if error is None else one_line(error), group=group)
    failures = {r: reason for r, reason in enumerate(reasons) if reason is not None}
    listed = [f"rank {r} failed at step {step} ({phase}): {reason}"
              for r, reason in list(failures.items())[:MAX_LISTED_FAILURES]]
    if len(failures) > MAX_LISTED_FAILURES:
        listed.append(f"and {len(failures) - MAX_LISTED_FAILURES} more rank(s)")
    failure = RankFailure("; ".join(listed), step=step, failures=failures)
    if error is not None:
        raise failure from error
    raise failure


def _disarm(net: nn.Module) -> None:
    """Remove the autograd hooks of a DDP whose step was abandoned: after a forward without its backward, the
    reducer still expects one, and while the wrapper lives (an exception's traceback holds it) its hooks on the
    parameters would all-reduce in the next wrapper's backward, on this rank only."""
    remove = getattr(net, "_remove_autograd_hooks", None)
    if remove is not None:
        try:
            remove()
        except Exception:  # never hide the exception being raised
            pass


def autocast(amp: str, device: torch.device | str):
    """The forward's precision context: bf16 autocast on any device, fp16 on CUDA only, else a no-op."""
    device = torch.device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None or (dtype is torch.float16 and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------- helpers

def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (e.g. before building a model)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_seed_everything = seed_everything


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy arrays are not allowed by weights_only loading; the MT19937 key fits a tensor exactly
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (collective): each rank draws its own dropout masks, augmentation, etc."""
    rank, world = _dist()
    mine = _rng_state()
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


# torch's default AdamW implementation (CPU: the per-parameter loop, no full-size temporaries; CUDA: for-each, one
# full-size temporary in the step, which a GPU holds easily). The fused one is ~4x faster on CPU and allocates
# nothing, but rounds differently (2e-7 after 20 steps): every committed training number (bench/results) was made
# with the default, and the same seed must give the same numbers. Both switches are named so that resuming a
# checkpoint takes them from here, not from the checkpoint (see ``train``).
ADAMW_IMPL = {"fused": None, "foreach": None}

_zero_ignored_logged = False  # ``optim.zero`` without a process group is logged once per process


def build_optimizer(model: nn.Module, head: nn.Module, cfg: OptimConfig,
                    param_groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """AdamW with groups ``frontend`` (``model.frontend``) and ``backend`` (the rest of the model + head).

    Frozen parameters are left out, so LoRA / pruning stages only pay optimizer memory for what they train.
    ``param_groups`` replaces the two default groups: a list of ``{"name", "params", "lr"[, "weight_decay"]}``
    (pruning trains weights, gate log-alphas and Lagrange multipliers at three rates, one of them negative).
    Their lr is the base lr the schedule multiplies; ``weight_decay`` defaults to ``cfg.weight_decay``.

    With ``cfg.zero`` under a process group of more than one rank the AdamW is sharded over the ranks
    (``ZeroAdamW``, same groups and keys); its ``param_groups`` are all the groups with all their parameters, and
    changes to their ``lr`` reach each rank's own AdamW at its next step. Without a process group ``zero`` is
    ignored.
    """
    if param_groups is not None:
        groups = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            if params:
                groups.append({**group, "params": params, "base_lr": group["lr"],
                               "weight_decay": group.get("weight_decay", cfg.weight_decay)})
        if not groups:
            raise ValueError("no trainable parameters in param_groups")
        # AdamW validates only its default lr (a negative group lr, gradient ascent, is accepted per group)
        return _adamw(groups, cfg, lr=0.0)
    frontend = getattr(model, "frontend", None)
    front_ids = {id(p) for p in frontend.parameters()} if isinstance(frontend, nn.Module) else set()
    front, back, seen = [], [], set()
    for p in list(model.parameters()) + list(head.parameters()):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (front if id(p) in front_ids else back).append(p)
    groups = [{"name": name, "params": params, "lr": lr, "base_lr": lr}
              for name, params, lr in (("frontend", front, cfg.lr_frontend), ("backend", back, cfg.lr_backend))
              if params]
    if not groups:
        raise ValueError("no trainable parameters (everything has requires_grad=False)")
    return _adamw(groups, cfg)


def _adamw(groups: list[dict], cfg: OptimConfig, **defaults: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` over ``groups``, sharded (``ZeroAdamW``) where ``cfg.zero`` and a group of > 1 ranks."""
    global _zero_ignored_logged
    kwargs = dict(defaults, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **ADAMW_IMPL)
    if cfg.zero and _dist()[1] > 1:
        return _zero_adamw_class()(groups, **kwargs)
    if cfg.zero and not _zero_ignored_logged:
        _zero_ignored_logged = True
        print("[train] optim.zero ignored: no process group of more than one rank (one rank: nothing to shard)")
    return torch.optim.AdamW(groups, **kwargs)


_zero_adamw: type | None = None


def _zero_adamw_class() -> type:
    """``ZeroAdamW`` on torch's ``ZeroRedundancyOptimizer``, made on first use: importing ``torch.distributed.optim``
    takes 0.7 s and raises 67 DeprecationWarnings (torch.jit), which runs without ``zero`` need not pay."""
    global _zero_adamw
    if _zero_adamw is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.distributed.optim import ZeroRedundancyOptimizer
        _zero_adamw = type("ZeroAdamW", (ZeroAdamW, ZeroRedundancyOptimizer), {"__module__": __name__})
    return _zero_adamw


class ZeroAdamW:
    """ZeRO stage 1 AdamW (``optimizer_class=torch.optim.AdamW``) whose consolidation moves tensors, not pickles.

    The methods here complete torch's ``ZeroRedundancyOptimizer`` (``_zero_adamw_class()`` makes the class;
    ``isinstance(optimizer, ZeroAdamW)`` tells a sharded optimizer).

    torch's ``consolidate_state_dict`` pickles each rank's whole shard into one byte tensor (by way of a Python
    bytearray) and broadcasts it, and the target keeps its copies until the next consolidation. Measured on 2 gloo
    ranks with 100.8M parameters (0.38 GiB of moments per rank): +4.1 GiB peak RSS on the sending rank, +1.1 GiB
    on rank 0, which keeps 0.38 GiB, 45 s; for the 580M student that would be tens of GiB at every checkpoint.
    Here the ranks all-gather only the small part (param groups, step counts, the shapes of the moments), then
    each rank other than the target broadcasts its moments one tensor at a time (in place: no copy on the
    sender); the target keeps them (on the CPU), the other ranks drop each at once. Measured as above: +0 GiB on
    the sender, +0.38 GiB on rank 0 (the other rank's moments, which it must write), 0.5 s. ``state_dict()``
    (torch's) then assembles the full optimizer state dict on the target, in the format of a plain ``AdamW``'s;
    ``release_consolidated()`` frees the gathered copies. Neither communicates; the consolidation is a
    collective (every rank calls it).
    """

    def __init__(self, params, **defaults: Any):
        super().__init__(params, optimizer_class=torch.optim.AdamW, **defaults)

    def consolidate_state_dict(self, to: int = 0) -> None:
        self._sync_param_groups(self.param_groups, self.optim.param_groups)
        local = self.optim.state_dict()  # this rank's shard, in its local indexing (references, no copies)
        sizes = {index: {key: (tuple(value.shape), value.dtype) for key, value in entry.items()
                         if torch.is_tensor(value) and value.dim() > 0}
                 for index, entry in local["state"].items()}
        small = {"param_groups": local["param_groups"],
                 "state": {index: {key: value.cpu() if torch.is_tensor(value) else value
                                   for key, value in entry.items() if key not in sizes[index]}
                           for index, entry in local["state"].items()},
                 "sizes": sizes}
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, small, group=self.process_group)
        self._all_state_dicts = []
        for rank, theirs in enumerate(everyone):
            state = theirs["state"]
            if rank == to:
                if self.rank == to:  # the target's own moments: no communication
                    for index, tensors in theirs["sizes"].items():
                        state[index].update({key: local["state"][index][key].cpu() for key in tensors})
            else:
                source = dist.get_global_rank(self.process_group, rank)
                for index, tensors in sorted(theirs["sizes"].items()):
                    for key, (shape, dtype) in sorted(tensors.items()):
                        if rank == self.rank:
                            tensor = local["state"][index][key].contiguous()
                        else:
                            tensor = torch.empty(shape, dtype=dtype, device=self._default_device)
                        dist.broadcast(tensor, src=source, group=self.process_group)
                        if self.rank == to:
                            state[index][key] = tensor.cpu()
                        del tensor
            if self.rank == to:
                self._all_state_dicts.append({"state": state, "param_groups": theirs["param_groups"]})

    def state_dict(self) -> dict[str, Any]:
        full = super().state_dict()
        # after a resume torch's keeps None for the parameters of the other ranks; drop any their owner did not
        # replace (a parameter that never had a gradient), as a plain AdamW has no entry for it
        full["state"] = {index: entry for index, entry in full["state"].items() if entry is not None}
        return full

    def release_consolidated(self) -> None:
        """Drop the state gathered by ``consolidate_state_dict`` (the other ranks' moments, on the target)."""
        self._all_state_dicts = []

    def local_state_numel(self) -> int:
        """Elements of the moments this rank holds (its shard)."""
        return sum(v.numel() for entry in self.optim.state.values() for v in entry.values()
                   if torch.is_tensor(v) and v.dim() > 0)


def _place_state(optimizer: torch.optim.Optimizer) -> None:
    """Put this rank's loaded AdamW state where its implementation wants it: the moments on their parameter's
    device, ``step`` a float32 tensor on the parameter's device for fused (or capturable) groups, else as loaded.

    ``load_state_dict`` places ``step`` by the *checkpoint's* groups, which may disagree once ``train`` restores
    the implementation from the code (a checkpoint of another implementation), and ZeRO's moves all 0-dim state to
    the CPU, the moments of 0-dim parameters too (the Lagrange multipliers of a pruning run), where a CUDA step
    would fail. A no-op on the CPU when the dtypes agree."""
    local = getattr(optimizer, "optim", optimizer)  # ZeRO: this rank's own AdamW (its groups may lag; ours rule)
    for group in optimizer.param_groups:
        step_on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = local.state.get(p)
            for key, value in (state or {}).items():
                if not torch.is_tensor(value):
                    continue
                if key != "step" and value.device != p.device:
                    state[key] = value.to(p.device)
                elif key == "step" and step_on_device and (value.device != p.device or value.dtype != torch.float32):
                    state[key] = value.to(device=p.device, dtype=torch.float32)


class _ModelAndHead(nn.Module):
    """Model + loss head as one module so that a single DDP wrapper all-reduces both."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, waves, lengths, labels):
        return self.head(self.model(waves, lengths), labels)


def _split_output(out) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The head returns ``(loss, accuracy)`` or ``(loss, accuracy, extras)``; extras are floats or 0-d tensors to log
    (tensors are averaged on their device and read once per log window)."""
    if len(out) == 3:
        return out[0], out[1], dict(out[2])
    loss, accuracy = out
    return loss, accuracy, {}


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


# ---------------------------------------------------------------------------------------------------- loop

class ResumeError(ConfigError):
    """A checkpoint that cannot be continued in this setup (one line naming the checkpoint and what differs)."""


def check_resume_world_size(ckpt_path: Path, saved_world: int, world: int, step: int, loader,
                            in_epochs: bool) -> None:
    """Refuse to continue ``ckpt_path`` (saved at ``step`` by ``saved_world`` ranks) on ``world`` ranks where
    the number of ranks decides what step ``step`` means.

    An epoch-mode loader gives rank ``r`` the entries ``perm_e[(k W + r) B : (k W + r + 1) B]`` of epoch
    ``e = i // K`` with ``K = floor(E / (B W))``: with another ``W`` both ``K`` and the slices change, so the
    rest of the run would repeat some samples of the epoch and skip others. A config whose lengths are in
    epochs has ``steps = epochs x K``: its total and its lr schedule move under the saved step. Neither holds for
    a speaker-balanced loader with lengths in steps, whose batch ``i`` of rank ``r`` is a function of
    ``(seed, i, r)`` alone: the ranks kept continue their streams exactly (only the RNG streams of the dropped or
    added ranks restart), so that case is allowed.
    """
    if saved_world == world:
        return
    reasons = []
    if getattr(loader, "epoch_sharded", False):
        reasons.append("its epoch-mode loader shards every epoch over the ranks (samples would be repeated or "
                       "skipped)")
    if in_epochs:
        reasons.append("its lengths are in epochs (the steps and the lr schedule would change under it)")
    if reasons:
        raise ResumeError(f"{ckpt_path}: saved at step {step} by {saved_world} rank(s), resumed on {world}: "
                          f"{'; '.join(reasons)}; finish the stage on {saved_world} rank(s), or start it afresh "
                          f"(remove {ckpt_path.parent})")


def train(model: nn.Module, head: nn.Module, loader, cfg: TrainConfig, out_dir: str | os.PathLike, *,
          resume: bool = False, validate: Callable[[nn.Module], dict] | None = None,
          log: Callable[[dict, int], None] | None = None,
          augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          param_groups: list[dict] | None = None,
          after_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``model`` + ``head`` on ``loader`` for ``cfg.steps`` updates in total (see module docstring).

    ``model`` must already be on its device; ``head`` is moved there. ``validate(model)`` runs on every rank
    that passes one (pass it on all ranks or on rank 0 only), under ``torch.no_grad()`` in eval mode; on
    rank 0 it returns metrics including ``cfg.val_metric`` (other ranks' return values are ignored). It is
    the only input to model selection (never pass a test-set evaluation here). ``augment(waves, lengths)`` runs
    on the training device after the batch is moved there (noise/reverb on the GPU, not in the loader); it
    draws from the global torch RNG, which checkpoints hold, so resume stays exact.

    ``param_groups`` overrides the optimizer groups (see ``build_optimizer``); the schedule multiplies each
    group's own lr. A head may return ``(loss, accuracy, extras)``: ``extras`` (name -> float, e.g. the
    distillation terms and the sparsity of a pruning run) are averaged over the log window and logged too.

    ``after_step(step)`` runs on every rank after each update (``step`` counts the updates done), before that
    step's checkpoint: a run resumed from before step k calls it again for step k, and the hook decides whether
    to write again (prune1's snapshots keep what is already on disk). Every rank agrees that it returned: a
    failure in it on one rank stops all of them.
    """
    rank, world = _dist()
    # collective the first time (a gloo side group under NCCL): first, before anything that can raise on some ranks
    agreement = _agreement_group() if world > 1 else None
    is_main = rank == 0
    out_dir = Path(out_dir)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    in_epochs = cfg.in_epochs  # before the conversion: whether the run's length follows the world size
    cfg, spe, conversion = resolve_config(cfg, loader, world)
    if is_main:
        print(f"[train] {conversion}")
    device = next(model.parameters()).device
    head.to(device)
    seed_everything(cfg.seed + rank)

    optimizer = build_optimizer(model, head, cfg.optim, param_groups)
    zero = isinstance(optimizer, ZeroAdamW)
    if cfg.amp == "fp16" and device.type != "cuda" and is_main:
        print(f"[train] amp=fp16 needs CUDA; running in float32 on {device}")
    # Only fp16 needs loss scaling (bf16 has float32's exponent range).
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16" and device.type == "cuda")

    # ---- resume: everything the next update depends on
    step, best_metric, best_step = 0, None, None
    ckpt_path = latest_checkpoint(out_dir) if resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        check_resume_world_size(ckpt_path, int(ckpt.get("world_size", len(ckpt["rng"]))), world, ckpt["step"],
                                loader, in_epochs)
        model.load_state_dict(ckpt["model"])
        head.load_state_dict(ckpt["head"])
        # load_state_dict also restores the saved hyperparameters; the config is the truth for those (only the
        # moments and step counts are state), so a deliberately changed lr takes effect, and the code is the
        # truth for the implementation (fused): the groups get back what build_optimizer gave them. A ZeroAdamW
        # keeps the moments of its own shard only (the full state dict is what every checkpoint holds).
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, fresh in zip(optimizer.param_groups, settings):
            group.update(fresh)
        _place_state(optimizer)
        scaler.load_state_dict(ckpt["scaler"])
        step, best_metric, best_step = ckpt["step"], ckpt["best_metric"], ckpt["best_step"]
        rng = ckpt["rng"]
        if len(rng) != world and is_main:
            print(f"[train] {ckpt_path} was saved by {len(rng)} ranks, now {world}: RNG streams restart per rank")
        _set_rng_state(rng[rank] if len(rng) == world else rng[0])
        if hasattr(loader, "load_state_dict"):
            loader.load_state_dict(ckpt["loader"])
        if is_main:
            print(f"[train] resumed from {ckpt_path} at step {step}")
        del ckpt  # its model weights (and a ZeroAdamW's dropped moments) would otherwise live as long as the run
    elif resume and is_main:
        print(f"[train] resume requested but no checkpoint in {out_dir}; starting from step 0")

    net: nn.Module = _ModelAndHead(model, head)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
            gradient_as_bucket_view=True)  # the gradients are the buckets: no second copy (module docstring)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def save(step: int) -> Path:
        rng = _all_rng_states()  # collective: every rank must call save()
        if zero:
            optimizer.consolidate_state_dict(to=0)  # collective: the shards' moments gathered on rank 0
        path = out_dir / checkpoint_name(step)
        try:
            if is_main:
                save_checkpoint(path, {
                    "step": step, "model": model.state_dict(), "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "loader": loader.state_dict() if hasattr(loader, "state_dict") else {"step": step},
                    "rng": rng, "best_metric": best_metric, "best_step": best_step,
                    "world_size": world, "config": to_dict(cfg),
                })
                prune_checkpoints(out_dir, cfg.keep_checkpoints)
        finally:
            if zero:
                optimizer.release_consolidated()  # rank 0: the other ranks' moments, held only to be written
        _barrier()
        return path

    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, accuracy since the last log
    extra_sums: dict[str, float | torch.Tensor] = {}  # the head's extra metrics since the last log
    window = 0
    pbar = tqdm(total=cfg.steps, initial=step, disable=not (is_main and cfg.progress), dynamic_ncols=True)
    model.train()
    head.train()
    batches = None
    try:
        with _agreed(agreement, world, step + 1, "loader"):
            batches = iter(loader)
            if ckpt_path is not None and not hasattr(loader, "load_state_dict"):
                # A deterministic loader without saved state still resumes exactly, just slowly: replay it.
                for _ in range(step):
                    next(batches)
        t0 = time.perf_counter()
        while step < cfg.steps:
            # Every rank agrees that each one has its batch before any enters the forward (DDP's forward runs
            # collectives), and that each finished its forward before any enters the backward (the gradient
            # all-reduce): a failure on one rank raises RankFailure on all of them instead of a hang.
            with _agreed(agreement, world, step + 1, "batch"):
                # The loader must not draw from the training RNG streams: torch's DataLoader takes its workers'
                # base seed from the global generator when its iterator starts, i.e. on the first batch of every
                # run. A resumed run would draw it after the checkpoint's RNG state is restored, so every random
                # choice after a resume (dropout, hard-concrete mask samples) would be shifted against the
                # uninterrupted run.
                with torch.random.fork_rng(devices=[]):
                    try:
                        batch = next(batches)
                    except StopIteration:  # finite loaders start another epoch
                        batches = iter(loader)
                        batch = next(batches)
                waves = batch.waves.to(device, non_blocking=True)
                lengths = batch.lengths.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                if augment is not None:
                    with torch.no_grad():
                        waves = augment(waves, lengths)
            with _agreed(agreement, world, step + 1, "forward"):
                factor = lr_factor(cfg.schedule, step, cfg.steps)
                apply_lr(optimizer, factor)
                if cfg.margin is not None:
                    head.margin = cfg.margin(step)
                with autocast(cfg.amp, device):
                    loss, accuracy, extras = _split_output(net(waves, lengths, labels))

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            pbar.update(1)
            if after_step is not None:
                with _agreed(agreement, world, step, "after_step"):
                    after_step(step)
            sums += torch.stack([loss.detach().double(), accuracy.detach().double()])
            for key, value in extras.items():
                # a tensor is summed where it lives: float() here would wait for the device on every step
                value = value.detach().double() if torch.is_tensor(value) else float(value)
                extra_sums[key] = extra_sums.get(key, 0.0) + value
            window += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                # Reducing only here keeps the device free of per-step host syncs.
                names = sorted(extra_sums)
                extra_mean = torch.stack([torch.as_tensor(extra_sums[k], dtype=torch.float64, device=device)
                                          for k in names]) if names else sums.new_zeros(0)
                if world > 1:
                    dist.all_reduce(sums)
                    if names:
                        dist.all_reduce(extra_mean)
                mean_loss, mean_acc = (sums / (window * world)).tolist()
                extra_mean = dict(zip(names, (extra_mean / (window * world)).tolist()))
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}; last lr factor {factor:.3g}")
                record = {
                    "loss": mean_loss, "accuracy": mean_acc,
                    "lr_frontend": cfg.optim.lr_frontend * factor, "lr_backend": cfg.optim.lr_backend * factor,
                    "margin": float(getattr(head, "margin", float("nan"))),
                    "steps_per_s": window / (time.perf_counter() - t0),
                }
                if param_groups is not None:  # the groups' own rates, not the unused frontend/backend ones
                    del record["lr_frontend"], record["lr_backend"]
                    record.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                record.update(extra_mean)
                sums.zero_()
                extra_sums.clear()
                window = 0
                t0 = time.perf_counter()
                if is_main:
                    pbar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{mean_acc:.3f}")
                    if log is not None:
                        log(record, step)

            if cfg.val_every > 0 and step % cfg.val_every == 0:
                # The condition must not depend on the rank (or on ``validate``, which a worker may omit): every
                # rank has to reach the barrier below.
                metrics = None
                if validate is not None:  # every rank that has one: a sharded validation needs all of them
                    model.eval()
                    # Validation must not shift the training RNG streams: enabling it may not change training.
                    py_state, np_state = random.getstate(), np.random.get_state()
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                        metrics = validate(model)
                    random.setstate(py_state)
                    np.random.set_state(np_state)
                    model.train()
                if is_main and validate is not None:
                    if metrics is None:
                        raise TypeError("validate() returned None on rank 0; it must return a dict of metrics there")
                    metrics = dict(metrics)
                    if cfg.val_metric not in metrics:
                        raise KeyError(f"validate() returned {sorted(metrics)}, no {cfg.val_metric!r} (cfg.val_metric)")
                    value = float(metrics[cfg.val_metric])
                    if _is_better(value, best_metric, cfg.val_mode):
                        best_metric, best_step = value, step
                        save_checkpoint(out_dir / "best.pt", {
                            "step": step, "metric": value, "metrics": {k: float(v) for k, v in metrics.items()},
                            "model": model.state_dict(), "head": head.state_dict()})
                    pbar.write(f"[val] step {step}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
                               + f" (best {best_metric:.4g} at step {best_step})")
                    if log is not None:
                        log({f"val_{k}": float(v) for k, v in metrics.items()}
                            | {f"best_{cfg.val_metric}": best_metric}, step)
                _barrier()
                t0 = time.perf_counter()  # do not count validation time in the training speed

            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save(step)
    except BaseException:
        if world > 1:
            _disarm(net)  # a forward may be waiting for its backward (another rank failed)
        raise
    finally:
        pbar.close()
        if hasattr(batches, "close"):
            # a generator over worker processes: shut them down now, not at garbage collection (on a failure too)
            batches.close()
    if world > 1:
        # DDP syncs buffers (BatchNorm running stats) at the *start* of each forward, so after the last step
        # every rank holds its own; hand back rank 0's (the ones saved) so all ranks end with one model.
        for buffer in list(model.buffers()) + list(head.buffers()):
            dist.broadcast(buffer.data, src=0)

    best_path = out_dir / "best.pt"
    return TrainResult(
        best_metric=best_metric, best_step=best_step, final_step=step,
        last_checkpoint=latest_checkpoint(out_dir), best_checkpoint=best_path if best_path.is_file() else None,
        checkpoints=list_checkpoints(out_dir), steps=cfg.steps, steps_per_epoch=spe,
        epochs=cfg.steps / spe if spe else None)
