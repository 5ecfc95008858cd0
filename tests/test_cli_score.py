"""``svlib score`` / ``svlib calibrate``: printed numbers equal the library's, bad input is one stderr line + exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from svlib.cli import main
from svlib.data.lists import read_trials
from svlib.scoring.metrics import cosine_scores, load_embeddings, save_embeddings, summarize
from svlib.scoring.norm import as_norm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup(tmp_path):
    """12 speakers x 5 utterances around speaker centres, all-pairs-ish trial list, a 40-speaker cohort."""
    rng = np.random.default_rng(0)
    dim, spk, per = 16, 12, 5
    centres = rng.normal(size=(spk, dim))
    utts = [f"id{s:05d}/vid{u}/0000{u}.wav" for s in range(spk) for u in range(per)]
    mat = np.repeat(centres, per, axis=0) + 0.9 * rng.normal(size=(spk * per, dim))
    emb = save_embeddings(tmp_path / "emb.npz", utts, mat, durations=rng.uniform(2, 20, len(utts)))
    cohort = save_embeddings(tmp_path / "cohort.npz", [f"c{i}" for i in range(40)], rng.normal(size=(40, dim)))
    lines = []
    for i in range(0, len(utts), 2):
        for j in range(1, len(utts), 3):
            if i != j:
                lines.append(f"{int(i // per == j // per)} {utts[i]} {utts[j]}")
    trials = tmp_path / "trials.txt"
    trials.write_text("\r\n".join(lines) + "\r\n")
    return tmp_path, trials, emb, cohort


def _table(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(None, 1)
        rows[key.strip()] = value
    return rows


def test_score_prints_library_numbers(setup, capsys):
    tmp, trials, emb, _ = setup
    assert main(["score", "--trials", str(trials), "--embeddings", str(emb),
                 "--scores-out", str(tmp / "out" / "scores.txt")]) == 0
    rows = _table(capsys.readouterr().out)
    t = read_trials(trials)
    ref = summarize(cosine_scores(load_embeddings(emb), t), t.labels)
    assert int(rows["trials"]) == len(t) and int(rows["target trials"]) == t.num_target
    assert float(rows["EER (%)"]) == pytest.approx(ref["eer_pct"], abs=5e-4)
    assert float(rows["minDCF (p=0.01)"]) == pytest.approx(ref["mindcf_0.01"], abs=5e-5)
    assert float(rows["minDCF (p=0.05)"]) == pytest.approx(ref["mindcf_0.05"], abs=5e-5)
    assert 0 < ref["eer_pct"] < 30  # the synthetic speakers are separable but not trivially
    written = (tmp / "out" / "scores.txt").read_text().splitlines()
    assert len(written) == len(t) and written[0].split()[:2] == [t.enroll[0], t.test[0]]


def test_asnorm_and_calibration_flow(setup, capsys):
    tmp, trials, emb, cohort = setup
    calib = tmp / "calib.json"
    assert main(["calibrate", "--trials", str(trials), "--embeddings", str(emb), "--asnorm", str(cohort),
                 "--top-n", "10", "--quality", "log_dur_min", "norm_max", "--out", str(calib)]) == 0
    assert json.loads(calib.read_text())["features"] == ["score", "log_dur_min", "norm_max"]
    capsys.readouterr()
    assert main(["score", "--trials", str(trials), "--embeddings", str(emb), "--asnorm", str(cohort),
                 "--top-n", "10", "--calibration", str(calib), "--det", str(tmp / "det.png")]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert "AS-norm top-10 + calibration" in out
    assert 0 < float(rows["Cllr (bits)"]) < 1 and float(rows["minCllr (bits)"]) <= float(rows["Cllr (bits)"])
    assert (tmp / "det.png").stat().st_size > 1000

    capsys.readouterr()
    assert main(["score", "--trials", str(trials), "--embeddings", str(emb), "--asnorm", str(cohort), "--top-n", "10"]) == 0
    t, table = read_trials(trials), load_embeddings(emb)
    ref = summarize(as_norm(table, t, load_embeddings(cohort), top_n=10), t.labels)
    assert float(_table(capsys.readouterr().out)["EER (%)"]) == pytest.approx(ref["eer_pct"], abs=5e-4)


def _bad(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for piece in expected:
        assert piece in err, err
    return err


def test_bad_input_is_one_line_exit_2(setup, capsys):
    tmp, trials, emb, cohort = setup
    _bad(capsys, ["score", "--trials", str(tmp / "nope.txt"), "--embeddings", str(emb)], "nope.txt", "not found")
    _bad(capsys, ["score", "--trials", str(trials), "--embeddings", str(tmp / "none.npz")], "none.npz", "not found")

    unknown = tmp / "unknown.txt"
    unknown.write_text(trials.read_text().splitlines()[0] + "\n1 id00000/vid0/00000.wav ghost/utt.wav\n")
    _bad(capsys, ["score", "--trials", str(unknown), "--embeddings", str(emb)], "'ghost/utt.wav'", "unknown.txt")

    malformed = tmp / "malformed.txt"
    malformed.write_text("1 a b\n1 a\n")
    _bad(capsys, ["score", "--trials", str(malformed), "--embeddings", str(emb)], "malformed.txt:2")

    junk = tmp / "junk.npz"
    junk.write_bytes(b"not a zip")
    _bad(capsys, ["score", "--trials", str(trials), "--embeddings", str(junk)], "junk.npz")
    _bad(capsys, ["score", "--trials", str(trials), "--embeddings", str(emb), "--asnorm", str(cohort)],
         "top_n=300", "cohort size 40")
    bad_cal = tmp / "c.json"
    bad_cal.write_text('{"features": ["score"], "weights": [1], "bias": "x"}')
    _bad(capsys, ["score", "--trials", str(trials), "--embeddings", str(emb), "--calibration", str(bad_cal)],
         "c.json", "'bias' must be a number")

    with pytest.raises(SystemExit) as exc:  # argparse usage errors keep argparse's own exit code 2
        main(["score", "--trials", str(trials)])
    assert exc.value.code == 2


def test_python_dash_m_subprocess(setup):
    tmp, trials, emb, _ = setup
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, "-m", "svlib.cli", "score", "--trials", str(trials), "--embeddings", str(emb)],
                        capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "EER (%)" in ok.stdout and "minDCF (p=0.05)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "svlib.cli", "score", "--trials", "missing.txt", "--embeddings", str(emb)],
                         capture_output=True, text=True, env=env, cwd=tmp, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "svlib score: error: missing.txt: file not found"


def _interval_row(out: str, name: str) -> list[float]:
    line = next(line for line in out.splitlines() if line.startswith(name))
    lo, hi = line[len(name):].strip().strip("[]").split(",")
    return [float(lo), float(hi)]


def test_score_ci_prints_the_library_interval(setup, capsys):
    from svlib.scoring.bootstrap import bootstrap_ci, trial_speakers

    tmp, trials, emb, _ = setup
    assert main(["score", "--trials", str(trials), "--embeddings", str(emb), "--ci", "--ci-replicates", "300",
                 "--ci-seed", "4"]) == 0
    out = capsys.readouterr().out
    t = read_trials(trials)
    ref = bootstrap_ci(cosine_scores(load_embeddings(emb), t), t.labels, trial_speakers(t.enroll, t.test, t.labels),
                       replicates=300, seed=4)
    assert _interval_row(out, "EER 95% CI (%)") == pytest.approx(ref["eer_pct"], abs=5e-4)
    assert _interval_row(out, "minDCF (p=0.01) 95% CI") == pytest.approx(ref["mindcf_0.01"], abs=5e-5)
    assert ref["speakers"] == 12 and ref["eer_pct"][0] < float(_table(out)["EER (%)"]) < ref["eer_pct"][1]
    assert "300 x 12 speakers, seed 4" in out
    assert "# note: 12 speakers: intervals under-cover below ~20 speakers, not called significant" in out


def test_compare_differing_and_identical_systems(setup, capsys):
    from svlib.scoring.bootstrap import paired_bootstrap, trial_speakers

    tmp, trials, emb, _ = setup
    table = load_embeddings(emb)
    noisy = save_embeddings(tmp / "noisy.npz", table.utts,
                            table.matrix + 1.5 * np.random.default_rng(1).normal(size=table.matrix.shape))
    for name, path in (("a", emb), ("b", noisy)):
        assert main(["score", "--trials", str(trials), "--embeddings", str(path),
                     "--scores-out", str(tmp / f"{name}.txt")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp / "a.txt"), str(tmp / "b.txt"), "--trials", str(trials), "--replicates", "400",
                 "--json", str(tmp / "cmp.json")]) == 0
    out = capsys.readouterr().out
    t = read_trials(trials)
    ref = paired_bootstrap(cosine_scores(table, t), cosine_scores(load_embeddings(noisy), t), t.labels,
                           trial_speakers(t.enroll, t.test, t.labels), replicates=400, seed=0)
    compared = json.loads((tmp / "cmp.json").read_text())
    saved = compared["eer_pct"]
    assert saved["ci"] == pytest.approx(ref["eer_pct"]["ci"], abs=1e-5)  # scores were written with 6 decimals
    assert saved["diff"] < 0 and saved["ci"][1] < 0 and saved["excludes_zero"]
    # 12 speakers: the interval is reported, the difference not called significant (test_compare_wording)
    assert not saved["significant"] and compared["note"].startswith("12 speakers: intervals under-cover")
    assert "excludes 0 (bootstrap p" in out and "the systems differ" not in out
    # the same scores in another line order: the pairs are matched by id, the difference is 0 in every replicate
    lines = (tmp / "a.txt").read_text().splitlines()
    (tmp / "a_shuffled.txt").write_text("\n".join(lines[::-1]) + "\n")
    assert main(["compare", str(tmp / "a.txt"), str(tmp / "a_shuffled.txt"), "--trials", str(trials),
                 "--replicates", "50"]) == 0
    out = capsys.readouterr().out
    assert "EER difference A - B = +0.000 points, 95% CI [0.000, 0.000] contains 0" in out


def _two_systems(tmp: Path, speakers: int) -> Path:
    """Score files of a good (A) and a worse (B) system on all pairs of ``speakers`` x 2 utterances."""
    utts = [f"s{s:02d}-u{u}" for s in range(speakers) for u in range(2)]
    pairs = [(utts[i], utts[j]) for i in range(len(utts)) for j in range(i + 1, len(utts))]
    labels = np.array([e[:3] == t[:3] for e, t in pairs], dtype=float)
    noise = np.random.default_rng(speakers).normal(size=(2, len(pairs)))
    trials = tmp / f"trials{speakers}.txt"
    trials.write_text("".join(f"{e} {t} {'target' if y else 'nontarget'}\n" for (e, t), y in zip(pairs, labels)))
    for name, scores in (("a", labels + 0.3 * noise[0]), ("b", labels + 0.9 * noise[1])):
        (tmp / f"{name}{speakers}.txt").write_text("".join(f"{e} {t} {s:.6f}\n" for (e, t), s in zip(pairs, scores)))
    return trials


@pytest.mark.parametrize("speakers", [10, 25])
def test_compare_wording(tmp_path, capsys, speakers):
    """p below the two-sided resolution 2/R reads "p < 2/R"; a list of fewer than 20 speakers gets the
    under-coverage note and no significance call, a larger one the verdict."""
    trials = _two_systems(tmp_path, speakers)
    assert main(["compare", str(tmp_path / f"a{speakers}.txt"), str(tmp_path / f"b{speakers}.txt"), "--trials",
                 str(trials), "--replicates", "400"]) == 0
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("EER difference"))
    assert verdict.endswith("(bootstrap p < 0.005)")          # no replicate crossed 0: p < 2/400
    assert f"{speakers} speakers, paired speaker bootstrap x 400" in out
    if speakers < 20:
        assert "excludes 0 (bootstrap" in verdict and "significant" not in verdict and "systems differ" not in verdict
        assert out.splitlines()[-1] == "note: 10 speakers: intervals under-cover below ~20 speakers, not called significant"
    else:
        assert "excludes 0: the systems differ (bootstrap" in verdict and "note" not in out
