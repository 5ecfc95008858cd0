"""``svlib embed / verify / calibrate-model / info``: numbers equal the library's; bad input is one stderr
line naming the problem and exit code 2."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from svlib.audio import audio_seconds, load_audio
from svlib.cli import main
from svlib.data.lists import DataDir, Trials, write_trials
from svlib.model.speaker import save_model
from svlib.package import describe, load_model
from svlib.scoring.calibration import load_calibration
from svlib.scoring.metrics import compute_eer, cosine_scores, load_embeddings

from test_speaker import tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sv-mini"
MAX_SECONDS = 4.0


def _pick_files() -> dict[str, tuple[str, str]]:
    """utt -> (speaker, path): 4 Arabic-speech-commands speakers x 3 words (1 s) + 2 LibriSpeech files."""
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (CI always has it; clone next to ../shared)")
    out = {}
    for spk_dir in sorted((DATA / "arabic_sc").iterdir())[:4]:
        for wav in sorted(spk_dir.glob("*.wav"))[:3]:
            out[f"asc{spk_dir.name}-{wav.stem}"] = (f"asc{spk_dir.name}", str(wav))
    for spk_dir in sorted((DATA / "librispeech_test-other").iterdir())[:1]:
        for flac in sorted(spk_dir.glob("*.flac"))[:2]:
            out[f"ls{spk_dir.name}-{flac.stem}"] = (f"ls{spk_dir.name}", str(flac))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("climodel")
    files = _pick_files()
    data = DataDir(wavs={u: p for u, (_, p) in files.items()}, utt2spk={u: s for u, (s, _) in files.items()})
    data.write(tmp / "data")
    utts = sorted(files)
    pairs = [(a, b) for i, a in enumerate(utts) for b in utts[i + 1:]]
    trials = Trials([a for a, _ in pairs], [b for _, b in pairs],
                    np.array([files[a][0] == files[b][0] for a, b in pairs], dtype=np.int8))
    write_trials(tmp / "trials.txt", trials)
    model = tiny_model()
    save_model(model, tmp / "model", {"note": "test"})
    return tmp, files, model


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _embed_alone(model, path) -> np.ndarray:
    wave = torch.from_numpy(load_audio(path, max_seconds=MAX_SECONDS))[None]
    with torch.no_grad():
        return model(wave, torch.tensor([wave.shape[1]]))[0].numpy()


def test_embed_equals_model_on_each_file(setup, capsys):
    tmp, files, model = setup
    code, out, _ = _run(["embed", "--model", tmp / "model", "--scp", tmp / "data" / "wav.scp", "--out",
                         tmp / "emb.npz", "--max-seconds", MAX_SECONDS, "--no-progress"], capsys)
    assert code == 0 and f"wrote {len(files)} embeddings of dimension 24" in out
    table = load_embeddings(tmp / "emb.npz")
    assert sorted(table.utts) == sorted(files)
    for utt, (_, path) in files.items():
        # batched by length with padding must give the embedding of the file alone
        np.testing.assert_allclose(table[utt], _embed_alone(model, path), atol=2e-5, rtol=0)
        assert table.durations[table.index[utt]] == pytest.approx(min(audio_seconds(path), MAX_SECONDS))
    # --wav: the paths are the utterance ids
    paths = [p for _, p in list(files.values())[:2]]
    code, _, _ = _run(["embed", "--model", tmp / "model", "--wav", *paths, "--out", tmp / "emb2.npz",
                       "--max-seconds", MAX_SECONDS, "--no-progress"], capsys)
    assert code == 0
    table2 = load_embeddings(tmp / "emb2.npz")
    assert table2.utts == paths
    np.testing.assert_allclose(table2[paths[1]], _embed_alone(model, paths[1]), atol=2e-5, rtol=0)


def test_calibrate_model_then_verify(setup, capsys):
    tmp, files, model = setup
    mdir = tmp / "model_cal"
    save_model(model, mdir, {})
    code, _, err = _run(["verify", "--model", mdir, files[sorted(files)[0]][1], files[sorted(files)[1]][1]], capsys)
    assert code == 2 and "calibrate-model" in err and len(err.strip().splitlines()) == 1

    code, out, _ = _run(["calibrate-model", "--model", mdir, "--data", tmp / "data", "--trials", tmp / "trials.txt",
                         "--max-seconds", MAX_SECONDS, "--no-progress", "--prior", 0.2], capsys)
    assert code == 0, out
    cal = load_calibration(mdir / "calibration.json")
    thr = cal.meta["thresholds"]
    # the library's numbers on the same trials
    from svlib.data.lists import read_trials

    trials = read_trials(tmp / "trials.txt")
    emb = {u: _embed_alone(model, p) for u, (_, p) in files.items()}
    scores = cosine_scores(emb, trials)
    eer, eer_thr = compute_eer(scores, trials.labels)
    assert thr["eer"]["eer_pct"] == pytest.approx(100 * eer, abs=1e-6)
    assert thr["eer"]["score"] == pytest.approx(eer_thr, abs=1e-4)
    llr_thr = -math.log(0.2 / 0.8)
    assert thr["bayes"]["llr"] == pytest.approx(llr_thr) and thr["bayes"]["prior"] == 0.2
    # the Bayes threshold is where the calibrated LLR reaches -logit(prior)
    assert float(cal.apply([thr["bayes"]["score"]])[0]) == pytest.approx(llr_thr, abs=1e-9)
    assert "Bayes threshold" in out and (mdir / "README.md").read_text().count("Bayes threshold") == 1

    a, b = sorted(files)[0], sorted(files)[5]
    code, out, _ = _run(["verify", "--model", mdir, files[a][1], files[b][1], "--max-seconds", MAX_SECONDS], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    score = float(np.dot(emb[a], emb[b]) / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b]))
    assert float(rows["score"]) == pytest.approx(score, abs=1e-4)
    # with a calibration the decision is made on the LLR, against -logit(prior)
    llr = float(cal.apply([score])[0])
    assert float(rows["threshold"]) == pytest.approx(thr["bayes"]["llr"], abs=1e-4)
    assert float(rows["llr"]) == pytest.approx(llr, abs=1e-3)
    assert rows["decision"] == ("accept" if llr >= thr["bayes"]["llr"] else "reject")
    assert "Bayes threshold" in out
    code, out, _ = _run(["verify", "--model", mdir, files[a][1], files[b][1], "--threshold-kind", "eer",
                         "--max-seconds", MAX_SECONDS], capsys)
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert code == 0 and float(rows["threshold"]) == pytest.approx(thr["eer"]["score"], abs=1e-4)
    assert "EER threshold" in out
    code, out, _ = _run(["verify", "--model", mdir, files[a][1], files[b][1], "--threshold", "-2"], capsys)
    assert code == 0 and "decision   accept" in out and "--threshold" in out


def test_info_dense_and_pruned(setup, capsys):
    tmp, _, model = setup
    code, out, _ = _run(["info", tmp / "model"], capsys)
    assert code == 0
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 1)
        if len(parts) == 2:
            rows[parts[0].strip()] = parts[1]
    assert int(rows["parameters (total)"].replace(",", "")) == sum(p.numel() for p in model.parameters())
    assert int(rows["parameters (back-end)"].replace(",", "")) == sum(p.numel() for p in model.backend.parameters())
    assert float(rows["MACs/s of audio (3 s utts)"].rstrip("M")) == pytest.approx(
        describe(model)["macs_per_second"] / 1e6, abs=0.006)
    assert "pruned                              no" in out or rows["pruned"] == "no"

    shrink = pytest.importorskip("svlib.pruning.shrink", reason="svlib.pruning.shrink not available")
    pruned = tiny_model(seed=1)
    shrink.shrink_encoder(pruned.frontend.encoder, [
        {"heads": torch.tensor([1.0, 0.0]), "ffn1": (torch.arange(64) < 40).float(), "conv": (torch.arange(32) < 20).float()},
        {"ffn2": torch.zeros(64)},
    ])
    save_model(pruned, tmp / "pruned", {})
    code, out, _ = _run(["info", tmp / "pruned", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["pruned"] is True
    assert info["layers"] == [{"heads": 1, "ffn1": 40, "ffn2": 64, "conv": 20}, {"heads": 2, "ffn1": 64, "ffn2": 0, "conv": 32}]
    assert info["params_total"] == sum(p.numel() for p in pruned.parameters())
    assert info["params_total"] == sum(p.numel() for p in load_model(tmp / "pruned").parameters())
    code, out, _ = _run(["info", tmp / "pruned"], capsys)
    assert code == 0 and "    0      1/2      40/64      64/64      20/32" in out


def _corrupt(tmp: Path) -> Path:
    bad = tmp / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(200)))
    return bad


def _old_model(tmp: Path) -> Path:
    import shutil

    old = tmp / "old_model"
    if not old.exists():
        shutil.copytree(tmp / "model", old)
        manifest = json.loads((old / "svlib_model.json").read_text())
        manifest["format_version"] = 99
        (old / "svlib_model.json").write_text(json.dumps(manifest))
    return old


def _truncated_model(tmp: Path) -> Path:
    import shutil

    bad = tmp / "truncated_model"
    if not bad.exists():
        shutil.copytree(tmp / "model", bad)
        weights = bad / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return bad


def _unknown_trials(tmp: Path, files) -> Path:
    path = tmp / "unknown_trials.txt"
    utt = sorted(files)[0]
    path.write_text(f"1 {utt} no-such-utt\n0 {utt} {sorted(files)[1]}\n")
    return path


BAD = {
    "missing wav": (lambda t, f: ["embed", "--model", t / "model", "--wav", t / "nope.wav", "--out", t / "x.npz"],
                    "nope.wav: audio file not found"),
    "corrupt audio": (lambda t, f: ["embed", "--model", t / "model", "--wav", _corrupt(t), "--out", t / "x.npz"],
                      "corrupt.wav: not a readable audio file"),
    "empty scp": (lambda t, f: ["embed", "--model", t / "model", "--scp", _write(t / "empty.scp", "\n\n"),
                                "--out", t / "x.npz"], "empty.scp: empty list"),
    "unknown utterance": (lambda t, f: ["calibrate-model", "--model", t / "model", "--data", t / "data", "--trials",
                                        _unknown_trials(t, f)], "'no-such-utt' is not in"),
    "model version": (lambda t, f: ["info", _old_model(t)], "format version 99"),
    "model version (embed)": (lambda t, f: ["embed", "--model", _old_model(t), "--wav", next(iter(f.values()))[1],
                                            "--out", t / "x.npz"], "format version 99"),
    "corrupt weights": (lambda t, f: ["info", _truncated_model(t)], "unreadable weights file"),
    "missing model": (lambda t, f: ["verify", "--model", t / "nomodel", next(iter(f.values()))[1],
                                    next(iter(f.values()))[1]], "nomodel: model folder not found"),
    "verify missing wav": (lambda t, f: ["verify", "--model", t / "model", next(iter(f.values()))[1], t / "b.wav"],
                           "b.wav: audio file not found"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(setup, capsys, case):
    tmp, files, _ = setup
    build, expected = BAD[case]
    code, out, err = _run(build(tmp, files), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("svlib ") and "error:" in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in err


# ------------------------------------------------------------------ bench/score_backend.py on sv-mini


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_backend", Path(__file__).resolve().parents[1] / "bench" / "score_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_score_backend_pipeline_on_sv_mini(setup, tmp_path):
    from svlib.corpora.manifest import prepare_manifest
    from svlib.data.lists import read_trials
    from svlib.scoring.calibration import cllr, min_cllr
    from svlib.scoring.metrics import summarize
    from svlib.scoring.norm import as_norm, speaker_means

    bench = _bench_module()
    if not (DATA / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {DATA}")
    prepare_manifest(DATA / "manifest.csv", tmp_path / "mini", verbose=False)
    _, _, model = setup
    splits = {s: DataDir.load(tmp_path / "mini" / s) for s in ("train", "val", "test")}
    # 2.5 s per utterance keeps this fast; the numbers only have to be consistent, not good
    tables = {s: bench.embed_split(model, d, max_seconds=2.5) for s, d in splits.items()}
    val_t, test_t = read_trials(tmp_path / "mini" / "val_trials.txt"), read_trials(tmp_path / "mini" / "test_trials.txt")
    res = bench.score_backends(tables["train"], splits["train"].utt2spk, tables["val"], val_t, tables["test"], test_t)
    cohort = speaker_means(tables["train"], splits["train"].utt2spk)
    assert res["top_n"] == len(cohort.utts) == len(set(splits["train"].utt2spk.values()))
    assert res["eer_raw_pct"] == pytest.approx(summarize(cosine_scores(tables["test"], test_t), test_t.labels)["eer_pct"])
    asn = as_norm(tables["test"], test_t, cohort, top_n=res["top_n"])
    assert res["eer_asnorm_pct"] == pytest.approx(summarize(asn, test_t.labels)["eer_pct"])
    cal = load_calibration_dict(res["calibration"])
    llr = cal.apply(asn, tables["test"], test_t)
    assert res["eer_calibrated_pct"] == pytest.approx(summarize(llr, test_t.labels)["eer_pct"])
    assert res["cllr_calibrated"] == pytest.approx(cllr(llr, test_t.labels))
    assert res["min_cllr"] == pytest.approx(min_cllr(llr, test_t.labels)) and res["min_cllr"] <= res["cllr_calibrated"]
    assert tables["test"].durations.max() <= 2.5
    # bench main: a missing model is one clear message, not a traceback
    with pytest.raises(SystemExit, match="no model folder at"):
        bench.main(["--model", str(tmp_path / "nomodel"), "--data", str(tmp_path / "mini")])


def load_calibration_dict(data):
    from svlib.scoring.calibration import Calibration

    return Calibration(data["features"], data["weights"], data["bias"], data["p_target"], data.get("meta") or {})
