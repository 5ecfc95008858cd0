"""GPU benchmark: full-size W2V-BERT 2.0 + Layer-Adapter MFA, random weights, batch 64 x 3 s, bf16 autocast.

Measures seconds per training step and peak memory for stage 1 (encoder frozen + LoRA r=64 on q/v) and stage 2
(everything trainable), and embedding throughput (utterances per second, inference). Features are computed on
the GPU inside the model (W2VBertFbank), as in training. Needs CUDA; made to finish in < 5 minutes on one H100.

    python bench/gpu.py [--steps 10] [--batch 64] [--seconds 3]

Writes bench/results/gpu_<card>.json and prints a table.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from svlib.files import write_json
from svlib.losses import AAMSoftmax
from svlib.model.backends import BackendConfig
from svlib.model.frontend import FrontendConfig, LoraConfig, count_parameters
from svlib.model.speaker import SpeakerModelConfig, build_speaker_model

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 17982  # VoxCeleb2-dev speakers x 3 speeds, as the reference's stage 1


def timed_steps(model, head, optimizer, waves, lengths, labels, steps: int) -> float:
    """Median seconds of a full training step (forward, backward, optimizer) after two warm-up steps."""
    times = []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = head(model(waves, lengths), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def stage(name: str, lora: bool, args, device) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = SpeakerModelConfig(
        FrontendConfig(preset="w2v-bert-2.0", lora=LoraConfig() if lora else None, freeze=lora),
        BackendConfig(type="mfa", adapter_dim=128, embed_dim=256))
    model = build_speaker_model(cfg).to(device).train()
    head = AAMSoftmax(256, NUM_CLASSES).to(device)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    samples = int(args.seconds * 16000)
    waves = torch.randn(args.batch, samples, device=device) * 0.1
    lengths = torch.full((args.batch,), samples, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    seconds = timed_steps(model, head, optimizer, waves, lengths, labels, args.steps)
    out = {"stage": name, "seconds_per_step": seconds, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
           "trainable_params": sum(p.numel() for p in params), "params_total": count_parameters(model)}
    if name == "s2":
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(waves, lengths)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                model(waves, lengths)
            torch.cuda.synchronize()
        out["embed_utts_per_s"] = args.steps * args.batch / (time.perf_counter() - start)
    del model, head, optimizer
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (none found); CPU numbers are in the other benchmarks")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    card = torch.cuda.get_device_name(0)
    rows = [stage("s1", True, args, device), stage("s2", False, args, device)]
    print(f"{card}, torch {torch.__version__}, batch {args.batch} x {args.seconds} s, bf16")
    print(f"{'stage':<6} {'s/step':>8} {'peak GiB':>9} {'trainable':>12} {'embed utt/s':>12}")
    for r in rows:
        print(f"{r['stage']:<6} {r['seconds_per_step']:8.3f} {r['peak_memory_gib']:9.1f} {r['trainable_params']:12,} "
              f"{r.get('embed_utts_per_s', float('nan')):12.1f}")
    result = {"card": card, "torch": torch.__version__, "batch": args.batch, "seconds": args.seconds,
              "amp": "bf16", "stages": rows}
    path = RESULTS / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', card).strip('_').lower()}.json"
    print(f"wrote {write_json(path, result)}")
    return result


if __name__ == "__main__":
    main()
