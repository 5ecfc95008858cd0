"""Training: the loop (engine), atomic checkpoints with exact resume, LR schedules."""
from svlib.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                    prune_checkpoints, save_checkpoint)
from svlib.train.engine import OptimConfig, TrainConfig, TrainResult, build_optimizer, setup_distributed, train
from svlib.train.schedules import ScheduleConfig, apply_lr, lr_factor

__all__ = [
    "CheckpointError", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "prune_checkpoints",
    "save_checkpoint", "OptimConfig", "TrainConfig", "TrainResult", "build_optimizer", "setup_distributed",
    "train", "ScheduleConfig", "apply_lr", "lr_factor",
]
