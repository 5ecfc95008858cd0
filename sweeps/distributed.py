"""One sweep worker spread over every rank of a torchrun job: rank 0 leads, the other ranks follow.

    torchrun --nproc_per_node 8 -m sweeps.prune_sweep --config sweeps/configs/w2vbert.yaml --grid

Rank 0 alone talks to Optuna and MLflow (ask/tell, heartbeats, stale trials, runs and artifacts). Before each
trial it broadcasts an :class:`Order` naming the trial's knobs and folder; every rank then runs the trial's
stages (the DDP stages on all ranks, shrink / graft / evaluation on rank 0 behind ``rank_zero_result``).
While rank 0 waits for other workers' trials it broadcasts ``idle`` orders, so the followers' wait never
reaches the process group's timeout; when it leaves it broadcasts ``stop``.

Why not ``optuna_integration.TorchDistributedTrial``: it makes every ``suggest_*`` and ``set_user_attr`` a
collective and needs the objective to be called the same number of times on every rank, so the followers
would have to know rank 0's stopping decisions (complete count, heartbeat retries, grid points taken, waits
for other workers) in advance. One broadcast per trial of everything the trial needs is simpler, and it
is the same ``share_from_rank_zero`` the pipeline's stages end with.

Failures. Every trial ends with :func:`agree_outcome`, a collective in which each rank says whether its part
raised: if any did, every rank raises :class:`TrialFailed` with the first failing rank's one-line reason, so
the trial is FAILED once (rank 0 records it) and every rank goes on to the next order. That needs each rank
to reach the end of the trial, which holds for the failures that happen on some ranks only: inside a
training step (``svlib.train.engine.RankFailure``: the step's agreement) and in rank-0-only work
(``rank_zero_result``: the others raise ``RankError``); rank 0's MLflow calls inside the stages go through
``svlib.tracking.TolerantTracker`` and never raise. A rank that is lost (killed, its node gone) is not the
trial's fault: a collective that fails on the process group itself raises :class:`LostRank`, which ends the
worker (torchrun stops the job; the trial's heartbeat stops and another worker retries it). Not covered: a
failure on one rank only inside backward or the optimizer step (e.g. CUDA OOM there, see the engine), or in
one rank's stage set-up before its training starts: the others wait in the next collective until the process
group's timeout (``dist_timeout_minutes``), and torchrun then stops the job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch.distributed as dist

from experiments.common import RankError, rank_and_world, release_memory, share_from_rank_zero
from svlib.train.engine import RankFailure, one_line

__all__ = ["Order", "TrialFailed", "LostRank", "agree_outcome", "follow", "broadcast_order"]


@dataclass
class Order:
    """What rank 0 tells the other ranks to do next."""

    kind: Literal["trial", "idle", "stop"]
    payload: dict[str, Any] = field(default_factory=dict)  # "trial": what the runner needs; "stop": the outcome
    reason: str = ""                                      # for "stop": why the worker leaves


class TrialFailed(RuntimeError):
    """The trial failed on some rank; raised on every rank with the first failing rank's reason."""


class LostRank(BaseException):
    """The process group itself failed (a rank died or its node is gone): not the trial's fault.

    A BaseException that Optuna does not catch, so that the worker stops instead of going on to another trial on
    a broken process group: the trial stays RUNNING, its heartbeat stops with the job, and after the grace
    period another worker retries it in its folder (from the stages it finished)."""


def _is_process_group_error(err: BaseException) -> bool:
    return isinstance(err, getattr(dist, "DistError", ())) and not isinstance(err, TrialFailed)


def agree_outcome(error: BaseException | None) -> None:
    """Collective at the end of a trial: every rank passes the exception its part raised (or None).

    Returns when no rank failed; otherwise raises :class:`TrialFailed` on every rank with the lowest failing
    rank's reason (``rank r: Type: message``); a ``RankError``, which merely relays rank 0's failure in
    rank-0-only work, is passed over for the original. A failure of the process group, here or as ``error``,
    raises :class:`LostRank`.
    """
    rank, world = rank_and_world()
    if error is not None and _is_process_group_error(error):
        raise LostRank(f"rank {rank}: the process group failed: {one_line(error)}") from error
    if world == 1:
        if error is not None:
            raise TrialFailed(one_line(error)) from error
        return
    # a RankFailure (a training step's agreement) is raised alike on every rank and already names the failing
    # rank(s); any other error is prefixed with the rank that raised it
    mine = None if error is None else (_is_relay(error), one_line(error) if isinstance(error, RankFailure)
                                       else f"rank {rank}: {one_line(error)}")
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, mine)
    except Exception as err:  # noqa: BLE001 - any failure here is the group's, not the trial's
        raise LostRank(f"rank {rank}: the process group failed while ending a trial: {one_line(err)}") from err
    failures = [(relay, r, reason) for r, item in enumerate(gathered) if item is not None
                for relay, reason in [item]]
    if not failures:
        return
    _, _, reason = min(failures)  # an original error before a relayed one, then by rank
    raise TrialFailed(reason) from error


def _is_relay(err: BaseException) -> bool:
    """Whether ``err`` only relays rank 0's failure in rank-0-only work (rank 0 gathers the original)."""
    return isinstance(err, RankError)


def broadcast_order(order: Order) -> None:
    """Rank 0: send ``order`` to the other ranks (they are waiting in :func:`follow`)."""
    if rank_and_world()[1] > 1:
        share_from_rank_zero(order)


def follow(run_trial: Callable[[dict[str, Any]], Any], on_failure: Callable[[TrialFailed], None] | None = None) -> Order:
    """A rank other than 0: run every trial rank 0 orders until it says stop; returns the stop order.

    ``run_trial(order.payload)`` is this rank's part of the trial; it is followed by :func:`agree_outcome`, whose
    :class:`TrialFailed` is passed to ``on_failure`` (the worker goes on with the next order).
    """
    while True:
        order = share_from_rank_zero(None)
        if order.kind == "stop":
            return order
        if order.kind == "idle":
            continue
        error = None
        try:
            run_trial(order.payload)
        except Exception as err:  # noqa: BLE001 - reported to every rank by agree_outcome
            error = err
        try:
            agree_outcome(error)
        except TrialFailed as failed:
            if on_failure is not None:
                on_failure(failed)
        # the failed trial's traceback holds its model and optimizer: let them go before the next trial
        error = None
        release_memory()
