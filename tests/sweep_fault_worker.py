"""``sweeps.prune_sweep`` under torchrun with a fault injected on rank 1, for tests/test_sweep_torchrun.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/sweep_fault_worker.py ARGS...

ARGS are the sweep's own. On rank 1 only, the first training loader of the job (``TrainLoader``, whichever
stage of the first trial builds it) raises ``OSError`` at its third batch, as a corrupt utterance in rank 1's
shard would; every later loader is healthy. The trial must then fail on both ranks with that reason, and the
worker go on to the next trial in the same process group.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svlib.data.sampling import TrainLoader  # noqa: E402
from sweeps import prune_sweep  # noqa: E402

FAULT = "injected: data/sv-mini/bad_utt.wav: cannot decode"
_healthy_iter = TrainLoader.__iter__
_faults_left = [1]


def _faulty_iter(self):
    injecting = _faults_left[0] > 0
    _faults_left[0] = 0
    for index, batch in enumerate(_healthy_iter(self)):
        if injecting and index == 2:
            raise OSError(FAULT)
        yield batch


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        TrainLoader.__iter__ = _faulty_iter
    sys.exit(prune_sweep.main(sys.argv[1:]))
