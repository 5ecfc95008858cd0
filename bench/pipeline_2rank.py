"""Wall time of the smoke pipeline under ``torchrun --nproc_per_node 2`` (gloo, CPU), next to one process.

    python bench/pipeline_2rank.py [--repeats 1]

The same job as tests/test_pipeline_torchrun.py: every stage of experiments/configs/smoke/pipeline.yaml on
the sv-mini lists (prepared into a temporary folder), one thread per rank, tracked into a temporary MLflow
store (rank 0 only). Both runs start from nothing, one after the other in this call, so they see the same
machine load (recorded before and after). Writes bench/results/pipeline_2rank.json (``pipeline_2rank_seconds``,
read by bench/scale.py into scale.json, and ``pipeline_1rank_seconds``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.common import print_table  # noqa: E402
from experiments.pipeline import launch_command  # noqa: E402
from svlib.corpora.manifest import prepare_manifest  # noqa: E402
from svlib.files import write_json  # noqa: E402

CONFIG = REPO / "experiments" / "configs" / "smoke" / "pipeline.yaml"
MANIFEST = REPO.parent / "shared" / "data" / "sv-mini" / "manifest.csv"
RESULT = REPO / "bench" / "results" / "pipeline_2rank.json"


def timed_run(command: list[str], workdir: Path) -> float:
    """Seconds for one pipeline job in ``workdir`` (its own exp/ and MLflow store); raises if it fails."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"}
    start = time.perf_counter()
    out = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest is reported")
    args = parser.parse_args(argv)
    args_pipeline = ["--config", str(CONFIG), "--experiment", "smoke"]
    jobs = {"1rank": [sys.executable, "-m", "experiments.pipeline", *args_pipeline],
            "2rank": launch_command(2, *args_pipeline)}
    load_before = os.getloadavg()
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    with tempfile.TemporaryDirectory(prefix="pipeline_2rank_") as tmp:
        for repeat in range(args.repeats):
            for name, command in jobs.items():  # interleaved: both see the same drift in machine load
                workdir = Path(tmp) / f"{name}_{repeat}"
                workdir.mkdir()
                with contextlib.chdir(workdir):  # the lists hold audio paths relative to where the job runs
                    prepare_manifest(MANIFEST, Path("data") / "sv-mini", seed=0)
                seconds[name].append(timed_run(command, workdir))
    load_after = os.getloadavg()
    best = {name: min(times) for name, times in seconds.items()}
    rows = [{"job": name, "seconds": best[name], "runs": len(seconds[name])} for name in jobs]
    print_table(rows, ["job", "seconds", "runs"], title="smoke pipeline, every stage, OMP_NUM_THREADS=1")
    write_json(RESULT, {
        "pipeline_2rank_seconds": best["2rank"],
        "pipeline_1rank_seconds": best["1rank"],
        "runs_seconds": seconds,
        "command_2rank": "torchrun --standalone --nproc_per_node 2 -m experiments.pipeline "
                         "--config experiments/configs/smoke/pipeline.yaml",
        "omp_num_threads": 1,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(load_before),
        "loadavg_end": list(load_after),
    })
    print(f"wrote {RESULT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
