"""Adaptive symmetric score normalisation (AS-norm) with a top-N cohort.

For a trial (e, t) with raw cosine score ``s`` and a cohort ``C`` (usually one mean embedding per
training speaker), each side is normalised by the statistics of its ``N`` *closest* cohort scores:

    S_e  = top-N of { cos(e, c) : c in C },   mu_e = mean(S_e),   sd_e = std(S_e)   (same for t)
    s'   = 0.5 * ( (s - mu_e) / sd_e  +  (s - mu_t) / sd_t )

``std`` is the population (ddof=0) standard deviation of the N scores, as in WeSpeaker's ``score_norm.py``
(``np.std`` with its default ddof). Enrolment models (CN-Celeb: the mean of several enrolment utterances,
``svlib.scoring.enroll``) are normalised like any other embedding: their top-N cohort statistics are those of
the model vector. Statistics are computed once
per *unique* utterance (one matrix product against the cohort, chunked) and then gathered per trial, so
1M trials over 40k utterances cost 40k x |C| dot products, not 1M x |C|.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from svlib.scoring.metrics import (
    EmbeddingTable,
    MissingEmbeddingError,
    ScoringError,
    cosine_scores,
    l2_normalize,
)

__all__ = ["speaker_means", "cohort_stats", "as_norm", "as_norm_scores"]


def speaker_means(embeddings: Mapping[str, np.ndarray], utt2spk: Mapping[str, str], normalize: bool = True) -> EmbeddingTable:
    """One cohort entry per speaker: the mean of its utterances' *length-normalised* embeddings.

    Utterances are unit-normalised before averaging because cosine scoring ignores the norm, and a few
    loud (large-norm) utterances should not dominate a speaker's direction. With ``normalize`` the means
    are unit-normalised again. Every embedding must have a speaker; speakers are returned sorted.
    """
    table = embeddings if isinstance(embeddings, EmbeddingTable) else EmbeddingTable.from_mapping(embeddings)
    where = f" in {table.source}" if table.source else ""
    missing = [u for u in table.utts if u not in utt2spk]
    if missing:
        raise MissingEmbeddingError(
            f"utterance {missing[0]!r}{where} has no speaker in utt2spk ({len(missing)} of {len(table.utts)} missing)")
    unit = l2_normalize(table.matrix, table.utts, table.source)
    speakers = sorted({utt2spk[u] for u in table.utts})
    spk_index = {s: i for i, s in enumerate(speakers)}
    which = np.fromiter((spk_index[utt2spk[u]] for u in table.utts), dtype=np.int64, count=len(table.utts))
    sums = np.zeros((len(speakers), unit.shape[1]), dtype=np.float64)
    np.add.at(sums, which, unit)
    means = sums / np.bincount(which, minlength=len(speakers))[:, None]
    if normalize:
        means = l2_normalize(means, speakers)
    return EmbeddingTable(speakers, means.astype(np.float32), source=f"speaker means of {table.source or 'embeddings'}")


def cohort_stats(unit: np.ndarray, cohort_unit: np.ndarray, top_n: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population, ddof=0) std of each row's ``top_n`` largest cosine scores against the cohort.

    Both inputs must already be unit rows. ``np.partition`` selects the top-N in O(|C|) per row
    instead of a full sort.
    """
    num_cohort = cohort_unit.shape[0]
    if top_n < 2:
        raise ScoringError(f"AS-norm top_n must be at least 2 (a std needs two scores), got {top_n}")
    if num_cohort < top_n:
        raise ScoringError(f"AS-norm top_n={top_n} exceeds the cohort size {num_cohort}; lower --top-n")
    mu = np.empty(unit.shape[0], dtype=np.float64)
    sd = np.empty(unit.shape[0], dtype=np.float64)
    ct = np.ascontiguousarray(cohort_unit.T, dtype=np.float32)
    for a in range(0, unit.shape[0], chunk):
        s = unit[a:a + chunk].astype(np.float32) @ ct
        top = np.partition(s, num_cohort - top_n, axis=1)[:, num_cohort - top_n:].astype(np.float64)
        mu[a:a + chunk] = top.mean(axis=1)
        sd[a:a + chunk] = top.std(axis=1, ddof=0)
    return mu, sd


def as_norm_scores(scores: np.ndarray, mu_e, sd_e, mu_t, sd_t) -> np.ndarray:
    """``0.5 * ((s - mu_e)/sd_e + (s - mu_t)/sd_t)`` elementwise; a zero std would divide by zero, so it
    is an error (it only happens with a degenerate cohort of identical vectors)."""
    sd_e, sd_t = np.asarray(sd_e, np.float64), np.asarray(sd_t, np.float64)
    if not (np.all(sd_e > 0) and np.all(sd_t > 0)):
        raise ScoringError("AS-norm: a cohort score std is zero (cohort of identical embeddings?)")
    s = np.asarray(scores, dtype=np.float64)
    return 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)


def as_norm(embeddings, trials, cohort, top_n: int = 300, scores: np.ndarray | None = None,
            source: str | None = None) -> np.ndarray:
    """AS-norm scores for every trial. ``cohort`` is an ``EmbeddingTable``/mapping or an (C, E) matrix;
    ``scores`` are the raw cosine scores when already computed (else computed here)."""
    enroll, test = list(trials.enroll), list(trials.test)
    if scores is None:
        scores = cosine_scores(embeddings, trials, source=source)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(enroll),):
        raise ScoringError(f"AS-norm: {scores.shape[0] if scores.ndim else 0} scores for {len(enroll)} trials")
    table = embeddings if isinstance(embeddings, EmbeddingTable) else None
    used = list(dict.fromkeys(enroll + test))
    if table is None:
        table = EmbeddingTable.from_mapping(embeddings, used)  # cosine_scores above already named any missing utt
    unit = l2_normalize(table.matrix[table.rows(used)], used, table.source)
    if isinstance(cohort, Mapping):
        cohort_table = cohort if isinstance(cohort, EmbeddingTable) else EmbeddingTable.from_mapping(cohort)
        cohort_matrix, cohort_names, cohort_src = cohort_table.matrix, cohort_table.utts, cohort_table.source
    else:
        cohort_matrix, cohort_names, cohort_src = np.asarray(cohort), None, "cohort"
    if cohort_matrix.ndim != 2 or cohort_matrix.shape[1] != unit.shape[1]:
        raise ScoringError(f"AS-norm: cohort {cohort_src or ''} has shape {cohort_matrix.shape}, "
                           f"expected (C, {unit.shape[1]}) to match the embeddings")
    cohort_unit = l2_normalize(cohort_matrix, cohort_names, cohort_src)
    mu, sd = cohort_stats(unit, cohort_unit, top_n)
    pos = {u: i for i, u in enumerate(used)}
    e = np.fromiter((pos[u] for u in enroll), dtype=np.int64, count=len(enroll))
    t = np.fromiter((pos[u] for u in test), dtype=np.int64, count=len(test))
    return as_norm_scores(scores, mu[e], sd[e], mu[t], sd[t])
