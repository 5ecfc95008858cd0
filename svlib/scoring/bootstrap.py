"""Speaker-level bootstrap confidence intervals for EER / minDCF, and the paired bootstrap of a difference.

Why speakers, not trials. Trials are not independent: every trial of a speaker shares that speaker's voice,
so resampling *trials* (the "sample bootstrap") treats 4,950 trials of 10 speakers as 4,950 independent
draws and gives intervals several times too narrow. The unit drawn from the population is the speaker, so
the speakers are resampled (Bolle, Ratha & Pankanti, "Error analysis of pattern recognition systems - the
subsets bootstrap", CVIU 93(1), 2004; Poh, Martin & Bengio, "Performance generalization in biometric
authentication using joint user-specific and sample bootstraps", IEEE TPAMI 29(3), 2007; the "conditions"
of Ferrer & Riera's ConfidenceIntervals toolkit).

The scheme (two-way: both sides of a trial). Let the trial list use ``S`` speakers. One replicate draws
``S`` speakers with replacement, i.e. counts ``m = (m_1..m_S) ~ Multinomial(S, 1/S)``; a speaker drawn
``k`` times stands for ``k`` distinct speakers that happen to sound alike. Trial ``i`` between enrolment
speaker ``a`` and test speaker ``b`` then occurs

    w_i = m_a          if a == b   (target: each copy of a brings its own target trials)
    w_i = m_a * m_b    if a != b   (non-target: every copy of a against every copy of b)

times in the replicate (0 when a speaker was not drawn). Copies of one speaker are never paired with each
other: no such non-target trial exists. The replicate's error rates are the weighted rates

    FNR(t) = sum_{tar, s_i < t} w_i / sum_tar w_i,      FPR(t) = sum_{non, s_i >= t} w_i / sum_non w_i,

which equal those of the trial list built by repeating each trial ``w_i`` times (weights are integers, so
the sums are exact in float64); EER and minDCF are then computed exactly as ``svlib.scoring.metrics``
does (cuts between equal-score groups, EER interpolated where FNR - FPR changes sign). A replicate
without a target or a non-target trial has no EER; it is dropped and counted (``ci_invalid``).

``sides="enroll"`` is the simpler one-way scheme (``w_i = m_a``, resampling only the enrolment speakers,
test speakers fixed), for lists whose test side is not a closed speaker set.

The interval is the percentile interval of the replicates (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 13): ``[q_{(1-c)/2}, q_{(1+c)/2}]``, c = 0.95. For two systems scored on the same
trials the *paired* bootstrap applies the same ``m`` to both in every replicate, so the speaker effects
they share cancel in the difference ``EER_A - EER_B``; the systems differ at level ``1 - c`` when that
interval excludes 0. The two-sided bootstrap p-value moves in steps of ``2/R``: when no replicate crosses 0
it is reported as ``p < 2/R``, the smallest value ``R`` replicates can resolve.

Few speakers. The percentile interval assumes the resampled speakers stand for the population; with few of
them it is too narrow: in a simulation of the two-way scheme the nominal 95 % interval covered the true EER
in 89.7 % of lists of 10 speakers. Below ``MIN_SPEAKERS`` (~20) every result therefore carries
``few_speakers_note`` (key ``note``), reports print it, and an interval that excludes 0 there is not called
a significant difference.

Cost: one sort per system, then per block of ``chunk`` replicates one sparse product over the trials onto
at most ``2 N_tar + 2`` cuts (see ``_Prepared``): 1,000 replicates of 40k trials take about a second, and
memory is ``O(chunk * (N_tar + S^2))``, bounded by ``chunk``, not by the number of replicates.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from svlib.scoring.metrics import DCF_TARGETS, ScoringError, check_scores

__all__ = [
    "DEFAULT_REPLICATES",
    "CONFIDENCE",
    "BootstrapError",
    "TrialSpeakers",
    "speaker_of",
    "trial_speakers",
    "speaker_counts",
    "trial_weights",
    "weighted_metrics",
    "replicate_metrics",
    "percentile_interval",
    "bootstrap_ci",
    "paired_bootstrap",
    "ci_fields",
    "MIN_SPEAKERS",
    "few_speakers_note",
    "ScoreFile",
    "read_score_file",
    "load_trial_scores",
    "paired_score_files",
    "read_labelled_scores",
    "score_file_ci",
]

DEFAULT_REPLICATES = 1000
CONFIDENCE = 0.95
MIN_SPEAKERS = 20       # fewer: intervals under-cover (module docstring), nothing is called significant
DEFAULT_CHUNK = 250     # replicates per block, lowered so that a block's arrays stay within BLOCK_BYTES
BLOCK_BYTES = 256 << 20  # ~8 float64 (chunk, cuts or units) arrays live at once


class BootstrapError(ScoringError):
    """Trials whose speakers cannot be told, or too few replicates with both classes."""


# --------------------------------------------------------------------------------------------------
# speakers of the trials


@dataclass(frozen=True)
class TrialSpeakers:
    """Speaker index (into ``names``) of each trial's enrolment and test side."""

    enroll: np.ndarray
    test: np.ndarray
    names: tuple[str, ...]

    @property
    def num_speakers(self) -> int:
        return len(self.names)


def speaker_of(utt: str) -> str:
    """The speaker prefix of a Kaldi-style utterance id: up to the first '/' (VoxCeleb ``id10270/vid/00001.wav``)
    or else the first '-' (``ls1688-1688-142285-0000``, CN-Celeb ``id00800-enroll``); the whole id without either."""
    for sep in ("/", "-"):
        if sep in utt:
            return utt.split(sep, 1)[0]
    return utt


def trial_speakers(enroll: Sequence[str], test: Sequence[str], labels, utt2spk: Mapping[str, str] | None = None,
                   source: str = "") -> TrialSpeakers:
    """Speakers of both sides of every trial, from ``utt2spk`` or else from the ids (``speaker_of``).

    Checked against the labels: a target trial must have one speaker on both sides and a non-target two,
    otherwise the mapping (or the id convention) is wrong and the resampling would be meaningless.
    """
    where = f"{source}: " if source else ""
    labels = np.asarray(labels).astype(bool)
    if utt2spk is None:
        spk_e, spk_t = [speaker_of(u) for u in enroll], [speaker_of(u) for u in test]
    else:
        try:
            spk_e, spk_t = [utt2spk[u] for u in enroll], [utt2spk[u] for u in test]
        except KeyError as err:
            raise BootstrapError(f"{where}utterance {err.args[0]!r} has no speaker in utt2spk") from None
    names, inverse = np.unique(np.asarray(spk_e + spk_t, dtype=object).astype(str), return_inverse=True)
    e_idx, t_idx = inverse[:len(spk_e)], inverse[len(spk_e):]
    same = e_idx == t_idx
    bad = np.flatnonzero(same != labels)
    if bad.size:
        i = int(bad[0])
        kind, rel = ("target", "different speakers") if labels[i] else ("non-target", "one speaker")
        how = "utt2spk" if utt2spk is not None else "the id prefix before '/' or '-' (give utt2spk)"
        raise BootstrapError(f"{where}trial {i + 1} ({enroll[i]} {test[i]}) is a {kind} trial but {how} gives "
                             f"{rel} ({spk_e[i]!r}, {spk_t[i]!r}); cannot resample speakers")
    return TrialSpeakers(e_idx.astype(np.int64), t_idx.astype(np.int64), tuple(names.tolist()))


# --------------------------------------------------------------------------------------------------
# replicates


def speaker_counts(num_speakers: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """``(replicates, S)`` draw counts: each row ``~ Multinomial(S, 1/S)`` (S draws with replacement)."""
    return rng.multinomial(num_speakers, np.full(num_speakers, 1.0 / num_speakers), size=replicates)


def _unit_keys(speakers: TrialSpeakers, sides: str) -> np.ndarray:
    """Per trial, the key of its weight's formula: ``a * S + b`` (``w = m_a m_b``), or ``a * S + a``
    (``w = m_a``) for a target trial or under ``sides="enroll"``."""
    if sides not in ("both", "enroll"):
        raise BootstrapError(f"sides must be 'both' or 'enroll', got {sides!r}")
    other = speakers.test if sides == "both" else speakers.enroll
    return speakers.enroll * speakers.num_speakers + other


def _unit_weights(counts: np.ndarray, keys: np.ndarray, num_speakers: int) -> np.ndarray:
    """``(R, U)`` weight of each distinct key (``_unit_keys``) in each replicate."""
    counts = np.asarray(counts, dtype=np.float64)
    a, b = keys // num_speakers, keys % num_speakers
    w = counts[:, a]
    cross = a != b
    w[:, cross] *= counts[:, b[cross]]
    return w


def trial_weights(counts: np.ndarray, speakers: TrialSpeakers, sides: str = "both") -> np.ndarray:
    """``(R, N)`` multiplicity of every trial in each replicate (module docstring)."""
    return _unit_weights(counts, _unit_keys(speakers, sides), speakers.num_speakers)


class _Prepared:
    """One system's scores reduced to what any replicate needs: a few cuts and sparse sums onto them.

    The scores are sorted once; FNR/FPR only change at the cuts between equal-score groups. Of those cuts
    only the starts of groups holding a target, the cut after each such group, 0 and N matter, for
    any non-negative weights: across a run of non-target-only groups FNR is constant and FPR falls, so
    (i) the DCF only falls there (its minimum sits at the start of a target group or at N) and (ii) the
    EER, if FNR - FPR changes sign inside the run, is that constant FNR, which the interpolation between
    the run's two ends also gives. With ``P`` those kept cuts, trial ``i`` falls in segment
    ``[P_j, P_{j+1})``, and ``A[j, u]`` counts the targets (non-targets) of weight unit ``u`` there, so the
    weighted counts below each kept cut are ``cumsum(A @ W_u)``: one sparse product per block of
    replicates instead of ``(R, N)`` temporaries.
    """

    def __init__(self, scores, labels, unit_of_trial: np.ndarray, num_units: int):
        from scipy import sparse

        scores, labels = check_scores(scores, labels)
        order = np.argsort(scores, kind="stable")
        s, is_tar, units = scores[order], labels[order], unit_of_trial[order]
        n = s.size
        cuts = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1, [n]))
        group_has_tar = np.add.reduceat(is_tar.astype(np.int64), cuts[:-1]) > 0
        tar_groups = np.flatnonzero(group_has_tar)
        self.cuts = np.unique(np.concatenate(([0, n], cuts[tar_groups], cuts[tar_groups + 1])))
        segment = np.searchsorted(self.cuts, np.arange(n), side="right") - 1
        shape = (self.cuts.size - 1, num_units)
        self.tar = sparse.csr_matrix((np.ones(int(is_tar.sum())), (segment[is_tar], units[is_tar])), shape=shape)
        self.non = sparse.csr_matrix((np.ones(int((~is_tar).sum())), (segment[~is_tar], units[~is_tar])), shape=shape)

    def below(self, unit_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted targets and non-targets below every kept cut, ``(R, len(cuts))`` each."""
        def cum(matrix):
            seg = np.asarray(matrix @ unit_weights.T).T  # (R, segments)
            out = np.zeros((seg.shape[0], seg.shape[1] + 1))
            np.cumsum(seg, axis=1, out=out[:, 1:])
            return out
        return cum(self.tar), cum(self.non)


def _rates_metrics(tar_below: np.ndarray, non_below: np.ndarray, p_targets: Sequence[float]) -> dict[str, np.ndarray]:
    """EER (%) and minDCF per row from the weighted counts below each cut; NaN where a class is empty.
    The same arithmetic as ``metrics._eer`` / ``metrics._min_dcf``, row-wise."""
    r = tar_below.shape[0]
    n_tar, n_non = tar_below[:, -1:], non_below[:, -1:]
    rows = np.flatnonzero((n_tar[:, 0] > 0) & (n_non[:, 0] > 0))
    out = {"eer_pct": np.full(r, np.nan)} | {f"mindcf_{p:g}": np.full(r, np.nan) for p in p_targets}
    if not rows.size:
        return out
    fnr = tar_below[rows] / n_tar[rows]
    fpr = (n_non[rows] - non_below[rows]) / n_non[rows]
    d = fnr - fpr  # non-decreasing from -1 (accept all) to +1 (reject all)
    i = np.argmax(d >= 0.0, axis=1)
    k = np.arange(rows.size)
    d_i, d_prev = d[k, i], d[k, i - 1]
    exact = d_i == 0.0
    a = np.where(exact, 0.0, -d_prev / np.where(exact, 1.0, d_i - d_prev))
    eer = np.where(exact, fnr[k, i], fnr[k, i - 1] + a * (fnr[k, i] - fnr[k, i - 1]))
    out["eer_pct"][rows] = 100.0 * eer
    for p in p_targets:
        out[f"mindcf_{p:g}"][rows] = (p * fnr + (1.0 - p) * fpr).min(axis=1) / min(p, 1.0 - p)
    return out


def weighted_metrics(scores, labels, weights, p_targets: Sequence[float] = DCF_TARGETS) -> dict[str, np.ndarray]:
    """EER (%) and minDCF of the trial list with trial ``i`` repeated ``weights[r, i]`` times, per row ``r``."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n = np.asarray(scores).reshape(-1).size
    if weights.shape[1] != n:
        raise ScoringError(f"weights have {weights.shape[1]} columns for {n} trials")
    if (weights < 0).any():
        raise ScoringError("weights must be non-negative")
    prep = _Prepared(scores, labels, np.arange(n), n)
    return _rates_metrics(*prep.below(weights), p_targets)


def _count_blocks(speakers: TrialSpeakers, replicates: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """The replicates' speaker counts block by block, from one generator: the same ``seed`` gives the same
    replicates whatever ``chunk`` is, which is what makes two calls (two systems) paired."""
    if replicates < 1:
        raise BootstrapError(f"replicates must be at least 1, got {replicates}")
    if chunk < 1:
        raise BootstrapError(f"chunk must be at least 1, got {chunk}")
    rng = np.random.default_rng(seed)
    for start in range(0, replicates, chunk):
        yield speaker_counts(speakers.num_speakers, min(chunk, replicates - start), rng)


def replicate_metrics(scores_list: Sequence, labels, speakers: TrialSpeakers, replicates: int = DEFAULT_REPLICATES,
                      seed: int = 0, p_targets: Sequence[float] = DCF_TARGETS, sides: str = "both",
                      chunk: int = DEFAULT_CHUNK) -> list[dict[str, np.ndarray]]:
    """Bootstrap distribution of the metrics of each system in ``scores_list`` (same trials, same labels),
    every system seeing the same speaker draws in each replicate: ``[{metric: (replicates,)}]``."""
    labels = np.asarray(labels).reshape(-1)
    if speakers.enroll.size != labels.size:
        raise BootstrapError(f"{speakers.enroll.size} trial speakers for {labels.size} trials")
    keys, unit_of_trial = np.unique(_unit_keys(speakers, sides), return_inverse=True)
    systems = [_Prepared(s, labels, unit_of_trial.reshape(-1), keys.size) for s in scores_list]
    # (chunk, units) weights and (chunk, cuts) rates are the big temporaries: keep a block under the budget
    widest = max([keys.size] + [p.cuts.size for p in systems])
    chunk = max(1, min(chunk, BLOCK_BYTES // (8 * 8 * widest)))
    parts: list[list[dict]] = [[] for _ in systems]
    for counts in _count_blocks(speakers, replicates, seed, chunk):
        w = _unit_weights(counts, keys, speakers.num_speakers)
        for k, prep in enumerate(systems):
            parts[k].append(_rates_metrics(*prep.below(w), p_targets))
    return [{m: np.concatenate([p[m] for p in part]) for m in part[0]} for part in parts]


def percentile_interval(values, confidence: float = CONFIDENCE) -> list[float]:
    """``[q_{(1-c)/2}, q_{(1+c)/2}]`` of the finite ``values`` (numpy's linear-interpolation percentiles)."""
    if not 0.0 < confidence < 1.0:
        raise BootstrapError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise BootstrapError("no bootstrap replicate had both target and non-target trials")
    lo, hi = np.quantile(values, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return [float(lo), float(hi)]


def few_speakers_note(num_speakers: int) -> str | None:
    """The note every reported interval of a list with fewer than ``MIN_SPEAKERS`` speakers carries (module
    docstring: such intervals under-cover), None for a list with enough speakers."""
    if num_speakers >= MIN_SPEAKERS:
        return None
    return f"{num_speakers} speakers: intervals under-cover below ~{MIN_SPEAKERS} speakers, not called significant"


def _setting(replicates: int, seed: int, confidence: float, sides: str, speakers: TrialSpeakers,
             invalid: int) -> dict:
    """The setting every result reports, with ``note`` (``few_speakers_note``) where the list is small."""
    note = few_speakers_note(speakers.num_speakers)
    return {"replicates": int(replicates), "seed": int(seed), "confidence": float(confidence), "sides": sides,
            "speakers": speakers.num_speakers, "invalid": int(invalid)} | ({"note": note} if note else {})


def bootstrap_ci(scores, labels, speakers: TrialSpeakers, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                 confidence: float = CONFIDENCE, p_targets: Sequence[float] = DCF_TARGETS, sides: str = "both",
                 chunk: int = DEFAULT_CHUNK) -> dict:
    """Speaker-level bootstrap percentile intervals: ``{"eer_pct": [lo, hi], "mindcf_0.01": [lo, hi], ...,
    "replicates", "seed", "confidence", "sides", "speakers", "invalid"}`` (EER in percent)."""
    dist = replicate_metrics([scores], labels, speakers, replicates, seed, p_targets, sides, chunk)[0]
    out = {m: percentile_interval(v, confidence) for m, v in dist.items()}
    return out | _setting(replicates, seed, confidence, sides, speakers, int(np.isnan(dist["eer_pct"]).sum()))


def paired_bootstrap(scores_a, scores_b, labels, speakers: TrialSpeakers, replicates: int = DEFAULT_REPLICATES,
                     seed: int = 0, confidence: float = CONFIDENCE, p_targets: Sequence[float] = DCF_TARGETS,
                     sides: str = "both", chunk: int = DEFAULT_CHUNK) -> dict:
    """Paired bootstrap of ``metric(A) - metric(B)`` on the same trials.

    Per metric: ``{"a", "b", "diff"}`` (full-list values), ``"ci"`` (percentile interval of the replicate
    differences), ``"excludes_zero"`` and ``"p_value"`` (two-sided bootstrap p-value
    ``min(1, 2 min(P*(diff <= 0), P*(diff >= 0)))`` over the replicates; 0 means below ``2/R``),
    ``"significant"`` (excludes 0 on a list of at least ``MIN_SPEAKERS`` speakers), plus the setting (with
    ``note`` on a smaller list).
    """
    from svlib.scoring.metrics import summarize

    dist_a, dist_b = replicate_metrics([scores_a, scores_b], labels, speakers, replicates, seed, p_targets, sides,
                                       chunk)
    full_a, full_b = summarize(scores_a, labels, p_targets), summarize(scores_b, labels, p_targets)
    setting = _setting(replicates, seed, confidence, sides, speakers, int(np.isnan(dist_a["eer_pct"]).sum()))
    out: dict = {}
    for m in dist_a:
        diff = dist_a[m] - dist_b[m]
        diff = diff[np.isfinite(diff)]
        ci = percentile_interval(diff, confidence)
        p = min(1.0, 2.0 * min(float(np.mean(diff <= 0.0)), float(np.mean(diff >= 0.0))))
        out[m] = {"a": float(full_a[m]), "b": float(full_b[m]), "diff": float(full_a[m] - full_b[m]), "ci": ci,
                  "excludes_zero": bool(ci[0] > 0.0 or ci[1] < 0.0), "p_value": p}
        out[m]["significant"] = out[m]["excludes_zero"] and "note" not in setting
    return out | setting


def ci_fields(ci: Mapping) -> dict:
    """The keys a result summary gains from ``bootstrap_ci``'s output: ``eer_ci_pct``, ``mindcf_<p>_ci``
    (each ``[lo, hi]``), ``ci_replicates``, ``ci_speakers``, ``ci_confidence``, ``ci_seed``, and ``ci_note``
    on a list of fewer than ``MIN_SPEAKERS`` speakers."""
    out = {"eer_ci_pct": list(ci["eer_pct"])}
    out |= {f"{m}_ci": list(v) for m, v in ci.items() if m.startswith("mindcf_")}
    out |= {"ci_replicates": ci["replicates"], "ci_speakers": ci["speakers"], "ci_confidence": ci["confidence"],
            "ci_seed": ci["seed"]}
    return out | ({"ci_note": ci["note"]} if ci.get("note") else {})


# --------------------------------------------------------------------------------------------------
# score files (``svlib score --scores-out``: ``enroll test score``; stage ``scores/<list>.txt``: ``... label``)

_LABELS = {"target": 1, "nontarget": 0, "1": 1, "0": 0}
UNLABELLED = -1  # ``ScoreFile.labels`` of a line without a fourth field


@dataclass(frozen=True)
class ScoreFile:
    """A score file's trials in file order; ``lines`` are their line numbers (1-based, for error messages)."""

    path: Path
    enroll: list[str]
    test: list[str]
    scores: np.ndarray
    labels: np.ndarray  # int8: 1 target, 0 non-target, UNLABELLED where the line has no label
    lines: np.ndarray


def read_score_file(path, labelled: bool = False) -> ScoreFile:
    """The one parser of score files: ``enroll test score [target|nontarget|1|0]`` per line, blank lines
    skipped. ``labelled``: every line must carry the label (stage score files).

    Every check is made here, so every reader reports bad input alike, as ``<file>:<line>: <problem>``: a
    wrong number of fields, a score that is not a finite number, an unknown label.
    """
    path = Path(path)
    if not path.is_file():
        raise BootstrapError(f"{path}: score file not found")
    form = "enroll test score target|nontarget" if labelled else "enroll test score [target|nontarget]"
    enroll, test, scores, labels, lines = [], [], [], [], []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in ((4,) if labelled else (3, 4)):
                raise BootstrapError(f"{path}:{number}: expected '{form}', got {len(fields)} fields")
            try:
                value = float(fields[2])
            except ValueError:
                raise BootstrapError(f"{path}:{number}: score {fields[2]!r} is not a number") from None
            if not np.isfinite(value):
                raise BootstrapError(f"{path}:{number}: score {fields[2]!r} is not finite")
            label = UNLABELLED
            if len(fields) == 4:
                label = _LABELS.get(fields[3].lower())
                if label is None:
                    raise BootstrapError(f"{path}:{number}: label {fields[3]!r} is not target/nontarget/1/0")
            enroll.append(fields[0])
            test.append(fields[1])
            scores.append(value)
            labels.append(label)
            lines.append(number)
    return ScoreFile(path, enroll, test, np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int8),
                     np.asarray(lines, dtype=np.int64))


def load_trial_scores(path, trials, trials_source: str = "the trial list") -> np.ndarray:
    """The scores of ``path`` in the order of ``trials`` (``svlib.data.lists.Trials``).

    The file must hold exactly the trials' (enroll, test) pairs, once each; a fourth field, when present,
    must agree with the trial's label. Errors name the file, the line and the first offending pair.
    """
    index = {pair: i for i, pair in enumerate(zip(trials.enroll, trials.test))}
    if len(index) != len(trials):
        raise BootstrapError(f"{trials_source}: the same (enroll, test) pair is listed twice")
    parsed = read_score_file(path)
    path = parsed.path
    scores = np.full(len(trials), np.nan)
    line_of = np.zeros(len(trials), dtype=np.int64)
    extra, first_extra = 0, None
    for e, t, value, label, number in zip(parsed.enroll, parsed.test, parsed.scores, parsed.labels, parsed.lines):
        i = index.get((e, t))
        if i is None:
            extra += 1
            first_extra = first_extra or f"{e} {t}"
            continue
        if line_of[i]:
            raise BootstrapError(f"{path}:{number}: trial '{e} {t}' repeats line {line_of[i]}")
        if label != UNLABELLED and label != int(trials.labels[i]):
            raise BootstrapError(f"{path}:{number}: trial '{e} {t}' is labelled "
                                 f"{'target' if label else 'nontarget'} here but not in {trials_source}")
        scores[i], line_of[i] = value, number
    if extra:
        raise BootstrapError(f"{path}: {extra} score line(s) are not trials of {trials_source} (first: "
                             f"'{first_extra}'); the score files must hold the same trial set")
    missing = np.flatnonzero(line_of == 0)
    if missing.size:
        i = int(missing[0])
        raise BootstrapError(f"{path}: no score for trial '{trials.enroll[i]} {trials.test[i]}' of {trials_source} "
                             f"({missing.size} of {len(trials)} trials missing)")
    return scores


def paired_score_files(path_a, path_b, trials, utt2spk: Mapping[str, str] | None = None,
                       trials_source: str = "the trial list", replicates: int = DEFAULT_REPLICATES,
                       seed: int = 0) -> dict:
    """``paired_bootstrap`` of systems A and B from their score files on one trial list (``Trials``): each file
    is read in the list's order (every trial must be scored), speakers come from ``utt2spk`` or the ids."""
    speakers = trial_speakers(trials.enroll, trials.test, trials.labels, utt2spk, source=trials_source)
    scores_a = load_trial_scores(path_a, trials, trials_source)
    scores_b = load_trial_scores(path_b, trials, trials_source)
    return paired_bootstrap(scores_a, scores_b, trials.labels, speakers, replicates, seed)


def read_labelled_scores(path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """A stage score file ``enroll test score target|nontarget`` -> ``(enroll, test, scores, labels)``."""
    parsed = read_score_file(path, labelled=True)
    return parsed.enroll, parsed.test, parsed.scores, parsed.labels


def score_file_ci(path, utt2spk: Mapping[str, str] | None = None, replicates: int = DEFAULT_REPLICATES,
                  seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """``bootstrap_ci`` of a stage score file (speakers from ``utt2spk`` or the ids)."""
    enroll, test, scores, labels = read_labelled_scores(path)
    speakers = trial_speakers(enroll, test, labels, utt2spk, source=str(path))
    return bootstrap_ci(scores, labels, speakers, replicates, seed, confidence)
