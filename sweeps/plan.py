"""What a pruning sweep will cost, computed from its configs alone (nothing is trained or loaded).

    from sweeps.plan import plan_sweep, format_plan
    print(format_plan(plan_sweep(cfg, world_size=8, budget=0.1, n_trials=20, card="H100",
                                 train_utterances=1_092_009, grid=cfg.grid)))

For every stage of every trial (prune1, prune2 when set, each fine-tune stage; a grid trial of target 0 runs
the fine-tune stages alone, as ``sweeps.prune_sweep.run_trial`` does), per trial and for the whole study:

* **steps**: exactly what the stage would run. Lengths in epochs are converted the engine's way
  (``svlib.train.engine.resolve_config``) from the loader's steps per epoch at this world size,
  ``K = floor(copies * U / (batch_size * world_size))`` (``svlib.data.sampling.steps_per_epoch``; ``U``
  training utterances, ``copies`` = the number of speeds with speed perturbation, else 1), so
  ``steps = round(epochs * K)``. The reference prune1 on 8 GPUs: ``floor(1,092,009 / (16 * 8)) = 8,531``
  steps per epoch, x 20 epochs = 170,620 steps.
* **samples** = ``steps * batch_size * world_size`` (``batch_size`` is per GPU), the crops the stage draws.
* **audio hours** = ``samples * mean crop / 3600``, the mean crop being the middle of ``sampling.crop_seconds``
  (each batch draws its crop length uniformly from that range).
* **GPU-hours** = ``seconds_per_step * steps * world_size / 3600`` (every GPU is busy for every step);
  ``wall_hours`` = ``seconds_per_step * steps / 3600``, one trial on ``world_size`` GPUs.

Seconds per step (one GPU's share of one optimizer step) come from :func:`seconds_per_step`: measured by
``bench/gpu.py`` for this card and scaled by the work ratio, or else estimated from FLOPs (both explained
there). Every GPU-hour figure carries its ``source`` label. Not counted: the evaluation stage, validation
during fine-tuning, shrink/graft and their checks on real audio, data loading stalls and multi-GPU
communication (the estimate's utilisation is meant to absorb the last two).

``scale_budget`` shortens a stage for a cheaper sweep: every length in epochs times ``budget``, lengths in
steps (the reference's 10k-step sparsity warm-up) untouched.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

from svlib.config import ConfigError
from svlib.data.sampling import steps_per_epoch
from svlib.model.attention import default_implementation
from svlib.model.frontend import PRESETS, encoder_config
from svlib.pruning.counting import FRAMES_PER_SECOND, KINDS, count_macs, count_params, dense_sizes
from svlib.train.engine import TrainConfig, resolve_config

if TYPE_CHECKING:  # prune_sweep imports this module: importing it back here would be a circle
    from sweeps.prune_sweep import SweepConfig

__all__ = ["RESULTS", "DEFAULT_UTILISATION", "PEAK_BF16_DENSE_TFLOPS", "DEFAULT_PEAK_CARD", "card_slug",
           "check_budget", "scale_budget", "resolve_stage", "EncoderCost", "StepWork", "stage_work", "measured_file",
           "seconds_per_step", "count_train_utterances", "plan_sweep", "format_plan"]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"   # where bench/gpu.py writes gpu_<card>.json
DEFAULT_UTILISATION = 0.35             # fraction of the peak a real step reaches (the estimate's one guess)
TEACHER_PRESET = "w2v-bert-2.0"        # the teacher's encoder when its folder does not exist (yet)

# Peak dense bf16 tensor TFLOP/s from the vendors' datasheets (the "with sparsity" figures are twice these).
PEAK_BF16_DENSE_TFLOPS = {
    "h100": 989.0,       # H100 SXM5: 989.4 (1,979 with 2:4 sparsity)
    "h100_pcie": 756.0,  # H100 PCIe: 756
    "h200": 989.0,       # H200 SXM: the H100 SXM's tensor cores, more and faster memory
    "a100": 312.0,       # A100 SXM4 / PCIe: 312
    "l40s": 362.0,       # L40S: 362.05 (733 with sparsity)
    "a10": 125.0,        # A10: 125 (250 with sparsity)
    "a10g": 125.0,       # AWS's A10G has no datasheet of its own: taken as the A10's
}
DEFAULT_PEAK_CARD = "h100"             # the peak assumed for an unknown (or no) card

# Forward-pass equivalents of one utterance through an encoder: the backward costs about two forwards (the
# gradients of the activations and of the weights), a frozen encoder only runs forward, and a frozen one
# with LoRA still back-propagates to its inputs (its weight gradients are LoRA's, negligible).
PASSES_TRAINED, PASSES_FROZEN_LORA, PASSES_FORWARD = 3, 2, 1
StageKind = Literal["distill", "train"]
# Which bench/gpu.py timing a stage kind is scaled from, and how many forward passes of its dense encoder
# that timing holds: prune1 = trained student + frozen teacher, training_s2 = everything trained.
MEASURED = {"distill": ("prune1", PASSES_TRAINED + PASSES_FORWARD), "train": ("training_s2", PASSES_TRAINED)}


def card_slug(card: str) -> str:
    """A card name as ``bench/gpu.py`` writes it in its file name (``NVIDIA H100 80GB HBM3`` ->
    ``nvidia_h100_80gb_hbm3``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower()


def _contains_tokens(slug: str, key: str) -> bool:
    """Whether ``key``'s ``_``-separated tokens appear, in a row, among ``slug``'s (``h100`` in
    ``nvidia_h100_80gb``)."""
    return f"_{key}_" in f"_{slug}_"


# ------------------------------------------------------------------------------------------ stage lengths

def check_budget(budget: float, what: str = "budget") -> float:
    """``budget`` as a float when it lies in (0, 1], the fraction of every stage's epochs a trial runs; else a
    ConfigError naming ``what``."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ConfigError(f"{what}: must lie in (0, 1] (the fraction of every stage's epochs a trial runs), "
                          f"got {budget!r}")
    return float(budget)


def scale_budget(stage_cfg, budget: float):
    """A deep copy of a stage config (DistillStageConfig / TrainStageConfig) with every length in epochs
    times ``budget``: ``train.epochs``, ``train.ckpt_every_epochs``, ``train.val_every_epochs`` and each
    ``*_epochs`` field of ``train.schedule`` (warm-up, step size, cosine decay), so the schedule keeps its
    shape over the shorter run. Lengths in steps are left as they are (the reference states its sparsity
    warm-up as 10k steps); a stage with every length in steps comes back as an unchanged copy.
    ``budget`` must lie in (0, 1]."""
    budget = check_budget(budget)
    scaled = copy.deepcopy(stage_cfg)
    schedule = _scale_epoch_fields(scaled.train.schedule, budget)
    scaled.train = dataclasses.replace(_scale_epoch_fields(scaled.train, budget), schedule=schedule)
    return scaled


def _scale_epoch_fields(obj, budget: float):
    """``obj`` (a dataclass) with ``epochs`` and every ``*_epochs`` field that is set multiplied by ``budget``
    (through ``replace``, so the dataclass checks its new values)."""
    scaled = {f.name: getattr(obj, f.name) * budget for f in dataclasses.fields(obj)
              if (f.name == "epochs" or f.name.endswith("_epochs")) and getattr(obj, f.name) is not None}
    return dataclasses.replace(obj, **scaled) if scaled else obj


def resolve_stage(stage_cfg, train_utterances: int, world_size: int) -> tuple[TrainConfig, int]:
    """``(train config in steps, steps per epoch)`` exactly as the stage would resolve them at this world size:
    the loader's ``steps_per_epoch`` (``svlib.data.sampling``) through the engine's own ``resolve_config``."""
    sampling = stage_cfg.sampling
    per_epoch = steps_per_epoch(train_utterances, sampling.batch_size, world_size, sampling.copies)
    name = getattr(stage_cfg, "stage", "stage")
    if per_epoch < 1 and (sampling.mode == "epoch" or stage_cfg.train.in_epochs):
        raise ConfigError(f"{name}: {sampling.copies} x {train_utterances:,} (utterance, speed) entries are fewer "
                          f"than one step of batch {sampling.batch_size} x {world_size} GPUs")
    loader = SimpleNamespace(steps_per_epoch=per_epoch)   # all resolve_config reads of a TrainLoader
    resolved, _, _ = resolve_config(stage_cfg.train, loader, world_size)
    return resolved, per_epoch


# ------------------------------------------------------------------------------------------ work per step

@dataclass(frozen=True)
class EncoderCost:
    """Forward MACs of one utterance through the encoder (``svlib.pruning.counting.count_macs``), dense or
    pruned to a target sparsity.

    A pruned structure is not known before its trial has run, so its MACs are estimated as
    ``(1 - target) * prunable + fixed``: ``fixed`` = the MACs of the encoder with every head, FFN unit and
    conv channel removed (the feature projection), ``prunable`` = the dense MACs minus those. The target
    counts parameters, not MACs; the attention's ``T^2`` terms scale with the heads kept, not with the
    parameters, so this is a good estimate for short crops, not an exact count.
    """

    config: Any           # the encoder's (prepared) Wav2Vec2BertConfig
    label: str            # where the config came from, for the plan's header
    attention: str = "lean"

    def dense_macs(self, seconds: float) -> int:
        return count_macs(self.config, dense_sizes(self.config), seconds, self.attention)

    def fixed_macs(self, seconds: float) -> int:
        empty = [dict.fromkeys(KINDS, 0) for _ in range(self.config.num_hidden_layers)]
        return count_macs(self.config, empty, seconds, self.attention)

    def macs(self, seconds: float, sparsity: float = 0.0) -> float:
        fixed = self.fixed_macs(seconds)
        return fixed + (1.0 - sparsity) * (self.dense_macs(seconds) - fixed)

    def mean_macs(self, crop_seconds: tuple[float, float], sparsity: float = 0.0) -> float:
        """MACs averaged over the crop lengths a stage draws (uniform over ``[lo, hi]``, counted in frames,
        ends half-weighted): the attention's ``T^2`` makes the mean crop's own count a slight underestimate."""
        lo, hi = (round(s * FRAMES_PER_SECOND) for s in crop_seconds)
        if lo == hi:
            return self.macs(lo / FRAMES_PER_SECOND, sparsity)
        weights = [0.5 if t in (lo, hi) else 1.0 for t in range(lo, hi + 1)]
        macs = [self.macs(t / FRAMES_PER_SECOND, sparsity) for t in range(lo, hi + 1)]
        return sum(w * m for w, m in zip(weights, macs)) / sum(weights)

    @cached_property
    def params(self) -> int:
        return count_params(self.config, dense_sizes(self.config))


@dataclass(frozen=True)
class StepWork:
    """What one GPU computes in one optimizer step: ``batch_size`` crops, each through the stage's encoders,
    ``forward_macs`` = sum over those encoders of (forward passes x forward MACs of one crop)."""

    batch_size: int
    crop_seconds: float   # mean crop, for the table
    forward_macs: float

    @property
    def flops(self) -> float:
        """``2 * batch * forward_macs`` (a MAC is two FLOPs). Normalisation, activations, the back-end and the
        optimizer update are left out: a few percent of a 580M-parameter encoder's matmuls."""
        return 2.0 * self.batch_size * self.forward_macs


def _mean_crop(sampling) -> float:
    lo, hi = sampling.crop_seconds
    return (lo + hi) / 2.0


def stage_work(stage_cfg, kind: StageKind, encoder: EncoderCost, student_sparsity: float) -> StepWork:
    """One step of a sweep stage. ``distill`` (prune1 / prune2): the student trained (x3) and the frozen dense
    teacher forward (x1); prune1's student is the dense encoder under its masks (``student_sparsity`` 0),
    prune2's the shrunk one. ``train`` (fine-tuning): the encoder trained (x3), frozen (x1) or frozen with
    LoRA (x2), at ``student_sparsity`` (0 for the dense teacher of a target-0 trial)."""
    crops = stage_cfg.sampling.crop_seconds
    student = encoder.mean_macs(crops, student_sparsity)
    if kind == "distill":
        macs = PASSES_TRAINED * student + PASSES_FORWARD * encoder.mean_macs(crops)
    elif not stage_cfg.freeze_frontend:
        macs = PASSES_TRAINED * student
    else:
        macs = (PASSES_FORWARD if stage_cfg.lora is None else PASSES_FROZEN_LORA) * student
    return StepWork(stage_cfg.sampling.batch_size, _mean_crop(stage_cfg.sampling), macs)


# ------------------------------------------------------------------------------------------ seconds per step

def _peak_of(card: str | None) -> tuple[float, str]:
    """(peak dense bf16 FLOP/s, how it was chosen) for ``card``; the most specific table entry wins."""
    slug = card_slug(card) if card else ""
    known = [key for key in PEAK_BF16_DENSE_TFLOPS if slug and _contains_tokens(slug, key)]
    if known:
        key = max(known, key=len)   # "nvidia_h100_pcie" is the PCIe card, not the SXM one
        return PEAK_BF16_DENSE_TFLOPS[key] * 1e12, f"{card}: {PEAK_BF16_DENSE_TFLOPS[key]:g} TFLOP/s bf16 dense"
    assumed = f"{PEAK_BF16_DENSE_TFLOPS[DEFAULT_PEAK_CARD]:g} TFLOP/s bf16 dense ({DEFAULT_PEAK_CARD.upper()} SXM)"
    what = f"unknown card {card}" if card else "no card given"
    return PEAK_BF16_DENSE_TFLOPS[DEFAULT_PEAK_CARD] * 1e12, f"{what}: assumed {assumed}"


def measured_file(card: str | None, results_dir: str | Path = RESULTS) -> Path | None:
    """``<results_dir>/gpu_<card slug>.json`` (``bench/gpu.py``'s name); else the one ``gpu_*.json`` whose
    slug holds the card's (``H100`` finds ``gpu_nvidia_h100_80gb_hbm3.json``). Dry runs (CPU, tiny preset)
    are never used. Several matches: a ConfigError asking for the full name."""
    if not card:
        return None
    slug, results_dir = card_slug(card), Path(results_dir)

    def usable(path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            return not json.loads(path.read_text()).get("dry", False)
        except ValueError:
            raise ConfigError(f"{path}: not valid JSON (rerun bench/gpu.py or remove it)") from None

    exact = results_dir / f"gpu_{slug}.json"
    if usable(exact):
        return exact
    found = [p for p in sorted(results_dir.glob("gpu_*.json")) if _contains_tokens(p.stem[4:], slug) and usable(p)]
    if len(found) > 1:
        raise ConfigError(f"card {card!r} matches several benchmarks ({', '.join(p.name for p in found)}): give the "
                          "card's full name")
    return found[0] if found else None


def _shown(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _measured_reference(kind: StageKind, path: Path, attention: str) -> tuple[float, StepWork] | None:
    """(seconds per step, its work) of the ``bench/gpu.py`` timing a stage kind scales from; None if absent."""
    bench = json.loads(path.read_text())
    section, passes = MEASURED[kind]
    timing = bench.get(section)
    if not timing or bench.get("preset") not in PRESETS:
        return None
    if kind == "train":   # batch 64 x 3 s, one timing per attention implementation
        timing = timing.get(attention) or timing.get("lean")
        batch, seconds = bench["batch"], bench["seconds"]
    else:                 # prune1: 16 x 4 s
        batch, seconds = timing["batch"], timing["seconds"]
    if not timing or timing.get("seconds_per_step") is None:
        return None
    encoder = EncoderCost(encoder_config(bench["preset"]), bench["preset"], attention)
    return float(timing["seconds_per_step"]), StepWork(batch, seconds, passes * encoder.macs(seconds))


def seconds_per_step(stage_kind: StageKind, work: StepWork, card: str | None, *, results_dir: str | Path = RESULTS,
                     utilisation: float = DEFAULT_UTILISATION, attention: str = "lean") -> tuple[float, str]:
    """``(seconds, source)`` of one GPU's share of one step of a ``distill`` or ``train`` stage.

    Measured, when ``bench/gpu.py`` has benchmarked this card (:func:`measured_file`): its per-step seconds for
    the same kind of step (``prune1``: dense student trained + teacher forward at 16 x 4 s; ``training_s2``:
    the whole model trained at 64 x 3 s, the ``attention`` implementation's timing) times
    ``work.flops / reference.flops``, the ratio of batch x crop x forward passes x encoder MACs.

    Estimated otherwise: ``work.flops / (peak * utilisation)`` with the card's peak dense bf16 FLOP/s
    (:data:`PEAK_BF16_DENSE_TFLOPS`; an unknown card is assumed to be an H100 SXM, and says so) and
    ``utilisation`` (default 0.35, what a well-fed bf16 transformer step reaches; not measured here).
    """
    if stage_kind not in MEASURED:
        raise ValueError(f"stage_kind must be one of {sorted(MEASURED)}, got {stage_kind!r}")
    if not 0.0 < utilisation <= 1.0:
        raise ConfigError(f"utilisation: must lie in (0, 1], got {utilisation}")
    path = measured_file(card, results_dir)
    reference = _measured_reference(stage_kind, path, attention) if path is not None else None
    if reference is not None:
        seconds, reference_work = reference
        return seconds * work.flops / reference_work.flops, f"measured ({_shown(path)})"
    peak, peak_note = _peak_of(card)
    missing = f"; {path.name} has no usable {MEASURED[stage_kind][0]} timing" if path is not None else ""
    return work.flops / (peak * utilisation), f"estimate ({peak_note} x {utilisation:g} utilisation{missing})"


# ------------------------------------------------------------------------------------------ the plan

def count_train_utterances(train_dir: str | Path | None) -> int:
    """Utterances of a Kaldi data folder, read a line at a time (1.09M lines at full size): ``utt2spk`` has one
    line per utterance (what the loader draws from); ``wav.scp`` too, unless a ``segments`` file re-keys it."""
    if train_dir is None:
        raise ConfigError("data.train is not set: pass --train-utterances N (the training set's utterance count)")
    folder = Path(train_dir)
    for name in ("utt2spk", "wav.scp"):
        path = folder / name
        if path.is_file() and not (name == "wav.scp" and (folder / "segments").is_file()):
            with path.open("rb") as lines:
                return sum(1 for line in lines if line.strip())
    raise ConfigError(f"{folder}: no utt2spk or wav.scp to count the training utterances (the data is not "
                      "prepared here): pass --train-utterances N")


def _teacher_encoder(cfg: SweepConfig, attention: str) -> EncoderCost:
    folder = Path(cfg.teacher) / "model" / "encoder"
    if (folder / "config.json").is_file():
        return EncoderCost(encoder_config(folder), f"teacher {folder / 'config.json'}", attention)
    return EncoderCost(encoder_config(TEACHER_PRESET), f"{TEACHER_PRESET} preset ({folder / 'config.json'} not "
                       "found)", attention)


def _trial_stages(cfg: SweepConfig, target: float) -> list[tuple[Any, StageKind, float]]:
    """(stage config, kind, the student's sparsity) of a trial in order, as ``run_trial`` runs them."""
    pruning = [(cfg.prune1, "distill", 0.0)] if target > 0.0 else []   # target 0: the dense teacher's fine-tune
    if target > 0.0 and cfg.prune2 is not None:
        pruning.append((cfg.prune2, "distill", target))
    return pruning + [(stage, "train", target) for stage in cfg.finetune]


def _totals(rows: list[dict]) -> dict:
    return {"steps": sum(r["steps"] for r in rows), "samples": sum(r["samples"] for r in rows),
            "audio_hours": sum(r["audio_hours"] for r in rows), "gpu_hours": sum(r["gpu_hours"] for r in rows),
            "wall_hours": sum(r["wall_hours"] for r in rows), "source": _joined(r["source"] for r in rows)}


def _joined(sources) -> str:
    distinct = list(dict.fromkeys(sources))
    return distinct[0] if len(distinct) == 1 else "mixed: " + "; ".join(distinct)


def plan_sweep(cfg: SweepConfig, *, world_size: int, budget: float, n_trials: int, card: str | None = None,
               train_utterances: int | None = None, grid: list[float] | None = None,
               results_dir: str | Path = RESULTS, utilisation: float = DEFAULT_UTILISATION) -> dict:
    """The cost of the sweep ``cfg`` with ``world_size`` GPUs per trial and every stage at ``budget``
    (:func:`scale_budget`), nothing trained.

    Trials: with ``grid`` (the ``--grid`` study), one per grid point, each at its target (``n_trials`` is not
    used: a shorter grid run covers points in the sampler's order); else ``n_trials`` TPE trials, each priced
    at the mean of ``space.target_sparsity``'s range (the midpoint, also for a log range). ``train_utterances``
    defaults to the lines of ``<data.train>/utt2spk``. The teacher's encoder is
    ``<teacher>/model/encoder/config.json``, else the W2V-BERT 2.0 preset (``encoder.config`` says which).

    Returns ``{world_size, budget, card, source, train_utterances, encoder, study, stages, trials, total,
    warnings}``: one ``stages`` row per (trial, stage) with steps, steps_per_epoch, epochs, samples,
    audio_hours, seconds_per_step, gpu_hours, wall_hours and its source; ``trials`` and ``total`` their sums.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size: GPUs per trial must be a positive integer, got {world_size!r}")
    if grid is None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ConfigError(f"n_trials: must be a positive integer, got {n_trials!r}")
    if train_utterances is None:
        train_utterances = count_train_utterances(cfg.data.train)
    elif isinstance(train_utterances, bool) or not isinstance(train_utterances, int) or train_utterances < 1:
        raise ConfigError(f"train_utterances: must be a positive integer, got {train_utterances!r}")
    attention = default_implementation()
    encoder = _teacher_encoder(cfg, attention)
    if grid is not None:
        targets = [float(t) for t in grid]
        study = {"kind": "grid", "trials": len(targets), "targets": "the grid's points, one trial each"}
    else:
        space = cfg.space.target_sparsity
        mean = (space.low + space.high) / 2.0
        targets = [mean] * n_trials
        study = {"kind": "tpe", "trials": n_trials, "targets": f"every trial at {mean:g}, the middle of "
                 f"space.target_sparsity [{space.low:g}, {space.high:g}]"}
    warnings: list[str] = []
    rows: list[dict] = []
    for trial, target in enumerate(targets):
        for stage_cfg, kind, sparsity in _trial_stages(cfg, target):
            stage_cfg = scale_budget(stage_cfg, budget)
            resolved, per_epoch = resolve_stage(stage_cfg, train_utterances, world_size)
            work = stage_work(stage_cfg, kind, encoder, sparsity)
            seconds, source = seconds_per_step(kind, work, card, results_dir=results_dir, utilisation=utilisation,
                                               attention=attention)
            steps, batch = resolved.steps, stage_cfg.sampling.batch_size
            samples = steps * batch * world_size
            rows.append({"trial": trial, "target": target, "stage": stage_cfg.stage, "kind": kind,
                         "batch_size": batch, "crop_seconds": work.crop_seconds, "steps_per_epoch": per_epoch,
                         "epochs": steps / per_epoch if per_epoch else None, "steps": steps, "samples": samples,
                         "audio_hours": samples * work.crop_seconds / 3600.0, "seconds_per_step": seconds,
                         "gpu_hours": seconds * steps * world_size / 3600.0, "wall_hours": seconds * steps / 3600.0,
                         "source": source})
            prune = getattr(stage_cfg, "prune", None)
            if prune is not None and prune.warmup_steps >= steps:
                note = (f"{stage_cfg.stage}: the sparsity warm-up ({prune.warmup_steps:,} steps) does not end within "
                        f"the stage's {steps:,} steps: the target is not reached")
                if note not in warnings:
                    warnings.append(note)
    trials = [{"trial": trial, "target": target, **_totals([r for r in rows if r["trial"] == trial])}
              for trial, target in enumerate(targets)]
    total = {"trials": len(trials), **_totals(rows)}
    return {"world_size": world_size, "budget": budget, "card": card, "source": total["source"],
            "train_utterances": train_utterances, "utilisation": utilisation, "attention": attention,
            "encoder": {"config": encoder.label, "params": encoder.params, "layers": encoder.config.num_hidden_layers,
                        "hidden_size": encoder.config.hidden_size,
                        "pruned_macs": "(1 - target) x prunable MACs + fixed MACs (the feature projection)"},
            "study": study, "stages": rows, "trials": trials, "total": total, "warnings": warnings}


# ------------------------------------------------------------------------------------------ table

_COLUMNS = (("epochs", 7), ("steps", 11), ("samples", 15), ("audio h", 12), ("s/step", 9), ("GPU-h", 10),
            ("wall h", 9))


def _cells(row: dict) -> list[str]:
    epochs = "" if row.get("epochs") is None else f"{row['epochs']:.3g}"
    per_step = f"{row['seconds_per_step']:.3g}" if "seconds_per_step" in row else ""
    return [epochs, f"{row['steps']:,}", f"{row['samples']:,}", f"{row['audio_hours']:,.1f}", per_step,
            f"{row['gpu_hours']:,.2f}", f"{row['wall_hours']:,.2f}"]


def _line(label: str, cells: list[str], note: str = "", width: int = 12) -> str:
    line = f"  {label:<{width}}" + "".join(f"{cell:>{w}}" for cell, (_, w) in zip(cells, _COLUMNS))
    return f"{line}  [{note}]" if note else line


def format_plan(plan: dict) -> str:
    """The plan as fixed-width text: a header (world size, budget, card, the GPU-time source), the stages of
    each trial (trials priced alike, as every TPE trial, share one table), one line per trial, the study total."""
    world = plan["world_size"]
    study, total = plan["study"], plan["total"]
    lines = [f"Sweep plan: {study['trials']} {study['kind']} trial(s) x {world} GPU(s) each, "
             f"budget {plan['budget']:g}, card {plan['card'] or '-'}, {plan['train_utterances']:,} training utterances",
             f"GPU time: {plan['source']}",
             f"Encoder: {plan['encoder']['config']}, {plan['encoder']['params']:,} parameters; a pruned trial's "
             f"MACs = {plan['encoder']['pruned_macs']}",
             f"Targets: {study['targets']}",
             ""]
    header = _line("stage", [name for name, _ in _COLUMNS])
    mixed = plan["source"].startswith("mixed")
    trials = plan["trials"]
    start = 0
    while start < len(trials):   # consecutive trials with the same target have the same stages
        end = start
        while end + 1 < len(trials) and trials[end + 1]["target"] == trials[start]["target"]:
            end += 1
        target = trials[start]["target"]
        which = f"trial {start}" if end == start else f"trials {start}-{end} ({end - start + 1} trials, each)"
        what = "dense teacher, fine-tune only" if target == 0.0 else "pruned"
        lines += [f"{which}: target {target:g} ({what})", header]
        stage_rows = [r for r in plan["stages"] if r["trial"] == start]
        # a plan of several sources (a benchmark without one of the timings) says which row has which
        lines += [_line(r["stage"], _cells(r), r["source"].split(" ")[0] if mixed else "") for r in stage_rows]
        lines += [_line("trial", _cells(trials[start])), ""]
        start = end + 1
    lines += ["per trial", _line("trial target", [name for name, _ in _COLUMNS])]
    lines += [_line(f"{t['trial']:<5} {t['target']:.2f}", _cells(t)) for t in trials]
    lines += [_line("study total", _cells(total)),
              f"(study total: {total['trials']} trial(s); wall hours = one trial at a time on {world} GPU(s); "
              "evaluation and validation not counted)"]
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)
