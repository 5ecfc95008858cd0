"""The graft stage: a pruned encoder + the stage-2 back-end and classifier head -> a speaker model folder.

    python -m experiments.graft --init exp/demo_prune/prune2 --teacher exp/demo/s2 --out exp/demo_prune/graft \
        --check-data data/sv-bench/train

The pruned fine-tuning stages ps1/ps2/ps3 are ordinary training stages (``experiments.train``) with
``init`` = this folder: ps1 trains the back-end on the frozen pruned encoder (``freeze_frontend: true``, no
LoRA), ps2 everything, ps3 the large-margin step. The head (``head.safetensors``) is stage 2's, so ps1
continues its classifier rather than starting a fresh one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from experiments.common import Timer, max_relative_diff, read_result, write_result
from experiments.prune import check_batch, load_stage_encoder
from experiments.train import HEAD
from svlib.data.lists import DataDir
from svlib.model.frontend import count_parameters
from svlib.model.speaker import SpeakerModel, load_model, save_model

# The reloaded folder must embed like the model saved, relative to the largest embedding magnitude.
RELOAD_TOLERANCE = 1e-5


def run(init: str | Path, teacher: str | Path, out_dir: str | Path, *, check_dir: DataDir, tracker=None) -> dict:
    """``init``: a pruning stage (its ``encoder/``); ``teacher``: the dense stage (``model/`` + head) it came from."""
    out_dir, init, teacher = Path(out_dir), Path(init), Path(teacher)
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    dense = load_model(teacher / "model")
    frontend = load_stage_encoder(init)
    if (frontend.num_states, frontend.hidden_size) != (dense.frontend.num_states, dense.frontend.hidden_size):
        raise ValueError(f"{init}: encoder gives {frontend.num_states} states of size {frontend.hidden_size}; the "
                         f"back-end of {teacher} expects {dense.frontend.num_states} of size {dense.frontend.hidden_size}")
    model = SpeakerModel(frontend, dense.backend, dense.features).eval()
    save_model(model, out_dir / "model", meta={"stage": "graft", "encoder_from": str(init), "backend_from": str(teacher)})
    if (teacher / HEAD).is_file():
        shutil.copy2(teacher / HEAD, out_dir / HEAD)
    # The folder must load (pruned widths rebuilt from config.json) and embed exactly like the model saved.
    waves, lengths = check_batch(check_dir)
    with torch.no_grad():
        reloaded = load_model(out_dir / "model")
        emb, saved = reloaded(waves, lengths), model(waves, lengths)
    diff, rel_diff = (emb - saved).abs().max().item(), max_relative_diff(saved, emb)
    if not torch.isfinite(emb).all() or rel_diff > RELOAD_TOLERANCE:
        raise RuntimeError(f"{out_dir / 'model'}: reloaded model embeds differently ({rel_diff:.2e} of the "
                           f"embeddings' magnitude, {diff:.2e} absolute) or not finitely")
    record = {"stage": "graft", "init": str(init), "teacher": str(teacher), "reload_max_abs_diff": diff,
              "reload_rel_diff": rel_diff,
              "params_total": count_parameters(model), "params_encoder": count_parameters(model.frontend),
              "params_encoder_teacher": count_parameters(dense.frontend), "minutes": timer.minutes}
    if tracker is not None:
        tracker.log_metrics({k: float(record[k]) for k in ("params_total", "params_encoder")})
        tracker.log_artifact(out_dir / "model", "model")
    write_result(out_dir, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="pruning stage folder (encoder/)")
    parser.add_argument("--teacher", required=True, help="dense stage folder (model/, head.safetensors)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--check-data", required=True, help="a data dir whose first utterances check the folder")
    args = parser.parse_args(argv)
    print(run(args.init, args.teacher, args.out, check_dir=DataDir.load(args.check_data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
