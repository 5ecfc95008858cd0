"""Benchmark: speaker-level bootstrap intervals (svlib.scoring.bootstrap), 1,000 replicates.

Lists of the demo's shape (40 speakers x 10 utterances, all pairs: 79,800 trials; and a 40k-trial random
subset of it, the size of VoxCeleb1-O) and of the old 10-speaker test list (4,950 trials): the time of
``bootstrap_ci`` (one system) and of ``paired_bootstrap`` (two systems, same draws), beside the time of one
``summarize`` of the same list, and the intervals themselves: speaker-level against the trial-level ("sample")
bootstrap, which treats trials as independent and is too narrow.

    python bench/bootstrap.py [--replicates 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svlib.files import write_json  # noqa: E402
from svlib.scoring.bootstrap import (bootstrap_ci, paired_bootstrap, percentile_interval, trial_speakers,  # noqa: E402
                                     weighted_metrics)
from bench.metrics import _median_time  # noqa: E402  (one timing rule for the scoring benchmarks)
from svlib.scoring.metrics import summarize  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bootstrap.json"


def synthetic_list(speakers: int, per_speaker: int, rng, max_trials: int | None = None):
    """All pairs of ``speakers x per_speaker`` utterances with a per-speaker offset on the target scores (what
    makes trials of one speaker dependent), optionally a random subset."""
    utts = [f"s{s:03d}-u{u}" for s in range(speakers) for u in range(per_speaker)]
    spk = np.repeat(np.arange(speakers), per_speaker)
    i, j = np.triu_indices(len(utts), k=1)
    if max_trials is not None and i.size > max_trials:
        keep = np.sort(rng.choice(i.size, max_trials, replace=False))
        i, j = i[keep], j[keep]
    labels = (spk[i] == spk[j]).astype(np.int8)
    offset = rng.normal(0.0, 0.8, speakers)
    system = lambda noise: rng.normal(size=labels.size) + labels * (2.0 + offset[spk[i]]) + noise  # noqa: E731
    a, b = system(0.0), system(0.3 * rng.normal(size=labels.size))
    return [utts[k] for k in i], [utts[k] for k in j], labels, a, b


def trial_level_interval(scores, labels, replicates: int, seed: int) -> list[float]:
    """The naive bootstrap over trials (stratified by class), for comparison."""
    rng = np.random.default_rng(seed)
    tar, non = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    w = np.zeros((replicates, labels.size))
    for r in range(replicates):
        np.add.at(w[r], rng.choice(tar, tar.size), 1.0)
        np.add.at(w[r], rng.choice(non, non.size), 1.0)
    return percentile_interval(weighted_metrics(scores, labels, w)["eer_pct"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicates", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for name, (spk, per, cap) in {"10 spk x 10 (old test list)": (10, 10, None),
                                  "40 spk x 10, 40k trials": (40, 10, 40_000),
                                  "40 spk x 10, all pairs": (40, 10, None)}.items():
        enroll, test, labels, a, b = synthetic_list(spk, per, rng, cap)
        speakers = trial_speakers(enroll, test, labels)
        ci = bootstrap_ci(a, labels, speakers, args.replicates)
        paired = paired_bootstrap(a, b, labels, speakers, args.replicates)["eer_pct"]
        rows.append({
            "list": name, "trials": int(labels.size), "targets": int(labels.sum()), "speakers": speakers.num_speakers,
            "eer_pct": summarize(a, labels)["eer_pct"], "eer_ci_pct": ci["eer_pct"],
            "trial_level_eer_ci_pct": trial_level_interval(a, labels, min(args.replicates, 300), 0),
            "paired_eer_diff_ci": paired["ci"],
            "summarize_s": _median_time(lambda: summarize(a, labels), args.repeats),
            "bootstrap_ci_s": _median_time(lambda: bootstrap_ci(a, labels, speakers, args.replicates), args.repeats),
            "paired_bootstrap_s": _median_time(lambda: paired_bootstrap(a, b, labels, speakers, args.replicates),
                                               args.repeats),
        })
    load = os.getloadavg()
    result = {"replicates": args.replicates, "rows": rows, "cpu_count": os.cpu_count(),
              "load_avg_1_5_15": [round(x, 2) for x in load],
              "notes": "times are medians of --repeats runs; trial_level_eer_ci_pct is the naive bootstrap over "
                       "trials (300 replicates), shown to be narrower than the speaker-level interval"}
    write_json(args.out, result)
    print(f"{'list':<28} {'trials':>7} {'spk':>4} {'EER %':>6} {'speaker CI':>16} {'trial CI':>16} "
          f"{'summ s':>7} {'ci s':>6} {'paired s':>8}")
    for r in rows:
        print(f"{r['list']:<28} {r['trials']:>7} {r['speakers']:>4} {r['eer_pct']:>6.2f} "
              f"{'[{:.2f}, {:.2f}]'.format(*r['eer_ci_pct']):>16} {'[{:.2f}, {:.2f}]'.format(*r['trial_level_eer_ci_pct']):>16} "
              f"{r['summarize_s']:>7.3f} {r['bootstrap_ci_s']:>6.2f} {r['paired_bootstrap_s']:>8.2f}")
    print(f"load {load[0]:.1f} on {os.cpu_count()} cores; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
