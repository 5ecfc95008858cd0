"""Speaker-level bootstrap (svlib.scoring.bootstrap) on hand-made score sets whose bootstrap distribution is
known exactly, against a slow reference that builds every replicate's trial list copy by copy, and the
paired bootstrap on systems that do and do not differ."""
from __future__ import annotations

import numpy as np
import pytest

from svlib.scoring.bootstrap import (BootstrapError, bootstrap_ci, ci_fields, few_speakers_note, paired_bootstrap,
                                     percentile_interval, replicate_metrics, speaker_counts, speaker_of,
                                     trial_speakers, trial_weights, weighted_metrics)
from svlib.scoring.metrics import summarize


def all_pairs(num_speakers: int, per_speaker: int):
    """Every pair of ``num_speakers x per_speaker`` utterances: enroll ids, test ids, labels, speaker indices."""
    utts = [f"s{s:02d}-u{u}" for s in range(num_speakers) for u in range(per_speaker)]
    spk = np.repeat(np.arange(num_speakers), per_speaker)
    i, j = np.triu_indices(len(utts), k=1)
    labels = (spk[i] == spk[j]).astype(np.int8)
    return [utts[k] for k in i], [utts[k] for k in j], labels, spk[i]


def bad_speakers_scores(labels, enroll_spk, bad) -> np.ndarray:
    """Targets of the ``bad`` speakers score 0, non-targets 1, all other targets 2 (ties inside each class)."""
    scores = np.where(labels == 1, 2.0, 1.0)
    scores[(labels == 1) & np.isin(enroll_spk, list(bad))] = 0.0
    return scores


def test_speaker_of_and_label_check():
    assert speaker_of("id10270/5r0dWxy17C8/00001.wav") == "id10270"
    assert speaker_of("ls1688-1688-142285-0000") == "ls1688"
    assert speaker_of("spk7") == "spk7"
    sp = trial_speakers(["a-1", "a-1", "b-1"], ["a-2", "b-2", "c-1"], [1, 0, 0])
    assert sp.names == ("a", "b", "c") and sp.enroll.tolist() == [0, 0, 1] and sp.test.tolist() == [0, 1, 2]
    with pytest.raises(BootstrapError, match=r"trial 2 \(a-1 b-2\) is a target trial but .* different speakers"):
        trial_speakers(["a-1", "a-1"], ["a-2", "b-2"], [1, 1])
    with pytest.raises(BootstrapError, match="has no speaker in utt2spk"):
        trial_speakers(["x"], ["y"], [0], utt2spk={"x": "p"})


def test_perfectly_separable_interval_is_zero():
    enroll, test, labels, _ = all_pairs(8, 3)
    scores = labels + np.random.default_rng(0).uniform(0, 0.5, labels.size)  # targets all above non-targets
    ci = bootstrap_ci(scores, labels, trial_speakers(enroll, test, labels), replicates=200, seed=1)
    assert ci["eer_pct"] == [0.0, 0.0]
    assert ci["mindcf_0.01"] == [0.0, 0.0] and ci["mindcf_0.05"] == [0.0, 0.0]
    assert ci["invalid"] == 0 and ci["speakers"] == 8 and ci["replicates"] == 200


def test_one_bad_speaker_gives_the_binomial_distribution_exactly():
    """One speaker's targets all below the non-targets, the others' above: a replicate drawing that speaker
    m ~ Binomial(S, 1/S) times has FNR m/S flat across the non-targets, so EER = minDCF = m/S exactly."""
    S = 10
    enroll, test, labels, spk = all_pairs(S, 4)
    scores = bad_speakers_scores(labels, spk, {3})
    speakers = trial_speakers(enroll, test, labels)
    dist = replicate_metrics([scores], labels, speakers, replicates=1000, seed=5, chunk=64)[0]
    m = speaker_counts(S, 1000, np.random.default_rng(5))[:, 3]  # the same draws: one generator, any chunk
    np.testing.assert_allclose(dist["eer_pct"], 100.0 * m / S, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dist["mindcf_0.01"], m / S, rtol=0, atol=1e-12)
    # Binomial(10, 0.1): P(m <= 0) = 0.349 > 2.5 %, P(m <= 2) = 0.930 < 97.5 % < P(m <= 3) = 0.987
    assert bootstrap_ci(scores, labels, speakers, 1000, seed=5)["eer_pct"] == [0.0, 30.0]
    assert summarize(scores, labels)["eer_pct"] == pytest.approx(10.0)


def reference_replicate(scores, labels, enroll, test, draws) -> dict:
    """The replicate's trial list built literally: every drawn copy's targets, and for every two copies of
    different speakers their non-target trials (copies of one speaker are never paired)."""
    spk_e, spk_t = np.array([speaker_of(u) for u in enroll]), np.array([speaker_of(u) for u in test])
    keep = []
    for x, a in enumerate(draws):
        keep += np.flatnonzero((labels == 1) & (spk_e == a)).tolist()
        for y, b in enumerate(draws):
            if x != y and a != b:
                keep += np.flatnonzero((labels == 0) & (spk_e == a) & (spk_t == b)).tolist()
    keep = np.array(keep, dtype=np.int64)
    return summarize(scores[keep], labels[keep])


def test_against_the_slow_reference_with_ties():
    enroll, test, labels, spk = all_pairs(6, 3)
    rng = np.random.default_rng(2)
    speaker_effect = rng.normal(0, 0.7, 6)[spk]
    scores = np.round(rng.normal(size=labels.size) + 1.2 * labels + speaker_effect, 1)  # many ties
    speakers = trial_speakers(enroll, test, labels)
    counts = speaker_counts(speakers.num_speakers, 25, np.random.default_rng(9))
    fast = weighted_metrics(scores, labels, trial_weights(counts, speakers))
    for r in range(counts.shape[0]):
        draws = [speakers.names[s] for s in np.repeat(np.arange(6), counts[r])]
        ref = reference_replicate(scores, labels, enroll, test, draws)
        for key in ("eer_pct", "mindcf_0.01", "mindcf_0.05"):
            assert fast[key][r] == pytest.approx(ref[key], abs=1e-12), (r, key)
    # and the blocked bootstrap uses exactly these draws for the same seed
    dist = replicate_metrics([scores], labels, speakers, replicates=25, seed=9, chunk=4)[0]
    np.testing.assert_allclose(dist["eer_pct"], fast["eer_pct"], rtol=0, atol=1e-12)


def test_weighted_metrics_equal_the_repeated_list():
    rng = np.random.default_rng(4)
    labels = (rng.random(300) < 0.2).astype(int)
    scores = np.round(rng.normal(size=300) + labels, 1)
    weights = rng.integers(0, 4, size=(5, 300))
    got = weighted_metrics(scores, labels, weights)
    for r in range(5):
        rep = np.repeat(np.arange(300), weights[r])
        want = summarize(scores[rep], labels[rep])
        assert got["eer_pct"][r] == pytest.approx(want["eer_pct"], abs=1e-12)
        assert got["mindcf_0.01"][r] == pytest.approx(want["mindcf_0.01"], abs=1e-12)
    one_class = np.where(labels == 1, 1, 0)[None, :]  # only targets kept: no EER, reported as NaN
    assert np.isnan(weighted_metrics(scores, labels, one_class)["eer_pct"][0])


def test_enroll_only_scheme_weights():
    enroll, test, labels, _ = all_pairs(3, 2)
    speakers = trial_speakers(enroll, test, labels)
    counts = np.array([[2, 0, 1]])
    both, one = trial_weights(counts, speakers, "both")[0], trial_weights(counts, speakers, "enroll")[0]
    e, t = speakers.enroll, speakers.test
    np.testing.assert_array_equal(both, np.where(e == t, counts[0, e], counts[0, e] * counts[0, t]))
    np.testing.assert_array_equal(one, counts[0, e])


def test_paired_bootstrap_systems_that_differ():
    """B has 6 more bad speakers than A: diff = -100 (sum of their draws) / S <= 0 in every replicate, 0 only
    if none of them is drawn, P = (14/20)^20 < 0.1 %."""
    S = 20
    enroll, test, labels, spk = all_pairs(S, 3)
    a = bad_speakers_scores(labels, spk, {0})
    b = bad_speakers_scores(labels, spk, {0, 1, 2, 3, 4, 5, 6})
    res = paired_bootstrap(a, b, labels, trial_speakers(enroll, test, labels), replicates=500, seed=3)
    eer = res["eer_pct"]
    assert eer["a"] == pytest.approx(5.0) and eer["b"] == pytest.approx(35.0) and eer["diff"] == pytest.approx(-30.0)
    assert eer["ci"][1] < 0.0 and eer["excludes_zero"] and eer["p_value"] < 0.01
    assert eer["significant"] and "note" not in res            # 20 speakers: enough to call it
    few = all_pairs(10, 3)
    small = paired_bootstrap(bad_speakers_scores(few[2], few[3], {0}), bad_speakers_scores(few[2], few[3], {0, 1, 2, 3, 4, 5}),
                             few[2], trial_speakers(*few[:3]), replicates=200, seed=3)
    assert small["eer_pct"]["excludes_zero"] and not small["eer_pct"]["significant"]
    assert small["note"] == "10 speakers: intervals under-cover below ~20 speakers, not called significant"


def test_paired_bootstrap_systems_that_do_not_differ():
    """A's bad speaker is 0, B's is 1: diff = 100 (m_0 - m_1) / S, symmetric about 0."""
    S = 20
    enroll, test, labels, spk = all_pairs(S, 3)
    a, b = bad_speakers_scores(labels, spk, {0}), bad_speakers_scores(labels, spk, {1})
    speakers = trial_speakers(enroll, test, labels)
    res = paired_bootstrap(a, b, labels, speakers, replicates=400, seed=11)
    counts = speaker_counts(S, 400, np.random.default_rng(11))
    want = percentile_interval(100.0 * (counts[:, 0] - counts[:, 1]) / S)
    assert res["eer_pct"]["diff"] == 0.0
    assert res["eer_pct"]["ci"] == pytest.approx(want, abs=1e-9)
    assert res["eer_pct"]["ci"][0] < 0.0 < res["eer_pct"]["ci"][1] and not res["eer_pct"]["excludes_zero"]


def test_ci_fields_and_bad_settings():
    enroll, test, labels, spk = all_pairs(5, 2)
    scores = bad_speakers_scores(labels, spk, {1})
    ci = bootstrap_ci(scores, labels, trial_speakers(enroll, test, labels), replicates=50, seed=0)
    fields = ci_fields(ci)
    assert set(fields) == {"eer_ci_pct", "mindcf_0.01_ci", "mindcf_0.05_ci", "ci_replicates", "ci_speakers",
                           "ci_confidence", "ci_seed", "ci_note"}
    assert fields["eer_ci_pct"] == ci["eer_pct"] and fields["ci_speakers"] == 5
    assert fields["ci_note"] == "5 speakers: intervals under-cover below ~20 speakers, not called significant"
    assert few_speakers_note(19).startswith("19 speakers: intervals under-cover") and few_speakers_note(20) is None
    with pytest.raises(BootstrapError, match="replicates must be at least 1"):
        bootstrap_ci(scores, labels, trial_speakers(enroll, test, labels), replicates=0)
    with pytest.raises(BootstrapError, match="confidence must be in"):
        percentile_interval([1.0, 2.0], 1.5)


def test_stage_summaries_mlflow_metrics_and_table_carry_the_intervals(tmp_path):
    from experiments.common import metrics_of
    from experiments.pipeline import test_row
    from svlib.data.lists import Trials
    from svlib.evaluate import score_trials

    rng = np.random.default_rng(0)
    enroll, test, labels, spk = all_pairs(6, 3)
    utts = sorted(set(enroll) | set(test))
    centres = rng.normal(size=(6, 8))
    emb = {u: centres[int(u[1:3])] + 0.8 * rng.normal(size=8) for u in utts}
    # ids that hide the speaker: only utt2spk can tell them, as in a Kaldi data dir
    hidden = {u: f"utt{k}" for k, u in enumerate(utts)}
    trials = {"test": Trials([hidden[u] for u in enroll], [hidden[u] for u in test], labels)}
    utt2spk = {hidden[u]: u[:3] for u in utts}
    emb = {hidden[u]: v for u, v in emb.items()}
    out = score_trials(emb, trials, utt2spk=utt2spk, ci_replicates=200, ci_seed=2)["test"]
    ref = bootstrap_ci(out["scores"], labels, trial_speakers(trials["test"].enroll, trials["test"].test, labels,
                                                             utt2spk), 200, seed=2)
    assert out["eer_ci_pct"] == ref["eer_pct"] and out["mindcf_0.01_ci"] == ref["mindcf_0.01"]
    assert out["ci_speakers"] == 6 and out["ci_replicates"] == 200
    assert out["ci_note"] == "6 speakers: intervals under-cover below ~20 speakers, not called significant"
    assert out["eer_ci_pct"][0] <= out["eer_pct"] <= out["eer_ci_pct"][1]
    with pytest.raises(BootstrapError, match="trial list 'test': trial 1 .* is a target trial"):
        score_trials(emb, trials, ci_replicates=10)  # 'uttK' ids: every utterance its own speaker
    assert "eer_ci_pct" not in score_trials(emb, trials)["test"]  # off by default for direct callers
    summary = {k: v for k, v in out.items() if k not in ("scores", "labels")}
    flat = metrics_of({"test": summary})
    assert flat["test_eer_pct_ci_low"] == ref["eer_pct"][0] and flat["test_eer_pct_ci_high"] == ref["eer_pct"][1]
    assert flat["test_mindcf_0.05_ci_high"] == ref["mindcf_0.05"][1]
    row = test_row("s2", {"test": {"test": summary}, "minutes": 1.0})
    assert row["test_eer_ci"] == "[{:.2f}, {:.2f}]".format(*ref["eer_pct"])
    from experiments.pipeline import report

    bench = report({"stages": {"s2": {"test": {"test": summary}, "minutes": 1.0}}, "wall_minutes": 1.0},
                   tmp_path / "demo_pipeline.json")
    assert bench["final_test_eer_ci"] == ref["eer_pct"] and bench["test_speakers"] == 6
    assert bench["test_ci_note"] == out["ci_note"]
    from experiments.pipeline import interval_notes

    assert interval_notes({"stages": {"s2": {"test": {"test": summary}}}, "baselines": {"fbank": {"test": summary}}}) \
        == "\nnote: test: 6 speakers: intervals under-cover below ~20 speakers, not called significant"
    assert bench["stages"]["s2"]["eer_ci_pct"] == ref["eer_pct"]


def test_sparsity_curve_intervals_from_stored_scores(tmp_path):
    """bench/sparsity_curve.py: a point's interval from its stored score file, the teacher's from its
    result.json, a point without scores listed in ci_note; the figure draws the bars."""
    import importlib.util
    import json
    from pathlib import Path

    from svlib.scoring.bootstrap import score_file_ci

    spec = importlib.util.spec_from_file_location(
        "sparsity_curve", Path(__file__).resolve().parents[1] / "bench" / "sparsity_curve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    enroll, test, labels, spk = all_pairs(6, 3)
    scores = np.random.default_rng(0).normal(size=labels.size) + labels
    folder = tmp_path / "runs" / "trial_0" / "eval_pruned" / "scores"
    folder.mkdir(parents=True)
    (folder / "test.txt").write_text("".join(f"{e} {t} {s:.6f} {'target' if y else 'nontarget'}\n"
                                             for e, t, s, y in zip(enroll, test, scores, labels)))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "result.json").write_text(json.dumps(
        {"test": {"test": {"eer_pct": 9.0, "eer_ci_pct": [7.0, 11.0], "mindcf_0.01_ci": [0.5, 0.9]}}}))
    point = {"target": 0.5, "achieved_sparsity": 0.5, "params": 500, "eer_pct": 12.0, "mindcf": 0.7,
             "mindcf_0.05": 0.6, "val_eer_pct": 13.0, "pareto": True, "trial": 0, "trial_dir": "runs/trial_0"}
    result = {"teacher": "teacher", "teacher_eer_pct": 9.0, "teacher_mindcf": 0.6, "teacher_params": 1000,
              "points": [point, dict(point, target=0.7, trial=1, trial_dir="runs/trial_1")]}
    missing = bench.attach_intervals(result, tmp_path, "test", replicates=100, seed=0)
    want = score_file_ci(folder / "test.txt", replicates=100, seed=0)
    assert result["points"][0]["eer_ci_pct"] == want["eer_pct"] and result["points"][0]["ci_source"] == "scores"
    assert result["points"][1]["eer_ci_pct"] is None and len(missing) == 1 and "target 0.7" in result["ci_note"]
    assert result["teacher_eer_ci_pct"] == [7.0, 11.0]
    plotted = bench.plot_points(result)
    assert plotted[0]["test_eer_pct_ci_low"] == want["eer_pct"][0] and "test_eer_pct_ci_low" not in plotted[1]
    assert bench.plot_teacher(result)["eer_pct_ci_high"] == 11.0
    from sweeps.prune_sweep import plot_sweep

    assert plot_sweep(plotted, bench.plot_teacher(result), tmp_path / "curve.png").stat().st_size > 10_000


def test_both_score_file_readers_report_a_nan_by_file_line(tmp_path):
    """One parser under load_trial_scores (compare, final_vs_fbank) and read_labelled_scores (score_file_ci,
    the analysis DET plots): a NaN on line k is ``file:k`` in every path, not a trial index."""
    from svlib.analysis import read_scores
    from svlib.data.lists import Trials
    from svlib.scoring.bootstrap import load_trial_scores, read_labelled_scores, score_file_ci

    enroll, test, labels, _ = all_pairs(4, 2)
    lines = [f"{e} {t} {0.5 + y:.6f} {'target' if y else 'nontarget'}" for e, t, y in zip(enroll, test, labels)]
    k = 6
    lines[k - 1] = lines[k - 1].replace(" 0.500000 ", " nan ")
    path = tmp_path / "scores.txt"
    path.write_text("\n".join(lines) + "\n")
    trials = Trials(enroll, test, labels)
    message = rf"^{path}:{k}: score 'nan' is not finite$"
    for read in (lambda: load_trial_scores(path, trials), lambda: read_labelled_scores(path),
                 lambda: score_file_ci(path, replicates=10), lambda: read_scores(path)):
        with pytest.raises(BootstrapError, match=message):
            read()
    # the labelled form is required where the labels come from the file, optional where the trial list has them
    path.write_text(f"{enroll[0]} {test[0]} 0.5\n")
    with pytest.raises(BootstrapError, match=rf"^{path}:1: expected 'enroll test score target\|nontarget', got 3"):
        read_labelled_scores(path)
    with pytest.raises(BootstrapError, match=rf"^{path}: no score for trial '{enroll[1]} {test[1]}'"):
        load_trial_scores(path, trials)
