"""Every stage of the real recipe, rehearsed on the full 580M W2V-BERT 2.0 (random weights) on real speech.

    python bench/full_size_rehearsal.py [--size full|tiny] [--device cpu|cuda] [--threads 2] [--keep DIR]

1. Writes a random-weight encoder folder as ``facebook/w2v-bert-2.0`` ships it (``config.json`` with
   SpecAugment and LayerDrop on + ``model.safetensors`` under the HF names, ``masked_spec_embed``
   included), streamed tensor by tensor so the 2.3 GB are never held twice, to
   ``<scratch>/pretrained/w2v-bert-2.0`` (the folder ``experiments/configs/w2vbert/s1.yaml`` names).
2. Prepares the sv-bench lists with ``python -m svlib.corpora.prepare manifest`` and cuts a few-utterance
   validation and test list from them (evaluation of a 580M model on 2 cores must stay cheap), a noise list
   (ESC-10 + speech for babble) and two synthetic room responses.
3. Runs ``experiments/configs/w2vbert/pipeline.yaml`` (s1 frozen + LoRA -> merge -> s2 -> s3 -> eval) and then
   ``experiments/configs/prune/pipeline.yaml`` (prune1 -> shrink -> prune2 -> graft -> ps1 -> ps2 -> ps3 ->
   eval) through the pipeline's own loader and runner (``experiments.pipeline.load_pipeline`` + ``run``,
   what ``python -m experiments.pipeline --config P --overrides O`` calls), in the scratch folder, with the
   override files of ``experiments/configs/rehearsal/`` (data paths, 2 steps, batch 2 x 2 s crops). The
   tracker handed to the pipeline is this script's stage monitor instead of MLflow: it marks the stage
   boundaries (per-stage peak memory), keeps the per-step metrics (step time, losses) and sizes the artifacts
   instead of copying gigabytes into an MLflow store.
4. Checks every stage from its folder: losses finite, trainable tensors changed and frozen ones not, exact
   parameter counts, class trimming, merge and shrink differences, and that every saved folder reloads to
   exactly the weights the stage trained (its final checkpoint) and the files hold.

Writes ``bench/results/full_size_rehearsal.json`` (``--size tiny``: the same at the ``tiny`` preset, in about
a minute; ``tests/test_rehearsal.py`` runs it). Machine load is recorded next to the times. On a CPU without
native bf16 (no avx512_bf16 / amx_bf16) the recipe's ``amp: bf16`` runs at full size in float32
(``--amp auto``): emulated bf16 matmuls are ~17x slower than float32 there, far beyond any time limit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors import safe_open  # noqa: E402
from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel  # noqa: E402

from svlib.files import write_json  # noqa: E402
from svlib.model.frontend import PRESETS, count_parameters, load_encoder  # noqa: E402

RESULTS = REPO / "bench" / "results"
OVERRIDES = REPO / "experiments" / "configs" / "rehearsal"
PIPELINES = (("w2vbert", REPO / "experiments/configs/w2vbert/pipeline.yaml", OVERRIDES / "w2vbert.yaml"),
             ("w2vbert_prune", REPO / "experiments/configs/prune/pipeline.yaml", OVERRIDES / "prune.yaml"))
PRETRAINED = Path("pretrained/w2v-bert-2.0")   # relative to the scratch folder, as in w2vbert/s1.yaml
# The published sizes (arXiv 2510.04213 and the reference's LoRA on linear_q / linear_v, r = 64).
FULL_ENCODER_PARAMS = 580_492_096
FULL_BACKEND_PARAMS = 6_160_640
FULL_LORA_PARAMS = 6_291_456
LIMIT_MINUTES = 15.0
LIMIT_RSS_GIB = 20.0
GIB = 2 ** 30
# What the shipped folder has on top of the speaker-model encoder (the loader forces these off).
SHIPPED_TRAINING_SETTINGS = {"mask_time_prob": 0.05, "layerdrop": 0.1, "apply_spec_augment": True}
SAFETENSORS_DTYPES = {torch.float32: "F32"}


# ------------------------------------------------------------------------------------------ the encoder folder

def init_tensor(name: str, shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """HF-like random init without building the module: biases 0, norm scales 1, matrices N(0, std^2)."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if name == "masked_spec_embed":
        return torch.rand(shape, generator=gen)
    if len(shape) == 1:  # LayerNorm weights (every 1-D weight of the model is one)
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) * std


def write_safetensors_streamed(path: Path, shapes: dict[str, tuple[int, ...]], make) -> int:
    """Write a float32 safetensors file tensor by tensor: ``make(name, shape)`` is called once per tensor, in
    file order, so only one tensor is in memory at a time (the library's writer needs them all at once).

    Format: 8-byte little-endian header length, the JSON header (name -> dtype, shape, [begin, end) byte
    offsets into the data; padded with spaces to a multiple of 8), then the data, tensors back to back.
    """
    names = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            tensor = make(name, shapes[name]).to(torch.float32).contiguous()
            if tuple(tensor.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: made {tuple(tensor.shape)}, header says {shapes[name]}")
            f.write(tensor.numpy().tobytes())
    os.replace(tmp, path)
    return offset


def write_pretrained_folder(folder: Path, size: str, seed: int = 0) -> dict:
    """A random-weight encoder folder laid out as facebook/w2v-bert-2.0 (the preset's architecture)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2BertConfig(**PRESETS[size], **SHIPPED_TRAINING_SETTINGS)
    config.architectures = ["Wav2Vec2BertModel"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Wav2Vec2BertModel(config).state_dict().items()}
    weights = folder / "model.safetensors"
    stamp = folder / ".rehearsal_seed"
    expected_bytes = sum(4 * math.prod(s) for s in shapes.values())
    reused = (stamp.is_file() and stamp.read_text() == f"{size} {seed}" and weights.is_file()
              and weights.stat().st_size > expected_bytes)  # the same draw, written by an earlier --keep run
    if not reused:
        stamp.unlink(missing_ok=True)
        config.save_pretrained(folder)
        gen = torch.Generator().manual_seed(seed)
        write_safetensors_streamed(weights, shapes,
                                   lambda name, shape: init_tensor(name, shape, config.initializer_range, gen))
        stamp.write_text(f"{size} {seed}")
    return {"tensors": len(shapes), "gib": expected_bytes / GIB, "has_masked_spec_embed": "masked_spec_embed" in shapes,
            "params_in_file": sum(math.prod(s) for s in shapes.values()), "reused": reused}


# ------------------------------------------------------------------------------------------ data

def prepare_data(scratch: Path, shared: Path, tiny_per_speaker: int = 2, tiny_speakers: int = 4) -> dict:
    """sv-bench lists via the prepare CLI, then few-utterance val/test lists, a noise and a RIR list."""
    import soundfile as sf

    from svlib.data.lists import AudioEntry, DataDir, write_audio_list, write_trials
    from svlib.corpora.manifest import all_pairs

    manifest = shared / "sv-bench" / "manifest.csv"
    subprocess.run([sys.executable, "-m", "svlib.corpora.prepare", "manifest", "--manifest",
                    os.path.relpath(manifest, scratch), "--out", "data/sv-bench"],
                   cwd=scratch, check=True, env=_child_env(), stdout=subprocess.DEVNULL)
    out = {}
    for split in ("val", "test"):
        full = DataDir.load(f"data/sv-bench/{split}")  # audio paths relative to the scratch folder (the cwd)
        shortest = {s: sorted(full.spk2utt[s], key=full.seconds)[:tiny_per_speaker] for s in full.speakers
                    if len(full.spk2utt[s]) >= tiny_per_speaker}
        # the speakers with the shortest such utterances: a 580M forward on 2 cores costs ~1 s per second
        speakers = sorted(shortest, key=lambda s: (sum(full.seconds(u) for u in shortest[s]), s))[:tiny_speakers]
        utts = [u for s in speakers for u in shortest[s]]
        full.subset(utts).write(scratch / "data/rehearsal" / split)
        trials = all_pairs(sorted(utts), full.utt2spk)
        write_trials(scratch / "data/rehearsal" / f"{split}_trials.txt", trials)
        out[split] = {"speakers": len(speakers), "utterances": len(utts), "trials": len(trials),
                      "target": int(trials.num_target), "seconds": round(sum(full.seconds(u) for u in utts), 2)}
    train = DataDir.load("data/sv-bench/train")
    out["train"] = {"speakers": len(train.speakers), "utterances": len(train)}
    esc = shared / "esc10-noise"
    clips = [line.split(",")[0] for line in (esc / "manifest.csv").read_text().splitlines()[1:5]]
    entries = [AudioEntry(f"esc{i}", "noise", os.path.relpath(esc / c, scratch)) for i, c in enumerate(clips)]
    entries += [AudioEntry(f"speech{i}", "speech", train.wavs[u]) for i, u in enumerate(sorted(train.wavs)[:3])]
    write_audio_list(scratch / "data/noise.list", entries)
    # Two synthetic room responses (exponentially decaying noise after a direct path): no RIR corpus is shared.
    rng = np.random.default_rng(0)
    rirs = []
    for i, rt60 in enumerate((0.3, 0.6)):
        t = np.arange(int(0.4 * 16000)) / 16000
        h = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60) * 0.3
        h[0] = 1.0
        (scratch / "data/rirs").mkdir(parents=True, exist_ok=True)
        sf.write(scratch / f"data/rirs/rir{i}.wav", h.astype(np.float32), 16000)
        rirs.append(AudioEntry(f"rir{i}", "synthetic", f"data/rirs/rir{i}.wav"))
    write_audio_list(scratch / "data/rirs.list", rirs)
    out["noise_files"], out["rir_files"] = len(entries), len(rirs)
    return out


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------------------ memory and load

def _kib_field(path: str, fields: tuple[str, ...]) -> int:
    total = 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(fields):
                    total += int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return total * 1024


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out + [g for c in out for g in _children(c)]


def tree_memory() -> int:
    """This process's RSS + its children's private memory (loader workers are forks: their shared pages are
    this process's and would be counted twice as RSS)."""
    pid = os.getpid()
    total = _kib_field(f"/proc/{pid}/status", ("VmRSS:",))
    for child in _children(pid):
        total += _kib_field(f"/proc/{child}/smaps_rollup", ("Private_Clean:", "Private_Dirty:"))
    return total


class Sampler(threading.Thread):
    """Samples memory and the 1-minute load every ``interval`` seconds; peaks are kept per label."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.label = "setup"
        self.peaks: dict[str, int] = {}
        self.loads: list[float] = []
        self.peak = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> None:
        mem = tree_memory()
        with self._lock:
            self.peak = max(self.peak, mem)
            self.peaks[self.label] = max(self.peaks.get(self.label, 0), mem)
            self.loads.append(os.getloadavg()[0])

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def relabel(self, label: str) -> None:
        self.sample()  # close the previous label with a sample of its own
        with self._lock:
            self.label = label

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# ------------------------------------------------------------------------------------------ the stage monitor

class StageMonitor:
    """The pipeline's tracker interface (``svlib.tracking.Tracker``): run / log_metrics / log_artifact ...

    Nested runs are the stages: their start and end relabel the memory sampler and time the stage. Metrics
    are kept per stage (the engine logs every step with ``log_every: 1``). Artifacts are sized, not copied.
    """

    def __init__(self, pipeline: str, sampler: Sampler, device: torch.device):
        self.pipeline = pipeline
        self.sampler = sampler
        self.device = device
        self.current: str | None = None
        self.stages: dict[str, dict] = {}

    @contextlib.contextmanager
    def run(self, name: str, *, tags=None, params=None, nested: bool = False):
        if not nested:
            yield f"{self.pipeline}"
            return
        label = f"{self.pipeline}/{name}"
        entry = self.stages.setdefault(name, {"metrics": [], "artifacts_gib": 0.0})
        # finished by an earlier invocation (a --keep folder): skipped now, so its steps are not observed here
        entry["reused"] = (tags or {}).get("reused") == "True"
        self.current = name
        self.sampler.relabel(label)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield label
        finally:
            entry["seconds"] = time.perf_counter() - start
            self.sampler.relabel(f"{self.pipeline}:between")
            entry["peak_rss_gib"] = self.sampler.peaks.get(label, 0) / GIB
            if self.device.type == "cuda":
                entry["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            self.current = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.current is not None:
            self.stages[self.current]["metrics"].append((step, dict(metrics)))

    def log_artifact(self, path, artifact_path=None) -> None:
        if self.current is None:
            return
        path = Path(path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        self.stages[self.current]["artifacts_gib"] += sum(p.stat().st_size for p in files) / GIB

    def log_params(self, params) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_figure(self, figure, name: str) -> None:
        pass

    @property
    def active_run_id(self) -> str | None:
        return self.current


# ------------------------------------------------------------------------------------------ tensor comparisons

class TensorFile:
    """Tensors of a model folder's safetensors file(s), read one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(str(path), framework="pt")

    def keys(self) -> set[str]:
        return set(self._file.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)


def compare_files(new: Path, old: Path, prefix: str = "") -> dict:
    """Tensor-by-tensor comparison of two safetensors files: which common tensors changed."""
    a, b = TensorFile(new), TensorFile(old)
    common = sorted((a.keys() & b.keys()) - {"masked_spec_embed"})
    changed, same, reshaped = [], [], []
    for key in common:
        x, y = a.get(key), b.get(key)
        if x.shape != y.shape:
            reshaped.append(prefix + key)
        elif torch.equal(x, y):
            same.append(prefix + key)
        else:
            changed.append(prefix + key)
    return {"changed": changed, "same": same, "reshaped": reshaped}


def state_diff(model_state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict:
    """Max |a - b| over ``expected``'s tensors, and every key missing from either side or of another shape."""
    missing = sorted(set(expected) - set(model_state))
    extra = sorted(set(model_state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(model_state) if model_state[k].shape != expected[k].shape)
    diff = 0.0
    for key in set(expected) & set(model_state):
        if key not in shapes and expected[key].numel():
            diff = max(diff, (model_state[key].float() - expected[key].float()).abs().max().item())
    return {"max_abs_diff": diff, "missing": missing[:10], "extra": extra[:10], "shape_mismatch": shapes[:10],
            "tensors": len(expected)}


def final_training_state(stage_dir: Path) -> tuple[dict[str, torch.Tensor], str] | None:
    """The weights a training stage ended with (``best.pt`` when validation selected one), memory-mapped."""
    from svlib.train.checkpoint import latest_checkpoint

    ckpt_dir = stage_dir / "ckpt"
    path = ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").is_file() else latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"], path.name


def merged_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """peft's ``<m>.base_layer.weight`` + scaling * B @ A under the stock name ``<m>.weight``."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            owner, leaf = key.split(".base_layer.")
            if leaf == "weight":
                a, b = state[f"{owner}.lora_A.default.weight"], state[f"{owner}.lora_B.default.weight"]
                value = value + scaling * (b.float() @ a.float())
            key = f"{owner}.{leaf}"
        out[key] = value
    return out


def folder_state(stage_dir: Path) -> dict[str, torch.Tensor]:
    """The model folder's tensors as the loader builds them, keyed like the stage's model state dict."""
    from svlib.model.speaker import load_model

    model = load_model(stage_dir / "model")
    return {k: v for k, v in model.state_dict().items() if not k.startswith("features.")}


def file_state(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    f = TensorFile(folder / "model.safetensors")
    return {prefix + k: f.get(k) for k in f.keys() if k != "masked_spec_embed"}


# ------------------------------------------------------------------------------------------ checks per stage

def check_model_folder(stage_dir: Path, lora_scaling: float | None) -> dict:
    """Reload ``model/`` and compare it with the files and with the stage's final training state."""
    state = folder_state(stage_dir)
    files = file_state(stage_dir / "model/encoder", "frontend.encoder.") | file_state(stage_dir / "model", "")
    out = {"vs_files": state_diff(state, files)}
    trained = final_training_state(stage_dir)
    if trained is not None:
        weights, name = trained
        weights = {k: v for k, v in weights.items() if not k.startswith("features.")}
        if lora_scaling is not None:
            weights = merged_lora_state(weights, lora_scaling)
        out["vs_checkpoint"] = state_diff(state, weights) | {"checkpoint": name}
    tol = 1e-6 if lora_scaling is not None else 0.0
    out["ok"] = all(not (d["missing"] or d["extra"] or d["shape_mismatch"]) and d["max_abs_diff"] <= tol
                    for d in (out["vs_files"], out.get("vs_checkpoint", out["vs_files"])))
    return out


def check_encoder_folder(stage_dir: Path) -> dict:
    """Reload ``encoder/`` (pruning stages; shrunk ones are resized on load) against files and checkpoint."""
    encoder = load_encoder(stage_dir / "encoder")
    state = encoder.state_dict()
    out = {"vs_files": state_diff(state, file_state(stage_dir / "encoder", "")),
           "params": count_parameters(encoder), "num_states": encoder.config.num_hidden_layers + 1}
    trained = final_training_state(stage_dir)
    if trained is not None:
        weights, name = trained
        student = {k[len("frontend.encoder."):]: v for k, v in weights.items() if k.startswith("frontend.encoder.")}
        out["vs_checkpoint"] = state_diff(state, student) | {"checkpoint": name}
    out["ok"] = all(not (d["missing"] or d["extra"] or d["shape_mismatch"]) and d["max_abs_diff"] == 0.0
                    for d in (out["vs_files"], out.get("vs_checkpoint", out["vs_files"])))
    return out


def step_metrics(monitor_entry: dict) -> dict:
    """Seconds per step from the engine's ``steps_per_s`` (step 1 includes the loader's start), losses."""
    rows = [(step, m) for step, m in monitor_entry.get("metrics", []) if step is not None and "steps_per_s" in m]
    losses = [float(m["train_loss"]) for _, m in rows if "train_loss" in m]
    out = {"steps": len(rows), "losses": losses,
           "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses)}
    if rows:
        seconds = [1.0 / m["steps_per_s"] for _, m in rows]
        out["first_step_seconds"] = seconds[0]
        out["seconds_per_step"] = seconds[-1] if len(seconds) > 1 else seconds[0]
    extras = ("distill_loss", "expected_sparsity", "deterministic_sparsity", "target_sparsity", "grad_norm")
    for key in extras:
        values = [float(m[key]) for _, m in rows if key in m]
        if values:
            out[key] = values[-1]
            if key in ("distill_loss", "grad_norm"):
                out["losses_finite"] = out["losses_finite"] and all(math.isfinite(x) for x in values)
    return out


def changed_summary(comparison: dict, expect: str) -> dict:
    """``expect``: "all" (every common tensor trained), "none" (frozen), or "lora" (only LoRA targets)."""
    changed, same = comparison["changed"], comparison["same"]
    total = len(changed) + len(same)
    out = {"changed": len(changed), "compared": total, "unchanged_examples": same[:5]}
    if expect == "none":
        out["ok"] = total > 0 and not changed and not comparison["reshaped"]
    elif expect == "lora":
        targets = [k for k in changed + same if k.endswith(("linear_q.weight", "linear_v.weight"))]
        out["lora_targets_changed"] = sum(k in set(changed) for k in targets)
        out["lora_targets"] = len(targets)
        out["others_changed"] = [k for k in changed if k not in set(targets)][:5]
        out["ok"] = bool(targets) and out["lora_targets_changed"] == len(targets) and not out["others_changed"]
    else:
        out["ok"] = total > 0 and not same and not comparison["reshaped"]
    return out


def head_rows(stage_dir: Path) -> int | None:
    path = stage_dir / "head.safetensors"
    return int(TensorFile(path).get("weight").shape[0]) if path.is_file() else None


def check_stage(spec, record: dict, monitor: dict, dirs: dict[str, Path], stage_cfg, expected: dict) -> dict:
    """One stage's entry: its numbers, and ``problems`` (empty when everything the stage promises holds)."""
    from experiments.prune import SHRINK_TOLERANCE
    from svlib.pruning import count_params
    from svlib.pruning.shrink import layer_sizes

    d = dirs[spec.name]
    init = dirs.get(spec.init) if spec.init else None
    entry: dict[str, Any] = {"kind": spec.kind, "seconds": monitor.get("seconds"),
                             "minutes_recorded": record.get("minutes"), "peak_rss_gib": monitor.get("peak_rss_gib"),
                             "saved_gib": monitor.get("artifacts_gib")}
    if "peak_gpu_gib" in monitor:
        entry["peak_gpu_gib"] = monitor["peak_gpu_gib"]
    problems: list[str] = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            problems.append(what)

    if monitor.get("reused"):
        entry["reused"] = True   # its step times and memory belong to the invocation that ran it
    elif spec.kind in ("train", "prune"):
        steps = step_metrics(monitor)
        entry |= steps
        need(steps["steps"] == stage_cfg.train.steps, f"{steps['steps']} logged steps, expected {stage_cfg.train.steps}")
        need(steps["losses_finite"], "a loss is not finite (or none was logged)")
    if spec.kind in ("train", "prune"):
        entry["amp"] = stage_cfg.train.amp
    if spec.kind == "train":
        frozen = stage_cfg.freeze_frontend
        lora = stage_cfg.lora
        before = (init / "model/encoder/model.safetensors") if init is not None else PRETRAINED / "model.safetensors"
        encoder_cmp = compare_files(d / "model/encoder/model.safetensors", before)
        entry["encoder_tensors"] = changed_summary(encoder_cmp, "lora" if lora else ("none" if frozen else "all"))
        need(entry["encoder_tensors"]["ok"], "encoder tensors changed against what the stage trains")
        if init is not None:
            entry["backend_tensors"] = changed_summary(compare_files(d / "model/model.safetensors",
                                                                     init / "model/model.safetensors"), "all")
            need(entry["backend_tensors"]["ok"], "not every back-end tensor changed")
        scaling = lora.alpha / lora.r if lora else None
        entry["reload"] = check_model_folder(d, scaling)
        need(entry["reload"]["ok"], "model/ does not reload to the trained weights")
        entry |= {k: record.get(k) for k in ("params_total", "params_encoder", "params_trainable", "num_classes")}
        entry["head_rows"] = head_rows(d)
        need(entry["head_rows"] == record.get("num_classes"), "head rows differ from the stage's classes")
        speeds = len(stage_cfg.sampling.speeds) if stage_cfg.sampling.speed_perturb else 1
        need(record.get("num_classes") == speeds * expected["train_speakers"],
             f"{record.get('num_classes')} classes, expected {speeds} x {expected['train_speakers']}")
        if lora:
            need(record.get("params_encoder") == expected["encoder"] + expected["lora"],
                 f"encoder + LoRA params {record.get('params_encoder')} != {expected['encoder'] + expected['lora']}")
            backend_and_head = record["params_total"] - record["params_encoder"] + record["num_classes"] * \
                TensorFile(d / "head.safetensors").get("weight").shape[1]
            lora_trainable = record["params_trainable"] - backend_and_head
            entry["params_lora_trainable"] = lora_trainable
            need(lora_trainable == expected["lora"], f"trainable LoRA params {lora_trainable} != {expected['lora']}")
        for list_name, res in (record.get("test") or {}).items():
            need(math.isfinite(res["eer_pct"]), f"test {list_name}: EER not finite")
    elif spec.kind == "merge":
        entry |= {"max_abs_diff": record["max_abs_diff"], "merge_rel_diff": record.get("merge_rel_diff"),
                  "params_lora": record["params_lora"]}
        need(record["params_lora"] == expected["lora"], f"LoRA params {record['params_lora']} != {expected['lora']}")
        same = compare_files(d / "model/encoder/model.safetensors", init / "model/encoder/model.safetensors")
        entry["vs_s1_folder"] = {"equal_tensors": len(same["same"]), "different": same["changed"][:5]}
        encoder_state = file_state(d / "model/encoder", "")
        entry["params_encoder"] = sum(v.numel() for v in encoder_state.values())
        need(entry["params_encoder"] == expected["encoder"], f"merged encoder has {entry['params_encoder']} params")
        entry["reload"] = check_model_folder(d, None)
        need(entry["reload"]["ok"], "model/ does not reload to its files")
    elif spec.kind == "prune":
        cmp = compare_files(d / "encoder/model.safetensors",
                            (init / "encoder/model.safetensors") if (init / "encoder").is_dir()
                            else init / "model/encoder/model.safetensors")
        entry["encoder_tensors"] = changed_summary(cmp, "all")
        need(entry["encoder_tensors"]["ok"], "not every student tensor changed")
        entry["reload"] = check_encoder_folder(d)
        need(entry["reload"]["ok"], "encoder/ does not reload to the trained weights")
        need(entry["reload"]["num_states"] == expected["num_states"], "distilled states != layers + 1")
        entry["distilled_states"] = len(stage_cfg.distill.layers) if stage_cfg.distill.layers else entry["reload"]["num_states"]
        if stage_cfg.prune is not None:
            gates = TensorFile(d / "gates.safetensors").keys()
            entry["gate_tensors"] = len(gates)
            need(len(gates) == 4 * expected["layers"], f"{len(gates)} gate sets, expected 4 x {expected['layers']}")
        entry |= {k: record.get(k) for k in ("params_encoder", "achieved_sparsity", "expected_sparsity")}
    elif spec.kind == "shrink":
        structure = json.loads((d / "structure.json").read_text())
        sizes = [{k: layer[k] for k in ("heads", "ffn1", "ffn2", "conv")} for layer in structure["layers"]]
        encoder = load_encoder(d / "encoder")
        counted = count_params(encoder.config, sizes)
        entry |= {"params_encoder": record["params_encoder"], "params_expected": counted,
                  "params_loaded": count_parameters(encoder), "achieved_sparsity": record["achieved_sparsity"],
                  "max_abs_diff": record.get("max_abs_diff")}
        # shrunk vs masked states on real audio, relative to the states' magnitude (the stage's own check)
        entry["shrink_rel_diff"] = record.get("shrink_rel_diff")
        need(entry["shrink_rel_diff"] is not None and entry["shrink_rel_diff"] <= SHRINK_TOLERANCE,
             f"shrink_rel_diff {entry['shrink_rel_diff']} missing or > {SHRINK_TOLERANCE}")
        need(int(record["params_encoder"]) == counted == entry["params_loaded"],
             f"shrunk params: record {record['params_encoder']}, counting {counted}, loaded {entry['params_loaded']}")
        need(layer_sizes(encoder) == sizes, "reloaded widths differ from structure.json")
        entry["reload"] = check_encoder_folder(d)
        need(entry["reload"]["ok"], "encoder/ does not reload to its files")
    elif spec.kind == "graft":
        teacher = dirs[spec.teacher]
        enc = compare_files(d / "model/encoder/model.safetensors", init / "encoder/model.safetensors")
        back = compare_files(d / "model/model.safetensors", teacher / "model/model.safetensors")
        entry["encoder_from_init_equal"] = not enc["changed"] and not enc["reshaped"] and bool(enc["same"])
        entry["backend_from_teacher_equal"] = not back["changed"] and bool(back["same"])
        need(entry["encoder_from_init_equal"] and entry["backend_from_teacher_equal"],
             "grafted model is not the pruned encoder + the teacher's back-end")
        entry |= {k: record.get(k) for k in ("reload_max_abs_diff", "params_total", "params_encoder")}
        entry["head_rows"] = head_rows(d)
        entry["reload"] = check_model_folder(d, None)
        need(entry["reload"]["ok"], "model/ does not reload to its files")
    elif spec.kind == "evaluate":
        entry["test"] = record.get("test")
        for list_name, res in (record.get("test") or {}).items():
            need(math.isfinite(res["eer_pct"]), f"{list_name}: EER not finite")
        need(bool(record.get("test")), "no evaluation results")
        entry |= {k: record.get(k) for k in ("params_total", "params_encoder")}
    elif spec.kind == "use":
        entry["source"] = spec.path
    entry["problems"] = problems
    entry["ok"] = not problems
    return entry


# ------------------------------------------------------------------------------------------ the run

def expected_sizes(size: str, train_speakers: int) -> dict:
    from svlib.model.frontend import encoder_config
    from svlib.pruning import count_params, dense_sizes

    config = encoder_config(size)  # the speaker-model encoder: SpecAugment off, so no masked_spec_embed
    with torch.device("meta"):
        encoder = Wav2Vec2BertModel(config)
    r = 64  # experiments/configs/w2vbert/s1.yaml: r 64 on linear_q, linear_v
    lora = sum(r * (m.in_features + m.out_features) for name, m in encoder.named_modules()
               if name.endswith(("linear_q", "linear_v")))
    return {"encoder": count_params(config, dense_sizes(config)), "lora": lora, "layers": config.num_hidden_layers,
            "num_states": config.num_hidden_layers + 1, "train_speakers": train_speakers}


def native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def effective_overrides(path: Path, device: str, amp_off: bool, dest: Path) -> Path:
    """The committed override file + the device (and ``train.amp: off`` for every stage when asked)."""
    overrides = yaml.safe_load(path.read_text())
    overrides["device"] = device
    if amp_off:
        for stage in overrides.get("stages", {}).values():
            stage.setdefault("train", {})["amp"] = "off"
    dest.write_text(yaml.safe_dump(overrides, sort_keys=False))
    return dest


def run_pipeline(name: str, config: Path, overrides: Path, sampler: Sampler, device: torch.device,
                 expected: dict) -> tuple[dict, str | None]:
    from experiments import pipeline

    cfg, stage_cfgs = pipeline.load_pipeline(config, overrides)
    monitor = StageMonitor(name, sampler, device)
    error, interrupted = None, False
    try:
        pipeline.run(cfg, config.parent, monitor, stage_cfgs=stage_cfgs)
    except Exception as err:  # recorded: the JSON says which stage failed and why
        error = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        traceback.print_exc()
    except (KeyboardInterrupt, SystemExit) as err:  # SIGTERM / Ctrl-C: report what finished, quickly
        error, interrupted = f"interrupted ({type(err).__name__} {err})", True
    from experiments.common import read_result

    dirs = pipeline.stage_dirs(cfg)
    stages = {}
    for spec in cfg.stages:
        record = read_result(dirs[spec.name])
        if record is None:
            stages[f"{name}/{spec.name}"] = {"kind": spec.kind, "ok": False,
                                              "problems": [error or "stage did not finish"]}
            continue
        label = f"{name}/{spec.name}"
        if interrupted:
            stages[label] = {"kind": spec.kind, "ok": False, "minutes_recorded": record.get("minutes"),
                             "seconds": monitor.stages.get(spec.name, {}).get("seconds"),
                             "peak_rss_gib": monitor.stages.get(spec.name, {}).get("peak_rss_gib"),
                             **step_metrics(monitor.stages.get(spec.name, {})),
                             "problems": ["finished, not checked: the run was interrupted"]}
            continue
        sampler.relabel(f"check:{label}")
        try:
            stages[label] = check_stage(spec, record, monitor.stages.get(spec.name, {}), dirs,
                                        stage_cfgs.get(spec.name), expected)
        except Exception as err:
            traceback.print_exc()
            stages[label] = {"kind": spec.kind, "ok": False, "problems": [f"check failed: {type(err).__name__}: {err}"]}
    return stages, error, interrupted


def print_table(stages: dict) -> None:
    print(f"{'stage':<24} {'ok':<4} {'s/step':>8} {'stage s':>8} {'peak GiB':>9}  notes")
    for label, e in stages.items():
        sps = e.get("seconds_per_step")
        note = "; ".join(e.get("problems", []))[:80]
        print(f"{label:<24} {'yes' if e.get('ok') else 'NO':<4} {'' if sps is None else f'{sps:8.2f}':>8} "
              f"{e.get('seconds') or 0:8.1f} {e.get('peak_rss_gib') or 0:9.2f}  {note}")


def summarise(run: dict, complete: bool) -> dict:
    """The JSON of the run so far (``complete``: all pipelines were attempted)."""
    args, stages, errors, setup, sampler = run["args"], run["stages"], run["errors"], run["setup"], run["sampler"]
    expected, encoder_params, amp_off = run.get("expected"), run.get("encoder_params"), run["amp_off"]
    start, load_start = run["start"], run["load_start"]
    wall = (time.perf_counter() - start) / 60.0
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(sampler.peak, peak_self)
    backend = stages.get("w2vbert/s1", {})
    backend_params = (backend.get("params_total") or 0) - (backend.get("params_encoder") or 0)
    checks = {
        "encoder_params": expected is not None and encoder_params == expected["encoder"],
        "backend_params": backend_params == FULL_BACKEND_PARAMS if args.size == "full" else backend_params > 0,
        "stages_ok": complete and bool(stages) and all(e.get("ok") for e in stages.values()) and not errors,
    }
    if args.size == "full":
        checks["within_minutes"] = wall <= LIMIT_MINUTES
        checks["within_rss"] = peak / GIB <= LIMIT_RSS_GIB
    load_end = os.getloadavg()
    result = {
        "all_ok": all(checks.values()),
        "checks": checks,
        "size": args.size,
        "device": args.device,
        "threads": args.threads,
        "amp": "off (float32): this CPU has no native bf16" if amp_off else "recipe (bf16 autocast)",
        "encoder_params": encoder_params,
        "encoder_params_expected": expected["encoder"] if expected is not None else None,
        "backend_params": backend_params,
        "lora_params": stages.get("w2vbert/merge", {}).get("params_lora"),
        "peak_rss_gib": peak / GIB,
        "wall_minutes": wall,
        "limits": {"minutes": LIMIT_MINUTES, "rss_gib": LIMIT_RSS_GIB} if args.size == "full" else None,
        "errors": errors,
        "stages": stages,
        "setup": setup,
        "machine": {"cpu_count": os.cpu_count(), "load_average_start": list(load_start),
                    "load_average_end": list(load_end),
                    "load_1min_mean": float(np.mean(sampler.loads)) if sampler.loads else None,
                    "load_1min_max": float(np.max(sampler.loads)) if sampler.loads else None,
                    "native_bf16": native_bf16(), "torch": torch.__version__,
                    "memory_total_gib": _kib_field("/proc/meminfo", ("MemTotal:",)) / GIB},
    }
    result["complete"] = complete
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="full: the w2v-bert-2.0 preset (580M); tiny: the tiny preset (the test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", choices=["auto", "recipe", "off"], default="auto",
                        help="auto: the recipe's bf16, except float32 at full size on a CPU without native bf16")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder, removed)")
    parser.add_argument("--out", help="JSON path (default: bench/results/full_size_rehearsal[_<size>].json)")
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    out_path = Path(args.out) if args.out else RESULTS / (
        "full_size_rehearsal.json" if args.size == "full" else f"full_size_rehearsal_{args.size}.json")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_off = args.amp == "off" or (args.amp == "auto" and args.size == "full" and device.type == "cpu"
                                    and not native_bf16())
    # SIGTERM (a timeout of bench/gpu.py, a scheduler) ends the run like Ctrl-C: the JSON still says what finished
    signal.signal(signal.SIGTERM, _terminate)
    sampler = Sampler()
    sampler.start()
    run = {"args": args, "stages": {}, "errors": [], "setup": {}, "sampler": sampler, "amp_off": amp_off,
           "start": time.perf_counter(), "load_start": os.getloadavg()}
    stages, errors, setup = run["stages"], run["errors"], run["setup"]
    scratch = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="rehearsal_"))
    scratch.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    size = "w2v-bert-2.0" if args.size == "full" else "tiny"
    interrupted = complete = False
    try:
        os.chdir(scratch)  # the recipe's relative paths (pretrained/, data/, exp/) resolve in the scratch folder
        t = time.perf_counter()
        setup["pretrained"] = write_pretrained_folder(scratch / PRETRAINED, size)
        setup["pretrained"]["write_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        setup["data"] = prepare_data(scratch, Path(args.shared).resolve())
        setup["data"]["seconds"] = time.perf_counter() - t
        expected = run["expected"] = expected_sizes(size, setup["data"]["train"]["speakers"])
        if args.size == "full":
            assert expected["encoder"] == FULL_ENCODER_PARAMS and expected["lora"] == FULL_LORA_PARAMS, expected
        run["encoder_params"] = count_parameters(load_encoder(PRETRAINED))
        for name, config, overrides in PIPELINES:
            eff = effective_overrides(overrides, args.device, amp_off, scratch / f"overrides_{name}.yaml")
            result, error, interrupted = run_pipeline(name, config, eff, sampler, device, expected)
            stages |= result
            write_json(out_path, summarise(run, complete=False))  # an interim record, in case of a later kill
            if error:
                errors.append(f"{name}: {error}")
                break
            for stage_dir in (scratch / "exp" / name).glob("*/ckpt"):
                shutil.rmtree(stage_dir)  # checked already; frees ~20 GB at full size before the next pipeline
        complete = not interrupted
    except (KeyboardInterrupt, SystemExit) as err:
        errors.append(f"interrupted during setup ({type(err).__name__} {err})")
        interrupted = True
    finally:
        os.chdir(cwd)
        sampler.relabel("cleanup")
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        sampler.stop()
    result = summarise(run, complete=complete)
    print_table(stages)
    checks, wall, peak = result["checks"], result["wall_minutes"], result["peak_rss_gib"]
    print(f"all_ok {result['all_ok']} ({checks}); wall {wall:.1f} min, peak {peak:.2f} GiB, "
          f"load mean {result['machine']['load_1min_mean']}")
    print(f"wrote {write_json(out_path, result)}")
    if interrupted:
        sys.exit(143)
    return result


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)

if __name__ == "__main__":
    sys.exit(0 if main()["all_ok"] else 1)
