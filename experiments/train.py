"""A training stage (s1, s2, s3 and the pruned fine-tuning stages): one YAML, one run.

    python -m experiments.train --config experiments/configs/demo/s1.yaml --data experiments/configs/demo/data.yaml \
        --out exp/demo/s1 [--init exp/demo/merge] [--resume]

The stage starts from ``--init`` (a previous stage's folder) or, without one, builds the model described in
``model:``. It then applies this stage's LoRA/freezing, trains with AAM-softmax, selects the best checkpoint
on the *validation* trials, and evaluates that checkpoint on the test trials (reported, never used for
selection).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from experiments.common import (DataConfig, Timer, metrics_of, rank_zero_result, read_result, setup_stage_device,
                                write_result, write_stage_config)
from experiments.evaluate import save_scores
from svlib.config import ConfigError, load_config
from svlib.data.augment import AugmentConfig, Augmenter
from svlib.data.sampling import SamplingConfig, TrainLoader
from svlib.evaluate import EvalConfig, evaluate
from svlib.files import save_tensors_atomic
from svlib.losses import AAMSoftmax, keep_classes
from svlib.model.frontend import LoraConfig, add_lora, count_parameters, freeze
from svlib.model.speaker import SpeakerModel, SpeakerModelConfig, build_speaker_model, load_model, save_model
from svlib.train.checkpoint import load_checkpoint
from svlib.train.engine import ResumeError, TrainConfig, seed_everything, train

HEAD = "head.safetensors"


@dataclass
class HeadConfig:
    scale: float = 32.0
    margin: float = 0.2
    easy_margin: bool = False

    def __post_init__(self) -> None:
        if not self.scale > 0 or self.margin < 0:
            raise ValueError(f"scale must be > 0 and margin >= 0, got scale={self.scale}, margin={self.margin}")


@dataclass
class TrainStageConfig:
    stage: str = "train"
    model: SpeakerModelConfig | None = None   # used only when the stage has no --init
    lora: LoraConfig | None = None            # LoRA added to the front-end for this stage
    freeze_frontend: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # score the test lists when the stage ends (its row of the stage table); off where an evaluate stage of
    # the same model follows, or where nobody reads the number (the demo's s1, a random encoder's back-end)
    evaluate_test: bool = True
    device: str = "auto"


def initial_model(cfg: TrainStageConfig, init: Path | None) -> SpeakerModel:
    # Random initial weights (a fresh model, LoRA) are a function of the config's seed, not of what ran before.
    seed_everything(cfg.train.seed)
    if init is not None:
        model = load_model(init / "model")
    elif cfg.model is not None:
        model = build_speaker_model(cfg.model)
    else:
        raise ConfigError(f"stage {cfg.stage}: no --init given and no 'model:' section to build one from")
    if cfg.lora is not None:
        add_lora(model.frontend, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    freeze(model.frontend, cfg.freeze_frontend)
    return model


def initial_head(cfg: TrainStageConfig, model: SpeakerModel, loader: TrainLoader, init: Path | None) -> AAMSoftmax:
    """Continue the previous stage's classifier where the classes allow it.

    Same class count: continue as is. A speed-perturbed head (k x N rows) moving to a stage without speed
    perturbation (N classes): keep the original-speed rows. Anything else starts a fresh head.
    """
    seed_everything(cfg.train.seed + 1)  # a fresh head's weights: seeded, and not the model's first draws again
    head = AAMSoftmax(model.embed_dim, loader.num_classes, cfg.head.scale, cfg.head.margin, cfg.head.easy_margin)
    path = init / HEAD if init is not None else None
    if path is not None and path.is_file():
        weight = load_file(str(path))["weight"]
        if weight.shape == head.weight.shape:
            head.weight.data.copy_(weight)
        elif weight.shape[1] == head.weight.shape[1] and weight.shape[0] % loader.num_classes == 0:
            head.weight.data.copy_(keep_classes(weight, loader.num_classes))
            print(f"[{cfg.stage}] kept the {loader.num_classes} original-speed classes of a {weight.shape[0]}-class head")
        else:
            print(f"[{cfg.stage}] previous head {tuple(weight.shape)} does not fit {tuple(head.weight.shape)}: fresh head")
    return head


def build_augmenter(cfg: AugmentConfig, data: DataConfig) -> Augmenter | None:
    """The stage's on-device augmentation, or None when every probability is 0 (nothing to load)."""
    if cfg.noise_prob > 0 or cfg.reverb_prob > 0 or cfg.telephone_prob > 0:
        return Augmenter.from_lists(cfg, data.noise_list, data.rir_list)
    return None


def run(cfg: TrainStageConfig, data: DataConfig, out_dir: str | Path, *, init: str | Path | None = None,
        tracker=None, resume: bool = True) -> dict:
    """Train one stage; returns (and writes) its result: best validation and test metrics, sizes, minutes.

    Under torchrun every rank trains (DDP); rank 0 alone saves the model, evaluates and writes the result, and
    every rank returns that same record once it is written.
    """
    out_dir = Path(out_dir)
    done = read_result(out_dir)
    if done is not None:
        return done
    init = Path(init) if init is not None else None
    timer = Timer()
    rank, world, device = setup_stage_device(cfg.device)
    tracker = tracker if rank == 0 else None  # MLflow is rank 0's alone
    write_stage_config(out_dir, cfg, tracker)

    model = initial_model(cfg, init).to(device)
    train_dir = data.load_dir("train")
    loader = TrainLoader(train_dir, cfg.sampling, seed=cfg.train.seed, rank=rank, world_size=world,
                         pin_memory=device.type == "cuda")
    head = initial_head(cfg, model, loader, init)
    augmenter = build_augmenter(cfg.augment, data)

    validation = data.validation()
    validate = None
    if validation is not None:
        val_dir, val_trials = validation
        # in the training precision, every rank embedding its shard of the list (rank 0 scores)
        quiet = EvalConfig(max_seconds=cfg.eval.max_seconds, max_batch_seconds=cfg.eval.max_batch_seconds,
                           progress=False, amp=cfg.train.amp, ci_replicates=0)  # no intervals for selection

        def validate(m):
            scores = evaluate(m, val_dir, {"val": val_trials}, quiet, distributed=True)
            return None if scores is None else {k: v for k, v in scores["val"].items()
                                                if k in ("eer_pct", "mindcf_0.01", "mindcf_0.05")}

    sizes = {"params_total": count_parameters(model), "params_encoder": count_parameters(model.frontend),
             "params_trainable": count_parameters(model, trainable_only=True) + head.weight.numel(),
             "num_classes": loader.num_classes}
    if tracker is not None:
        tracker.log_metrics({k: float(v) for k, v in sizes.items()})

    def log(record: dict, step: int) -> None:
        if tracker is not None:
            renamed = {(f"train_{k}" if k in ("loss", "accuracy") else k): v for k, v in record.items()}
            tracker.log_metrics(renamed, step=step)

    result = train(model, head, loader, cfg.train, out_dir / "ckpt", resume=resume, validate=validate, log=log,
                   augment=augmenter)

    def finish() -> dict:  # rank 0 only: the other ranks wait for its record (the stage's barrier)
        if result.best_checkpoint is not None:  # the validation-selected weights, not simply the last ones
            best = load_checkpoint(result.best_checkpoint)
            model.load_state_dict(best["model"])
            head.load_state_dict(best["head"])
        merged_lora = cfg.lora is not None
        save_model(model, out_dir / "model", meta={"stage": cfg.stage, "best_step": result.best_step,
                                                   "best_val_eer_pct": result.best_metric, "lora_merged": merged_lora})
        save_tensors_atomic({"weight": head.weight.detach().cpu().contiguous()}, out_dir / HEAD)

        record = {"stage": cfg.stage, "init": str(init) if init is not None else None, "best_step": result.best_step,
                  "best_val_eer_pct": result.best_metric, "final_step": result.final_step, **sizes,
                  # the run's length after the epoch conversion at this stage's world size
                  "steps": result.steps, "steps_per_epoch": result.steps_per_epoch, "epochs": result.epochs,
                  "world_size": world}
        if tracker is not None:
            tracker.log_metrics({k: float(record[k]) for k in ("steps", "steps_per_epoch", "epochs", "world_size")
                                 if record[k] is not None})
        tests = data.tests() if cfg.evaluate_test else None
        if tests is not None:
            test_dir, test_trials = tests
            scores = evaluate(model, test_dir, test_trials, cfg.eval)
            record["test"] = {name: {k: v for k, v in s.items() if k not in ("scores", "labels")}
                              for name, s in scores.items()}
            if tracker is not None:
                tracker.log_metrics(metrics_of(scores))
            # the stage's score files and DET plot (README "Tracking"), also as the run's artifacts
            save_scores(out_dir, test_trials, scores, f"DET: {cfg.stage}", tracker)
        record["minutes"] = timer.minutes
        if tracker is not None:
            tracker.log_metrics({"minutes": record["minutes"]})
            tracker.log_artifact(out_dir / "model", "model")
        write_result(out_dir, record)
        return record

    return rank_zero_result(finish)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="stage YAML")
    parser.add_argument("--data", required=True, help="data YAML (DataConfig)")
    parser.add_argument("--out", required=True, help="stage output folder")
    parser.add_argument("--init", help="previous stage folder to start from")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, TrainStageConfig)
        data = load_config(args.data, DataConfig)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        record = run(cfg, data, args.out, init=args.init, resume=not args.no_resume)
    except ResumeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
