"""What the CLI leaves behind: embeddings that survive bad files and interruptions, long files said to be cut
or embedded whole, files readable by the group, ids for paths with spaces, lists with a BOM, atomic score
files, and ONNX rows shorter than the minimum length."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from svlib.cli import main
from svlib.model.speaker import SpeakerModel, save_model
from svlib.scoring.metrics import load_embeddings, save_embeddings

from test_speaker import tiny_model

SR = 16000


def _wav(path: Path, seconds: float, seed: int) -> Path:
    sf.write(path, 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR)).astype(np.float32), SR)
    return path


def _alone(model, wave: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))[0].double().numpy()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cliout")
    model = tiny_model()
    save_model(model, tmp / "model", {})
    for i in range(4):
        _wav(tmp / f"u{i}.wav", 0.6 + 0.2 * i, seed=i)
    sf.write(tmp / "silent.wav", np.zeros(SR, dtype=np.float32), SR)
    (tmp / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    lines = [f"u{i} {tmp / f'u{i}.wav'}" for i in range(4)] + [f"bad {tmp / 'corrupt.wav'}",
                                                               f"quiet {tmp / 'silent.wav'}", f"gone {tmp / 'no.wav'}"]
    (tmp / "wav.scp").write_text("\n".join(lines) + "\n")
    (tmp / "good.scp").write_text("\n".join(lines[:4]) + "\n")
    return tmp, model


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_skip_bad_lists_every_skipped_utterance_with_its_reason(env, capsys):
    tmp, model = env
    code, out, err = _run(["embed", "--model", tmp / "model", "--scp", tmp / "wav.scp", "--out", tmp / "skip.npz",
                           "--skip-bad", "--no-progress"], capsys)
    assert code == 0, err
    skipped = sorted(line for line in err.splitlines() if line.startswith("svlib embed: skipped"))
    assert len(skipped) == 3, err
    assert skipped[0].startswith(f"svlib embed: skipped bad: {tmp}/corrupt.wav: not a readable audio file")
    assert skipped[1] == f"svlib embed: skipped gone: {tmp}/no.wav: audio file not found"
    assert skipped[2].startswith(f"svlib embed: skipped quiet: {tmp}/silent.wav: near-silent audio (RMS -inf dBFS")
    assert "wrote 4 embeddings of dimension 24" in out and "(3 skipped)" in out
    table = load_embeddings(tmp / "skip.npz")
    assert table.utts == ["u0", "u1", "u2", "u3"]
    for i in range(4):
        np.testing.assert_allclose(table[f"u{i}"], _alone(model, sf.read(tmp / f"u{i}.wav", dtype="float32")[0]),
                                   atol=2e-5)


def test_interrupted_embed_resumes_from_its_checkpoint(env, capsys, monkeypatch):
    tmp, _ = env
    out = tmp / "resume.npz"
    argv = ["embed", "--model", tmp / "model", "--scp", tmp / "good.scp", "--out", out, "--checkpoint-every", "1",
            "--no-progress"]
    calls = []
    forward = SpeakerModel.forward

    def dies_on_the_third(self, waves, lengths):
        calls.append(int(lengths[0]))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(self, waves, lengths)

    monkeypatch.setattr(SpeakerModel, "forward", dies_on_the_third)
    code, _, err = _run(argv, capsys)
    assert code == 2 and "out of memory" in err and "2 embeddings kept in" in err and "rerun to resume" in err
    partial = out.with_name(out.name + ".partial.npz")
    assert not out.exists() and load_embeddings(partial).utts == ["u3", "u2"]  # longest first

    monkeypatch.setattr(SpeakerModel, "forward", lambda self, w, n: (calls.append(int(n[0])), forward(self, w, n))[1])
    calls.clear()
    code, _, err = _run(argv, capsys)
    assert code == 0 and "resuming from" in err and "2 of 4 utterances already embedded" in err
    assert calls == [int(0.8 * SR), int(0.6 * SR)]  # only the two that were missing
    assert not partial.exists() and not out.with_name(out.name + ".partial.json").exists()
    monkeypatch.setattr(SpeakerModel, "forward", forward)
    _run(["embed", "--model", tmp / "model", "--scp", tmp / "good.scp", "--out", tmp / "whole.npz", "--no-progress"],
         capsys)
    resumed, whole = load_embeddings(out), load_embeddings(tmp / "whole.npz")
    assert resumed.utts == whole.utts
    np.testing.assert_allclose(resumed.matrix, whole.matrix, atol=1e-6)
    np.testing.assert_allclose(resumed.durations, whole.durations)

    # a partial checkpoint of other settings is refused, not silently mixed in
    _killed_after_two(argv, capsys, monkeypatch)
    code, _, err = _run(argv + ["--max-seconds", "30"], capsys)
    assert code == 2 and "partial embeddings of a run with other settings" in err


def _killed_after_two(argv, capsys, monkeypatch) -> None:
    """Run ``argv`` (embed, --checkpoint-every 1) with the model failing on its third file, as a kill would
    stop it: the two longest files' embeddings stay in the partial file."""
    forward = SpeakerModel.forward
    calls = []

    def dies_on_the_third(self, waves, lengths):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return forward(self, waves, lengths)

    with monkeypatch.context() as patch:
        patch.setattr(SpeakerModel, "forward", dies_on_the_third)
        code, _, err = _run(argv, capsys)
    assert code == 2 and "2 embeddings kept in" in err, err


def test_resume_never_mixes_models_or_lists(env, capsys, monkeypatch):
    """A partial is resumed only with the weights and the list it was made from (their content): retrained
    weights in the same folder, or the same ids naming other files, start over, with a note, and give what a
    clean run gives. Resuming them mixed two models' embeddings (cosine 0.96 to a clean run)."""
    tmp, _ = env
    folder = tmp / "retrained"
    save_model(tiny_model(seed=1), folder, {})
    out = tmp / "mixed.npz"
    partial = out.with_name(out.name + ".partial.npz")
    argv = ["embed", "--model", folder, "--scp", tmp / "good.scp", "--out", out, "--checkpoint-every", "1",
            "--no-progress"]
    _killed_after_two(argv, capsys, monkeypatch)
    model_b = tiny_model(seed=2)
    save_model(model_b, folder, {})  # retrained into the same folder

    code, _, err = _run(argv, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "not resumed" in line]
    assert len(notes) == 1 and notes[0].startswith(f"svlib: note: {partial}: not resumed, made with other model "
                                                   "weights (sha256 ") and notes[0].endswith(
        "; deleted, embedding all 4 utterances again"), err
    resumed = load_embeddings(out)
    for i in range(4):
        wave = sf.read(tmp / f"u{i}.wav", dtype="float32")[0]
        np.testing.assert_allclose(resumed[f"u{i}"], _alone(model_b, wave), atol=2e-5)
        assert np.abs(_alone(tiny_model(seed=1), wave) - _alone(model_b, wave)).max() > 0.1  # A's would show

    # the same ids, two of them naming each other's file: another list
    lines = (tmp / "good.scp").read_text().splitlines()
    swapped = tmp / "swapped.scp"
    swapped.write_text("\n".join(lines[:2] + [f"u2 {tmp / 'u3.wav'}", f"u3 {tmp / 'u2.wav'}"]) + "\n")
    _killed_after_two(argv, capsys, monkeypatch)  # u3 and u2 of good.scp in the partial
    code, _, err = _run(argv[:4] + [swapped] + argv[5:], capsys)
    assert code == 0 and f"{partial}: not resumed, made from another list (other utterance ids or files)" in err
    resumed = load_embeddings(out)
    for utt, name in (("u2", "u3.wav"), ("u3", "u2.wav")):
        np.testing.assert_allclose(resumed[utt], _alone(model_b, sf.read(tmp / name, dtype="float32")[0]), atol=2e-5)

    # a partial of an svlib that recorded the model's path, not its weights: which model made it is unknown
    save_embeddings(partial, ["u0"], np.ones((1, 24)))
    out.with_name(out.name + ".partial.json").write_text(f'{{"model": "{folder}"}}')
    code, _, err = _run(argv, capsys)
    assert code == 0 and f"{partial}: not resumed, it does not record which model weights made it" in err
    np.testing.assert_allclose(load_embeddings(out)["u0"], _alone(model_b, sf.read(tmp / "u0.wav", dtype="float32")[0]),
                               atol=2e-5)


def test_long_files_are_said_to_be_cut_or_embedded_in_windows(env, capsys):
    tmp, model = env
    long = _wav(tmp / "long.wav", 2.5, seed=9)
    wave = sf.read(long, dtype="float32")[0]
    code, _, err = _run(["embed", "--model", tmp / "model", "--wav", long, "--out", tmp / "cut.npz",
                         "--max-seconds", "1", "--no-progress"], capsys)
    assert code == 0
    assert (f"svlib: note: 1 file(s) longer than --max-seconds 1 were cut to their first 1 s (longest: {long}, "
            "2.5 s); --windowed embeds them whole") in err
    np.testing.assert_allclose(load_embeddings(tmp / "cut.npz")[str(long)], _alone(model, wave[:SR]), atol=2e-5)

    code, _, err = _run(["embed", "--model", tmp / "model", "--wav", long, "--out", tmp / "win.npz",
                         "--max-seconds", "1", "--windowed", "--no-progress"], capsys)
    assert code == 0 and "cut" not in err
    # ceil(2.5 / 1) = 3 equal windows of 0.8333 s; the mean of their length-normalised embeddings
    edges = [0, int(round(SR * 2.5 / 3)), int(round(SR * 5 / 3)), len(wave)]
    pieces = [_alone(model, wave[a:b]) for a, b in zip(edges, edges[1:])]
    expected = np.mean([p / np.linalg.norm(p) for p in pieces], axis=0)
    table = load_embeddings(tmp / "win.npz")
    np.testing.assert_allclose(table[str(long)], expected, atol=2e-5)
    assert table.durations[0] == pytest.approx(2.5)


def test_outputs_respect_the_umask(env, capsys):
    tmp, model = env
    old = os.umask(0o022)
    try:
        save_embeddings(tmp / "mode.npz", ["a"], np.ones((1, 4)))
        save_model(model, tmp / "mode_model", {})
    finally:
        os.umask(old)
    assert oct(os.stat(tmp / "mode.npz").st_mode & 0o777) == oct(0o644)
    written = [tmp / "mode_model" / "model.safetensors", *(tmp / "mode_model" / "encoder").rglob("*.safetensors")]
    assert len(written) == 2
    for path in written:
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o644), path


def test_wav_paths_with_spaces_get_an_id(env, capsys):
    tmp, model = env
    spaced = tmp / "my take 1.wav"
    shutil.copy(tmp / "u1.wav", spaced)
    code, _, err = _run(["embed", "--model", tmp / "model", "--wav", spaced, tmp / "u2.wav", "--out", tmp / "sp.npz",
                         "--no-progress"], capsys)
    assert code == 0, err
    table = load_embeddings(tmp / "sp.npz")
    assert table.utts == [f"{tmp}/my_take_1.wav", f"{tmp}/u2.wav"]
    np.testing.assert_allclose(table.matrix[0], _alone(model, sf.read(spaced, dtype="float32")[0]), atol=2e-5)


def test_bom_trials_and_atomic_scores_out(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(1)
    utts = [f"s{i // 2}-{i % 2}" for i in range(8)]
    save_embeddings(tmp_path / "e.npz", utts, rng.normal(size=(8, 6)))
    lines = [f"{int(a[:2] == b[:2])} {a} {b}" for i, a in enumerate(utts) for b in utts[i + 1:]]
    (tmp_path / "plain.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode())
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real_replace(a, b))[1])
    outs = {}
    for name in ("plain", "bom"):
        code, out, err = _run(["score", "--trials", tmp_path / f"{name}.txt", "--embeddings", tmp_path / "e.npz",
                               "--scores-out", tmp_path / f"{name}.scores"], capsys)
        assert code == 0, err
        outs[name] = out.splitlines()[1:]
    assert outs["bom"] == outs["plain"]
    assert (tmp_path / "bom.scores").read_text() == (tmp_path / "plain.scores").read_text()
    assert (tmp_path / "bom.scores").read_text().startswith(f"{utts[0]} {utts[1]} ")
    # written through a temporary file in the same folder and renamed over the target
    targets = [b for _, b in replaced]
    assert tmp_path / "bom.scores" in targets
    src = next(a for a, b in replaced if b == tmp_path / "bom.scores")
    assert src.parent == tmp_path and src != tmp_path / "bom.scores" and not src.exists()


def test_onnx_row_shorter_than_the_minimum_is_clamped(tmp_path):
    pytest.importorskip("onnxruntime")
    from svlib.export import ExportError, export_onnx, onnx_session, run_onnx
    from svlib.features import MIN_SAMPLES

    model = tiny_model()
    path = export_onnx(model, tmp_path / "m.onnx", input="waves")
    session = onnx_session(path, threads=1)
    g = torch.Generator().manual_seed(0)
    waves = torch.zeros(2, 16000)
    waves[0] = 0.1 * torch.randn(16000, generator=g)
    waves[1, :200] = 0.1 * torch.randn(200, generator=g)  # 12.5 ms: below the 560-sample minimum
    out = run_onnx(session, waves, torch.tensor([16000, 200]))
    assert np.isfinite(out).all()
    # the short row is embedded as if zero-padded to MIN_SAMPLES
    with torch.no_grad():
        ref = model(waves[1:, :MIN_SAMPLES], torch.tensor([MIN_SAMPLES]))[0].numpy()
    np.testing.assert_allclose(out[1], ref, atol=1e-3)
    with pytest.raises(ExportError, match="at least 560"):
        run_onnx(session, waves[:, :300], torch.tensor([300, 200]))
