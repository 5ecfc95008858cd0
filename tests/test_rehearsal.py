"""The full-size rehearsal script at the tiny preset: every stage of both recipes, checked (bench/full_size_rehearsal.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
W2VBERT = ["s1", "merge", "s2", "s3", "eval"]
PRUNE = ["s2", "prune1", "shrink", "prune2", "graft", "ps1", "ps2", "ps3", "eval"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_rehearsal_every_stage_ok(tmp_path, sv_bench):  # sv_bench: skipped without ../shared
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/full_size_rehearsal.py"), "--size", "tiny",
                           "--threads", "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["all_ok"], json.dumps({k: v.get("problems") for k, v in result["stages"].items()}) + result["errors"].__str__()
    assert proc.returncode == 0
    stages = result["stages"]
    assert list(stages) == [f"w2vbert/{s}" for s in W2VBERT] + [f"w2vbert_prune/{s}" for s in PRUNE]
    assert result["encoder_params"] == result["encoder_params_expected"] == 41_920
    assert result["amp"].startswith("recipe")  # bf16 autocast on CPU at tiny size
    for label, entry in stages.items():
        assert entry["ok"] and entry["problems"] == [], label
        assert entry["peak_rss_gib"] > 0, label
        if entry["kind"] in ("train", "prune"):
            assert entry["steps"] == 2 and len(entry["losses"]) == 2 and entry["losses_finite"], label
            assert entry["seconds_per_step"] > 0 and entry["amp"] == "bf16", label
        if entry["kind"] in ("train", "prune", "merge", "graft", "shrink"):
            assert entry["reload"]["ok"] and entry["reload"]["vs_files"]["max_abs_diff"] == 0.0, label
    s1, s3 = stages["w2vbert/s1"], stages["w2vbert/s3"]
    speakers = result["setup"]["data"]["train"]["speakers"]
    assert s1["encoder_tensors"]["lora_targets_changed"] == s1["encoder_tensors"]["lora_targets"] == 4
    assert s1["encoder_tensors"]["others_changed"] == []
    assert s1["params_lora_trainable"] == result["lora_params"] == 2 * 2 * 64 * (32 + 32)
    assert s1["reload"]["vs_checkpoint"]["max_abs_diff"] <= 1e-6   # LoRA merged into the saved folder
    assert s1["head_rows"] == 3 * speakers and s3["head_rows"] == speakers   # class trimming 3N -> N
    assert stages["w2vbert_prune/ps1"]["encoder_tensors"]["changed"] == 0    # frozen pruned encoder
    assert stages["w2vbert/merge"]["max_abs_diff"] < 1e-4
    shrink = stages["w2vbert_prune/shrink"]
    assert shrink["params_encoder"] == shrink["params_expected"] == shrink["params_loaded"] < 41_920
    assert stages["w2vbert_prune/prune1"]["gate_tensors"] == 4 * 2
    assert result["machine"]["cpu_count"] >= 1 and len(result["machine"]["load_average_start"]) == 3
