"""GPU benchmark of the full-size recipe: one command, no downloads, about 6 minutes on one H100/H200.

    python bench/gpu.py [--steps 5] [--batch 64] [--seconds 3] [--no-rehearsal]
    python bench/gpu.py --dry          # tiny preset on CPU, one step of everything (tests/test_gpu_dry.py)

Random-weight W2V-BERT 2.0 (580M) + Layer-Adapter MFA, bf16 autocast (``svlib.train.engine.autocast``),
features computed on the device inside the model (``W2VBertFbank``), as in training. Measures:

* ``training``: seconds per training step (forward, AAM loss, backward, clipping, AdamW) and peak GPU memory
  for stage 1 (encoder frozen + LoRA r=64 on q/v) and stage 2 (everything trainable) at batch 64 x 3 s, with
  the lean relative_key attention (``svlib.model.attention``) and HF's stock one, alternated on the same
  model, after warm-up; medians.
* ``prune1``: one distillation + Lagrangian step of ``experiments.prune`` (student with the 96 hard-concrete
  gate sets, frozen teacher, all 25 hidden states) at the recipe's batch (16 x 4 s).
* ``fbank``: ``W2VBertFbank`` on the GPU vs ``transformers.SeamlessM4TFeatureExtractor`` on the CPU (one
  process, numpy) for the same 64 x 3 s batch of real sv-bench speech, and their largest difference.
* ``embedding``: utterances per second, inference, dense vs the reference's 80 %-pruned structure
  (``bench/prune_speed.py``: 118 heads, 33,275 FFN units, 7,917 conv channels).
* ``rehearsal``: ``bench/full_size_rehearsal.py --device cuda`` (every stage of both recipes, 2 steps each,
  in bf16), its JSON summarised here and written beside it.

Writes ``bench/results/gpu_<card>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fbank import real_audio  # noqa: E402
from bench.full_size_rehearsal import build_parser as rehearsal_parser  # noqa: E402
from bench.prune_speed import HEADLESS_LAYER, TOTAL_CONV, TOTAL_FFN, TOTAL_HEADS, random_split  # noqa: E402
from svlib.files import write_json  # noqa: E402
from svlib.losses import AAMSoftmax  # noqa: E402
from svlib.model.attention import set_attention  # noqa: E402
from svlib.model.backends import BackendConfig  # noqa: E402
from svlib.model.frontend import FrontendConfig, LoraConfig, count_parameters  # noqa: E402
from svlib.model.speaker import SpeakerModel, SpeakerModelConfig, build_speaker_model  # noqa: E402
from svlib.pruning import count_params, dense_sizes, layer_sizes, shrink_encoder  # noqa: E402
from svlib.train.engine import OptimConfig, autocast, build_optimizer  # noqa: E402

RESULTS = REPO / "bench" / "results"
SR = 16000
NUM_CLASSES = 17982  # VoxCeleb2-dev speakers x 3 speeds, as the reference's stage 1
DRY_CLASSES = 30
GIB = 2 ** 30
ATTENTIONS = ("lean", "stock")


# ------------------------------------------------------------------------------------------ timing helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def timed(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------ inputs

@functools.lru_cache(maxsize=None)
def speech_crops(batch: int, seconds: float) -> tuple[np.ndarray, ...]:
    """``batch`` crops of ``seconds`` of real sv-bench speech (files concatenated in manifest order)."""
    samples = int(seconds * SR)
    audio = real_audio(REPO.parent / "shared" / "data" / "sv-bench", batch * seconds + 1)
    return tuple(audio[i * samples:(i + 1) * samples] for i in range(batch))


def speech_batch(batch: int, seconds: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The crops as a [batch, samples] tensor on ``device``, their lengths, and the crops themselves."""
    crops = list(speech_crops(batch, seconds))
    waves = torch.from_numpy(np.stack(crops)).to(device)
    return waves, torch.full((batch,), waves.shape[1], device=device), crops


# ------------------------------------------------------------------------------------------ sections

def speaker_model(preset: str, lora: bool, device: torch.device) -> SpeakerModel:
    cfg = SpeakerModelConfig(FrontendConfig(preset=preset, lora=LoraConfig() if lora else None, freeze=lora),
                             BackendConfig(type="mfa", adapter_dim=128, embed_dim=256))
    with torch.device(device):  # random init on the device: no 2.3 GB host copy to move
        return build_speaker_model(cfg).to(device)


def training(name: str, lora: bool, args, device: torch.device) -> dict:
    """One stage's training step, lean vs stock attention alternated block by block on the same model."""
    model = speaker_model(args.preset, lora, device).train()
    classes = DRY_CLASSES if args.dry else NUM_CLASSES
    head = AAMSoftmax(256, classes).to(device)
    optimizer = build_optimizer(model, head, OptimConfig(lr_frontend=1e-5, lr_backend=1e-5))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    waves, lengths, _ = speech_batch(args.batch, args.seconds, device)
    labels = torch.randint(0, classes, (args.batch,), device=device)
    losses = []

    def step():
        with autocast("bf16", device):
            loss, _ = head(model(waves, lengths), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.detach())

    out = {"trainable_params": sum(p.numel() for p in params), "params_total": count_parameters(model)}
    times = {impl: [] for impl in ATTENTIONS}
    peaks = {impl: 0.0 for impl in ATTENTIONS}
    rounds = 1 if args.dry else 2  # alternate in blocks, so load drift hits both implementations alike
    for r in range(rounds):
        for impl in ATTENTIONS:
            set_attention(model.frontend.encoder, impl)
            reset_peak(device)
            times[impl] += timed(step, max(1, args.steps // rounds), 0 if args.dry else 1, device)
            peaks[impl] = max(peaks[impl], peak_gib(device) or 0.0)
    for impl in ATTENTIONS:
        out[impl] = {"seconds_per_step": statistics.median(times[impl]), "seconds_all": times[impl],
                     "peak_memory_gib": peaks[impl] if device.type == "cuda" else None}
    out["speedup_lean"] = out["stock"]["seconds_per_step"] / out["lean"]["seconds_per_step"]
    if device.type == "cuda":
        out["memory_ratio_lean"] = out["stock"]["peak_memory_gib"] / out["lean"]["peak_memory_gib"]
    out["losses_finite"] = bool(torch.isfinite(torch.stack(losses)).all())
    del model, head, optimizer
    return {"stage": name} | out


def prune1(args, device: torch.device) -> dict:
    """One prune1 step as the stage runs it: DistillPair (student with gates + frozen teacher) + objective."""
    from svlib.features import W2VBertFbank
    from svlib.model.frontend import Frontend, build_encoder
    from svlib.pruning import (DistillConfig, DistillObjective, DistillPair, MaskConfig, PruneConfig, attach_masks,
                               param_groups)

    with torch.device(device):
        student = Frontend(build_encoder(args.preset)).to(device)
    teacher = copy.deepcopy(student)
    prune_cfg = PruneConfig(target_sparsity=0.8, warmup_steps=10000, masks=MaskConfig(
        heads=True, ffn=True, conv=True, head_init_keep=0.99, ffn_init_keep=0.5, conv_init_keep=0.99))
    mask_set = attach_masks(student.encoder, prune_cfg.masks)
    pair = DistillPair(student, teacher, mask_set, features=W2VBertFbank()).to(device).train()  # as w2v-bert 2.0
    objective = DistillObjective(DistillConfig(), student.num_states, prune_cfg, mask_set).to(device).train()
    weights = [p for p in student.parameters() if p.requires_grad]
    groups = param_groups(weights, mask_set.log_alphas(), objective.lagrangian, 2e-4, 2e-2, -2e-2)
    optimizer = build_optimizer(pair, objective, OptimConfig(), param_groups=groups)
    batch, seconds = (2, 1.0) if args.dry else (args.prune_batch, args.prune_seconds)
    waves, lengths, _ = speech_batch(batch, seconds, device)
    losses = []

    def step():
        with autocast("bf16", device):
            loss, _, _ = objective(pair(waves, lengths), None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    reset_peak(device)
    times = timed(step, 1 if args.dry else args.steps, 0 if args.dry else 1, device)
    out = {"batch": batch, "seconds": seconds, "seconds_per_step": statistics.median(times), "seconds_all": times,
           "peak_memory_gib": peak_gib(device), "gate_sets": len(mask_set.log_alphas()),
           "distilled_states": student.num_states, "losses_finite": bool(torch.isfinite(torch.stack(losses)).all())}
    del pair, objective, optimizer, student, teacher
    return out


def fbank(args, device: torch.device) -> dict:
    """The model's fbank on ``device`` vs the transformers extractor on the CPU, same real-speech batch."""
    import logging

    from transformers import SeamlessM4TFeatureExtractor

    from svlib.features import W2VBertFbank

    logging.getLogger("transformers").setLevel(logging.ERROR)
    extractor = SeamlessM4TFeatureExtractor()
    features = W2VBertFbank().to(device)
    waves, lengths, crops = speech_batch(args.batch, args.seconds, device)
    ours = timed(lambda: features(waves, lengths), args.fbank_repeats, 0 if args.dry else 2, device)
    theirs = timed(lambda: extractor(crops, sampling_rate=SR, return_tensors="np"), max(1, args.fbank_repeats // 3),
                   0 if args.dry else 1, torch.device("cpu"))
    feats, mask = features(waves, lengths)
    ref = extractor(crops[:4], sampling_rate=SR, return_tensors="np")
    frames = int(ref["attention_mask"][0].sum())
    diff = float(np.abs(feats[:4, :frames].float().cpu().numpy() - ref["input_features"][:, :frames]).max())
    return {"device_ms": 1000 * statistics.median(ours), "extractor_cpu_ms": 1000 * statistics.median(theirs),
            "speedup": statistics.median(theirs) / statistics.median(ours), "max_abs_diff": diff,
            "batch": [args.batch, args.seconds]}


def scaled_reference_sizes(config, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The reference's 80 % structure (``bench/prune_speed.py``'s totals) as masks on ``config``'s encoder;
    at another size the totals are scaled by the config's dense totals (the dry run's tiny encoder)."""
    gen = torch.Generator().manual_seed(seed)
    layers, full = config.num_hidden_layers, dense_sizes(config)[0]
    scale = {"heads": layers * full["heads"] / (24 * 16), "ffn": 2 * layers * full["ffn1"] / (48 * 4096),
             "conv": layers * full["conv"] / (24 * 1024)}
    heads_total = max(layers - 1, round(TOTAL_HEADS * scale["heads"]))
    headless = min(HEADLESS_LAYER, layers - 1)
    heads = random_split(heads_total, layers - 1, full["heads"], gen)
    heads.insert(headless, 0)
    ffn = random_split(max(2 * layers, round(TOTAL_FFN * scale["ffn"])), 2 * layers, full["ffn1"], gen)
    conv = random_split(max(layers, round(TOTAL_CONV * scale["conv"])), layers, full["conv"], gen)

    def mask(width: int, keep: int) -> torch.Tensor:
        m = torch.zeros(width)
        m[torch.randperm(width, generator=gen)[:keep]] = 1.0
        return m

    return [{"heads": mask(full["heads"], heads[i]), "ffn1": mask(full["ffn1"], ffn[2 * i]),
             "ffn2": mask(full["ffn2"], ffn[2 * i + 1]), "conv": mask(full["conv"], conv[i])} for i in range(layers)]


@torch.inference_mode()
def embedding(args, device: torch.device) -> dict:
    """Utterances per second (inference, bf16): dense vs the reference's 80 % structure, alternated."""
    dense = speaker_model(args.preset, False, device).eval()
    encoder = copy.deepcopy(dense.frontend.encoder).cpu()
    shrink_encoder(encoder, scaled_reference_sizes(encoder.config))
    from svlib.model.frontend import Frontend

    pruned = SpeakerModel(Frontend(encoder.to(device)), dense.backend, dense.features).eval()
    sizes = layer_sizes(pruned.frontend.encoder)
    assert count_parameters(pruned.frontend) == count_params(pruned.frontend.config, sizes)
    waves, lengths, _ = speech_batch(args.batch, args.seconds, device)
    times = {"dense": [], "pruned": []}
    for _ in range(1 if args.dry else 3):
        for name, model in (("dense", dense), ("pruned", pruned)):
            with autocast("bf16", device):
                times[name] += timed(lambda: model(waves, lengths), 1 if args.dry else max(1, args.steps // 2),
                                     0 if args.dry else 1, device)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    return {"dense_utts_per_s": rate["dense"], "pruned_utts_per_s": rate["pruned"],
            "speedup": rate["pruned"] / rate["dense"], "params_dense": count_parameters(dense.frontend),
            "params_pruned": count_parameters(pruned.frontend),
            "kept": {k: sum(s[k] for s in sizes) for k in ("heads", "ffn1", "ffn2", "conv")}}


def rehearsal(args, card_slug: str) -> dict:
    """``bench/full_size_rehearsal.py --device cuda`` in a subprocess; its JSON summarised (dry: argv checked)."""
    out = RESULTS / f"full_size_rehearsal_cuda_{card_slug}.json"
    argv = ["--size", "full", "--device", "cuda", "--threads", str(min(8, os.cpu_count() or 1)), "--out", str(out)]
    rehearsal_parser().parse_args(argv)  # the command stays valid even where it is not run
    command = [sys.executable, str(REPO / "bench/full_size_rehearsal.py")] + argv
    shown = " ".join(["python", "bench/full_size_rehearsal.py"] + argv[:-1] + [os.path.relpath(out, REPO)])
    if args.dry or args.no_rehearsal:
        return {"run": False, "command": shown,
                "why": "--dry: tests/test_rehearsal.py runs the same script at tiny size" if args.dry else "--no-rehearsal"}
    start = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.rehearsal_timeout)
            timed_out = False
        except subprocess.TimeoutExpired:  # SIGTERM: the rehearsal writes what finished, then cleans up
            proc.terminate()
            timed_out = True
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    summary = {"run": True, "command": shown, "returncode": proc.returncode, "timed_out": timed_out,
               "seconds": time.perf_counter() - start, "log": log.name}
    if not out.is_file():
        return summary | {"all_ok": False, "error": log.read_text()[-2000:]}
    result = json.loads(out.read_text())
    return summary | {"all_ok": result["all_ok"], "wall_minutes": result["wall_minutes"], "json": out.name,
                      "stages": {k: {"ok": v.get("ok"), "seconds_per_step": v.get("seconds_per_step"),
                                     "peak_gpu_gib": v.get("peak_gpu_gib"), "problems": v.get("problems")}
                                 for k, v in result["stages"].items()}}


# ------------------------------------------------------------------------------------------ main

def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="tiny preset on CPU, one step of each part")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--prune-batch", type=int, default=16, help="experiments/configs/prune/prune1.yaml")
    parser.add_argument("--prune-seconds", type=float, default=4.0)
    parser.add_argument("--fbank-repeats", type=int, default=9)
    parser.add_argument("--no-rehearsal", action="store_true")
    parser.add_argument("--rehearsal-timeout", type=int, default=360, help="seconds")
    parser.add_argument("--out", help="JSON path (default: bench/results/gpu_<card>.json)")
    args = parser.parse_args(argv)
    if args.dry:
        args.preset, args.steps, args.batch, args.seconds, args.fbank_repeats = "tiny", 1, 2, 1.0, 1
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/gpu.py needs a CUDA GPU (none found); `--dry` checks the script on the CPU")
        args.preset = "w2v-bert-2.0"
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    start = time.perf_counter()
    load_start = os.getloadavg()
    card = card_name(device)
    slug = "dry" if args.dry else re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower()
    result = {"card": card, "dry": args.dry, "torch": torch.__version__, "cuda": torch.version.cuda,
              "preset": args.preset, "batch": args.batch, "seconds": args.seconds, "amp": "bf16"}
    timings = {}
    for key, fn in (("training_s1", lambda: training("s1", True, args, device)),
                    ("training_s2", lambda: training("s2", False, args, device)),
                    ("prune1", lambda: prune1(args, device)), ("fbank", lambda: fbank(args, device)),
                    ("embedding", lambda: embedding(args, device)), ("rehearsal", lambda: rehearsal(args, slug))):
        t = time.perf_counter()
        result[key] = fn()
        timings[key] = time.perf_counter() - t
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["section_seconds"] = timings
    result["wall_minutes"] = (time.perf_counter() - start) / 60.0
    result["machine"] = {"cpu_count": os.cpu_count(), "load_average_start": list(load_start),
                         "load_average_end": list(os.getloadavg())}

    print(f"{card}, torch {torch.__version__}, batch {args.batch} x {args.seconds} s, bf16")
    print(f"{'stage':<6} {'attention':<9} {'s/step':>8} {'peak GiB':>9}")
    for key in ("training_s1", "training_s2"):
        for impl in ATTENTIONS:
            row = result[key][impl]
            peak = row["peak_memory_gib"]
            print(f"{result[key]['stage']:<6} {impl:<9} {row['seconds_per_step']:8.3f} "
                  f"{'-' if peak is None else f'{peak:.1f}':>9}")
    p = result["prune1"]
    print(f"prune1 {p['batch']} x {p['seconds']} s, {p['gate_sets']} gate sets: {p['seconds_per_step']:.3f} s/step")
    f = result["fbank"]
    print(f"fbank: device {f['device_ms']:.1f} ms vs extractor (CPU) {f['extractor_cpu_ms']:.1f} ms "
          f"({f['speedup']:.1f}x), max |diff| {f['max_abs_diff']:.1e}")
    e = result["embedding"]
    print(f"embedding utt/s: dense {e['dense_utts_per_s']:.1f}, pruned {e['pruned_utts_per_s']:.1f} ({e['speedup']:.2f}x)")
    print(f"rehearsal: {result['rehearsal'].get('all_ok', 'not run')}; wall {result['wall_minutes']:.1f} min")
    out = Path(args.out) if args.out else RESULTS / f"gpu_{slug}.json"
    print(f"wrote {write_json(out, result)}")
    return result


if __name__ == "__main__":
    main()
