"""Dense vs pruned W2V-BERT 2.0 encoder: parameters, MACs and CPU inference time.

The pruned structure has the reference's 80 % totals (118 of 384 heads with layer 23 left without
attention, 33,275 of 196,608 FFN units, 7,917 of 24,576 conv channels), spread over the layers at random
with a fixed seed; kept units carry random soft mask values that shrinking folds into the weights.
Random weights (default ``Wav2Vec2BertConfig``); input is a batch of 8 x 3 s of fbank features
[8, 150, 160]; dense and pruned run in the same process with ``torch.set_num_threads(2)``, alternating
round by round (the CPU is shared), after one warm-up each; the medians are reported.

    python bench/prune_speed.py [--repeats 3] [--out bench/results/prune_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Wav2Vec2BertConfig

from svlib.files import write_json
from svlib.model.frontend import build_encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svlib.pruning import count_macs, count_params, dense_sizes, layer_sizes, shrink_encoder  # noqa: E402

TOTAL_HEADS = 118
TOTAL_FFN = 33_275
TOTAL_CONV = 7_917
HEADLESS_LAYER = 23


def random_split(total: int, n: int, cap: int, gen: torch.Generator) -> list[int]:
    """``n`` integers in [1, cap] summing to ``total``, roughly proportional to random weights."""
    if not n <= total <= n * cap:
        raise ValueError(f"cannot split {total} into {n} parts of 1..{cap}")
    weights = torch.rand(n, generator=gen) * 0.8 + 0.2
    parts = [min(cap, max(1, int(w))) for w in (weights / weights.sum() * total).tolist()]
    while sum(parts) != total:
        i = int(torch.randint(n, (1,), generator=gen))
        step = 1 if sum(parts) < total else -1
        if 1 <= parts[i] + step <= cap:
            parts[i] += step
    return parts


def reference_masks(config: Wav2Vec2BertConfig, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    layers = config.num_hidden_layers
    heads = random_split(TOTAL_HEADS, layers - 1, config.num_attention_heads, gen)
    heads.insert(HEADLESS_LAYER, 0)
    ffn = random_split(TOTAL_FFN, 2 * layers, config.intermediate_size, gen)
    conv = random_split(TOTAL_CONV, layers, config.hidden_size, gen)
    full = dense_sizes(config)[0]

    def mask(width: int, keep: int) -> torch.Tensor:
        m = torch.zeros(width)
        idx = torch.randperm(width, generator=gen)[:keep]
        m[idx] = torch.rand(keep, generator=gen) * 0.5 + 0.5
        return m

    return [
        {
            "heads": mask(full["heads"], heads[i]),
            "ffn1": mask(full["ffn1"], ffn[2 * i]),
            "ffn2": mask(full["ffn2"], ffn[2 * i + 1]),
            "conv": mask(full["conv"], conv[i]),
        }
        for i in range(layers)
    ]


@torch.inference_mode()
def time_interleaved(models: dict, feats, mask, repeats: dict) -> tuple[dict, dict]:
    """Alternate the models round by round, so load from other processes hits both alike.

    Returns wall-clock and process CPU seconds per run; on a shared machine the CPU time is the steadier
    of the two (time sliced away to other processes does not count).
    """
    for model in models.values():
        model(feats, attention_mask=mask)  # warm-up: allocator, kernels
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    for r in range(max(repeats.values())):
        for name, model in models.items():
            if r < repeats[name]:
                start, start_cpu = time.perf_counter(), time.process_time()
                model(feats, attention_mask=mask)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pruned-repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune_speed.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # The speaker-model encoder: no SpecAugment, so no masked_spec_embed (the paper's 580,492,096).
    model = build_encoder("w2v-bert-2.0").eval()
    config = model.config
    frames = int(round(args.seconds * 50))
    feats = torch.randn(args.batch, frames, config.feature_projection_input_dim)
    att = torch.ones(args.batch, frames, dtype=torch.long)

    params_dense = sum(p.numel() for p in model.parameters())
    pruned = shrink_encoder(copy.deepcopy(model), reference_masks(config, args.seed))
    sizes = layer_sizes(pruned)
    params_pruned = sum(p.numel() for p in pruned.parameters())
    assert params_pruned == count_params(config, sizes), "analytic count disagrees with numel"
    load_before = os.getloadavg()[0]
    times, cpu_times = time_interleaved(
        {"dense": model, "pruned": pruned}, feats, att, {"dense": args.repeats, "pruned": args.pruned_repeats}
    )
    load_after = os.getloadavg()[0]
    dense_times, pruned_times = times["dense"], times["pruned"]
    cpu_dense, cpu_pruned = statistics.median(cpu_times["dense"]), statistics.median(cpu_times["pruned"])
    with torch.inference_mode():
        dense_out = model(feats, attention_mask=att).last_hidden_state
        pruned_out = pruned(feats, attention_mask=att).last_hidden_state

    macs_dense = count_macs(config, dense_sizes(config), args.seconds)
    macs_pruned = count_macs(config, sizes, args.seconds)
    t_dense, t_pruned = statistics.median(dense_times), statistics.median(pruned_times)
    result = {
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "param_ratio": params_dense / params_pruned,
        "macs_dense_per_utt": macs_dense,
        "macs_pruned_per_utt": macs_pruned,
        "mac_ratio": macs_dense / macs_pruned,
        "seconds_dense": t_dense,
        "seconds_pruned": t_pruned,
        "seconds_dense_all": dense_times,
        "seconds_pruned_all": pruned_times,
        "speedup": t_dense / t_pruned,
        "cpu_seconds_dense": cpu_dense,
        "cpu_seconds_pruned": cpu_pruned,
        "speedup_cpu_time": cpu_dense / cpu_pruned,
        "kept": {
            "heads": sum(s["heads"] for s in sizes),
            "ffn_units": sum(s["ffn1"] + s["ffn2"] for s in sizes),
            "conv_channels": sum(s["conv"] for s in sizes),
        },
        "layer_sizes": sizes,
        "setup": {
            "input": [args.batch, frames, config.feature_projection_input_dim],
            "threads": args.threads,
            "repeats": [args.repeats, args.pruned_repeats],
            "seed": args.seed,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "device": "cpu",
            "load_average_1min": [load_before, load_after],
        },
        # sanity: pruning changes the function (random weights, no distillation), so this is not small
        "mean_abs_output_change": float((dense_out - pruned_out).abs().mean()),
    }

    print(f"{'':22}{'dense':>16}{'pruned':>16}{'ratio':>9}")
    print(f"{'parameters':22}{params_dense:>16,}{params_pruned:>16,}{result['param_ratio']:>8.2f}x")
    print(f"{'GMACs / 3 s utterance':22}{macs_dense / 1e9:>16.2f}{macs_pruned / 1e9:>16.2f}{result['mac_ratio']:>8.2f}x")
    print(f"{'seconds / batch':22}{t_dense:>16.3f}{t_pruned:>16.3f}{result['speedup']:>8.2f}x")
    print(f"{'CPU seconds / batch':22}{cpu_dense:>16.3f}{cpu_pruned:>16.3f}{result['speedup_cpu_time']:>8.2f}x")
    print(f"kept: {result['kept']}   load average (1 min) before/after: {load_before:.1f}/{load_after:.1f}")
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
