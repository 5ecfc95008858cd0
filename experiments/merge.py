"""The LoRA merge stage: fold the stage-1 LoRA updates into plain encoder weights.

    python -m experiments.merge --init exp/demo/s1 --out exp/demo/merge

Its own stage (as in the reference's ``lora_merge.py``) so that stage 2 starts from an ordinary encoder
and the equality of the merged and unmerged models is checked on real audio every time it runs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from experiments.common import Timer, max_relative_diff, read_result, write_result
from experiments.train import HEAD, TrainStageConfig, initial_model
from svlib.config import load_config
from svlib.data.lists import DataDir
from svlib.model.frontend import count_parameters, merge_lora
from svlib.model.speaker import SpeakerModel, save_model
from svlib.train.checkpoint import latest_checkpoint, load_checkpoint

# Tolerance of the merged-vs-LoRA embedding check (float32 re-association only), relative to the largest
# embedding magnitude: the absolute error grows with the activations.
MERGE_TOLERANCE = 1e-4


def lora_model_of(stage_dir: Path) -> SpeakerModel:
    """Rebuild a finished training stage's model *with* its LoRA adapters, at its selected (best) weights."""
    cfg = load_config(stage_dir / "config.yaml", TrainStageConfig)
    if cfg.lora is None:
        raise ValueError(f"{stage_dir}: stage {cfg.stage!r} has no LoRA to merge")
    result = read_result(stage_dir) or {}
    model = initial_model(cfg, Path(result["init"]) if result.get("init") else None)
    ckpt_dir = stage_dir / "ckpt"
    state_path = ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").is_file() else latest_checkpoint(ckpt_dir)
    if state_path is None:
        raise FileNotFoundError(f"{stage_dir}: no checkpoint to merge (ckpt/ is empty)")
    model.load_state_dict(load_checkpoint(state_path)["model"])
    return model.eval()


def run(init: str | Path, out_dir: str | Path, *, check_dir: DataDir, tracker=None) -> dict:
    """Merge ``init``'s LoRA into its encoder, check on real audio that nothing changed, write the model."""
    out_dir, init = Path(out_dir), Path(init)
    done = read_result(out_dir)
    if done is not None:
        return done
    timer = Timer()
    with_lora = lora_model_of(init)
    merged = SpeakerModel(merge_lora(with_lora.frontend), with_lora.backend, with_lora.features).eval()
    utts = sorted(check_dir.wavs)[:4]
    waves = [torch.from_numpy(check_dir.load_wave(u, max_seconds=4.0)) for u in utts]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    with torch.no_grad():
        reference, result = with_lora(batch, lengths), merged(batch, lengths)
    diff, rel_diff = (reference - result).abs().max().item(), max_relative_diff(reference, result)
    if rel_diff > MERGE_TOLERANCE:
        raise RuntimeError(f"{init}: merged model differs from the LoRA model by {rel_diff:.2e} of the embeddings' "
                           f"magnitude (> {MERGE_TOLERANCE}; {diff:.2e} absolute)")
    save_model(merged, out_dir / "model", meta={"stage": "merge", "source": str(init), "lora_merged": True})
    if (init / HEAD).is_file():
        shutil.copy2(init / HEAD, out_dir / HEAD)
    record = {"stage": "merge", "source": str(init), "max_abs_diff": diff, "merge_rel_diff": rel_diff,
              "params_lora": count_parameters(with_lora.frontend) - count_parameters(merged.frontend),
              "params_encoder": count_parameters(merged.frontend), "params_total": count_parameters(merged),
              "minutes": timer.minutes}
    if tracker is not None:  # the check (how far the merged model is from the LoRA one) and the sizes
        tracker.log_metrics({"merge_max_abs_diff": diff, "merge_rel_diff": rel_diff} | {
            k: float(record[k]) for k in ("params_lora", "params_encoder", "params_total", "minutes")})
    write_result(out_dir, record)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="stage-1 folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--check-data", required=True, help="a data dir whose first utterances check the merge")
    args = parser.parse_args(argv)
    print(run(args.init, args.out, check_dir=DataDir.load(args.check_data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
