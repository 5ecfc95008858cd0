"""Benchmark: EER + minDCF(0.01) + minDCF(0.05) on 1,000,000 trials (target: < 1 s on a 2-core CPU).

``summarize`` sorts once and derives all three metrics from the same error-rate arrays; the separate
calls (each sorting again) are timed too, to show what sharing the sort buys. Cosine scoring of 1M
trials over a 20k x 256 embedding table is timed as well, since it precedes the metrics in ``svlib score``.

    python bench/metrics.py [--trials 1000000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from svlib.files import write_json
from svlib.scoring.metrics import EmbeddingTable, compute_eer, compute_min_dcf, cosine_scores, summarize

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.json"


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.trials
    labels = (rng.random(n) < 0.1).astype(np.int8)
    scores = rng.normal(size=n) + 2.0 * labels
    # quantise half the scores so the tie-grouping path is exercised as in real float32 cosine scores
    scores[: n // 2] = np.round(scores[: n // 2], 4)

    summary = summarize(scores, labels)
    t_summary = _median_time(lambda: summarize(scores, labels), args.repeats)
    t_separate = _median_time(lambda: (compute_eer(scores, labels), compute_min_dcf(scores, labels, 0.01),
                                       compute_min_dcf(scores, labels, 0.05)), max(1, args.repeats // 2))

    num_utts, dim = 20_000, 256
    table = EmbeddingTable([f"spk{i // 20:04d}/utt{i:05d}.wav" for i in range(num_utts)],
                           rng.normal(size=(num_utts, dim)).astype(np.float32))
    trials = SimpleNamespace(enroll=[table.utts[i] for i in rng.integers(0, num_utts, n)],
                             test=[table.utts[i] for i in rng.integers(0, num_utts, n)])
    t_cosine = _median_time(lambda: cosine_scores(table, trials), max(1, args.repeats // 2))

    result = {
        "num_trials": n,
        "repeats": args.repeats,
        "seconds_1m_trials": round(t_summary * 1_000_000 / n, 4),
        "seconds_summarize": round(t_summary, 4),
        "seconds_three_separate_calls": round(t_separate, 4),
        "seconds_cosine_scoring_256d": round(t_cosine, 4),
        "eer_pct": round(summary["eer_pct"], 4),
        "mindcf_0.01": round(summary["mindcf_0.01"], 4),
        "mindcf_0.05": round(summary["mindcf_0.05"], 4),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}",
        # the CPU is shared with other jobs; timings scale roughly with this
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    rows = [
        ("EER + minDCF x2 (summarize, one sort)", t_summary),
        ("EER, minDCF, minDCF (three sorts)", t_separate),
        ("cosine scores, 256-d, 20k utts", t_cosine),
    ]
    print(f"{n:,} trials, median of {args.repeats} runs")
    print(f"{'operation':<40} {'seconds':>8}")
    for name, sec in rows:
        print(f"{name:<40} {sec:8.3f}")
    print(f"EER {summary['eer_pct']:.3f}%  minDCF0.01 {summary['mindcf_0.01']:.4f}  minDCF0.05 {summary['mindcf_0.05']:.4f}"
          f"  (expected EER for d'=2: 15.87%)")
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
