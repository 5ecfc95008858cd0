"""Stock HF vs lean relative_key self-attention on one full-width W2V-BERT 2.0 layer: time and peak memory.

One ``Wav2Vec2BertSelfAttention`` of the published config (hidden 1024, 16 heads of 64, distances clamped to
[-64, +8]), random weights, on the layer-normalised hidden states of

* 8 x 3 s  (T = 150 frames at 50 Hz; rows 3.0 .. 2.65 s long, so HF's padding mask is in play),
* 1 x 30 s (T = 1500), 1 x 120 s (T = 6000), single unpadded utterances (HF passes no mask),

inference (``torch.inference_mode``) for all cases, plus forward + backward in train mode (attention dropout
0 as in the published config) for 8 x 3 s and 1 x 30 s. The mask is built by HF's own
``create_bidirectional_mask``, as the encoder does.

* Time: one worker process per case runs stock and lean alternately round by round after one warm-up each
  (load from the other processes on a shared CPU hits both alike); medians of wall and process-CPU seconds.
* Peak memory: a fresh process per (case, implementation) builds the layer and inputs, resets the peak RSS
  (``/proc/self/clear_refs``), runs one call and reports ``VmHWM`` minus the RSS before the call, i.e. what
  the attention itself added (torch's CPU allocations are invisible to tracemalloc). On CUDA:
  ``torch.cuda.max_memory_allocated`` over the call.
* Stock at 120 s needs ~(T^2 d + 3 B H T^2) x 4 bytes (16 GiB): a case whose estimate exceeds half of
  ``MemAvailable`` is skipped with the reason recorded; every worker also runs under an address-space cap.

    python bench/attention.py [--threads 2] [--device cpu] [--out bench/results/attention.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Wav2Vec2BertConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.wav2vec2_bert.modeling_wav2vec2_bert import Wav2Vec2BertSelfAttention

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from svlib.files import write_json  # noqa: E402
from svlib.model.attention import set_attention  # noqa: E402

FRAME_RATE = 50  # frames per second after the fbank's 2-frame stacking (10 ms hop)
CASES = {  # name: (batch, seconds, train-mode timing too, timed rounds)
    "8x3s": (8, 3.0, True, 10),
    "1x30s": (1, 30.0, True, 3),
    "1x120s": (1, 120.0, False, 1),
}
IMPLEMENTATIONS = ("stock", "lean")


# ------------------------------------------------------------------------------------------ the layer
def build_layer(device: str, seed: int = 0) -> Wav2Vec2BertSelfAttention:
    torch.manual_seed(seed)
    config = Wav2Vec2BertConfig()  # the facebook/w2v-bert-2.0 architecture
    config._attn_implementation = "sdpa"  # what Wav2Vec2BertModel picks by default
    return Wav2Vec2BertSelfAttention(config).to(device)


def case_inputs(name: str, layer: Wav2Vec2BertSelfAttention, device: str, seed: int = 1):
    """(hidden_states [B, T, 1024], the 4-D mask HF's encoder would pass, or None)."""
    batch, seconds = CASES[name][:2]
    frames = int(round(seconds * FRAME_RATE))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, frames, layer.config.hidden_size, generator=g).to(device)
    lengths = [frames - round(i * 0.05 * FRAME_RATE) for i in range(batch)]  # 3.0, 2.95, ... s
    padding = torch.tensor([[1] * n + [0] * (frames - n) for n in lengths], device=device)
    mask = create_bidirectional_mask(config=layer.config, inputs_embeds=hidden, attention_mask=padding)
    return hidden, mask


def call(layer, hidden, mask, train: bool):
    """One inference call, or one train-mode forward + backward (gradients of weights and input)."""
    if not train:
        with torch.inference_mode():
            return layer(hidden, attention_mask=mask)[0]
    layer.train()
    x = hidden.detach().requires_grad_(True)
    out = layer(x, attention_mask=mask)[0]
    out.square().mean().backward()
    layer.zero_grad(set_to_none=True)
    layer.eval()
    return out.detach()


def stock_estimate_bytes(name: str, layer) -> int:
    """HF's relative_key temporaries: the (T, T, d) table, the einsum output, its scaled copy, the mask sum."""
    batch, seconds = CASES[name][:2]
    frames = int(round(seconds * FRAME_RATE))
    return 4 * (frames * frames * layer.head_size + 3 * batch * layer.num_heads * frames * frames)


# ------------------------------------------------------------------------------------------ workers
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(name: str, implementation: str, train: bool, device: str, threads: int) -> dict:
    """Peak memory one call adds, in a fresh process (nothing cached from another implementation)."""
    torch.set_num_threads(threads)
    layer = set_attention(build_layer(device), implementation).eval()
    hidden, mask = case_inputs(name, layer, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(layer, hidden, mask, train)
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "how": "torch.cuda.max_memory_allocated"}
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        how = "VmHWM after clear_refs - VmRSS before"
    except OSError:
        how = "VmHWM - VmRSS before (peak not reset)"
    before = _status_kib("VmRSS")
    call(layer, hidden, mask, train)
    return {"peak_bytes": (_status_kib("VmHWM") - before) * 1024, "how": how}


def time_worker(name: str, implementations: list[str], train: bool, device: str, threads: int,
                rounds: int) -> dict:
    """Alternating timed calls of each implementation on the same layer and inputs; also their outputs' diff."""
    torch.set_num_threads(threads)
    layer = build_layer(device).eval()
    hidden, mask = case_inputs(name, layer, device)

    def run(implementation):
        set_attention(layer, implementation)
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        out = call(layer, hidden, mask, train)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, time.process_time() - start_cpu

    outputs = {impl: run(impl)[0] for impl in implementations}  # warm-up, and the outputs compared
    wall = {impl: [] for impl in implementations}
    cpu = {impl: [] for impl in implementations}
    for _ in range(rounds):
        for impl in implementations:
            _, seconds, cpu_seconds = run(impl)
            wall[impl].append(seconds)
            cpu[impl].append(cpu_seconds)
    result = {"wall_seconds": wall, "cpu_seconds": cpu, "output_max_abs": float(outputs[implementations[-1]].abs().max())}
    if len(implementations) == 2:
        result["max_abs_diff"] = float((outputs["stock"] - outputs["lean"]).abs().max())
    return result


def run_worker(task: dict, limit_bytes: int | None) -> dict:
    """Run one worker task in a subprocess (address space capped), returning its JSON or the failure."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)]

    def cap():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task = json.loads(args.worker)
        kind = task.pop("kind")
        print(json.dumps((memory_worker if kind == "memory" else time_worker)(**task)))
        return {}

    layer = build_layer("meta")
    available = mem_available_bytes()
    budget = available // 2  # the machine is shared
    # the worker's own baseline (torch, the layer, inputs) on top of the attention's temporaries
    limit = None if args.device == "cuda" else budget + (3 << 30)
    load_before = os.getloadavg()
    started = time.perf_counter()
    cases = {}
    for name in args.cases:
        batch, seconds, with_train, rounds = CASES[name]
        runnable, skipped = [], {}
        estimate = stock_estimate_bytes(name, layer)
        if args.device != "cuda" and estimate > budget:
            skipped["stock"] = (f"stock would need ~{estimate / 2**30:.1f} GiB of temporaries, over half of "
                                f"MemAvailable ({available / 2**30:.1f} GiB) on this shared machine")
        runnable = [impl for impl in IMPLEMENTATIONS if impl not in skipped]
        entry = {"batch": batch, "seconds": seconds, "frames": int(round(seconds * FRAME_RATE)),
                 "stock_estimate_bytes": estimate, "skipped": skipped, "modes": {}}
        for mode in (("inference", "train") if with_train else ("inference",)):
            train = mode == "train"
            memory = {impl: run_worker({"kind": "memory", "name": name, "implementation": impl, "train": train,
                                        "device": args.device, "threads": args.threads}, limit)
                      for impl in runnable}
            timing = run_worker({"kind": "time", "name": name, "implementations": runnable, "train": train,
                                 "device": args.device, "threads": args.threads, "rounds": rounds}, limit)
            row = {"memory": memory, "timing": timing}
            if "error" not in timing:
                row["median_wall_seconds"] = {i: statistics.median(timing["wall_seconds"][i]) for i in runnable}
                row["median_cpu_seconds"] = {i: statistics.median(timing["cpu_seconds"][i]) for i in runnable}
            row["peak_bytes"] = {i: memory[i]["peak_bytes"] for i in runnable if "peak_bytes" in memory[i]}
            if len(row.get("median_wall_seconds", {})) == 2:
                row["speedup"] = row["median_wall_seconds"]["stock"] / row["median_wall_seconds"]["lean"]
                row["speedup_cpu_time"] = row["median_cpu_seconds"]["stock"] / row["median_cpu_seconds"]["lean"]
            if len(row["peak_bytes"]) == 2:
                row["memory_ratio"] = row["peak_bytes"]["stock"] / max(1, row["peak_bytes"]["lean"])
            entry["modes"][mode] = row
            print(_table_row(name, mode, row, skipped), flush=True)
        cases[name] = entry

    def pick(case, key, mode="inference"):
        return cases.get(case, {}).get("modes", {}).get(mode, {}).get(key)

    diffs = [m["timing"]["max_abs_diff"] for c in cases.values() for m in c["modes"].values()
             if "max_abs_diff" in m.get("timing", {})]
    result = {
        "speedup_3s": pick("8x3s", "speedup"),
        "speedup_30s": pick("1x30s", "speedup"),
        "speedup_120s": pick("1x120s", "speedup"),
        "memory_ratio_3s": pick("8x3s", "memory_ratio"),
        "memory_ratio_30s": pick("1x30s", "memory_ratio"),
        "train_speedup_3s": pick("8x3s", "speedup", "train"),
        "train_speedup_30s": pick("1x30s", "speedup", "train"),
        "train_memory_ratio_3s": pick("8x3s", "memory_ratio", "train"),
        "train_memory_ratio_30s": pick("1x30s", "memory_ratio", "train"),
        "max_abs_diff": max(diffs) if diffs else None,
        "cases": cases,
        "setup": {
            "layer": "Wav2Vec2BertSelfAttention, Wav2Vec2BertConfig() (hidden 1024, 16 heads, relative_key -64..+8)",
            "device": args.device,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "mem_available_gib": available / 2**30,
            "worker_address_space_cap_gib": None if limit is None else limit / 2**30,
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
            "wall_minutes": (time.perf_counter() - started) / 60,
        },
    }
    print(f"max |stock - lean| = {result['max_abs_diff']}; load average before {load_before[0]:.1f}, "
          f"after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"wrote {write_json(args.out, result)}")
    return result


def _table_row(name: str, mode: str, row: dict, skipped: dict) -> str:
    def fmt_s(impl):
        value = row.get("median_wall_seconds", {}).get(impl)
        return f"{value:9.3f}s" if value is not None else f"{'skipped' if impl in skipped else 'failed':>10}"

    def fmt_m(impl):
        value = row["peak_bytes"].get(impl)
        return f"{value / 2**20:9.0f}M" if value is not None else f"{'-':>10}"

    speed = f"{row['speedup']:6.2f}x" if "speedup" in row else f"{'-':>7}"
    ratio = f"{row['memory_ratio']:6.1f}x" if "memory_ratio" in row else f"{'-':>7}"
    head = "" if _table_row.printed else (f"{'case':8}{'mode':10}{'stock':>11}{'lean':>11}{'speedup':>8}"
                                          f"{'stock mem':>11}{'lean mem':>11}{'ratio':>8}\n")
    _table_row.printed = True
    return f"{head}{name:8}{mode:10}{fmt_s('stock')}{fmt_s('lean')}{speed} {fmt_m('stock')}{fmt_m('lean')}{ratio}"


_table_row.printed = False

if __name__ == "__main__":
    main()
