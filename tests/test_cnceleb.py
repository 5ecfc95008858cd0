"""CN-Celeb: ``prepare cnceleb`` on a hand-made CN-Celeb1/2 folder, then enrolment-model scoring (and AS-norm
with enrolment models) through ``svlib score --enroll``, checked against numpy written out by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from svlib.cli import main as svlib_main
from svlib.corpora.cnceleb import prepare_cnceleb
from svlib.corpora.prepare import main as prepare_main
from svlib.data.lists import DataDir, ListError, read_trials
from svlib.model.speaker import save_model
from svlib.scoring.enroll import EnrollError, read_enroll_list
from svlib.scoring.metrics import load_embeddings, save_embeddings

from test_speaker import tiny_model

SR = 16000
TRAIN = {"id00000": ["singing-01-001", "speech-02-001"], "id00001": ["vlog-01-001", "vlog-01-002"]}
EVAL = ["id00800", "id00801"]
ENROLL_MAP = {"id00800-enroll": ["id00800/singing-01-001.flac", "id00800/speech-01-002.flac", "id00800/vlog-03-001.flac"],
              "id00801-enroll": ["id00801/drama-01-001.flac", "id00801/drama-01-002.flac"]}
TESTS = ["id00800-singing-01-004.flac", "id00800-interview-02-001.flac", "id00801-drama-02-003.flac",
         "id00801-movie-01-001.flac"]


def _flac(path: Path, seed: int, seconds: float = 0.5) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))
    sf.write(path, wave.astype(np.float32), SR, format="FLAC")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The CN-Celeb1 v2 layout (data/, dev/dev.lst, eval/{enroll,test,lists}) and a CN-Celeb2 data/ + spk.lst."""
    root = tmp_path_factory.mktemp("cnc")
    cn1, cn2 = root / "CN-Celeb_flac", root / "CN-Celeb2_flac"
    seed = 0
    for spk, names in TRAIN.items():
        for name in names:
            _flac(cn1 / "data" / spk / f"{name}.flac", seed := seed + 1)
    for files in ENROLL_MAP.values():
        for f in files:
            _flac(cn1 / "data" / f, seed := seed + 1)
    (cn1 / "dev").mkdir()
    (cn1 / "dev" / "dev.lst").write_text("id00000\nid00001\n")
    for spk in EVAL:
        _flac(cn1 / "eval" / "enroll" / f"{spk}-enroll.flac", seed := seed + 1, seconds=1.0)
    for name in TESTS:
        _flac(cn1 / "eval" / "test" / name, seed := seed + 1)
    lists = cn1 / "eval" / "lists"
    lists.mkdir()
    (lists / "enroll.lst").write_text("".join(f"{s}-enroll enroll/{s}-enroll.flac\n" for s in EVAL))
    (lists / "enroll.map").write_text("".join(f"{m} {' '.join(f)}\n" for m, f in ENROLL_MAP.items()))
    trials = [f"{s}-enroll test/{t} {int(t.startswith(s))}" for s in EVAL for t in TESTS]
    (lists / "trials.lst").write_text("\n".join(trials) + "\n")
    for name in ("a", "b"):
        _flac(cn2 / "data" / "id10001" / f"{name}.flac", seed := seed + 1)
    (cn2 / "spk.lst").write_text("id10001\n")
    return root


def test_prepare_cnceleb_layout(corpus, capsys):
    out = corpus / "prepared"
    code = prepare_main(["--relative-to", str(corpus), "cnceleb", "--root", str(corpus / "CN-Celeb_flac"),
                         "--root2", str(corpus / "CN-Celeb2_flac"), "--out", str(out)])
    assert code == 0
    assert capsys.readouterr().out.strip() == (
        f"{out}: train speakers 3, train utterances 6, enroll models 2, enroll utterances 5, test utterances 4, "
        "trials 8, target trials 4")
    train = DataDir.load(out / "train", check_files=True, root=corpus)
    assert train.utts == ["id00000/singing-01-001.flac", "id00000/speech-02-001.flac", "id00001/vlog-01-001.flac",
                          "id00001/vlog-01-002.flac", "id10001/a.flac", "id10001/b.flac"]
    assert train.wavs["id10001/a.flac"] == f"{corpus}/CN-Celeb2_flac/data/id10001/a.flac"
    assert (out / "train" / "wav.scp").read_text().splitlines()[0] == \
        "id00000/singing-01-001.flac CN-Celeb_flac/data/id00000/singing-01-001.flac"
    ev = DataDir.load(out / "eval", check_files=True, root=corpus)
    assert sorted(ev.utts) == sorted([f for fs in ENROLL_MAP.values() for f in fs] + [f"test/{t}" for t in TESTS])
    assert ev.utt2spk["test/id00801-movie-01-001.flac"] == "id00801" and ev.utt2spk["id00800/vlog-03-001.flac"] == "id00800"
    assert read_enroll_list(out / "eval" / "enroll.lst") == ENROLL_MAP
    trials = read_trials(out / "eval" / "trials.txt")
    assert trials.enroll[:4] == ["id00800-enroll"] * 4 and trials.test[0] == "test/id00800-singing-01-004.flac"
    assert trials.labels.tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert (out / "eval" / "trials.txt").read_text().splitlines()[0] == \
        "id00800-enroll test/id00800-singing-01-004.flac target"

    # enroll.lst mode: one concatenated enrolment file per model
    counts = prepare_cnceleb(corpus, corpus / "concat", enroll="lst", relative_to=corpus)
    assert counts["enroll_utterances"] == 2 and counts["train_speakers"] == 2
    assert read_enroll_list(corpus / "concat" / "eval" / "enroll.lst") == {
        "id00800-enroll": ["enroll/id00800-enroll.flac"], "id00801-enroll": ["enroll/id00801-enroll.flac"]}

    # a dev speaker that is also evaluated, and a missing enrolment file, are named
    bad = corpus / "bad"
    (bad / "eval" / "lists").mkdir(parents=True)
    (bad / "eval" / "lists" / "enroll.map").write_text("id00800-enroll id00800/nope.flac\n")
    (bad / "dev").mkdir()
    (bad / "dev" / "dev.lst").write_text("id00000\n")
    (bad / "data" / "id00000").mkdir(parents=True)
    _flac(bad / "data" / "id00000" / "x.flac", 99)
    with pytest.raises(ListError, match=r"enroll.map:1: enrolment file .*id00800/nope.flac not found"):
        prepare_cnceleb(bad, bad / "out")


def _unit(v):
    return v / np.linalg.norm(v)


def test_multi_utterance_enrolment_and_asnorm_equal_hand_computation(corpus, capsys, monkeypatch):
    out = corpus / "scored"
    prepare_cnceleb(corpus, out, root2=corpus / "CN-Celeb2_flac", relative_to=corpus)
    monkeypatch.chdir(corpus)  # wav.scp paths are relative to the folder they were written for
    save_model(tiny_model(), corpus / "model", {})
    assert svlib_main(["embed", "--model", "model", "--scp", str(out / "eval" / "wav.scp"), "--out", "eval.npz",
                       "--no-progress"]) == 0
    table = load_embeddings(corpus / "eval.npz")
    enroll = read_enroll_list(out / "eval" / "enroll.lst")
    trials = read_trials(out / "eval" / "trials.txt")
    capsys.readouterr()

    # by hand: model = mean of the unit-normalised enrolment embeddings, score = cosine with the test embedding
    models = {m: np.mean([_unit(table[u].astype(np.float64)) for u in utts], axis=0) for m, utts in enroll.items()}
    hand = np.array([_unit(models[e]) @ _unit(table[t].astype(np.float64)) for e, t in zip(trials.enroll, trials.test)])
    assert svlib_main(["score", "--trials", str(out / "eval" / "trials.txt"), "--embeddings", "eval.npz",
                       "--enroll", str(out / "eval" / "enroll.lst"), "--scores-out", "cos.txt"]) == 0
    printed = capsys.readouterr().out
    assert "enrolment models" in printed
    lines = [line.split() for line in (corpus / "cos.txt").read_text().splitlines()]
    assert [(e, t) for e, t, _ in lines] == list(zip(trials.enroll, trials.test))
    np.testing.assert_allclose([float(s) for *_, s in lines], hand, atol=2e-6)
    # a 3-utterance model is not any one of its utterances: the mean matters
    single = _unit(table[enroll["id00800-enroll"][0]].astype(np.float64)) @ _unit(table[trials.test[0]].astype(np.float64))
    assert abs(single - hand[0]) > 1e-3

    # AS-norm with enrolment models: the model's own top-N cohort statistics (population std, ddof=0)
    rng = np.random.default_rng(5)
    cohort = rng.normal(size=(12, table.matrix.shape[1]))
    save_embeddings(corpus / "cohort.npz", [f"c{i}" for i in range(12)], cohort)
    top_n = 5

    def stats(v):
        s = np.sort(np.array([_unit(v) @ _unit(c) for c in cohort]))[::-1][:top_n]
        return s.mean(), s.std()

    expected = []
    for (e, t), s in zip(zip(trials.enroll, trials.test), hand):
        (me, se), (mt, st) = stats(models[e]), stats(table[t].astype(np.float64))
        expected.append(0.5 * ((s - me) / se + (s - mt) / st))
    assert svlib_main(["score", "--trials", str(out / "eval" / "trials.txt"), "--embeddings", "eval.npz",
                       "--enroll", str(out / "eval" / "enroll.lst"), "--asnorm", "cohort.npz", "--top-n", str(top_n),
                       "--scores-out", "asn.txt"]) == 0
    got = [float(line.split()[2]) for line in (corpus / "asn.txt").read_text().splitlines()]
    np.testing.assert_allclose(got, expected, atol=5e-5)

    # calibrate + score with the same enrolment and AS-norm settings round-trips; without --asnorm it is refused
    assert svlib_main(["calibrate", "--trials", str(out / "eval" / "trials.txt"), "--embeddings", "eval.npz",
                       "--enroll", str(out / "eval" / "enroll.lst"), "--asnorm", "cohort.npz", "--top-n", str(top_n),
                       "--out", "cal.json"]) == 0
    assert svlib_main(["score", "--trials", str(out / "eval" / "trials.txt"), "--embeddings", "eval.npz",
                       "--enroll", str(out / "eval" / "enroll.lst"), "--asnorm", "cohort.npz", "--top-n", str(top_n),
                       "--calibration", "cal.json"]) == 0
    assert svlib_main(["score", "--trials", str(out / "eval" / "trials.txt"), "--embeddings", "eval.npz",
                       "--enroll", str(out / "eval" / "enroll.lst"), "--calibration", "cal.json"]) == 2


def test_enroll_list_errors(tmp_path):
    (tmp_path / "a.lst").write_text("m1 u1 u2\nm1 u3\n")
    with pytest.raises(EnrollError, match=r"a.lst:2: enrolment id 'm1' repeated \(first on line 1\)"):
        read_enroll_list(tmp_path / "a.lst")
    (tmp_path / "b.lst").write_text("m1\n")
    with pytest.raises(EnrollError, match=r"b.lst:1: expected '<enroll-id> <utt> \[<utt> ...\]'"):
        read_enroll_list(tmp_path / "b.lst")
