"""Verification metrics (EER, minDCF, DET), cosine scoring and the embeddings file format.

Conventions: a trial is *accepted* when ``score >= threshold``; labels are 1 (target) / 0 (non-target).
For a threshold ``t``

    FNR(t) = #{targets with s < t} / N_tar          (miss rate)
    FPR(t) = #{non-targets with s >= t} / N_non     (false-alarm rate)

Both rates only change at the distinct score values, so every metric here is computed on the *cuts*
between groups of equal scores: one argsort, one cumulative sum, and the equal-score groups are merged so
that tied trials always move together (a tie can never be split by a threshold).
"""
from __future__ import annotations

import operator
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from svlib.files import replace_atomic

__all__ = [
    "ScoringError",
    "MissingEmbeddingError",
    "EmbeddingFileError",
    "ErrorRates",
    "check_scores",
    "error_rates",
    "compute_eer",
    "compute_min_dcf",
    "det_curve",
    "summarize",
    "plot_det",
    "EmbeddingTable",
    "save_embeddings",
    "load_embeddings",
    "cosine_scores",
    "l2_normalize",
]

DCF_TARGETS = (0.01, 0.05)
# per-utterance quality flags an embeddings file may hold (bool arrays under these names): "narrowband" (the
# audio had no content above 4 kHz, svlib.audio.is_narrowband), "truncated" (the file held less audio than its
# header declared, svlib.audio.AudioInfo.truncated). Files without them (older svlib) load with the flag unknown.
QUALITY_FLAGS = ("narrowband", "truncated")
ZIP_MAGIC = b"PK\x03\x04"  # every .npz starts with a zip local-file header


class ScoringError(ValueError):
    """Scores/labels that cannot be evaluated (empty class, length mismatch, NaN...)."""


class MissingEmbeddingError(KeyError):
    """A trial refers to an utterance that has no embedding.

    Subclasses ``KeyError`` (it *is* a failed lookup) but prints its message verbatim: ``KeyError.__str__``
    would wrap it in quotes, which is unreadable on one stderr line.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class EmbeddingFileError(ValueError):
    """An embeddings ``.npz`` that is missing, unreadable or not in the svlib layout; names the file."""


# --------------------------------------------------------------------------------------------------
# error rates


@dataclass(frozen=True)
class ErrorRates:
    """FNR/FPR at every cut between groups of equal scores, cut 0 = accept all, last cut = reject all.

    ``thresholds[k]`` is the smallest accepted score at cut ``k``; the last one (reject all) is the next
    float above the largest score.
    """

    fnr: np.ndarray
    fpr: np.ndarray
    thresholds: np.ndarray
    num_target: int
    num_nontarget: int


def check_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (float64 scores, bool labels); raises ``ScoringError`` saying what is wrong."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ScoringError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}")
    if scores.shape[0] != labels.shape[0]:
        raise ScoringError(f"length mismatch: {scores.shape[0]} scores but {labels.shape[0]} labels")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            bad = labels[~np.isin(labels, (0, 1))][:3]
            raise ScoringError(f"labels must be 0 (non-target) or 1 (target), found {bad.tolist()}")
    labels = labels.astype(bool)
    finite = np.isfinite(scores)
    if not finite.all():
        n_nan = int(np.isnan(scores).sum())
        n_inf = int((~finite).sum()) - n_nan
        first = int(np.flatnonzero(~finite)[0])
        raise ScoringError(f"scores contain {n_nan} NaN and {n_inf} infinite values (first at trial {first})")
    n_tar = int(labels.sum())
    if n_tar == 0:
        raise ScoringError(f"no target trials among {labels.size} trials: EER/minDCF are undefined")
    if n_tar == labels.size:
        raise ScoringError(f"no non-target trials among {labels.size} trials: EER/minDCF are undefined")
    return scores, labels


def error_rates(scores, labels) -> ErrorRates:
    """Miss and false-alarm rates at every distinct threshold (one sort; ties grouped).

    With the scores sorted ascending and ``T[k]``/``F[k]`` the numbers of targets/non-targets among the
    ``k`` lowest, the cut in front of position ``k`` gives ``FNR = T[k]/N_tar`` and
    ``FPR = (N_non - F[k])/N_non``. Only cuts at the start of an equal-score group are kept.
    """
    scores, labels = check_scores(scores, labels)
    order = np.argsort(scores, kind="quicksort")
    s = scores[order]
    is_tar = labels[order]
    n = s.size
    # cuts: 0, every position where the sorted value increases, and n.
    starts = np.flatnonzero(s[1:] != s[:-1]) + 1
    cuts = np.concatenate(([0], starts, [n]))
    tar_below = np.concatenate(([0], np.cumsum(is_tar, dtype=np.int64)))[cuts]
    non_below = cuts - tar_below
    n_tar = int(tar_below[-1])
    n_non = n - n_tar
    fnr = tar_below / n_tar
    fpr = (n_non - non_below) / n_non
    thresholds = np.empty(cuts.size, dtype=np.float64)
    thresholds[:-1] = s[cuts[:-1]]
    thresholds[-1] = np.nextafter(s[-1], np.inf)
    return ErrorRates(fnr, fpr, thresholds, n_tar, n_non)


def _eer(rates: ErrorRates) -> tuple[float, float]:
    """Crossing of FNR and FPR, linearly interpolated between the two cuts that bracket it.

    ``d = FNR - FPR`` is non-decreasing from -1 (accept all) to +1 (reject all). With ``i`` the first cut
    where ``d >= 0`` and ``a = -d[i-1] / (d[i] - d[i-1])``, EER = FNR[i-1] + a (FNR[i] - FNR[i-1]);
    on that segment FNR and FPR are equal at ``a``, so this is the intersection of the (piecewise linear)
    DET/ROC curve with the diagonal, the same as the usual ``brentq`` on an interpolated ROC.
    """
    d = rates.fnr - rates.fpr
    i = int(np.searchsorted(d, 0.0, side="left"))  # d is sorted; first index with d >= 0
    if d[i] == 0.0:
        return float(rates.fnr[i]), float(rates.thresholds[i])
    a = -d[i - 1] / (d[i] - d[i - 1])
    eer = rates.fnr[i - 1] + a * (rates.fnr[i] - rates.fnr[i - 1])
    thr = rates.thresholds[i - 1] + a * (rates.thresholds[i] - rates.thresholds[i - 1])
    return float(eer), float(thr)


def _min_dcf(rates: ErrorRates, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """``min_t [c_miss p FNR(t) + c_fa (1-p) FPR(t)] / min(c_miss p, c_fa (1-p))`` and its threshold.

    The normaliser is the cost of the best trivial system (accept all or reject all), so 1.0 means
    "no better than ignoring the scores".
    """
    if not 0.0 < p_target < 1.0:
        raise ScoringError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ScoringError(f"c_miss and c_fa must be positive, got {c_miss} and {c_fa}")
    dcf = c_miss * p_target * rates.fnr + c_fa * (1.0 - p_target) * rates.fpr
    k = int(np.argmin(dcf))
    norm = min(c_miss * p_target, c_fa * (1.0 - p_target))
    return float(dcf[k] / norm), float(rates.thresholds[k])


def compute_eer(scores, labels) -> tuple[float, float]:
    """Equal error rate as a fraction in [0, 1] and the (interpolated) threshold where it occurs."""
    return _eer(error_rates(scores, labels))


def compute_min_dcf(scores, labels, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (see ``_min_dcf`` for the formula)."""
    return _min_dcf(error_rates(scores, labels), p_target, c_miss, c_fa)[0]


def det_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """DET points ``(fpr, fnr)``, one per distinct threshold, from (FPR=1, FNR=0) to (FPR=0, FNR=1)."""
    r = error_rates(scores, labels)
    return r.fpr, r.fnr


def summarize(scores, labels, p_targets: Sequence[float] = DCF_TARGETS) -> dict:
    """EER (percent) and minDCF at each ``p_target`` from a single sort of the scores."""
    r = error_rates(scores, labels)
    eer, _ = _eer(r)
    out = {"eer_pct": 100.0 * eer}
    for p in p_targets:
        out[f"mindcf_{p:g}"] = _min_dcf(r, p)[0]
    out["num_trials"] = r.num_target + r.num_nontarget
    out["num_target"] = r.num_target
    return out


# --------------------------------------------------------------------------------------------------
# DET plot


def _thin_staircase(fpr: np.ndarray, fnr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop points in the middle of straight runs; the drawn curve is unchanged, 1M points become few."""
    if fpr.size <= 2:
        return fpr, fnr
    dx = np.diff(fpr)
    dy = np.diff(fnr)
    # a point is a corner when the segment before and after it point in different directions
    # (steps are purely horizontal, purely vertical or diagonal for ties; compare the signs).
    before = np.sign(dx[:-1]) * 2 + np.sign(dy[:-1])
    after = np.sign(dx[1:]) * 2 + np.sign(dy[1:])
    # diagonal (tie) segments with different slopes are also corners
    diag = (dx[:-1] != 0) & (dy[:-1] != 0)
    slope_change = diag & ~np.isclose(dy[:-1] * dx[1:], dy[1:] * dx[:-1])
    keep = np.concatenate(([True], (before != after) | slope_change, [True]))
    return fpr[keep], fnr[keep]


def draw_det(ax, curves: Mapping[str, tuple], title: str | None = None, mindcf_p: float | None = None,
             legend_size: float = 8) -> None:
    """Draw DET curves on ``ax`` with normal-deviate (probit) axes; each legend entry shows its EER
    (and its minDCF at ``mindcf_p`` when given).

    The legend is the figure's, below the axes (``ax``'s figure should use constrained layout, which makes
    room for it): inside, a high-EER curve runs through whichever corner it is put in.

    ``curves`` maps a name to ``(scores, labels)``. Rates of exactly 0 or 1 sit at +/- infinity on a
    probit axis, so they are clipped to the plotted range.
    """
    from scipy.stats import norm

    if not curves:
        raise ScoringError("draw_det: no curves given")
    ticks = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6])
    lo, hi = 0.0005, 0.7
    for name, (scores, labels) in curves.items():
        r = error_rates(scores, labels)
        eer, _ = _eer(r)
        label = f"{name} (EER {100 * eer:.2f}%"
        if mindcf_p is not None:
            label += f", minDCF {_min_dcf(r, mindcf_p)[0]:.3f}"
        fpr, fnr = _thin_staircase(r.fpr, r.fnr)
        x = norm.ppf(np.clip(fpr, lo / 2, 1 - lo / 2))
        y = norm.ppf(np.clip(fnr, lo / 2, 1 - lo / 2))
        ax.plot(x, y, label=label + ")", linewidth=1.4)
    lim = norm.ppf([lo, hi])
    ax.plot(lim, lim, color="0.6", linestyle=":", linewidth=0.8)
    tick_pos = norm.ppf(ticks)
    labels_txt = [f"{100 * t:g}" for t in ticks]
    ax.set_xticks(tick_pos, labels_txt)
    ax.set_yticks(tick_pos, labels_txt)
    ax.set_xlim(*lim)
    ax.set_ylim(*lim)
    ax.set_xlabel("False alarm rate (%)")
    ax.set_ylabel("Miss rate (%)")
    ax.grid(True, color="0.85", linewidth=0.6)
    ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=legend_size)
    if title:
        ax.set_title(title)


def plot_det(curves: Mapping[str, tuple], path, title: str | None = None) -> Path:
    """Write a DET plot (PNG) of ``curves`` (see ``draw_det``) without needing a display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ScoringError("plot_det: no curves given")
    # A bare Figure with the Agg canvas: no pyplot state, so a notebook's backend is left alone.
    fig = Figure(figsize=(5.5, 5.5 + 0.2 * len(curves)), layout="constrained")
    FigureCanvasAgg(fig)
    draw_det(fig.add_subplot(), curves, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


# --------------------------------------------------------------------------------------------------
# embeddings file and cosine scoring


class EmbeddingTable(dict):
    """``{utt: vector}`` that can also hand out one (N, E) matrix, so scoring gathers rows instead of
    looking up and stacking a million vectors.

    Build it either from a file-like ``(utts, matrix)`` pair (values are then row views of ``matrix``) or
    empty, filling it like a dict (``table[utt] = vector``). ``utts``, ``matrix`` and ``index`` are
    rebuilt lazily after any change. ``durations`` (seconds, aligned with ``utts``; NaN where unknown) is
    ``None`` unless the file or ``set_durations`` provided some; likewise each of the ``QUALITY_FLAGS``
    (``flag(name)``, ``set_flags``).
    """

    def __init__(self, utts: Sequence[str] | None = None, matrix: np.ndarray | None = None,
                 durations=None, source: str = "", flags: Mapping[str, Sequence[bool]] | None = None):
        super().__init__()
        self.source = source
        self._cache: tuple[list[str], np.ndarray, dict[str, int]] | None = None
        self._durations: dict[str, float] = {}
        self._flags: dict[str, dict[str, bool]] = {}
        if utts is None and matrix is None:
            if durations is not None or flags:
                raise EmbeddingFileError("durations or flags given without utterances")
            return
        where = f"{source}: " if source else ""
        if utts is None or matrix is None:
            raise EmbeddingFileError(f"{where}give both utterance ids and the embedding matrix, or neither")
        matrix = np.asarray(matrix)
        if matrix.ndim != 2:
            raise EmbeddingFileError(f"{where}embeddings must be a 2-D (N, E) matrix, got shape {matrix.shape}")
        utts = [str(u) for u in utts]
        if len(utts) != matrix.shape[0]:
            raise EmbeddingFileError(f"{where}{len(utts)} utterance ids but {matrix.shape[0]} embedding rows")
        index = {u: i for i, u in enumerate(utts)}
        if len(index) != len(utts):
            seen: set[str] = set()
            dup = next(u for u in utts if u in seen or seen.add(u))
            raise EmbeddingFileError(f"{where}duplicate utterance id {dup!r}")
        if durations is not None:
            durations = np.asarray(durations, dtype=np.float64)
            if durations.shape != (len(utts),):
                raise EmbeddingFileError(f"{where}durations has shape {durations.shape}, expected ({len(utts)},)")
            self._durations = dict(zip(utts, durations.tolist()))
        for name, values in (flags or {}).items():
            values = np.asarray(values)
            if name not in QUALITY_FLAGS or values.dtype != np.bool_ or values.shape != (len(utts),):
                raise EmbeddingFileError(f"{where}flag {name!r} must be one of {QUALITY_FLAGS} with a boolean "
                                         f"({len(utts)},) array, got {values.dtype} {values.shape}")
            self._flags[name] = dict(zip(utts, values.tolist()))
        matrix = matrix.view()
        matrix.flags.writeable = False  # values are views: writing one would silently change the matrix
        dict.update(self, zip(utts, matrix))
        self._cache = (utts, matrix, index)

    # ---- dict mutations invalidate the matrix view -------------------------------------------------
    def _changed(name):  # noqa: N805 - decorator factory used only in the class body
        base = getattr(dict, name)

        def method(self, *args, **kwargs):
            self._cache = None
            return base(self, *args, **kwargs)

        method.__name__ = name
        return method

    __setitem__ = _changed("__setitem__")
    __delitem__ = _changed("__delitem__")
    __ior__ = _changed("__ior__")
    update = _changed("update")
    pop = _changed("pop")
    popitem = _changed("popitem")
    setdefault = _changed("setdefault")
    clear = _changed("clear")
    del _changed

    def _build(self) -> tuple[list[str], np.ndarray, dict[str, int]]:
        if self._cache is None:
            utts = list(self.keys())
            if not utts:
                self._cache = ([], np.zeros((0, 0), dtype=np.float32), {})
            else:
                vecs = [np.asarray(v).reshape(-1) for v in self.values()]
                dims = {v.size for v in vecs}
                if len(dims) != 1:
                    raise ScoringError(f"embeddings{' in ' + self.source if self.source else ''} have different "
                                       f"dimensions {sorted(dims)}")
                self._cache = (utts, np.stack(vecs), {u: i for i, u in enumerate(utts)})
        return self._cache

    @property
    def utts(self) -> list[str]:
        return self._build()[0]

    @property
    def matrix(self) -> np.ndarray:
        return self._build()[1]

    @property
    def index(self) -> dict[str, int]:
        return self._build()[2]

    @property
    def durations(self) -> np.ndarray | None:
        if not self._durations:
            return None
        return np.array([self._durations.get(u, np.nan) for u in self.utts], dtype=np.float64)

    def set_durations(self, durations: Mapping[str, float]) -> None:
        """Attach per-utterance durations (seconds), used by quality-measure calibration."""
        self._durations.update({str(u): float(d) for u, d in durations.items()})

    def flag(self, name: str) -> np.ndarray | None:
        """Boolean array of quality flag ``name`` aligned with ``utts`` (False where not recorded), or None
        when no utterance has it recorded (e.g. a file of an older svlib)."""
        if name not in QUALITY_FLAGS:
            raise KeyError(f"unknown quality flag {name!r} (known: {', '.join(QUALITY_FLAGS)})")
        values = self._flags.get(name)
        return None if not values else np.array([values.get(u, False) for u in self.utts], dtype=bool)

    def flagged(self, name: str, utts: Iterable[str] | None = None) -> list[str]:
        """The utterances (of ``utts``, default all) that carry quality flag ``name``."""
        values = self._flags.get(name, {})
        return [u for u in (self.utts if utts is None else utts) if values.get(u, False)]

    def set_flags(self, name: str, values: Mapping[str, bool]) -> None:
        """Record quality flag ``name`` (one of ``QUALITY_FLAGS``) for some utterances."""
        if name not in QUALITY_FLAGS:
            raise KeyError(f"unknown quality flag {name!r} (known: {', '.join(QUALITY_FLAGS)})")
        self._flags.setdefault(name, {}).update({str(u): bool(v) for u, v in values.items()})

    def __reduce__(self):
        # the default dict pickling would skip the constructor and lose source/durations/flags
        flags = {name: self.flag(name) for name in self._flags if self._flags[name]}
        return (type(self), (self.utts, np.array(self.matrix), self.durations, self.source, flags))

    def rows(self, utts: Iterable[str]) -> np.ndarray:
        """Row indices of ``utts``; raises ``MissingEmbeddingError`` naming the first absent one."""
        utts = utts if isinstance(utts, (list, tuple)) else list(utts)
        if not utts:
            return np.zeros(0, dtype=np.int64)
        try:
            # itemgetter does all the dict lookups in C: ~2x faster than a generator on 1M trials
            found = operator.itemgetter(*utts)(self.index)
        except KeyError as err:
            raise MissingEmbeddingError(f"no embedding for utterance {err.args[0]!r}"
                                        + (f" in {self.source}" if self.source else "")) from None
        return np.array(found if len(utts) > 1 else (found,), dtype=np.int64)

    @classmethod
    def from_mapping(cls, emb: Mapping[str, np.ndarray], utts: Sequence[str] | None = None) -> "EmbeddingTable":
        """A table of a plain ``{utt: vector}`` mapping (only ``utts`` when given)."""
        if isinstance(emb, EmbeddingTable) and utts is None:
            return emb
        keys = list(emb.keys()) if utts is None else list(utts)
        missing = [u for u in keys if u not in emb]
        if missing:
            raise MissingEmbeddingError(f"no embedding for utterance {missing[0]!r} ({len(missing)} missing)")
        table = cls()
        dict.update(table, ((u, emb[u]) for u in keys))
        if isinstance(emb, EmbeddingTable):
            table.source = emb.source
            table._durations = {u: emb._durations[u] for u in keys if u in emb._durations}
            table._flags = {name: {u: values[u] for u in keys if u in values} for name, values in emb._flags.items()}
        return table


def save_embeddings(path, utts: Sequence[str], matrix, durations=None,
                    flags: Mapping[str, Sequence[bool]] | None = None) -> Path:
    """Write ``path`` (.npz): ``utts`` (unicode array, ids may contain '/'), ``embeddings`` (N, E) float32,
    optionally ``durations`` (N,) seconds, used by quality-measure calibration, and ``flags``: boolean (N,)
    arrays stored under their names (``QUALITY_FLAGS``: narrowband, truncated). Atomic (tmp + rename) so a
    crashed extraction never leaves a half-written file that looks valid."""
    path = Path(path)
    matrix = np.asarray(matrix, dtype=np.float32)
    flags = {name: np.asarray(values, dtype=bool) for name, values in (flags or {}).items()}
    # validates shapes, duplicates and flag names
    table = EmbeddingTable(utts, matrix, durations, source=str(path), flags=flags)
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise EmbeddingFileError(f"{path}: embedding of {table.utts[bad]!r} contains NaN or inf")
    arrays = {"utts": np.array(table.utts, dtype=np.str_), "embeddings": matrix}
    if durations is not None:
        arrays["durations"] = np.asarray(durations, dtype=np.float64)
    arrays.update(flags)

    def write_arrays(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # a file handle: np.savez would append ".npz" to a path
            fh.flush()
            os.fsync(fh.fileno())

    # the umask's mode (mkstemp's 0600 would lock teammates out); a full disk names the file
    return replace_atomic(path, write_arrays)


def load_embeddings(path) -> EmbeddingTable:
    """Read a file written by ``save_embeddings``; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: embeddings file not found")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != ZIP_MAGIC:
        # np.load would try it as .npy/pickle and advise loading "unsafely": never right for an embeddings file
        kind = "a NumPy .npy array" if head == b"\x93NUM" else "an empty file" if not head else "not a zip archive"
        raise EmbeddingFileError(f"{path}: not an .npz embeddings file ({kind}); write one with `svlib embed` "
                                 "or svlib.scoring.save_embeddings")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = {"utts", "embeddings"} - keys
            if missing:
                raise EmbeddingFileError(
                    f"{path}: not an svlib embeddings file (missing arrays {sorted(missing)}, has {sorted(keys)})")
            utts = data["utts"]
            matrix = data["embeddings"]
            durations = data["durations"] if "durations" in keys else None
            flags = {name: data[name] for name in QUALITY_FLAGS if name in keys}
    except EmbeddingFileError:
        raise
    except (OSError, ValueError) as err:  # pickle/format problems
        raise EmbeddingFileError(f"{path}: not a readable .npz file ({err})") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:  # not OSError/ValueError: a traceback otherwise
        raise EmbeddingFileError(f"{path}: truncated or corrupt .npz file ({err}); write it again") from None
    if utts.dtype.kind not in "US":
        raise EmbeddingFileError(f"{path}: 'utts' must be an array of strings, got dtype {utts.dtype}")
    if matrix.dtype.kind != "f":
        raise EmbeddingFileError(f"{path}: 'embeddings' must be floating point, got dtype {matrix.dtype}")
    return EmbeddingTable(utts.astype(str).tolist(), matrix, durations, source=str(path), flags=flags)


def l2_normalize(matrix: np.ndarray, names: Sequence[str] | None = None, source: str = "") -> np.ndarray:
    """Rows divided by their L2 norm; a zero row has no direction, so it is an error naming the utterance."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    bad = np.flatnonzero(~(norms[:, 0] > 0) | ~np.isfinite(norms[:, 0]))
    if bad.size:
        who = repr(names[bad[0]]) if names is not None else f"row {bad[0]}"
        where = f" in {source}" if source else ""
        raise ScoringError(f"embedding of {who}{where} has zero or non-finite norm; cannot cosine-score it")
    return matrix / norms


def cosine_scores(embeddings, trials, chunk: int = 8192, source: str | None = None) -> np.ndarray:
    """``cos(e, t) = <e, t> / (|e| |t|)`` for every (enroll, test) pair of ``trials``, float64 (num_trials,).

    ``embeddings`` is an ``EmbeddingTable`` or any ``{utt: vector}`` mapping; ``trials`` anything with
    ``enroll`` and ``test`` lists (``svlib.data.lists.Trials``); ``source`` names the trial list in errors.
    Norms are computed once per utterance used; the raw rows are gathered per chunk of trials (small
    chunks stay in cache) and the dot product is divided by the two norms.
    """
    enroll, test = trials.enroll, trials.test
    if len(enroll) != len(test):
        raise ScoringError(f"trials have {len(enroll)} enroll but {len(test)} test entries")
    trial_src = source or getattr(trials, "path", None) or getattr(trials, "source", None)
    try:
        if isinstance(embeddings, EmbeddingTable):
            table = embeddings
        else:
            table = EmbeddingTable.from_mapping(embeddings, list(dict.fromkeys([*enroll, *test])))
        e_idx, t_idx = table.rows(enroll), table.rows(test)
    except MissingEmbeddingError:
        used = dict.fromkeys([*enroll, *test])
        absent = [u for u in used if u not in embeddings]
        emb_src = getattr(embeddings, "source", "") or "the embeddings"
        raise MissingEmbeddingError(
            f"utterance {absent[0]!r} from trial list {trial_src or '(unnamed)'} has no embedding in {emb_src}"
            f" ({len(absent)} of {len(used)} trial utterances missing)") from None
    matrix = table.matrix
    used_rows = np.unique(np.concatenate((e_idx, t_idx)))
    norms = np.ones(matrix.shape[0], dtype=np.float64)
    used_norms = np.linalg.norm(matrix[used_rows].astype(np.float64), axis=1)
    bad = np.flatnonzero(~(used_norms > 0) | ~np.isfinite(used_norms))
    if bad.size:
        where = f" in {table.source}" if table.source else ""
        raise ScoringError(f"embedding of {table.utts[used_rows[bad[0]]]!r}{where} has zero or non-finite norm; "
                           "cannot cosine-score it")
    norms[used_rows] = used_norms
    out = np.empty(len(enroll), dtype=np.float64)
    for a in range(0, len(enroll), chunk):
        e, t = e_idx[a:a + chunk], t_idx[a:a + chunk]
        out[a:a + chunk] = np.einsum("ij,ij->i", matrix[e], matrix[t]) / (norms[e] * norms[t])
    return out
