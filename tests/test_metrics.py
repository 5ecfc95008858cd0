"""EER / minDCF / DET / cosine scoring / embeddings files, checked against hand arithmetic and
independent plain-numpy references."""
from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq

from svlib.scoring.metrics import (
    EmbeddingFileError,
    EmbeddingTable,
    MissingEmbeddingError,
    ScoringError,
    compute_eer,
    compute_min_dcf,
    cosine_scores,
    det_curve,
    load_embeddings,
    plot_det,
    save_embeddings,
    summarize,
)


def _roc_eer(scores, labels):
    """Reference: ROC built like sklearn.metrics.roc_curve, EER = root of 1 - fpr - tpr(fpr)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(np.int64)
    distinct = np.flatnonzero(np.diff(s)) if s.size > 1 else np.array([], int)
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = idx + 1 - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return brentq(lambda x: 1.0 - x - np.interp(x, fpr, tpr), 0.0, 1.0, xtol=1e-14)


def _brute_min_dcf(scores, labels, p, c_miss=1.0, c_fa=1.0):
    tar, non = scores[labels == 1], scores[labels == 0]
    best = np.inf
    for t in list(np.unique(scores)) + [np.inf]:
        fnr = np.mean(tar < t)
        fpr = np.mean(non >= t)
        best = min(best, c_miss * p * fnr + c_fa * (1 - p) * fpr)
    return best / min(c_miss * p, c_fa * (1 - p))


# ---------------------------------------------------------------------------------------- EER


def test_perfect_separation_gives_zero():
    eer, thr = compute_eer([0.9, 0.8, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0])
    assert eer == 0.0
    assert 0.3 < thr <= 0.8


def test_inverted_scores_give_hundred_percent():
    assert compute_eer([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])[0] == pytest.approx(1.0)
    assert summarize([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0])["eer_pct"] == pytest.approx(100.0)


def test_hand_worked_case_with_tie():
    # targets 0.9, 0.5, 0.4 ; non-targets 0.7, 0.5, 0.2, 0.1  (0.5 is a target/non-target tie)
    # cuts (accept s >= t):        t=.1    .2     .4     .5     .7     .9     >.9
    #   FNR (of 3 targets)          0      0      0     1/3    2/3    2/3     1
    #   FPR (of 4 non-targets)      1     3/4    1/2    1/2    1/4     0      0
    #   d = FNR - FPR              -1   -3/4   -1/2   -1/6   5/12   2/3     1
    # sign change between t=.5 (d=-1/6) and t=.7 (d=5/12): a = (1/6)/(1/6+5/12) = 2/7
    #   EER = 1/3 + 2/7*(2/3-1/3) = 3/7 ;  FPR check: 1/2 - 2/7*(1/4) = 3/7
    #   threshold = 0.5 + 2/7*(0.7-0.5) = 0.5571428...
    scores = np.array([0.9, 0.5, 0.4, 0.7, 0.5, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    eer, thr = compute_eer(scores, labels)
    assert eer == pytest.approx(3 / 7, abs=1e-12)
    assert thr == pytest.approx(0.5 + 0.4 / 7, abs=1e-12)
    # minDCF p=0.05: cost/norm = FNR + 19 FPR -> best at t=.9: 2/3
    assert compute_min_dcf(scores, labels, 0.05) == pytest.approx(2 / 3)
    # p=0.5: FNR + FPR -> best at t=.4: 0 + 1/2
    assert compute_min_dcf(scores, labels, 0.5) == pytest.approx(0.5)
    # p=0.01: FNR + 99 FPR -> best at t=.9: 2/3
    assert summarize(scores, labels)["mindcf_0.01"] == pytest.approx(2 / 3)


def test_full_tie_is_not_split():
    # a nearest-threshold EER would give 0 or 1; the interpolated crossing of (FPR 1, FNR 0)->(0, 1) is 1/2
    assert compute_eer([1.0, 1.0], [1, 0])[0] == pytest.approx(0.5)
    assert compute_eer([2.0, 2.0, 2.0, 2.0], [1, 0, 0, 1])[0] == pytest.approx(0.5)


def test_ties_order_invariant():
    rng = np.random.default_rng(1)
    labels = (rng.random(3000) < 0.3).astype(np.int8)
    scores = np.round(rng.normal(size=3000) + labels, 1)  # heavy ties
    ref = summarize(scores, labels)
    for _ in range(3):
        p = rng.permutation(scores.size)
        got = summarize(scores[p], labels[p])
        for k in ("eer_pct", "mindcf_0.01", "mindcf_0.05"):
            assert got[k] == ref[k]
    assert ref["eer_pct"] / 100 == pytest.approx(_roc_eer(scores, labels), abs=1e-9)


def test_eer_matches_roc_reference_100k():
    rng = np.random.default_rng(0)
    labels = (rng.random(100_000) < 0.1).astype(np.int8)
    scores = rng.normal(size=labels.size) + 2.0 * labels
    eer, _ = compute_eer(scores, labels)
    assert eer == pytest.approx(_roc_eer(scores, labels), abs=1e-6)
    # and the textbook value for unit Gaussians 2 apart: Phi(-1) = 0.1587
    assert eer == pytest.approx(0.15866, abs=0.005)


def test_min_dcf_matches_brute_force():
    rng = np.random.default_rng(2)
    labels = (rng.random(300) < 0.2).astype(np.int8)
    scores = np.round(rng.normal(size=300) + 1.5 * labels, 2)
    for p in (0.01, 0.05, 0.3):
        for c_miss, c_fa in ((1, 1), (10, 1), (1, 3)):
            assert compute_min_dcf(scores, labels, p, c_miss, c_fa) == pytest.approx(
                _brute_min_dcf(scores, labels, p, c_miss, c_fa), abs=1e-12)


def test_summarize_keys_and_counts():
    out = summarize([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert out["num_trials"] == 4 and out["num_target"] == 2
    assert set(out) == {"eer_pct", "mindcf_0.01", "mindcf_0.05", "num_trials", "num_target"}
    assert out["eer_pct"] == pytest.approx(50.0)  # at t=0.4: FNR = 1/2 (0.35 missed), FPR = 1/2 (0.4 accepted)
    assert 0.0 <= out["mindcf_0.01"] <= 1.0


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 0.2], [0, 0], "no target"),
        ([0.1, 0.2], [1, 1], "no non-target"),
        ([0.1, 0.2, 0.3], [1, 0], "length mismatch"),
        ([0.1, float("nan"), 0.3], [1, 0, 0], "NaN"),
        ([0.1, 0.2], [1, 2], "labels must be 0"),
    ],
)
def test_bad_input_errors(scores, labels, match):
    with pytest.raises(ScoringError, match=match):
        compute_eer(scores, labels)


def test_det_curve_monotone_endpoints():
    rng = np.random.default_rng(3)
    labels = rng.random(500) < 0.5
    scores = np.round(rng.normal(size=500) + labels, 1)
    fpr, fnr = det_curve(scores, labels)
    assert (fpr[0], fnr[0], fpr[-1], fnr[-1]) == (1.0, 0.0, 0.0, 1.0)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(fnr) >= 0)
    assert fpr.size == np.unique(scores).size + 1


def test_plot_det_writes_png(tmp_path):
    rng = np.random.default_rng(4)
    labels = rng.random(20_000) < 0.05
    a = rng.normal(size=labels.size) + 2 * labels
    out = plot_det({"sys A": (a, labels), "sys B": (a + rng.normal(size=a.size), labels)}, tmp_path / "det.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


# ------------------------------------------------------------------------ embeddings, cosine


def test_save_load_roundtrip_with_slashes(tmp_path):
    utts = ["id10270/x6uYqmx31kE/00001.wav", "id10271/abc/00002.wav", "é/ü"]
    mat = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = save_embeddings(tmp_path / "emb.npz", utts, mat, durations=[1.5, 2.0, 3.25])
    assert path.name == "emb.npz"  # no ".npz.npz"
    table = load_embeddings(path)
    assert isinstance(table, dict) and list(table) == utts
    np.testing.assert_array_equal(table["id10271/abc/00002.wav"], mat[1])
    np.testing.assert_array_equal(table.durations, [1.5, 2.0, 3.25])
    assert table.matrix.dtype == np.float32
    clone = pickle.loads(pickle.dumps(table))
    assert clone.utts == utts and clone.source == table.source
    np.testing.assert_array_equal(clone.matrix, mat)


def test_embedding_file_errors(tmp_path):
    with pytest.raises(EmbeddingFileError, match="not found"):
        load_embeddings(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(EmbeddingFileError, match=r"other\.npz.*missing arrays"):
        load_embeddings(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("hello")
    with pytest.raises(EmbeddingFileError, match="junk.npz"):
        load_embeddings(tmp_path / "junk.npz")
    with pytest.raises(EmbeddingFileError, match="duplicate"):
        save_embeddings(tmp_path / "d.npz", ["a", "a"], np.ones((2, 3)))
    with pytest.raises(EmbeddingFileError, match="NaN"):
        save_embeddings(tmp_path / "n.npz", ["a", "b"], np.array([[1, 2], [np.nan, 1]]))


def test_truncated_or_corrupt_npz_is_an_embedding_file_error(tmp_path):
    """A copy cut short (zip magic, no central directory) or a flipped byte raised zipfile.BadZipFile, which
    is no ValueError/OSError: `svlib score` printed its traceback."""
    whole = save_embeddings(tmp_path / "e.npz", ["a", "b", "c"], np.arange(24.0).reshape(3, 8)).read_bytes()
    damaged = {"cut at 40%": whole[:len(whole) * 2 // 5], "last byte missing": whole[:-1]}
    flipped = bytearray(whole)
    flipped[200] ^= 0xFF  # inside the first member: its header or data no longer checks out
    damaged["a flipped byte"] = bytes(flipped)
    for name, data in damaged.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data)
        with pytest.raises(EmbeddingFileError) as err:
            load_embeddings(path)
        assert str(err.value).startswith(f"{path}: truncated or corrupt .npz file ("), name
        assert str(err.value).endswith("); write it again"), name


def test_every_npz_read_goes_through_load_embeddings():
    """One loader, one set of errors: no other module calls np.load."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    loader = repo / "svlib" / "scoring" / "metrics.py"
    direct = [f"{p.relative_to(repo)}:{n}" for folder in ("svlib", "experiments", "bench")
              for p in sorted((repo / folder).rglob("*.py")) if p != loader
              for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\b(np|numpy)\.load\(", line)]
    assert direct == [], direct


def test_cosine_scores_values_and_table_equals_dict():
    emb = {"a/1": np.array([1.0, 0.0]), "b/1": np.array([3.0, 4.0]), "c/1": np.array([0.0, -2.0])}
    trials = SimpleNamespace(enroll=["a/1", "a/1", "b/1"], test=["b/1", "c/1", "c/1"])
    got = cosine_scores(emb, trials)
    np.testing.assert_allclose(got, [0.6, 0.0, -0.8], atol=1e-7)
    table = EmbeddingTable(list(emb), np.stack(list(emb.values())))
    np.testing.assert_allclose(cosine_scores(table, trials, chunk=2), got, atol=1e-7)


def test_cosine_scores_missing_utterance_names_it(tmp_path):
    table = EmbeddingTable(["a", "b"], np.eye(2), source="emb.npz")
    trials = SimpleNamespace(enroll=["a", "zz/9.wav"], test=["b", "a"], path="lists/trials.txt")
    with pytest.raises(MissingEmbeddingError) as err:
        cosine_scores(table, trials)
    msg = str(err.value)
    assert "'zz/9.wav'" in msg and "lists/trials.txt" in msg and "emb.npz" in msg
    assert isinstance(err.value, KeyError)
    with pytest.raises(KeyError, match="zz/9.wav"):
        cosine_scores({"a": np.ones(2), "b": np.ones(2)}, trials)


def test_table_filled_like_a_dict():
    table = EmbeddingTable()
    table["a"] = np.array([1.0, 0.0], dtype=np.float32)
    table["b"] = np.array([1.0, 1.0], dtype=np.float32)
    trials = SimpleNamespace(enroll=["a"], test=["b"])
    assert cosine_scores(table, trials)[0] == pytest.approx(math.sqrt(0.5))
    table["b"] = np.array([0.0, 3.0], dtype=np.float32)  # a change must reach the cached matrix
    assert cosine_scores(table, trials)[0] == pytest.approx(0.0, abs=1e-7)
    assert table.utts == ["a", "b"] and table.matrix.shape == (2, 2) and table.durations is None
    table.set_durations({"a": 2.0})
    assert table.durations[0] == 2.0 and np.isnan(table.durations[1])
    del table["a"]
    with pytest.raises(MissingEmbeddingError, match="'a'"):
        cosine_scores(table, trials)
    table["c"] = np.ones(3)
    with pytest.raises(ScoringError, match="different dimensions"):
        table.matrix


def test_cosine_zero_vector_is_an_error():
    with pytest.raises(ScoringError, match="'z'.*zero"):
        cosine_scores({"a": np.ones(2), "z": np.zeros(2)}, SimpleNamespace(enroll=["a"], test=["z"]))
