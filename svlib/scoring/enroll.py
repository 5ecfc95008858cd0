"""Enrolment models: trials whose enrolment side is a *speaker model* built from several utterances.

CN-Celeb (and NIST-style protocols) enrol each speaker with one or more utterances and test single files
against that enrolment. An enrolment list has one line per model, Kaldi ``spk2utt``-like::

    <enroll-id> <utt-1> [<utt-2> ...]

and the trial list pairs ``<enroll-id>`` with test utterances. The model of ``m`` with utterances
``u_1..u_K`` is the mean of their *length-normalised* embeddings (WeSpeaker's cnceleb recipe averages the
enrolment embeddings per model; normalising first keeps one loud, large-norm utterance from dominating
the direction):

    x_m = (1/K) sum_k  e_k / |e_k|

Cosine scoring and AS-norm ignore the norm of ``x_m``, so it is left unnormalised; its duration (for the
duration quality measures of calibration) is the total of its utterances' durations.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from svlib.scoring.metrics import QUALITY_FLAGS, EmbeddingTable, MissingEmbeddingError, ScoringError, l2_normalize

__all__ = ["EnrollError", "read_enroll_list", "write_enroll_list", "enroll_models", "with_enroll_models"]


class EnrollError(ValueError):
    """A malformed enrolment list (names the file and the line)."""


def read_enroll_list(path: str | os.PathLike) -> dict[str, list[str]]:
    """``<enroll-id> <utt> [<utt> ...]`` per line -> ``{enroll_id: [utt, ...]}`` (file order kept)."""
    from svlib.data.lists import ListError, read_fields

    path = Path(path)
    out: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    try:
        for number, fields in read_fields(path):
            if len(fields) < 2:
                raise EnrollError(f"{path}:{number}: expected '<enroll-id> <utt> [<utt> ...]', "
                                  f"got {len(fields)} field(s)")
            model, utts = fields[0], fields[1:]
            if model in out:
                raise EnrollError(f"{path}:{number}: enrolment id '{model}' repeated "
                                  f"(first on line {first_line[model]})")
            if len(set(utts)) != len(utts):
                dup = next(u for i, u in enumerate(utts) if u in utts[:i])
                raise EnrollError(f"{path}:{number}: utterance '{dup}' listed twice for '{model}'")
            out[model], first_line[model] = utts, number
    except ListError as err:
        raise EnrollError(str(err)) from None
    if not out:
        raise EnrollError(f"{path}: empty enrolment list")
    return out


def write_enroll_list(path: str | os.PathLike, models: dict[str, list[str]]) -> Path:
    from svlib.files import write_lines_atomic

    for model, utts in models.items():
        for token in (model, *utts):
            if not token or any(c.isspace() for c in token):
                raise EnrollError(f"enrolment id or utterance {token!r} is empty or contains whitespace")
    return write_lines_atomic(path, (f"{m} {' '.join(u)}" for m, u in models.items()))


def enroll_models(table: EmbeddingTable, models: dict[str, list[str]], source: str = "") -> EmbeddingTable:
    """One row per enrolment id: the mean of its utterances' unit-normalised embeddings (see module doc)."""
    where = f" of enrolment list {source}" if source else ""
    names = list(models)
    dim = table.matrix.shape[1] if table.utts else 0
    out = np.empty((len(names), dim), dtype=np.float32)
    durations = [] if table.durations is not None else None
    for i, model in enumerate(names):
        try:
            rows = table.rows(models[model])
        except MissingEmbeddingError as err:
            raise MissingEmbeddingError(f"enrolment '{model}'{where}: {err}") from None
        unit = l2_normalize(table.matrix[rows], models[model], table.source)
        out[i] = unit.astype(np.float64).mean(axis=0)
        if durations is not None:
            durations.append(float(np.sum(table.durations[rows])))
    models_table = EmbeddingTable(names, out, durations, source=f"enrolment models ({source or 'enrolment list'})")
    _carry_flags(table, models_table, models)
    return models_table


def _carry_flags(table: EmbeddingTable, out: EmbeddingTable, members: dict[str, list[str]]) -> None:
    """Quality flags of ``table`` onto ``out``: an entry of ``out`` is flagged when any of its ``members``
    (``table`` utterances) is: one narrow-band or truncated utterance is enough to make a model suspect."""
    for name in QUALITY_FLAGS:
        if table.flag(name) is not None:
            out.set_flags(name, {key: bool(table.flagged(name, utts)) for key, utts in members.items()})


def with_enroll_models(table: EmbeddingTable, models: dict[str, list[str]], trials, source: str = "") -> EmbeddingTable:
    """The embeddings the trials need: enrolment models under their ids plus the test utterances of ``table``.

    Every enrolment id of the trials must be in ``models`` and may not also be a test utterance (the same id
    would then mean two vectors).
    """
    unknown = sorted(set(trials.enroll) - set(models))
    if unknown:
        raise MissingEmbeddingError(f"trial enrolment id {unknown[0]!r} is not in the enrolment list {source or ''}"
                                    f" ({len(unknown)} unknown)".replace("  ", " "))
    clash = sorted(set(models) & set(trials.test))
    if clash:
        raise ScoringError(f"{clash[0]!r} is both an enrolment id{f' in {source}' if source else ''} and a test "
                           "utterance of the trials; rename the enrolment model")
    used = sorted(set(trials.enroll))
    enrolled = enroll_models(table, {m: models[m] for m in used}, source)
    tests = list(dict.fromkeys(trials.test))
    try:
        test_rows = table.rows(tests)
    except MissingEmbeddingError as err:
        raise MissingEmbeddingError(f"test side of the trials: {err}") from None
    matrix = np.concatenate([enrolled.matrix, table.matrix[test_rows].astype(np.float32)], axis=0)
    durations = None
    if table.durations is not None:
        durations = np.concatenate([enrolled.durations, table.durations[test_rows]])
    out = EmbeddingTable(enrolled.utts + tests, matrix, durations, source=table.source)
    _carry_flags(enrolled, out, {m: [m] for m in enrolled.utts})
    _carry_flags(table, out, {t: [t] for t in tests})
    return out
