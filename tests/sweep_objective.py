"""A cheap but real sweep objective for the storage/worker tests (the pruning objective replaces it later).

The "model" is a synthetic verification score set whose target/non-target separation shrinks as the
target sparsity grows; the objective returns ``(eer_pct, params_fraction)`` computed with svlib's EER,
so the two objectives trade off like the real pruning sweep. Test knobs come from the environment
because the objective runs inside ``python -m sweeps.study worker`` subprocesses:

- ``SVLIB_SWEEP_MARKERS``: folder; each trial writes ``start-<trial>-<pid>`` when it starts (so a test can
  SIGKILL a worker mid-trial) and ``done-<trial>-<pid>`` when it returns.
- ``SVLIB_SWEEP_SLEEP``: seconds each trial sleeps (after its start marker).
- ``SVLIB_SWEEP_BARRIER``: number of worker processes that must have started a trial before any trial
  proceeds (makes two workers overlap however slowly each one starts).
- ``SVLIB_SWEEP_FAIL_TRIALS``: comma-separated trial numbers that raise.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from svlib.scoring.metrics import compute_eer

_N_TRIALS_PER_CLASS = 2000
_BARRIER_TIMEOUT_S = 60.0


class InjectedFailure(RuntimeError):
    """Raised on purpose by the trials listed in SVLIB_SWEEP_FAIL_TRIALS."""


def synthetic_eer_pct(sparsity: float) -> float:
    # Same scores for every trial (fixed seed): only the separation, i.e. the parameters, differ.
    rng = np.random.default_rng(1234)
    separation = 4.0 * (1.0 - sparsity ** 2)
    target = rng.normal(separation, 1.0, _N_TRIALS_PER_CLASS)
    nontarget = rng.normal(0.0, 1.0, _N_TRIALS_PER_CLASS)
    scores = np.concatenate([target, nontarget])
    labels = np.concatenate([np.ones(_N_TRIALS_PER_CLASS, np.int8), np.zeros(_N_TRIALS_PER_CLASS, np.int8)])
    eer, _threshold = compute_eer(scores, labels)
    return 100.0 * eer


def _barrier(markers: Path, parties: int) -> None:
    (markers / f"worker-{os.getpid()}").touch()
    deadline = time.monotonic() + _BARRIER_TIMEOUT_S
    while len(list(markers.glob("worker-*"))) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier: fewer than {parties} workers after {_BARRIER_TIMEOUT_S} s")
        time.sleep(0.05)


def objective(trial) -> tuple[float, float]:
    sparsity = trial.suggest_float("target_sparsity", 0.05, 0.95)
    markers = Path(os.environ["SVLIB_SWEEP_MARKERS"]) if os.environ.get("SVLIB_SWEEP_MARKERS") else None
    if markers is not None:
        (markers / f"start-{trial.number}-{os.getpid()}").touch()
        parties = int(os.environ.get("SVLIB_SWEEP_BARRIER", "0"))
        if parties > 1:
            _barrier(markers, parties)
    time.sleep(float(os.environ.get("SVLIB_SWEEP_SLEEP", "0")))
    failing = {int(n) for n in os.environ.get("SVLIB_SWEEP_FAIL_TRIALS", "").split(",") if n.strip()}
    if trial.number in failing:
        raise InjectedFailure(f"trial {trial.number} fails on purpose")
    result = synthetic_eer_pct(sparsity), 1.0 - sparsity
    if markers is not None:
        (markers / f"done-{trial.number}-{os.getpid()}").touch()
    return result
