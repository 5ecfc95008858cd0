"""Cost of the demo's data foundations: simulated RIRs, the telephone channel, and ``prepare demo``.

* RIRs (``svlib.corpora.demo_data.simulate_one``): the same ``--rirs`` rooms (seeds ``[0, i]``) simulated with the
  image-source method capped at order 25 (the default), at order 10, and with pyroomacoustics' hybrid
  (image sources to order 3 + ray tracing), interleaved room by room so machine load hits all alike; per
  setting the seconds per RIR and the measured / target RT60 ratio (median, 10th and 90th percentiles:
  capping the order shortens the tail of reverberant rooms, the ratio shows by how much).
* Telephone (``svlib.data.channel.telephone``): a 16 x 3 s batch on the CPU, with and without mu-law; median
  of ``--repeats`` calls after one warm-up.
* ``prepare demo`` (splits and trials only, no RIRs) on ``../shared/data`` when it is there.

    python bench/demo_data.py [--rirs 30] [--repeats 5] [--out bench/results/demo_data.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svlib.data.channel import TelephoneConfig, telephone  # noqa: E402
from svlib.corpora.demo_data import RirSimConfig, prepare_demo, simulate_one  # noqa: E402
from svlib.files import write_json  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def _hybrid(cfg: RirSimConfig, index: int) -> tuple[np.ndarray, float]:
    """The same room as ``simulate_one(cfg, index)`` with image sources to order 3 + ray tracing."""
    import pyroomacoustics as pra

    _, params = simulate_one(RirSimConfig(**{**cfg.__dict__, "max_order": 0}), index)  # room and positions only
    absorption, _ = pra.inverse_sabine(params["rt60_target"], params["room"])
    room = pra.ShoeBox(params["room"], fs=cfg.sample_rate, materials=pra.Material(absorption), max_order=3,
                       ray_tracing=True, air_absorption=True)
    room.set_ray_tracing(receiver_radius=0.5, n_rays=2000, energy_thres=1e-5)
    room.add_source(params["source"])
    room.add_microphone(params["mic"])
    room.compute_rir()
    return np.asarray(room.rir[0][0]), float(room.measure_rt60()[0][0]) / params["rt60_target"]


def bench_rirs(num: int) -> dict:
    settings = {"ism_order25": RirSimConfig(num=num), "ism_order10": RirSimConfig(num=num, max_order=10)}
    seconds = {name: [] for name in [*settings, "hybrid_order3_raytracing"]}
    ratios = {name: [] for name in seconds}
    samples = {name: [] for name in seconds}
    for index in range(num):
        for name, cfg in settings.items():
            start = time.perf_counter()
            rir, params = simulate_one(cfg, index)
            seconds[name].append(time.perf_counter() - start)
            ratios[name].append(params["rt60_measured"] / params["rt60_target"])
            samples[name].append(params["samples"])
        start = time.perf_counter()
        rir, ratio = _hybrid(settings["ism_order25"], index)
        seconds["hybrid_order3_raytracing"].append(time.perf_counter() - start)
        ratios["hybrid_order3_raytracing"].append(ratio)
        samples["hybrid_order3_raytracing"].append(len(rir))
    return {name: {"seconds_per_rir": statistics.mean(seconds[name]),
                   "rt60_ratio_median": float(np.median(ratios[name])),
                   "rt60_ratio_p10": float(np.percentile(ratios[name], 10)),
                   "rt60_ratio_p90": float(np.percentile(ratios[name], 90)),
                   "mean_samples": float(np.mean(samples[name]))} for name in seconds}


def bench_telephone(repeats: int) -> dict:
    waves = torch.randn(16, 48000, generator=torch.Generator().manual_seed(0)) * 0.1
    out = {}
    for name, cfg in (("mu_law", TelephoneConfig()), ("no_mu_law", TelephoneConfig(mu_law=False))):
        telephone(waves, cfg=cfg)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            telephone(waves, cfg=cfg)
            times.append(time.perf_counter() - start)
        out[name] = {"batch": "16 x 3 s", "median_ms": 1000 * statistics.median(times)}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rirs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo_data.json"))
    args = parser.parse_args(argv)
    import pyroomacoustics as pra

    load_before = os.getloadavg()
    rirs = bench_rirs(args.rirs)
    phone = bench_telephone(args.repeats)
    prepare_seconds = None
    if (DATA / "speechocean762-train" / "manifest.csv").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            prepare_demo(DATA / "sv-bench" / "manifest.csv", DATA / "speechocean762-train", tmp, verbose=False)
            prepare_seconds = time.perf_counter() - start
    result = {
        "rir_seconds_per_rir": rirs["ism_order25"]["seconds_per_rir"],
        "rir_200_seconds_estimate": 200 * rirs["ism_order25"]["seconds_per_rir"],
        "rir_settings": rirs,
        "telephone_ms_16x3s": phone["mu_law"]["median_ms"],
        "telephone": phone,
        "prepare_demo_seconds": prepare_seconds,
        "setup": {"rirs_per_setting": args.rirs, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
                  "torch": torch.__version__, "pyroomacoustics": pra.__version__, "cpu_count": os.cpu_count(),
                  "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
    }
    print(f"{'RIR setting':<26} {'s/RIR':>7} {'RT60 meas/target':>22} {'samples':>8}")
    for name, r in rirs.items():
        print(f"{name:<26} {r['seconds_per_rir']:>7.3f} {r['rt60_ratio_median']:>8.2f} "
              f"[{r['rt60_ratio_p10']:.2f}, {r['rt60_ratio_p90']:.2f}] {r['mean_samples']:>8.0f}")
    for name, r in phone.items():
        print(f"telephone {name:<16} {r['median_ms']:>7.1f} ms per 16 x 3 s batch")
    if prepare_seconds is not None:
        print(f"prepare demo (splits + trials): {prepare_seconds:.1f} s")
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
