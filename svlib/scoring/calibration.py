"""Score calibration to log-likelihood ratios, with quality measures (QMF), and Cllr / minCllr.

Calibrated output: ``llr = w . x + b`` with ``x = [score, q_1, q_2, ...]`` (quality measures of the trial,
e.g. log-durations and embedding norms of both sides). ``w, b`` minimise the prior-weighted logistic loss
of BOSARIS (Brümmer), with ``lp = logit(p_target)``:

    C(w, b) = p/N_tar  * sum_tar  log(1 + exp(-(llr_i + lp)))
            + (1-p)/N_non * sum_non log(1 + exp(  llr_j + lp ))        [+ l2/2 |v|^2, see below]

i.e. the cross-entropy of the posterior ``sigmoid(llr + lp)`` with both classes re-weighted to the
effective prior ``p``, so the trial list's own target share does not leak into the LLRs.

    Cllr = 1/(2 ln 2) * [ mean_tar log(1 + e^-llr) + mean_non log(1 + e^llr) ]      (bits)

``min_cllr`` is the Cllr after the best monotone re-mapping of the scores: PAV (isotonic regression) gives
the optimal posterior per score, which is turned into an LLR by removing the empirical prior log-odds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from svlib.files import write_json
from svlib.scoring.metrics import EmbeddingTable, ScoringError, check_scores

__all__ = [
    "CalibrationError",
    "QUALITY_FEATURES",
    "Calibration",
    "quality_measures",
    "feature_matrix",
    "train_calibration",
    "fit_calibration",
    "load_calibration",
    "cllr",
    "min_cllr",
    "pav",
    "optimal_llrs",
]

LN2 = math.log(2.0)


class CalibrationError(ValueError):
    """A calibration file or feature set that cannot be used; names the file or the feature."""


# --------------------------------------------------------------------------------------------------
# quality measures


def _durations(table, trials, side: str) -> np.ndarray:
    if getattr(table, "durations", None) is None:
        raise CalibrationError(
            f"duration quality measures need durations in the embeddings file {table.source or ''}".rstrip()
            + " (save_embeddings(..., durations=...))")
    utts = getattr(trials, side)
    d = table.durations[table.rows(utts)]
    bad = np.flatnonzero(~(d > 0))
    if bad.size:
        raise CalibrationError(f"utterance {utts[bad[0]]!r} has a missing or non-positive duration "
                               f"({d[bad[0]]}) in {table.source or 'the embeddings'}; log-duration undefined")
    return d


def _norms(table, trials, side: str) -> np.ndarray:
    return np.linalg.norm(table.matrix[table.rows(getattr(trials, side))].astype(np.float64), axis=1)


QUALITY_FEATURES = {
    # log of the shorter / longer side: short enrolment or test audio shifts score distributions
    "log_dur_min": lambda tb, tr: np.log(np.minimum(_durations(tb, tr, "enroll"), _durations(tb, tr, "test"))),
    "log_dur_max": lambda tb, tr: np.log(np.maximum(_durations(tb, tr, "enroll"), _durations(tb, tr, "test"))),
    # raw (pre-normalisation) embedding norms, a by-product of the model that tracks utterance quality
    "norm_min": lambda tb, tr: np.minimum(_norms(tb, tr, "enroll"), _norms(tb, tr, "test")),
    "norm_max": lambda tb, tr: np.maximum(_norms(tb, tr, "enroll"), _norms(tb, tr, "test")),
}


def quality_measures(table: EmbeddingTable, trials, features: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-trial quality measures named in ``features`` (``score`` is skipped: it is not a quality)."""
    out = {}
    for name in features:
        if name == "score":
            continue
        if name not in QUALITY_FEATURES:
            raise CalibrationError(f"unknown calibration feature {name!r}; known: score, {', '.join(QUALITY_FEATURES)}")
        out[name] = np.asarray(QUALITY_FEATURES[name](table, trials), dtype=np.float64)
    return out


def feature_matrix(features: Sequence[str], scores, table: EmbeddingTable | None = None, trials=None,
                   quality: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(N, F) matrix in the order of ``features``; qualities come from ``quality`` or are computed from
    ``table`` + ``trials``."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if "score" not in features:
        raise CalibrationError(f"calibration features {list(features)} must include 'score'")
    if len(set(features)) != len(features):
        raise CalibrationError(f"calibration features {list(features)} contain duplicates")
    needed = [f for f in features if f != "score"]
    if quality is None:
        if needed and (table is None or trials is None):
            raise CalibrationError(f"features {needed} need the embedding table and the trials")
        quality = quality_measures(table, trials, needed) if needed else {}
    cols = []
    for name in features:
        if name == "score":
            cols.append(scores)
            continue
        if name not in quality:
            raise CalibrationError(f"quality measure {name!r} not given")
        col = np.asarray(quality[name], dtype=np.float64).reshape(-1)
        if col.shape != scores.shape:
            raise CalibrationError(f"quality measure {name!r} has {col.size} values for {scores.size} trials")
        cols.append(col)
    x = np.stack(cols, axis=1)
    if not np.isfinite(x).all():
        bad = [features[j] for j in range(x.shape[1]) if not np.isfinite(x[:, j]).all()]
        raise CalibrationError(f"calibration features {bad} contain NaN or infinite values")
    return x


# --------------------------------------------------------------------------------------------------
# the calibrator


@dataclass
class Calibration:
    """Affine map from features to LLR; ``p_target`` is the prior it was trained for (informative only:
    the output is an LLR, the prior is applied by whoever makes decisions)."""

    features: list[str]
    weights: np.ndarray
    bias: float
    p_target: float = 0.5
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = list(self.features)
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if self.weights.size != len(self.features):
            raise CalibrationError(f"{len(self.features)} features but {self.weights.size} weights")
        if "score" not in self.features:
            raise CalibrationError(f"calibration features {self.features} must include 'score'")

    def llr(self, x: np.ndarray) -> np.ndarray:
        """``x @ w + b`` for an (N, F) feature matrix in ``self.features`` order.

        Quality measures are clipped to the range seen in training (``meta["quality_range"]``): a linear
        calibration knows nothing outside it, and extrapolating a duration weight fitted on 3-s pieces to 30-s
        utterances turns the LLRs into noise (measured: test EER 17 % -> 50 %).
        """
        x = np.array(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.weights.size:
            raise CalibrationError(f"feature matrix shape {x.shape}, expected (N, {self.weights.size})")
        for name, (low, high) in (self.meta.get("quality_range") or {}).items():
            if name in self.features:
                j = self.features.index(name)
                x[:, j] = np.clip(x[:, j], low, high)
        return x @ self.weights + self.bias

    def apply(self, scores, table: EmbeddingTable | None = None, trials=None, quality=None) -> np.ndarray:
        """Calibrated LLRs of ``scores`` (quality measures from ``table``/``trials`` or ``quality``)."""
        return self.llr(feature_matrix(self.features, scores, table, trials, quality))

    def to_dict(self) -> dict:
        out = {"features": self.features, "weights": [float(w) for w in self.weights], "bias": float(self.bias),
               "p_target": float(self.p_target)}
        if self.meta:
            out["meta"] = self.meta
        return out

    def save(self, path) -> Path:
        return write_json(path, self.to_dict())


def load_calibration(path) -> Calibration:
    """Read a calibration JSON (``{"features": [...], "weights": [...], "bias": b}``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path}: expected a JSON object with features, weights, bias")
    missing = {"features", "weights", "bias"} - set(data)
    unknown = set(data) - {"features", "weights", "bias", "p_target", "meta"}
    if missing or unknown:
        raise CalibrationError(f"{path}: " + (f"missing keys {sorted(missing)}" if missing else f"unknown keys {sorted(unknown)}"))
    feats, weights, bias = data["features"], data["weights"], data["bias"]
    if not (isinstance(feats, list) and all(isinstance(f, str) for f in feats)):
        raise CalibrationError(f"{path}: 'features' must be a list of names")
    num = (int, float)
    if not (isinstance(weights, list) and all(isinstance(w, num) and not isinstance(w, bool) for w in weights)):
        raise CalibrationError(f"{path}: 'weights' must be a list of numbers")
    if not isinstance(bias, num) or isinstance(bias, bool):
        raise CalibrationError(f"{path}: 'bias' must be a number")
    for f in feats:
        if f != "score" and f not in QUALITY_FEATURES:
            raise CalibrationError(f"{path}: unknown feature {f!r}; known: score, {', '.join(QUALITY_FEATURES)}")
    try:
        return Calibration(feats, weights, float(bias), float(data.get("p_target", 0.5)), data.get("meta") or {})
    except CalibrationError as err:
        raise CalibrationError(f"{path}: {err}") from None


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def train_calibration(x: np.ndarray, labels, features: Sequence[str], p_target: float = 0.5,
                      l2: float = 1e-6) -> Calibration:
    """Prior-weighted logistic regression (see module docstring) on the (N, F) matrix ``x``.

    Features are standardised for the optimiser (L-BFGS with the analytic gradient) and the solution is
    mapped back so the stored weights apply to the raw features. ``l2`` penalises the standardised weights
    only to keep the optimum finite when the training trials are perfectly separable.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(features):
        raise CalibrationError(f"feature matrix shape {x.shape} does not match features {list(features)}")
    _, y = check_scores(x[:, 0], labels)
    if not 0.0 < p_target < 1.0:
        raise CalibrationError(f"p_target must be in (0, 1), got {p_target}")
    mean, std = x.mean(axis=0), x.std(axis=0)
    flat = [features[j] for j in range(x.shape[1]) if not std[j] > 0]
    if flat:
        raise CalibrationError(f"calibration feature(s) {flat} are constant over the training trials")
    z = (x - mean) / std
    n_tar, n_non = int(y.sum()), int((~y).sum())
    # per-trial weight and sign: targets push llr up, non-targets down
    wt = np.where(y, p_target / n_tar, (1.0 - p_target) / n_non)
    sign = np.where(y, -1.0, 1.0)
    lp = math.log(p_target / (1.0 - p_target))

    def objective(theta):
        v, c = theta[:-1], theta[-1]
        a = sign * (z @ v + c + lp)
        loss = float(np.sum(wt * _softplus(a))) + 0.5 * l2 * float(v @ v)
        g_a = wt * _sigmoid(a) * sign
        grad = np.empty_like(theta)
        grad[:-1] = z.T @ g_a + l2 * v
        grad[-1] = g_a.sum()
        return loss, grad

    theta0 = np.zeros(x.shape[1] + 1)
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10})
    if not np.all(np.isfinite(res.x)):
        raise CalibrationError(f"logistic regression diverged ({res.message})")
    v, c = res.x[:-1], res.x[-1]
    weights = v / std
    bias = float(c - np.sum(v * mean / std))
    ranges = {f: [float(x[:, j].min()), float(x[:, j].max())] for j, f in enumerate(features) if f != "score"}
    return Calibration(list(features), weights, bias, p_target,
                       {"num_trials": int(y.size), "num_target": n_tar, "loss_bits": float(res.fun / LN2),
                        "quality_range": ranges})


def fit_calibration(scores, labels, table: EmbeddingTable | None = None, trials=None,
                    features: Sequence[str] = ("score",), p_target: float = 0.5,
                    quality: Mapping[str, np.ndarray] | None = None) -> Calibration:
    """Build the feature matrix for ``features`` and train the calibration on it."""
    x = feature_matrix(list(features), scores, table, trials, quality)
    return train_calibration(x, labels, list(features), p_target)


# --------------------------------------------------------------------------------------------------
# Cllr, PAV, minCllr


def cllr(llrs, labels) -> float:
    """Cost of log-likelihood ratio in bits (0 = perfect, 1 = uninformative ``llr == 0``)."""
    llrs, y = check_scores(llrs, labels)
    c_tar = _softplus(-llrs[y]).mean()
    c_non = _softplus(llrs[~y]).mean()
    return float(0.5 * (c_tar + c_non) / LN2)


def pav(values, weights=None) -> np.ndarray:
    """Weighted isotonic (non-decreasing) least-squares fit of ``values`` in the given order, by
    pool-adjacent-violators: merge neighbouring blocks while a block's mean exceeds the next one's."""
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != y.shape or np.any(w <= 0):
        raise ScoringError("pav: weights must be positive and match the values")
    n = y.size
    means = np.empty(n)
    wsum = np.empty(n)
    count = np.empty(n, dtype=np.int64)
    top = -1
    for i in range(n):
        top += 1
        means[top], wsum[top], count[top] = y[i], w[i], 1
        while top > 0 and means[top - 1] >= means[top]:
            tot = wsum[top - 1] + wsum[top]
            means[top - 1] = (means[top - 1] * wsum[top - 1] + means[top] * wsum[top]) / tot
            wsum[top - 1] = tot
            count[top - 1] += count[top]
            top -= 1
    return np.repeat(means[:top + 1], count[:top + 1])


def optimal_llrs(scores, labels) -> np.ndarray:
    """LLRs of the best monotone (non-decreasing) map of ``scores``, per trial.

    Equal scores are pooled first (a function of the score must give them one value), PAV fits the
    target posterior ``P(tar | s)`` by block, and ``llr = logit(P) - logit(N_tar/N)`` removes the trial
    list's prior. Blocks of a single class get +/- inf, which only ever costs 0 in Cllr.
    """
    scores, y = check_scores(scores, labels)
    order = np.argsort(scores, kind="stable")
    s, t = scores[order], y[order].astype(np.float64)
    starts = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1))
    sizes = np.diff(np.concatenate((starts, [s.size])))
    tar_per_group = np.add.reduceat(t, starts)
    post = pav(tar_per_group / sizes, sizes)
    with np.errstate(divide="ignore"):
        llr_group = np.log(post) - np.log1p(-post) - math.log(y.sum() / (~y).sum())
    out = np.empty(scores.size)
    out[order] = np.repeat(llr_group, sizes)
    return out


def min_cllr(scores, labels) -> float:
    """Cllr of the optimally (monotonically) calibrated scores, the floor any calibration can reach."""
    _, y = check_scores(scores, labels)
    return _cllr_allow_inf(optimal_llrs(scores, labels), y)


def _cllr_allow_inf(llrs: np.ndarray, y: np.ndarray) -> float:
    """Cllr allowing +/-inf LLRs (from PAV); ``check_scores`` in ``cllr`` rejects them on purpose for user input."""
    y = np.asarray(y, dtype=bool)
    c_tar = _softplus(-llrs[y]).mean()
    c_non = _softplus(llrs[~y]).mean()
    return float(0.5 * (c_tar + c_non) / LN2)
