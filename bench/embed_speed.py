"""Benchmark: utterances per second of ``svlib embed``'s path on CPU.

Compares, on 40 (``--num-utts``) of the 100 sv-bench test utterances (full length, capped at 60 s as in evaluation):

* batched by length (``extract_embeddings``, what ``svlib embed`` runs) vs one utterance per forward;
* the dense model vs a pruned one (random structured masks keeping ~half of every layer's heads, FFN
  units and conv channels, shrunk with ``svlib.pruning.shrink``; skipped with a note if unavailable);
* torch vs onnxruntime (the ``waves``-input ONNX export, same batches).

Audio loading is inside every timing (it is part of the path). The default model is the ``small`` preset
with random weights (speed does not depend on the weights); ``--model DIR`` times a trained folder.

    python bench/embed_speed.py [--model DIR] [--num-utts 40] [--repeats 2] [--threads 2]

Writes bench/results/embed_speed.json (``speedup_batched_vs_single``, ``rows``, ``table``).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svlib.data.lists import DataDir  # noqa: E402
from svlib.data.sampling import iterate_by_length  # noqa: E402
from svlib.files import relative_path, write_json  # noqa: E402
from svlib.evaluate import EvalConfig, extract_embeddings  # noqa: E402
from svlib.package import describe, load_model  # noqa: E402

RESULTS = REPO / "bench" / "results" / "embed_speed.json"
SINGLE = 1e-9  # max_batch_seconds that makes every batch a single utterance


def small_model(seed: int = 0):
    from svlib.config import from_dict
    from svlib.model.speaker import SpeakerModelConfig, build_speaker_model

    torch.manual_seed(seed)
    cfg = from_dict(SpeakerModelConfig, {"frontend": {"preset": "small"}, "backend": {"type": "mfa"}})
    return build_speaker_model(cfg).eval()


def pruned_copy(model, keep: float = 0.5, seed: int = 0):
    """A copy with a random ``keep`` share of each layer's heads / FFN units / conv channels, or None."""
    try:
        from svlib.pruning.shrink import layer_sizes, shrink_encoder
    except ImportError:
        return None
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    masks = []
    for sizes in layer_sizes(model.frontend.encoder):
        layer = {}
        for kind, n in sizes.items():
            mask = torch.zeros(n)
            mask[torch.randperm(n, generator=g)[: max(1, round(keep * n))]] = 1.0
            layer[kind] = mask
        masks.append(layer)
    shrink_encoder(model.frontend.encoder, masks)
    return model.eval()


def run_torch(model, data, utts, batch_seconds):
    cfg = EvalConfig(max_seconds=60.0, max_batch_seconds=batch_seconds, progress=False)
    t0 = time.perf_counter()
    table = extract_embeddings(model, data, utts, cfg)
    return time.perf_counter() - t0, table


def run_onnx(session, data, utts, batch_seconds):
    from svlib.export import run_onnx as ort_run

    t0 = time.perf_counter()
    table = {}
    for names, waves, lengths in iterate_by_length(data, utts, 60.0, batch_seconds):
        for name, vec in zip(names, ort_run(session, waves, lengths)):
            table[name] = vec
    return time.perf_counter() - t0, table


def max_diff(a, b) -> float:
    return float(max(np.abs(np.asarray(a[u]) - np.asarray(b[u])).max() for u in a))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="model folder (default: `small` preset, random weights)")
    ap.add_argument("--data", type=Path, default=REPO / "data" / "sv-bench" / "test")
    ap.add_argument("--num-utts", type=int, default=40,
                    help="utterances, spread over the list (default 40: ~5 min of audio, ~3 min of benchmark)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N round-robin timings per configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-seconds", type=float, default=240.0, help="padded audio per batch (as svlib embed)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not (args.data / "wav.scp").is_file():
        sys.exit(f"embed_speed: no data dir at {args.data} (prepare it: python -m svlib.corpora.prepare ...)")
    data = DataDir.load(args.data)
    everything = sorted(data.wavs)
    step = max(1, len(everything) // max(1, args.num_utts))
    utts = everything[::step][: args.num_utts]  # spread over speakers and lengths
    audio = sum(min(data.seconds(u), 60.0) for u in utts)
    model = load_model(args.model) if args.model else small_model()
    models = {"dense": model}
    notes = []
    pruned = pruned_copy(model)
    if pruned is None:
        notes.append("pruned model skipped: svlib.pruning.shrink not available")
    else:
        models["pruned"] = pruned
    onnx_ok = not args.no_onnx
    if onnx_ok:
        try:
            from svlib.export import export_onnx, onnx_session
        except ImportError as err:
            onnx_ok = False
            notes.append(f"onnxruntime skipped: {err}")

    # warm-up (first-call allocations, lazy imports) on the shortest utterances, not timed
    warm = sorted(utts, key=data.seconds)[:2]
    configs = []  # (model name, engine, runner, timing function, describe())
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in models.items():
            info = describe(m)
            configs.append((name, "torch", m, run_torch, info))
            if onnx_ok:
                path = export_onnx(m, Path(tmp) / f"{name}.onnx", input="waves")
                configs.append((name, "onnxruntime", onnx_session(path, threads=args.threads), run_onnx, info))
        for _, _, runner, fn, _ in configs:
            fn(runner, data, warm, args.batch_seconds)
        # Round-robin repeats, best of N per configuration: on a shared CPU, load from other processes then
        # hits every configuration alike instead of whichever happened to run during a busy minute.
        best: dict[tuple[str, str, str], tuple[float, dict]] = {}
        for _ in range(args.repeats):
            for name, engine, runner, fn, _ in configs:
                for mode, batch_seconds in (("batched", args.batch_seconds), ("single", SINGLE)):
                    seconds, table = fn(runner, data, utts, batch_seconds)
                    key = (name, engine, mode)
                    if key not in best or seconds < best[key][0]:
                        best[key] = (seconds, table)
                    print(f"{name:>6} {engine:>11} {mode:>7}: {len(utts) / seconds:7.2f} utt/s "
                          f"({audio / seconds:6.1f}x real time)", flush=True)
    rows, tables = [], {}
    for name, engine, _, _, info in configs:
        for mode in ("batched", "single"):
            seconds, table = best[(name, engine, mode)]
            tables[(name, engine, mode)] = table
            rows.append({"model": name, "engine": engine, "mode": mode, "seconds": seconds,
                         "utts_per_s": len(utts) / seconds, "realtime_factor": audio / seconds,
                         "params_total": info["params_total"], "macs_per_second": info["macs_per_second"]})

    def rate(model_name, engine, mode):
        return next(r["utts_per_s"] for r in rows if (r["model"], r["engine"], r["mode"]) == (model_name, engine, mode))

    ref = tables[("dense", "torch", "single")]
    agreement = {f"{k[0]}/{k[1]}/{k[2]}": max_diff(ref, v) for k, v in tables.items() if k[0] == "dense"}
    result = {
        "model": relative_path(args.model, REPO) if args.model else "small preset (random weights), MFA back-end",
        "data": relative_path(args.data, REPO), "num_utts": len(utts), "audio_seconds": audio,
        "threads": args.threads,
        "batch_seconds": args.batch_seconds, "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "speedup_batched_vs_single": rate("dense", "torch", "batched") / rate("dense", "torch", "single"),
        "rows": rows,
        "max_abs_diff_vs_dense_torch_single": agreement,
        "notes": notes,
    }
    if "pruned" in models:
        result["speedup_pruned_vs_dense"] = rate("pruned", "torch", "batched") / rate("dense", "torch", "batched")
    if onnx_ok:
        result["speedup_onnx_vs_torch_batched"] = rate("dense", "onnxruntime", "batched") / rate("dense", "torch", "batched")
        result["speedup_onnx_vs_torch_single"] = rate("dense", "onnxruntime", "single") / rate("dense", "torch", "single")
    lines = ["| model | engine | mode | utt/s | x real time | params | MACs/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['mode']} | {r['utts_per_s']:.2f} | "
                     f"{r['realtime_factor']:.1f} | {r['params_total']:,} | {r['macs_per_second'] / 1e6:.1f}M |")
    result["table"] = "\n".join(lines)
    print(result["table"])
    print(f"speedup batched vs single (dense, torch): {result['speedup_batched_vs_single']:.2f}x")
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
