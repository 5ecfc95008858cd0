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
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
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


@dataclass
class OptimConfig:
    lr_frontend: float = 5e-5
    lr_backend: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


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
    return rank, world, local_rank


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


def build_optimizer(model: nn.Module, head: nn.Module, cfg: OptimConfig,
                    param_groups: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW with groups ``frontend`` (``model.frontend``) and ``backend`` (the rest of the model + head).

    Frozen parameters are left out, so LoRA / pruning stages only pay optimizer memory for what they train.
    ``param_groups`` replaces the two default groups: a list of ``{"name", "params", "lr"[, "weight_decay"]}``
    (pruning trains weights, gate log-alphas and Lagrange multipliers at three rates, one of them negative).
    Their lr is the base lr the schedule multiplies; ``weight_decay`` defaults to ``cfg.weight_decay``.
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
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
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
    return torch.optim.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


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
          param_groups: list[dict] | None = None) -> TrainResult:
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
    """
    rank, world = _dist()
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
    base_lrs = {group["name"]: group["base_lr"] for group in optimizer.param_groups}
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
        optimizer.load_state_dict(ckpt["optimizer"])
        # load_state_dict also restores the saved hyperparameters; the config is the truth for those
        # (only the moments and step counts are state), so a deliberately changed lr takes effect.
        for group in optimizer.param_groups:
            group["base_lr"] = base_lrs[group["name"]]
            if param_groups is None:
                group["weight_decay"] = cfg.optim.weight_decay
            else:
                group["weight_decay"] = next(g.get("weight_decay", cfg.optim.weight_decay)
                                             for g in param_groups if g["name"] == group["name"])
            group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
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
    elif resume and is_main:
        print(f"[train] resume requested but no checkpoint in {out_dir}; starting from step 0")

    net: nn.Module = _ModelAndHead(model, head)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    batches = iter(loader)
    if ckpt_path is not None and not hasattr(loader, "load_state_dict"):
        # A deterministic loader without saved state still resumes exactly, just slowly: replay it.
        for _ in range(step):
            next(batches)

    def save(step: int) -> Path:
        rng = _all_rng_states()  # collective: every rank must call save()
        path = out_dir / checkpoint_name(step)
        if is_main:
            save_checkpoint(path, {
                "step": step, "model": model.state_dict(), "head": head.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "loader": loader.state_dict() if hasattr(loader, "state_dict") else {"step": step},
                "rng": rng, "best_metric": best_metric, "best_step": best_step,
                "world_size": world, "config": to_dict(cfg),
            })
            prune_checkpoints(out_dir, cfg.keep_checkpoints)
        _barrier()
        return path

    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, accuracy since the last log
    extra_sums: dict[str, float | torch.Tensor] = {}  # the head's extra metrics since the last log
    window = 0
    pbar = tqdm(total=cfg.steps, initial=step, disable=not (is_main and cfg.progress), dynamic_ncols=True)
    model.train()
    head.train()
    t0 = time.perf_counter()
    while step < cfg.steps:
        # The loader must not draw from the training RNG streams: torch's DataLoader takes its workers' base
        # seed from the global generator when its iterator starts, i.e. on the first batch of every run.
        # A resumed run would draw it after the checkpoint's RNG state is restored, so every random choice
        # after a resume (dropout, hard-concrete mask samples) would be shifted against the uninterrupted run.
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
    pbar.close()
    if hasattr(batches, "close"):
        batches.close()  # a generator over worker processes: shut them down now, not at garbage collection
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
