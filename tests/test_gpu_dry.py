"""bench/gpu.py --dry: every part of the GPU benchmark built at the tiny preset and stepped once on the CPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_writes_every_section(tmp_path, sv_bench):
    out = tmp_path / "gpu_dry.json"  # the rehearsal part reads real speech: skipped like every test without ../shared
    proc = subprocess.run([sys.executable, str(REPO / "bench/gpu.py"), "--dry", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] is True and result["preset"] == "tiny" and result["amp"] == "bf16"
    assert result["batch"] == 2 and result["card"].startswith("cpu")
    s1, s2 = result["training_s1"], result["training_s2"]
    for stage in (s1, s2):
        assert stage["losses_finite"]
        for impl in ("lean", "stock"):
            assert stage[impl]["seconds_per_step"] > 0 and len(stage[impl]["seconds_all"]) == 1
        assert math.isclose(stage["speedup_lean"], stage["stock"]["seconds_per_step"] / stage["lean"]["seconds_per_step"])
    # s1 trains LoRA (2 layers x q, v x 64 x (32 + 32)) + back-end + head; s2 everything
    assert s1["params_total"] - s1["trainable_params"] == 41_920 - 30 * 256   # frozen encoder minus the head
    assert s2["trainable_params"] == s2["params_total"] + 30 * 256
    prune = result["prune1"]
    assert prune["gate_sets"] == 4 * 2 and prune["distilled_states"] == 3 and prune["losses_finite"]
    assert prune["seconds_per_step"] > 0
    fbank = result["fbank"]
    assert fbank["max_abs_diff"] < 1e-3 and fbank["device_ms"] > 0 and fbank["extractor_cpu_ms"] > 0
    emb = result["embedding"]
    assert emb["params_pruned"] < emb["params_dense"] == 41_920
    assert emb["dense_utts_per_s"] > 0 and emb["pruned_utts_per_s"] > 0
    assert emb["kept"]["heads"] >= 1
    rehearsal = result["rehearsal"]
    assert rehearsal["run"] is False and "--device cuda" in rehearsal["command"] and "--size full" in rehearsal["command"]
    assert set(result["section_seconds"]) == {"training_s1", "training_s2", "prune1", "fbank", "embedding", "rehearsal"}
    assert len(result["machine"]["load_average_start"]) == 3
    assert not [v for v in strings(result) if v.startswith("/")]  # no absolute paths in a committed JSON


def strings(value):
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []
