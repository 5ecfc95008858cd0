"""AS-norm against a per-trial loop; calibration, Cllr and PAV against known Gaussian answers."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.integrate import quad

from svlib.scoring.calibration import (
    Calibration,
    CalibrationError,
    cllr,
    feature_matrix,
    fit_calibration,
    load_calibration,
    min_cllr,
    optimal_llrs,
    pav,
    train_calibration,
)
from svlib.scoring.metrics import EmbeddingTable, MissingEmbeddingError, ScoringError, cosine_scores
from svlib.scoring.norm import as_norm, cohort_stats, speaker_means


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------- AS-norm


def test_as_norm_matches_loop():
    rng = np.random.default_rng(0)
    utts = [f"spk{i % 3}/u{i}.wav" for i in range(8)]
    table = EmbeddingTable(utts, rng.normal(size=(8, 6)) * rng.uniform(0.5, 3, size=(8, 1)))
    cohort = rng.normal(size=(25, 6))
    pairs = [(0, 1), (2, 3), (0, 7), (5, 5), (6, 4)]
    trials = SimpleNamespace(enroll=[utts[a] for a, _ in pairs], test=[utts[b] for _, b in pairs])
    top_n = 7
    got = as_norm(table, trials, cohort, top_n=top_n)

    expected = []
    for a, b in pairs:
        e, t = table.matrix[a], table.matrix[b]
        s = _cos(e, t)
        stats = []
        for v in (e, t):
            cs = sorted((_cos(v, c) for c in cohort), reverse=True)[:top_n]
            stats.append((np.mean(cs), np.std(cs)))  # ddof=0, as np.std in WeSpeaker score_norm.py
        (mu_e, sd_e), (mu_t, sd_t) = stats
        expected.append(0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # same result from a cohort table and from precomputed raw scores (chunking must not matter)
    cohort_table = EmbeddingTable([f"c{i}" for i in range(25)], cohort)
    np.testing.assert_allclose(as_norm(table, trials, cohort_table, top_n, scores=cosine_scores(table, trials)),
                               got, rtol=1e-6)
    unit = table.matrix / np.linalg.norm(table.matrix, axis=1, keepdims=True)
    cu = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)
    mu1, sd1 = cohort_stats(unit, cu, top_n, chunk=3)
    mu2, sd2 = cohort_stats(unit, cu, top_n)
    np.testing.assert_allclose(mu1, mu2, rtol=1e-6)
    np.testing.assert_allclose(sd1, sd2, rtol=1e-6)


def test_as_norm_errors():
    table = EmbeddingTable(["a", "b"], np.eye(3)[:2])
    trials = SimpleNamespace(enroll=["a"], test=["b"])
    with pytest.raises(ScoringError, match="exceeds the cohort size 4"):
        as_norm(table, trials, np.ones((4, 3)) + np.eye(4, 3), top_n=300)
    with pytest.raises(ScoringError, match="shape"):
        as_norm(table, trials, np.ones((10, 5)), top_n=3)


def test_speaker_means():
    utts = ["s1/a", "s1/b", "s2/a"]
    table = EmbeddingTable(utts, np.array([[2.0, 0.0], [0.0, 5.0], [0.0, -1.0]]))
    means = speaker_means(table, {"s1/a": "s1", "s1/b": "s1", "s2/a": "s2", "s9/x": "s9"})
    assert means.utts == ["s1", "s2"]
    # unit vectors (1,0) and (0,1) averaged then renormalised -> (1,1)/sqrt2, the norms 2 and 5 do not matter
    np.testing.assert_allclose(means["s1"], [math.sqrt(0.5)] * 2, rtol=1e-6)
    np.testing.assert_allclose(means["s2"], [0.0, -1.0])
    with pytest.raises(MissingEmbeddingError, match="s2/a"):
        speaker_means(table, {"s1/a": "s1", "s1/b": "s1"})


# --------------------------------------------------------------------------------- Cllr / PAV


def test_pav_known_and_monotone():
    np.testing.assert_allclose(pav([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(pav([3, 2, 1]), [2, 2, 2])
    # weighted: (3*1 + 1*3)/2 ... weights 1 and 3 on values 4 and 0 -> 1.0 for both
    np.testing.assert_allclose(pav([4, 0, 5], [1, 3, 1]), [1, 1, 5])
    rng = np.random.default_rng(1)
    y = rng.normal(size=500) + np.linspace(0, 3, 500)
    w = rng.uniform(0.5, 2, size=500)
    fit = pav(y, w)
    assert np.all(np.diff(fit) >= -1e-12)
    assert np.sum(fit * w) == pytest.approx(np.sum(y * w))  # block means preserve the weighted total
    # isotonic optimum beats any other monotone candidate, e.g. a running max or a shifted fit
    sse = np.sum(w * (fit - y) ** 2)
    assert sse <= np.sum(w * (np.maximum.accumulate(y) - y) ** 2)
    assert sse <= np.sum(w * (fit + 0.01 - y) ** 2)


def test_cllr_of_true_llrs_matches_integral():
    # targets N(mu, 1), non-targets N(0, 1): LLR(s) = mu*s - mu^2/2, distributed N(+-m, 2m) with m = mu^2/2.
    # By symmetry Cllr = (1/ln2) * E_{x ~ N(m, 2m)} log(1 + e^-x)
    mu, n = 2.0, 200_000
    m = mu * mu / 2
    pdf = lambda x: math.exp(-(x - m) ** 2 / (4 * m)) / math.sqrt(4 * math.pi * m)
    expected = quad(lambda x: pdf(x) * math.log1p(math.exp(-x)), m - 12 * math.sqrt(2 * m), m + 12 * math.sqrt(2 * m))[0] / math.log(2)
    rng = np.random.default_rng(2)
    s = np.r_[rng.normal(mu, 1, n), rng.normal(0, 1, n)]
    y = np.r_[np.ones(n), np.zeros(n)]
    got = cllr(mu * s - m, y)
    assert got == pytest.approx(expected, abs=0.004)
    assert 0.50 < expected < 0.53  # d'=2 (EER 15.9 %) sits at about 0.514 bits
    assert cllr(np.zeros(4), [1, 0, 1, 0]) == pytest.approx(1.0)  # llr 0 carries no information
    assert cllr(np.array([50.0, -50.0]), [1, 0]) == pytest.approx(0.0, abs=1e-12)


def test_min_cllr_properties():
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.3
    s = rng.normal(size=5000) + 2 * y
    mc = min_cllr(s, y)
    # invariant to monotone maps of the score, and never above the cost of any monotone calibration
    assert min_cllr(np.exp(s) * 7 - 3, y) == pytest.approx(mc, abs=1e-12)
    for a, b in ((1.0, -1.0), (2.0, -2.0), (1.5, -2.5)):
        assert mc <= cllr(a * s + b, y) + 1e-12
    llr = optimal_llrs(s, y)
    ordered = llr[np.argsort(s)]
    assert np.all(ordered[1:] >= ordered[:-1])  # +/-inf at the ends, so compare instead of np.diff
    assert min_cllr([0.1, 0.9], [0, 1]) == 0.0
    # tied scores must share one value: a full tie of 1 target + 1 non is uninformative
    assert min_cllr([0.5, 0.5], [0, 1]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------- calibration


def test_calibration_recovers_gaussian_llr():
    # true LLR of s (targets N(2,1), non N(0,1)) is 2s - 2; observed x = 3s - 5 so LLR = (2/3) x + 4/3
    rng = np.random.default_rng(4)
    n_tar, n_non = 5000, 45000
    s = np.r_[rng.normal(2, 1, n_tar), rng.normal(0, 1, n_non)]
    y = np.r_[np.ones(n_tar, np.int8), np.zeros(n_non, np.int8)]
    x = 3 * s - 5
    for p in (0.5, 0.05):
        cal = fit_calibration(x, y, p_target=p)
        assert cal.weights[0] == pytest.approx(2 / 3, abs=0.04)
        assert cal.bias == pytest.approx(4 / 3, abs=0.1)
    cal = fit_calibration(x, y)
    c, mc, oracle = cllr(cal.apply(x), y), min_cllr(x, y), cllr(2 * s - 2, y)
    assert mc <= c < mc + 0.01
    assert c == pytest.approx(oracle, abs=0.005)
    assert cllr(x, y) > c + 0.2  # the raw scores are badly calibrated (0.76 bits)


def test_quality_measure_calibration_with_durations(tmp_path):
    # the score shifts with the shorter side's log-duration q: s = 2*y + (q - qbar) + noise, so the
    # optimal LLR is linear in (s, q): 2*(s - (q - qbar)) - 2 -> weights [2, -2]
    rng = np.random.default_rng(5)
    num_utts, n = 600, 30000
    utts = [f"u{i}/x.wav" for i in range(num_utts)]
    dur = rng.uniform(2.0, 30.0, num_utts)
    table = EmbeddingTable(utts, rng.normal(size=(num_utts, 4)) + 0.1, durations=dur)
    e, t = rng.integers(0, num_utts, n), rng.integers(0, num_utts, n)
    trials = SimpleNamespace(enroll=[utts[i] for i in e], test=[utts[i] for i in t])
    y = (rng.random(n) < 0.2).astype(np.int8)
    q = np.log(np.minimum(dur[e], dur[t]))
    s = 2.0 * y + (q - q.mean()) + rng.normal(size=n)
    oracle = cllr(2 * (s - (q - q.mean())) - 2, y)

    plain = fit_calibration(s, y)
    qmf = fit_calibration(s, y, table, trials, features=["score", "log_dur_min"])
    np.testing.assert_allclose(qmf.weights, [2.0, -2.0], atol=0.1)
    c_plain, c_qmf = cllr(plain.apply(s), y), cllr(qmf.apply(s, table, trials), y)
    assert c_qmf == pytest.approx(oracle, abs=0.01)
    assert c_qmf < c_plain - 0.05

    path = qmf.save(tmp_path / "calib.json")
    data = json.loads(path.read_text())
    assert data["features"] == ["score", "log_dur_min"] and len(data["weights"]) == 2
    again = load_calibration(path)
    np.testing.assert_allclose(again.apply(s, table, trials), qmf.apply(s, table, trials))

    with pytest.raises(CalibrationError, match="durations"):
        feature_matrix(["score", "log_dur_max"], s, EmbeddingTable(utts, table.matrix), trials)
    norms = feature_matrix(["score", "norm_min", "norm_max"], s, table, trials)
    assert np.all(norms[:, 1] <= norms[:, 2]) and norms[0, 1] == pytest.approx(
        min(np.linalg.norm(table.matrix[e[0]]), np.linalg.norm(table.matrix[t[0]])), rel=1e-6)


def test_calibration_file_errors(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match=r"bad\.json: not valid JSON"):
        load_calibration(bad)
    bad.write_text(json.dumps({"features": ["score"], "weights": [1.0]}))
    with pytest.raises(CalibrationError, match=r"missing keys \['bias'\]"):
        load_calibration(bad)
    bad.write_text(json.dumps({"features": ["score", "snr"], "weights": [1.0, 2.0], "bias": 0}))
    with pytest.raises(CalibrationError, match="unknown feature 'snr'"):
        load_calibration(bad)
    bad.write_text(json.dumps({"features": ["score"], "weights": [1.0, 2.0], "bias": 0}))
    with pytest.raises(CalibrationError, match="1 features but 2 weights"):
        load_calibration(bad)
    with pytest.raises(CalibrationError, match="constant"):
        fit_calibration([1.0, 2.0, 3.0], [1, 0, 1], quality={"norm_min": np.ones(3)}, features=["score", "norm_min"])
    assert Calibration(["score"], [2.0], -1.0).apply(np.array([0.0, 1.0])).tolist() == [-1.0, 1.0]


def test_quality_measures_are_clipped_to_the_training_range(tmp_path):
    rng = np.random.default_rng(3)
    n = 4000
    labels = rng.integers(0, 2, n)
    quality = rng.uniform(0.0, 1.0, n)
    scores = np.where(labels == 1, 1.0, -1.0) * (1.0 + quality) + rng.normal(0, 1, n)
    x = np.stack([scores, quality], axis=1)
    cal = train_calibration(x, labels, ["score", "log_dur_min"])
    lo, hi = cal.meta["quality_range"]["log_dur_min"]
    assert 0.0 <= lo < 0.01 and 0.99 < hi <= 1.0
    far = cal.llr(np.array([[0.5, 25.0], [0.5, -3.0]]))
    edge = cal.llr(np.array([[0.5, hi], [0.5, lo]]))
    np.testing.assert_allclose(far, edge)  # no extrapolation beyond what calibration saw
    reloaded = load_calibration(cal.save(tmp_path / "calib.json"))
    np.testing.assert_allclose(reloaded.llr(np.array([[0.5, 25.0]])), far[:1])
