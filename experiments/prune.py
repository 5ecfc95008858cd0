"""Knowledge-distillation-guided structured pruning of the encoder: the stages prune1, shrink, prune2
(and random_prune, the same-size baseline without distillation; control, the encoder removed or re-initialised).

    python -m experiments.prune distill --config experiments/configs/demo_prune/prune1.yaml --data D.yaml \
        --init exp/demo/s2 --out exp/demo_prune/prune1
    python -m experiments.prune shrink --init exp/demo_prune/prune1 --data D.yaml --out exp/demo_prune/shrink
    python -m experiments.prune distill --config .../prune2.yaml --data D.yaml --init exp/demo_prune/shrink \
        --teacher exp/demo/s2 --out exp/demo_prune/prune2

The flow (DPHuBERT-style, as the reference's train_prune_s1/s2 + apply_prune_s1/s2)::

    s2/model ──encoder (frozen, eval)──▶ teacher
             ──copy + hard-concrete masks──▶ student   prune1: distil + Lagrangian on expected sparsity
    prune1/{encoder, gates} ──shrink (checked equal on real audio)──▶ shrink/encoder (physically smaller)
    shrink/encoder ──distil again, no regulariser──▶ prune2/encoder ──graft (experiments.graft)──▶ model folder

Both distillation stages go through ``svlib.train.engine.train`` (one training loop for everything): the
"model" is ``DistillPair`` (waves -> student states, teacher states, frame mask; features computed once)
and the "head" is ``DistillObjective`` (distillation loss [+ Lagrangian], per-step metrics as extras); they,
their configs (``DistillConfig``, ``PruneConfig``), the target schedule and the random-structure baseline
(``random_masks``) live in ``svlib.pruning.objective``. This module holds the stages and their command line.
The engine's checkpoints therefore hold the student weights, the gates, the multipliers, the optimizer,
the loader position and the RNG streams: an interrupted stage resumes exactly. The teacher is not part of
any checkpoint (it is reloaded from its folder).

A stage folder (``experiments.common``) holds here::

    encoder/            the student encoder (HF folder; dense with masks for prune1, shrunk after that)
    gates.safetensors   prune1: the hard-concrete log-alphas (with config.yaml's ``prune.masks``, the masks)
    structure.json/png  prune1, shrink, random_prune: kept heads / ffn1 / ffn2 / conv channels per layer
    ckpt/               engine checkpoints
    result.json         written last
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from experiments.common import (DataConfig, Timer, max_relative_diff, rank_zero_result, read_result,
                                setup_stage_device, write_result, write_stage_config)
from experiments.train import HEAD, HeadConfig, build_augmenter, initial_head
from svlib.config import ConfigError, load_config, save_config
from svlib.data.augment import AugmentConfig
from svlib.data.lists import DataDir
from svlib.data.sampling import SamplingConfig, TrainLoader
from svlib.features import W2VBertFbank
from svlib.files import save_tensors_atomic
from svlib.model.frontend import Frontend, count_parameters, encoder_from_config, load_encoder, save_encoder
from svlib.model.speaker import SpeakerModel, load_model, save_model
from svlib.pruning import (MaskSet, attach_masks, count_params, dense_sizes, layer_sizes, param_groups, prune_model,
                           save_pruned_encoder, shrink_encoder)
from svlib.pruning.counting import KINDS
from svlib.pruning.objective import (RANDOM_MATCH, ClassifyObjective, DistillConfig, DistillObjective, DistillPair,
                                     MaskedSpeakerModel, PruneConfig, random_masks)
from svlib.train.engine import TrainConfig, train

ENCODER = "encoder"
GATES = "gates.safetensors"
STRUCTURE = "structure.json"
STRUCTURE_PNG = "structure.png"
# Shrunk vs masked encoder, every hidden state, on real audio: float32 re-association only, relative to each
# state's largest magnitude (the absolute error grows with it: 8.4e-5 at max |h| = 116 on a 12-layer D=256
# model, i.e. 7e-7 relative; a wrong fold is off by 1e-2 or more).
SHRINK_TOLERANCE = 1e-5
CHECK_UTTERANCES = 4


# ------------------------------------------------------------------------------------------ loading

def load_stage_encoder(stage_dir: Path) -> Frontend:
    """The encoder a pruning stage (or a speaker model folder's stage) hands on, as a trainable front-end."""
    stage_dir = Path(stage_dir)
    if (stage_dir / ENCODER).is_dir():
        return Frontend(load_encoder(stage_dir / ENCODER))
    if (stage_dir / "model").is_dir():
        return load_model(stage_dir / "model").frontend
    raise FileNotFoundError(f"{stage_dir}: neither {ENCODER}/ (a pruning stage) nor model/ (a training stage); "
                            "is the stage finished?")


def save_stage_encoder(encoder, folder: Path) -> Path:
    """Dense encoders as a plain HF folder, shrunk ones with their per-layer widths in ``config.json``."""
    if layer_sizes(encoder) == dense_sizes(encoder.config):
        return save_encoder(encoder, folder)
    return save_pruned_encoder(encoder, folder)


def check_batch(datadir: DataDir, seconds: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first utterances of ``datadir`` (real audio, different lengths, padded) for equality checks."""
    utts = sorted(datadir.wavs)[:CHECK_UTTERANCES]
    waves = [torch.from_numpy(datadir.load_wave(u, max_seconds=seconds)) for u in utts]
    lengths = torch.tensor([len(w) for w in waves])
    return torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths


@torch.no_grad()
def encoder_states(frontend: Frontend, waves: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """All hidden states on the valid frames only (padded frames hold meaningless values)."""
    device = next(frontend.parameters()).device
    feats, mask = W2VBertFbank().to(device)(waves.to(device), lengths.to(device))
    states = frontend(feats, mask)
    keep = mask.bool()
    return [s[keep] for s in states]


def max_state_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ configs

OBJECTIVES = ("distill", "classification")


@dataclass
class DistillStageConfig:
    """prune1 (with ``prune:``) or prune2 (without). ``train.optim.lr_frontend`` is the encoder weights' lr
    (reference: 2e-4).

    ``objective``: what the masked student is trained on. ``distill`` (the reference): the teacher's hidden
    states (``distill``); no back-end, ``train.optim.lr_backend`` is unused. ``classification`` (prune1 only):
    task-loss pruning without a teacher, the single-stage "prune while fine-tuning" family (e.g. arXiv
    2508.16232): the same masks and Lagrangian, but the loss is the AAM-softmax of the stage-2 classifier
    (``head``, continued from ``init``'s head.safetensors) on the speaker model (``init``'s back-end, trained at
    ``train.optim.lr_backend``), with ``augment`` as a training stage has it. Its folder then also holds
    ``model/`` and head.safetensors, the back-end and classifier that graft takes (``teacher: prune1``).
    """

    stage: str = "prune1"
    prune: PruneConfig | None = None
    objective: Literal["distill", "classification"] = "distill"
    distill: DistillConfig = field(default_factory=DistillConfig)
    head: HeadConfig | None = None            # classification only
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # classification only (default: none)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    check_seconds: float = 4.0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.train.val_every:
            raise ConfigError(f"{self.stage}: train.val_every must be 0: a pruning stage keeps its last state "
                              "(the constraint is met at the end), there is no model selection")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{self.stage}: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "classification":
            if self.prune is None:
                raise ConfigError(f"{self.stage}: objective 'classification' prunes (it needs a 'prune:' section); "
                                  "prune2 distils towards the teacher")
            if self.head is None:
                raise ConfigError(f"{self.stage}: objective 'classification' needs 'head:' (scale, margin of the "
                                  "AAM-softmax, as the training stages have it)")
            if self.prune.snapshots:
                raise ConfigError(f"{self.stage}: prune.snapshots with objective 'classification': every snapshot "
                                  "would be grafted onto the back-end trained to the run's end, not its own")
        elif self.head is not None or self.augment != AugmentConfig():
            raise ConfigError(f"{self.stage}: 'head' and 'augment' are for objective 'classification' only")


# ------------------------------------------------------------------------------------------ snapshots

SNAPSHOTS = "snapshots"


def snapshot_dir(stage_dir: str | Path, level: float) -> Path:
    """Where prune1 saves its snapshot at ``level`` (a folder shaped like a finished prune1 stage)."""
    return Path(stage_dir) / SNAPSHOTS / f"{float(level):.3f}"


def save_snapshot(stage_dir: Path, level: float, cfg: DistillStageConfig, student: Frontend, mask_set: MaskSet,
                  step: int, reached: bool) -> dict:
    """The student's weights and gates now, as a finished prune1 stage folder (config.yaml, encoder/, gates,
    structure.json, result.json), written to a temporary folder and renamed into place: a folder that exists
    is complete. Rank 0 only."""
    final = snapshot_dir(stage_dir, level)
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(cfg, tmp / "config.yaml")
    save_stage_encoder(student.encoder, tmp / ENCODER)  # dense, with the masks' weights as they are at ``step``
    record = {"stage": cfg.stage, "snapshot": level, "step": step, "reached": reached, "target_sparsity": level,
              **save_gates(tmp, mask_set, student.config, f"{cfg.stage} snapshot {level:.3f}")}
    write_result(tmp, record)
    os.replace(tmp, final)
    return record


class SnapshotWriter:
    """The engine's ``after_step`` for ``prune.snapshots``: saves each level the first time the sparsity the
    Lagrangian constrains reaches it (``constrain: deterministic``: what the deterministic masks keep, exactly
    what shrink will keep; else the expected sparsity, which lagged the masks' by up to 0.02 on the demo's ramp).
    During a fast ramp the masks' sparsity moves in jumps (many gates cross together), so a snapshot can land
    above its level: on the demo, 0.728 and 0.838 for 0.7 and 0.8 (result.json records the achieved value).
    Levels already on disk are skipped, so a resumed run writes only what it had not saved before it stopped
    (replaying the same steps, at the same steps)."""

    def __init__(self, stage_dir: Path, cfg: DistillStageConfig, student: Frontend, mask_set: MaskSet, rank: int):
        self.stage_dir, self.cfg, self.student, self.mask_set, self.rank = stage_dir, cfg, student, mask_set, rank
        self.pending = [v for v in cfg.prune.snapshots if not snapshot_dir(stage_dir, v).is_dir()]

    def __call__(self, step: int) -> None:
        if not self.pending:
            return
        with torch.no_grad():  # the same on every rank (DDP-synced gates)
            expected, rounded = self.mask_set.param_counts()  # rounded == what shrink keeps, computed on device
        # one host read per step, not one per gate (deterministic_params() reads every gate's mask back)
        params = float(rounded if self.cfg.prune.constrain == "deterministic" else expected)
        sparsity = 1.0 - params / self.mask_set.dense_params
        while self.pending and sparsity >= self.pending[0]:
            level = self.pending.pop(0)
            if self.rank == 0:
                save_snapshot(self.stage_dir, level, self.cfg, self.student, self.mask_set, step, reached=True)

    def finish(self, step: int) -> None:
        """Rank 0, after training: levels never reached are saved from the final state (``reached: false``)."""
        for level in self.pending:
            save_snapshot(self.stage_dir, level, self.cfg, self.student, self.mask_set, step, reached=False)
        self.pending = []


def snapshot_records(stage_dir: Path) -> list[dict]:
    """The result.json of every snapshot saved under ``stage_dir``, by level."""
    root = Path(stage_dir) / SNAPSHOTS
    found = [read_result(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.endswith(".partial")] \
        if root.is_dir() else []
    return [r for r in found if r is not None]


# ------------------------------------------------------------------------------------------ structure

def structure_record(sizes: list[dict[str, int]], config) -> dict:
    """``structure.json`` (docs/CONTRACTS.md): kept widths per layer, the dense widths, the sizes."""
    dense = dense_sizes(config)
    params, dense_params = count_params(config, sizes), count_params(config, dense)
    return {"layers": [{"layer": i, **{k: int(s[k]) for k in KINDS}} for i, s in enumerate(sizes)],
            "dense": [{"layer": i, **{k: int(s[k]) for k in KINDS}} for i, s in enumerate(dense)],
            "params_encoder": params, "dense_params_encoder": dense_params,
            "achieved_sparsity": 1.0 - params / dense_params}


def plot_structure(record: dict, path: Path, title: str) -> Path:
    """Heatmap of the fraction kept per layer and kind, annotated with the kept counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = np.array([[layer[k] for layer in record["layers"]] for k in KINDS], dtype=float)
    dense = np.array([[layer[k] for layer in record["dense"]] for k in KINDS], dtype=float)
    frac = np.divide(kept, dense, out=np.zeros_like(kept), where=dense > 0)
    n_layers = kept.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * n_layers + 2.0), 3.0))
    image = ax.imshow(frac, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (r, c), value in np.ndenumerate(kept):
        ax.text(c, r, f"{int(value)}", ha="center", va="center", fontsize=7,
                color="white" if frac[r, c] < 0.6 else "black")
    ax.set_yticks(range(len(KINDS)), KINDS)
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("layer")
    ax.set_title(f"{title}: sparsity {record['achieved_sparsity']:.3f}", fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction kept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_structure(stage_dir: Path, sizes: list[dict[str, int]], config, title: str, tracker=None) -> dict:
    record = structure_record(sizes, config)
    (stage_dir / STRUCTURE).write_text(json.dumps(record, indent=2) + "\n")
    plot_structure(record, stage_dir / STRUCTURE_PNG, title)
    if tracker is not None:
        tracker.log_artifact(stage_dir / STRUCTURE)
        tracker.log_artifact(stage_dir / STRUCTURE_PNG)
    return record


def save_gates(stage_dir: Path, mask_set: MaskSet, config, title: str, tracker=None) -> dict:
    """The gates (``gates.safetensors``) and the structure their deterministic masks keep (structure.json/png)
    in ``stage_dir``; returns the record's size keys: the expected sparsity beside what the deterministic
    (rounded, top-k) masks actually keep (achieved sparsity, encoder parameters, per-layer sizes)."""
    save_tensors_atomic({k: v.detach().cpu().contiguous() for k, v in mask_set.state_dict().items()},
                        stage_dir / GATES)
    structure = write_structure(stage_dir, mask_set.sizes(), config, title, tracker)
    return {"expected_sparsity": float(mask_set.expected_sparsity().detach()), **_size_metrics(structure),
            "sizes": structure["layers"]}


def _size_metrics(record: dict) -> dict[str, float]:
    return {"achieved_sparsity": record["achieved_sparsity"], "params_encoder": float(record["params_encoder"])}


# ------------------------------------------------------------------------------------------ stages

def run_distill(cfg: DistillStageConfig, data: DataConfig, out_dir: str | Path, *, init: str | Path,
                teacher: str | Path | None = None, tracker=None, resume: bool = True) -> dict:
    """prune1 (``cfg.prune`` set: masks + Lagrangian) or prune2 (plain distillation of ``init``'s encoder).

    ``init``: the stage whose encoder is the student's start (s2 for prune1, shrink for prune2);
    ``teacher``: the dense stage whose model's encoder is the teacher (default: ``init``); with
    ``objective: classification`` it gives the back-end, the classifier and the features instead.
    """
    out_dir, init = Path(out_dir), Path(init)
    teacher = Path(teacher) if teacher is not None else init
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    rank, world, device = setup_stage_device(cfg.device)
    tracker = tracker if rank == 0 else None  # MLflow is rank 0's alone
    write_stage_config(out_dir, cfg, tracker)

    teacher_model = load_model(teacher / "model")
    teacher_frontend = teacher_model.frontend
    student = load_stage_encoder(init).to(device)
    if student.hidden_size != teacher_frontend.hidden_size or student.num_states != teacher_frontend.num_states:
        raise ValueError(f"{init} encoder ({student.num_states} states x {student.hidden_size}) does not match the "
                         f"teacher {teacher} ({teacher_frontend.num_states} x {teacher_frontend.hidden_size})")
    dense_params = count_parameters(teacher_frontend)
    torch.manual_seed(cfg.train.seed)  # the gates' initial log-alphas: a function of the config, not of history
    mask_set = attach_masks(student.encoder, cfg.prune.masks) if cfg.prune is not None else None
    loader = TrainLoader(data.load_dir("train"), cfg.sampling, seed=cfg.train.seed, rank=rank, world_size=world,
                         pin_memory=device.type == "cuda")
    weights = [p for p in student.parameters() if p.requires_grad]
    augment = speaker = None
    if cfg.objective == "classification":
        # the teacher's encoder is not used: only its back-end, classifier and features
        speaker = SpeakerModel(student, teacher_model.backend, teacher_model.features).to(device)
        model = MaskedSpeakerModel(speaker, mask_set).to(device)
        objective = ClassifyObjective(initial_head(cfg, speaker, loader, teacher), cfg.prune, mask_set)
        augment = build_augmenter(cfg.augment, data)
    else:
        model = DistillPair(student, teacher_frontend.to(device), mask_set, features=teacher_model.features).to(device)
        objective = DistillObjective(cfg.distill, student.num_states, cfg.prune, mask_set)
    if mask_set is not None:
        groups = param_groups(weights, mask_set.log_alphas(), objective.lagrangian, cfg.train.optim.lr_frontend,
                              cfg.prune.lr_log_alpha, cfg.prune.lr_lambda)
    else:
        groups = [{"name": "weights", "params": weights, "lr": cfg.train.optim.lr_frontend, "weight_decay": 0.0}]
    if speaker is not None:
        groups.append({"name": "backend", "params": list(speaker.backend.parameters()) + list(objective.aam.parameters()),
                       "lr": cfg.train.optim.lr_backend, "weight_decay": cfg.train.optim.weight_decay})
    snapshots = (SnapshotWriter(out_dir, cfg, student, mask_set, rank)
                 if cfg.prune is not None and cfg.prune.snapshots else None)

    if tracker is not None and rank == 0:
        tracker.log_metrics({"params_encoder_start": float(count_parameters(student)),
                             "params_encoder_teacher": float(dense_params)})

    def log(record: dict, step: int) -> None:
        if tracker is not None:
            record = {("train_loss" if k == "loss" else k): v for k, v in record.items()
                      if speaker is not None or k not in ("accuracy", "margin")}  # no classifier in distillation
            tracker.log_metrics(record, step=step)

    result = train(model, objective, loader, cfg.train, out_dir / "ckpt", resume=resume, log=log,
                   param_groups=groups, augment=augment, after_step=snapshots)

    def finish() -> dict:  # rank 0 only: the other ranks wait for its record (the stage's barrier)
        model.eval()
        record = {"stage": cfg.stage, "objective": cfg.objective, "init": str(init), "teacher": str(teacher),
                  "final_step": result.final_step,
                  # the run's length after the epoch conversion at this stage's world size
                  "steps": result.steps, "steps_per_epoch": result.steps_per_epoch, "epochs": result.epochs,
                  "world_size": world}
        if tracker is not None:
            tracker.log_metrics({k: float(record[k]) for k in ("steps", "steps_per_epoch", "epochs", "world_size")
                                 if record[k] is not None})
        if mask_set is not None:
            if snapshots is not None:
                snapshots.finish(result.final_step)
                record["snapshots"] = [{k: r[k] for k in ("snapshot", "step", "reached", "expected_sparsity",
                                                           "achieved_sparsity")} for r in snapshot_records(out_dir)]
            record |= {"target_sparsity": cfg.prune.target_sparsity,
                       "lambda1": float(objective.lagrangian.lambda1.detach()),
                       "lambda2": float(objective.lagrangian.lambda2.detach()),
                       **save_gates(out_dir, mask_set, student.config, cfg.stage, tracker)}
            # the student keeps its dense shape here; shrink removes the units
            mask_set.detach()
        else:
            record |= _size_metrics(structure_record(layer_sizes(student.encoder), student.config))
        save_stage_encoder(student.encoder, out_dir / ENCODER)
        if speaker is not None:  # the trained back-end and classifier, for graft (teacher: this stage)
            save_model(speaker, out_dir / "model", meta={"stage": cfg.stage, "objective": cfg.objective,
                                                        "encoder": "dense, unmasked: shrink reads encoder/ + gates"})
            save_tensors_atomic({"weight": objective.aam.weight.detach().cpu().contiguous()}, out_dir / HEAD)
        record["minutes"] = timer.minutes
        if tracker is not None:
            tracker.log_metrics({k: float(record[k]) for k in ("achieved_sparsity", "params_encoder")}
                                | {"minutes": record["minutes"]})
        write_result(out_dir, record)
        return record

    return rank_zero_result(finish)


def run_shrink(init: str | Path, out_dir: str | Path, *, check_dir: DataDir, tracker=None) -> dict:
    """Physically remove what prune1's deterministic masks drop; check on real audio that nothing changed."""
    out_dir, init = Path(out_dir), Path(init)
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    prune_cfg = load_config(init / "config.yaml", DistillStageConfig)
    if prune_cfg.prune is None or not (init / GATES).is_file():
        raise ValueError(f"{init}: not a finished prune1 stage (no 'prune:' section or no {GATES})")
    frontend = Frontend(load_encoder(init / ENCODER)).eval()
    mask_set = attach_masks(frontend.encoder, prune_cfg.prune.masks)
    mask_set.load_state_dict(load_file(str(init / GATES)))
    mask_set.eval()
    waves, lengths = check_batch(check_dir, prune_cfg.check_seconds)
    masked = encoder_states(frontend, waves, lengths)  # eval mode: the deterministic masks
    sizes = mask_set.sizes()
    prune_model(frontend.encoder, mask_set)
    shrunk = encoder_states(frontend, waves, lengths)
    diff, rel_diff = max_state_diff(masked, shrunk), max_relative_diff(masked, shrunk)
    if rel_diff > SHRINK_TOLERANCE:
        raise RuntimeError(f"{init}: the shrunk encoder differs from the masked one by {rel_diff:.2e} of the "
                           f"states' magnitude (> {SHRINK_TOLERANCE}; {diff:.2e} absolute) on real audio")
    if layer_sizes(frontend.encoder) != sizes or count_parameters(frontend) != count_params(frontend.config, sizes):
        raise RuntimeError(f"{init}: shrunk widths/parameters disagree with the masks' count")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pruned_encoder(frontend.encoder, out_dir / ENCODER)
    structure = write_structure(out_dir, sizes, frontend.config, "shrink", tracker)
    record = {"stage": "shrink", "init": str(init), "max_abs_diff": diff, "shrink_rel_diff": rel_diff,
              **_size_metrics(structure), "dense_params_encoder": structure["dense_params_encoder"],
              "minutes": timer.minutes}
    if tracker is not None:
        tracker.log_metrics(_size_metrics(structure) | {"shrink_max_abs_diff": diff, "shrink_rel_diff": rel_diff})
    write_result(out_dir, record)
    return record


def run_random_prune(structure_of: str | Path, teacher: str | Path, out_dir: str | Path, *, seed: int = 0,
                     match: Literal["kind", "layer"] = "kind", tracker=None) -> dict:
    """The same-size baseline: the teacher's encoder cut with random masks (``random_masks``) matching
    ``structure_of``'s per-kind totals or per-layer widths. ``params_diff_from_kd`` in the result: its encoder
    parameters minus the KD structure's (0 for ``match="layer"``; the blocks a per-kind draw empties or
    revives change the per-block constants)."""
    out_dir, structure_of, teacher = Path(out_dir), Path(structure_of), Path(teacher)
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    if not (structure_of / STRUCTURE).is_file():
        raise FileNotFoundError(f"{structure_of}: no {STRUCTURE} (run prune1/shrink first)")
    kd = json.loads((structure_of / STRUCTURE).read_text())
    encoder = load_model(teacher / "model").frontend.encoder
    shrink_encoder(encoder, random_masks(layer_sizes(encoder), kd["layers"], seed, match))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pruned_encoder(encoder, out_dir / ENCODER)
    structure = write_structure(out_dir, layer_sizes(encoder), encoder.config, "random", tracker)
    params_diff = structure["params_encoder"] - kd["params_encoder"]
    record = {"stage": "random_prune", "init": str(structure_of), "teacher": str(teacher), "seed": seed,
              "match": match, **_size_metrics(structure), "params_diff_from_kd": params_diff,
              "minutes": timer.minutes}
    if tracker is not None:
        tracker.log_metrics(_size_metrics(structure) | {"params_diff_from_kd": float(params_diff)})
    write_result(out_dir, record)
    return record


CONTROLS = ("encoder_removed", "random_init")


def control_encoder(teacher_encoder, control: Literal["encoder_removed", "random_init"], seed: int = 0):
    """The encoder of a control that says what the teacher's encoder is worth (in place for ``encoder_removed``).

    ``encoder_removed``: every head, FFN unit and conv channel cut, so each layer is its residual path (the
    feature projection, the LayerNorms and the blocks' output biases stay: no mask removes them, and this is
    the highest sparsity any pruning can reach). ``random_init``: the same architecture with fresh weights
    (the library's initialisation, seeded), feature projection included.
    """
    if control == "encoder_removed":
        empty = [{kind: torch.zeros(width) for kind, width in layer.items() if width > 0}
                 for layer in layer_sizes(teacher_encoder)]
        return shrink_encoder(teacher_encoder, empty)
    if control == "random_init":
        torch.manual_seed(seed)
        return encoder_from_config(teacher_encoder.config)
    raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")


def run_control(teacher: str | Path, out_dir: str | Path, control: Literal["encoder_removed", "random_init"], *,
                seed: int = 0, tracker=None) -> dict:
    """A control stage: ``control_encoder`` of ``teacher``'s encoder, saved like a pruning stage (``encoder/``,
    structure.json) so that graft -> ps1 -> ps2 -> ps3 -> evaluate treat it exactly as a pruned point."""
    out_dir, teacher = Path(out_dir), Path(teacher)
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    encoder = control_encoder(load_model(teacher / "model").frontend.encoder, control, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_stage_encoder(encoder, out_dir / ENCODER)
    structure = write_structure(out_dir, layer_sizes(encoder), encoder.config, control, tracker)
    record = {"stage": "control", "control": control, "teacher": str(teacher), "seed": seed,
              **_size_metrics(structure), "minutes": timer.minutes}
    if tracker is not None:
        tracker.log_metrics(_size_metrics(structure))
    write_result(out_dir, record)
    return record


# ------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="prune1 (config with prune:) or prune2")
    p.add_argument("--config", required=True)
    p.add_argument("--teacher", help="dense stage folder with model/ (default: --init)")
    s = sub.add_parser("shrink", help="physically remove what prune1 masked")
    r = sub.add_parser("random", help="same-size random structure of --init, cut from --teacher")
    r.add_argument("--teacher", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--match", choices=RANDOM_MATCH, default="kind",
                   help="kind: the KD structure's totals per unit kind; layer: its widths per layer")
    for q in (p, s, r):
        q.add_argument("--init", required=True, help="previous stage folder")
        q.add_argument("--out", required=True)
    for q in (p, s):
        q.add_argument("--data", required=True, help="data YAML (DataConfig)")
    args = parser.parse_args(argv)
    try:
        data = load_config(args.data, DataConfig) if hasattr(args, "data") else None
        if args.command == "distill":
            record = run_distill(load_config(args.config, DistillStageConfig), data, args.out, init=args.init,
                                 teacher=args.teacher)
        elif args.command == "shrink":
            record = run_shrink(args.init, args.out, check_dir=data.load_dir("train"))
        else:
            record = run_random_prune(args.init, args.teacher, args.out, seed=args.seed, match=args.match)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
