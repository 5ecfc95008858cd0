"""Kaldi-style data directories, trial lists and typed audio lists (noise / RIR).

A data directory holds
  ``wav.scp``   ``<utt> <path>`` (or ``<recording> <path>`` when ``segments`` exists)
  ``utt2spk``   ``<utt> <speaker>``
  ``segments``  optional, ``<utt> <recording> <start-seconds> <end-seconds>`` (Kaldi; ``end`` -1 = end of file)
  ``utt2dur``   optional, ``<utt> <seconds>``, so that length-aware sampling need not open every file
  ``spk2utt``   derived; written for Kaldi tools, checked against ``utt2spk`` when present on load.

Paths in ``wav.scp`` are plain file names, never Kaldi command pipes. A relative path resolves against the
*current working directory* (the Kaldi convention), so svlib writes paths relative to the repo root and is
run from there; ``DataDir.load(..., root=...)`` resolves them against another folder instead.

Every parse error is a ``ListError`` that names the file and the 1-based line, because a list of a
million lines is only fixable when the message says where to look.
"""
from __future__ import annotations

import gc
import math
import os
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from svlib.audio import SAMPLE_RATE, AudioError, audio_info, audio_seconds, load_audio
from svlib.files import write_lines_atomic

__all__ = [
    "ListError",
    "DataDir",
    "Trials",
    "read_trials",
    "write_trials",
    "AudioEntry",
    "read_audio_list",
    "write_audio_list",
    "read_scp",
    "read_segment",
    "read_fields",
]


class ListError(ValueError):
    """A malformed or inconsistent list file (message names file and line)."""


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ListError(f"{path}: file not found")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) would otherwise become part of the first id
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ListError(f"{path}: not UTF-8 text ({err})") from None


def _raw_lines(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """Yield ``(line_number, stripped line, fields)`` for non-blank lines; CRLF and trailing blanks are tolerated."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split()
        if fields:
            yield number, line.strip(), fields


def read_fields(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line_number, fields)`` of every non-blank line of a whitespace-separated text file (for readers of
    other Kaldi-style lists, e.g. a corpus's own, whose errors then name the file and line)."""
    for number, _, fields in _raw_lines(path):
        yield number, fields


class _Table:
    """One Kaldi table in memory: ``values`` maps key -> the other field (a string; for 2 fields and for
    "rest of the line" tables) or fields (a list). Line numbers are looked up again only for error
    messages, so a million-line table costs one dict and no per-line bookkeeping. ``keys`` is the key
    column in file order when the fast path read it (tables written in one order can then be matched by
    one list comparison instead of set operations); ``typed`` says ``value_type`` was applied."""

    def __init__(self, path: Path, values: dict, keys: list[str] | None = None, typed: bool = False):
        self.path, self.values, self.keys, self.typed = path, values, keys, typed

    def same_keys(self, other: "_Table") -> bool:
        """Whether both were read by the fast path with the same keys in the same order (no key repeats there)."""
        return self.keys is not None and other.keys is not None and self.keys == other.keys

    def line_of(self, key: str) -> int:
        for number, line in enumerate(_read_text(self.path).splitlines(), start=1):
            if line.split(None, 1)[:1] == [key]:
                return number
        return 0


def _read_table(path: Path, num_fields: int | None, what: str, value_type=None) -> _Table:
    """Key -> other field(s). ``num_fields`` None means "key plus the rest of the line as one field".

    Fast path: split every line with C-level list/dict builders and accept the result when every line has the
    expected shape and no key repeats. Anything else (blank lines, bad lines, duplicates) goes through the
    line-by-line parser, which tolerates blanks and raises the error naming the file and line.
    ``value_type`` (2-field tables) converts the values on the fast path, so that e.g. utt2dur builds one
    dict of floats rather than one of strings and then one of floats; if it fails the values stay strings.
    """
    text = _read_text(path)
    with _no_gc():
        columns = _canonical_columns(text, num_fields)
        if columns is not None:
            keys, typed = columns[0], False
            if len(columns) == 2:
                rest = columns[1]
                if value_type is not None:
                    try:
                        rest, typed = list(map(value_type, rest)), True
                    except ValueError:
                        pass
            else:
                rest = map(list, zip(*columns[1:]))
            values = dict(zip(keys, rest))
            if len(values) == len(keys):  # else a repeated key: the line parser names it
                return _Table(path, values, keys, typed)
        lines = text.splitlines()
        if num_fields is None:
            rows = [line.split(None, 1) for line in lines]
            if set(map(len, rows)) == {2}:
                values = dict(rows)
                if len(values) == len(rows):
                    # Kaldi takes the rest of the line as the file name, so paths with inner spaces survive;
                    # trailing blanks are not part of it.
                    if _has_trailing_blank(text):
                        values = {k: v.rstrip() for k, v in values.items()}
                    return _Table(path, values)
        else:
            rows = [line.split() for line in lines]
            if set(map(len, rows)) == {num_fields}:
                values = dict(rows) if num_fields == 2 else {r[0]: r[1:] for r in rows}
                if len(values) == len(rows):
                    return _Table(path, values)
        return _Table(path, _read_table_by_line(path, lines, num_fields, what))


_OTHER_BLANKS = "\t\r\x0b\x0c\x1c\x1d\x1e\x1f"  # ASCII characters str.split()/splitlines() also treat as blanks


def _canonical_columns(text: str, num_fields: int | None) -> list[list[str]] | None:
    """The table's columns when ``text`` is in the form Kaldi and svlib write (ASCII, fields separated by one
    space, every line ending in a newline, no blank lines), else None, with no per-line Python work:

    * deleting every byte but spaces and newlines (one ``bytes.translate``) must leave ``k - 1`` spaces and a
      newline per line: then no line holds more than ``k`` fields, blank lines and doubled spaces fail;
    * one ``str.split`` of the whole file must give ``k`` fields per line: with at most ``k`` on each, every
      line has exactly ``k`` (a leading or trailing space would lose one), in order, so column ``i`` is
      ``fields[i::k]``.
    """
    k = 2 if num_fields is None else num_fields  # "rest of the line" is the second field when there is one space
    if not text.endswith("\n") or not text.isascii() or any(c in text for c in _OTHER_BLANKS):
        return None
    num_lines = text.count("\n")
    if text.encode("ascii").translate(None, _NOT_SPACE_OR_NEWLINE) != (b" " * (k - 1) + b"\n") * num_lines:
        return None
    tokens = text.split()
    if len(tokens) != k * num_lines:
        return None
    return [tokens[i::k] for i in range(k)]


_NOT_SPACE_OR_NEWLINE = bytes(b for b in range(256) if b not in b" \n")


def _has_trailing_blank(text: str) -> bool:
    """Whether some line may end in a blank: C-level substring scans for ASCII text; non-ASCII text (which may
    hold Unicode blanks) is always stripped."""
    return not text.isascii() or any(f"{blank}{end}" in text for blank in " \t\f\v" for end in "\n\r") or text.rstrip("\n\r") != text.rstrip()


def _read_table_by_line(path: Path, lines: list[str], num_fields: int | None, what: str) -> dict:
    out: dict = {}
    first: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if num_fields is None:
            if len(fields) < 2:
                raise ListError(f"{path}:{number}: expected '{what}', got {len(fields)} field(s)")
            value = line.split(None, 1)[1].rstrip()
        else:
            if len(fields) != num_fields:
                raise ListError(f"{path}:{number}: expected {num_fields} fields '{what}', got {len(fields)}")
            value = fields[1] if num_fields == 2 else fields[1:]
        key = fields[0]
        if key in out:
            raise ListError(f"{path}:{number}: duplicate key '{key}' (first on line {first[key]})")
        out[key], first[key] = value, number
    return out


def read_utt2spk(path: str | os.PathLike) -> dict[str, str]:
    """A lone ``utt2spk`` (``<utt> <speaker>`` per line) as utt -> speaker; errors name the file and line."""
    return _read_table(Path(path), 2, "<utt> <speaker>").values


def read_scp(path: str | os.PathLike) -> dict[str, str]:
    """A lone ``wav.scp`` (``<utt> <path>`` per line, the rest of the line being the path) as utt -> path."""
    path = Path(path)
    table = _read_table(path, None, "<utt> <path>")
    wavs = table.values
    piped = None
    if "|" in "".join(wavs.values()):  # as DataDir.load: the per-path test only when a bar exists
        piped = next((k for k, p in wavs.items() if p.endswith("|") or p.startswith("|")), None)
    if piped is not None:
        raise ListError(f"{path}:{table.line_of(piped)}: '{piped}' is a command pipe ({wavs[piped]!r}); pipes are not "
                        "supported, give a plain audio file path")
    if not wavs:
        raise ListError(f"{path}: empty list (no '<utt> <path>' lines)")
    return wavs


def _first_bad_token(values) -> int | None:
    """Index of the first empty or whitespace-holding string, or None; one C-level split for all of them.

    Joined with newlines, n clean tokens split back into exactly n parts and lose only the n - 1 separators;
    an empty token drops a part, an inner or edge blank loses more characters.
    """
    values = list(values)
    joined = "\n".join(values)
    parts = joined.split()
    if len(parts) == len(values) and len("".join(parts)) == len(joined) - max(len(values) - 1, 0):
        return None
    return next(i for i, v in enumerate(values) if not v or any(c.isspace() for c in v))


def _check_token(value: str, what: str) -> None:
    if _first_bad_token([value]) is not None:
        raise ListError(f"{what} {value!r} is empty or contains whitespace, which Kaldi lists cannot hold")


def _first_missing(keys: dict, present: dict) -> str | None:
    """First key of ``keys`` (in its order) not in ``present``; a C-level subset test first, so the common case
    builds nothing."""
    if keys.keys() <= present.keys():
        return None
    return next(k for k in keys if k not in present)


def _first_unmatched(a: dict, b: dict) -> tuple[str | None, str | None]:
    """``(first key of a missing from b, first key of b missing from a)``; equal sizes and a within b mean
    equal key sets, so the second scan is skipped in the common case."""
    missing = _first_missing(a, b)
    if missing is None and len(a) == len(b):
        return None, None
    return missing, _first_missing(b, a)



@contextmanager
def _no_gc():
    """Pause the cyclic garbage collector while building millions of small lists: none of them form cycles,
    and the collections their allocation triggers took most of the parse time (2.4 s -> 0.5 s per 1.1M lines)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class DataDir:
    """One Kaldi data directory in memory.

    ``wavs`` always maps *utterance* -> audio path, also for segmented directories (where several utterances
    share one recording's path); ``segments`` then gives each utterance's (start, end) in seconds, end None
    meaning "to the end of the recording". ``utt2rec`` keeps recording ids so that ``write`` reproduces them;
    ``durations`` (``utt2dur``) lets samplers avoid opening files. Read audio with ``load_wave`` and lengths
    with ``seconds``: both honour segments, whereas ``load_audio(wavs[utt])`` would return the whole recording.
    """

    wavs: dict[str, str]
    utt2spk: dict[str, str]
    segments: dict[str, tuple[float, float | None]] | None = None
    utt2rec: dict[str, str] | None = None
    durations: dict[str, float] | None = None
    _seconds_cache: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    # ``load`` has matched the ids of its tables (with file:line errors) and split them on blanks already.
    ids_checked: InitVar[bool] = False

    def __post_init__(self, ids_checked: bool = False) -> None:
        if not ids_checked:
            self._check_ids()
        self._check_segments()

    def _check_ids(self) -> None:
        # Set operations and one joined split instead of per-utterance Python checks: 1M-line lists load in seconds.
        no_speaker, utt = _first_unmatched(self.wavs, self.utt2spk)
        if no_speaker is not None:
            raise ListError(f"utterance '{no_speaker}' has a path but no speaker (missing from utt2spk)")
        if utt is not None:
            raise ListError(f"utterance '{utt}' has a speaker but no path (missing from wav.scp)")
        utts = list(self.utt2spk)
        bad = _first_bad_token(utts)
        if bad is not None:
            _check_token(utts[bad], "utterance id")
        bad = _first_bad_token(self.utt2spk.values())
        if bad is not None:
            _check_token(self.utt2spk[utts[bad]], f"speaker of '{utts[bad]}'")
        if self.durations is not None and not self.durations.keys() <= self.wavs.keys():
            extra = sorted(self.durations.keys() - self.wavs.keys())
            raise ListError(f"utt2dur names utterance '{extra[0]}' that is not in the directory")

    def _check_segments(self) -> None:
        if self.segments is not None:
            if set(self.segments) != set(self.wavs):
                odd = sorted(set(self.segments) ^ set(self.wavs))[0]
                raise ListError(f"utterance '{odd}' is in only one of segments and wav.scp: a segmented "
                                "directory needs a segment for every utterance")
            for utt, (start, end) in self.segments.items():
                if start < 0 or (end is not None and end <= start):
                    raise ListError(f"segment '{utt}': bad times start={start} end={end}")
        if self.utt2rec is not None:
            if self.segments is None or set(self.utt2rec) != set(self.segments):
                raise ListError("utt2rec needs segments with exactly the same utterances")
            rec_path: dict[str, str] = {}
            for utt, rec in self.utt2rec.items():
                _check_token(rec, f"recording of '{utt}'")
                if rec_path.setdefault(rec, self.wavs[utt]) != self.wavs[utt]:
                    raise ListError(f"recording '{rec}' maps to two paths: {rec_path[rec]!r} and {self.wavs[utt]!r}")

    # ---- views -------------------------------------------------------------------------------------
    @property
    def spk2utt(self) -> dict[str, list[str]]:
        """Speaker -> sorted utterances, speakers in sorted order."""
        out: dict[str, list[str]] = {}
        for utt in sorted(self.utt2spk):
            out.setdefault(self.utt2spk[utt], []).append(utt)
        return {spk: out[spk] for spk in sorted(out)}

    @property
    def speakers(self) -> list[str]:
        return sorted(set(self.utt2spk.values()))

    @property
    def utts(self) -> list[str]:
        return sorted(self.wavs)

    def __len__(self) -> int:
        return len(self.wavs)

    def __contains__(self, utt: object) -> bool:
        return utt in self.wavs

    def _need(self, utt: str) -> None:
        if utt not in self.wavs:
            raise ListError(f"unknown utterance '{utt}'")

    def seconds(self, utt: str) -> float:
        """Duration: from segments, else utt2dur, else the file header (cached)."""
        self._need(utt)
        if self.segments is not None and self.segments[utt][1] is not None:
            start, end = self.segments[utt]
            return round(end - start, 6)
        if self.durations is not None and utt in self.durations:
            return self.durations[utt]
        if utt not in self._seconds_cache:
            total = audio_seconds(self.wavs[utt])
            start = self.segments[utt][0] if self.segments is not None else 0.0
            self._seconds_cache[utt] = max(0.0, total - start)
        return self._seconds_cache[utt]

    def load_wave(self, utt: str, max_seconds: float | None = None, sample_rate: int = SAMPLE_RATE,
                  offset: float = 0.0) -> np.ndarray:
        """Mono float32 audio of ``utt`` at ``sample_rate``; only the frames of ``[offset, offset + max_seconds)``
        seconds into the utterance (its segment, for segmented directories) are read, for every format."""
        self._need(utt)
        path = self.wavs[utt]
        if self.segments is None:
            return load_audio(path, sample_rate=sample_rate, max_seconds=max_seconds, offset=offset)
        start, end = self.segments[utt]
        start += offset
        if end is not None and start >= end:
            raise AudioError(f"{path}: offset {offset:.3f} s is past the end of segment '{utt}'")
        if max_seconds is not None:
            end = start + max_seconds if end is None else min(end, start + max_seconds)
        return read_segment(path, start, end, sample_rate=sample_rate)

    def subset(self, utts) -> "DataDir":
        """A new DataDir with only ``utts`` (all must exist)."""
        keep = sorted(set(utts))
        for utt in keep:
            self._need(utt)

        def pick(table):
            return None if table is None else {u: table[u] for u in keep if u in table}

        durations = pick(self.durations)
        return DataDir(wavs={u: self.wavs[u] for u in keep}, utt2spk={u: self.utt2spk[u] for u in keep},
                       segments=pick(self.segments), utt2rec=pick(self.utt2rec), durations=durations)

    # ---- files -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, dirpath: str | os.PathLike, check_files: bool = False, root: str | os.PathLike | None = None) -> "DataDir":
        """Read a data directory. ``check_files`` verifies that every audio path exists; ``root`` resolves
        relative paths against that folder instead of the current working directory."""
        dirpath = Path(dirpath)
        if not dirpath.is_dir():
            raise ListError(f"{dirpath}: data directory not found")
        scp_path, u2s_path, seg_path = dirpath / "wav.scp", dirpath / "utt2spk", dirpath / "segments"
        scp = _read_table(scp_path, None, "<id> <path>")
        u2s = _read_table(u2s_path, 2, "<utt> <speaker>")

        def resolve(p: str) -> str:
            return os.path.join(root, p) if root is not None and not os.path.isabs(p) else p

        piped = None
        if "|" in "".join(scp.values.values()):  # one C-level scan; the per-path test only when a bar exists
            piped = next((k for k, p in scp.values.items() if p.endswith("|") or p.startswith("|")), None)
        if piped is not None:
            raise ListError(f"{scp_path}:{scp.line_of(piped)}: command pipes are not supported, give a plain file path")
        if check_files:
            for key, p in scp.values.items():
                if not os.path.isfile(resolve(p)):
                    raise ListError(f"{scp_path}:{scp.line_of(key)}: audio file of '{key}' not found: {resolve(p)} "
                                    f"(relative paths resolve against {root or os.getcwd()})")

        segments = utt2rec = None
        if seg_path.exists():
            seg = _read_table(seg_path, 4, "<utt> <recording> <start> <end>")
            segments, utt2rec, wavs = {}, {}, {}
            for utt, (rec, start_s, end_s) in seg.values.items():
                try:
                    start, end = float(start_s), float(end_s)
                except ValueError:
                    raise ListError(f"{seg_path}:{seg.line_of(utt)}: start/end must be numbers, got {start_s!r} {end_s!r}") from None
                if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
                    raise ListError(f"{seg_path}:{seg.line_of(utt)}: bad start time {start_s!r}")
                if end == -1:
                    end_v = None
                elif end <= start:
                    raise ListError(f"{seg_path}:{seg.line_of(utt)}: end {end_s} is not after start {start_s}")
                else:
                    end_v = end
                if rec not in scp.values:
                    raise ListError(f"{seg_path}:{seg.line_of(utt)}: recording '{rec}' of segment '{utt}' is not in {scp_path}")
                segments[utt], utt2rec[utt], wavs[utt] = (start, end_v), rec, resolve(scp.values[rec])
            keyed, keyed_path = seg, seg_path
        else:
            wavs = scp.values if root is None else {utt: resolve(p) for utt, p in scp.values.items()}
            keyed, keyed_path = scp, scp_path

        no_speaker, utt = (None, None) if keyed.same_keys(u2s) else _first_unmatched(keyed.values, u2s.values)
        if no_speaker is not None:
            raise ListError(f"{keyed_path}:{keyed.line_of(no_speaker)}: utterance '{no_speaker}' is missing from {u2s_path}")
        if utt is not None:
            raise ListError(f"{u2s_path}:{u2s.line_of(utt)}: utterance '{utt}' is missing from {keyed_path}")
        utt2spk = u2s.values

        durations = None
        dur_path = dirpath / "utt2dur"
        if dur_path.exists():
            durations = _read_durations(_read_table(dur_path, 2, "<utt> <seconds>", value_type=float), u2s, u2s_path)

        s2u_path = dirpath / "spk2utt"
        if s2u_path.exists():
            # A stale spk2utt (utt2spk edited, spk2utt not regenerated) silently breaks Kaldi tools; catch it.
            seen: set[str] = set()
            for number, fields in read_fields(s2u_path):
                spk, utts = fields[0], fields[1:]
                if set(map(utt2spk.get, utts)) != {spk}:  # C-level lookups; the loop below only names the culprit
                    for utt in utts:
                        if utt2spk.get(utt) != spk:
                            raise ListError(f"{s2u_path}:{number}: '{utt}' listed under '{spk}' but utt2spk says "
                                            f"{utt2spk.get(utt)!r}; delete spk2utt or regenerate it")
                seen.update(utts)
            if len(seen) != len(utt2spk):
                missing = sorted(set(utt2spk) - seen)[0]
                raise ListError(f"{s2u_path}: utterance '{missing}' of utt2spk is not listed; regenerate spk2utt")

        try:
            return cls(wavs=wavs, utt2spk=utt2spk, segments=segments, utt2rec=utt2rec, durations=durations,
                       ids_checked=True)
        except ListError as err:
            raise ListError(f"{dirpath}: {err}") from None

    def write(self, dirpath: str | os.PathLike) -> Path:
        """Write wav.scp, utt2spk, spk2utt (+ segments, utt2dur); lines sorted like Kaldi's C-locale sort."""
        dirpath = Path(dirpath)
        dirpath.mkdir(parents=True, exist_ok=True)
        utts = self.utts
        stale = ["segments", "utt2dur"]
        if self.segments is not None:
            utt2rec = self.utt2rec or self._derive_recordings()
            rec2path = {utt2rec[u]: self.wavs[u] for u in utts}
            write_lines_atomic(dirpath / "wav.scp", (f"{r} {rec2path[r]}" for r in sorted(rec2path)))
            write_lines_atomic(dirpath / "segments", (f"{u} {utt2rec[u]} {_fmt_time(self.segments[u][0])} "
                                                f"{_fmt_time(self.segments[u][1])}" for u in utts))
            stale.remove("segments")
        else:
            write_lines_atomic(dirpath / "wav.scp", (f"{u} {self.wavs[u]}" for u in utts))
        write_lines_atomic(dirpath / "utt2spk", (f"{u} {self.utt2spk[u]}" for u in utts))
        write_lines_atomic(dirpath / "spk2utt", (f"{s} {' '.join(us)}" for s, us in self.spk2utt.items()))
        if self.durations is not None:
            write_lines_atomic(dirpath / "utt2dur", (f"{u} {self.durations[u]:.4f}".rstrip("0").rstrip(".")
                                               for u in utts if u in self.durations))
            stale.remove("utt2dur")
        for name in stale:
            # A segments file left from an earlier write would re-key wav.scp on the next load.
            (dirpath / name).unlink(missing_ok=True)
        return dirpath

    def _derive_recordings(self) -> dict[str, str]:
        """Recording ids from file stems (unique per path), for segmented dirs built without utt2rec."""
        rec_of_path: dict[str, str] = {}
        used: set[str] = set()
        for p in sorted(set(self.wavs.values())):
            base = "".join("_" if c.isspace() else c for c in Path(p).stem) or "rec"
            name, k = base, 1
            while name in used:
                k += 1
                name = f"{base}-{k}"
            used.add(name)
            rec_of_path[p] = name
        return {u: rec_of_path[self.wavs[u]] for u in self.wavs}


def _read_durations(table: _Table, u2s: _Table, u2s_path: Path) -> dict[str, float]:
    """utt2dur values as floats; every check is vectorised, and only a failing one looks up its line."""
    path = table.path
    utt = None if table.same_keys(u2s) else _first_missing(table.values, u2s.values)
    if utt is not None:
        raise ListError(f"{path}:{table.line_of(utt)}: utterance '{utt}' is missing from {u2s_path}")
    if table.typed:
        values = list(table.values.values())
        seconds = np.array(values, dtype=np.float64)
        if np.isfinite(seconds).all() and (seconds > 0).all():
            return table.values
    try:
        values = list(map(float, table.values.values()))
    except ValueError:
        utt, value = next((u, v) for u, v in table.values.items() if not _is_float(v))
        raise ListError(f"{path}:{table.line_of(utt)}: duration must be a number, got {value!r}") from None
    seconds = np.array(values, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(seconds) & (seconds > 0)))
    if bad.size:
        utt = list(table.values)[int(bad[0])]
        number = table.line_of(utt)
        text = _read_text(path).splitlines()[number - 1].split()[1] if table.typed else table.values[utt]
        raise ListError(f"{path}:{number}: duration must be positive, got {text!r}")
    return dict(zip(table.values, values))


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _fmt_time(t: float | None) -> str:
    return "-1" if t is None else f"{t:.3f}"


def read_segment(path: str | os.PathLike, start: float, end: float | None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Frames [start, end) seconds of ``path`` (end None: to the end) as mono float32 at ``sample_rate``.

    Seeks instead of decoding the whole recording (``load_audio`` with an offset, for every format it reads):
    a 1-hour file cut into 3-s segments would otherwise be decoded once per segment.
    """
    info = audio_info(path)
    first = int(round(start * info.sample_rate))
    last = info.frames if end is None else int(round(end * info.sample_rate))
    # A few ms of overrun come from rounding times to milliseconds; more means a wrong segments file.
    # (Container lengths of compressed files are metadata; their decoders pad by up to a frame, so 0.1 s.)
    slack = 0.01 if info.backend == "soundfile" else 0.1
    if first >= info.frames or last > info.frames + int(slack * info.sample_rate):
        raise AudioError(f"{path}: segment {start:.3f}-{end if end is not None else 'end'} s lies outside "
                         f"the recording ({info.seconds:.3f} s)")
    span = None if end is None else (min(last, info.frames) - first) / info.sample_rate
    try:
        return load_audio(path, sample_rate=sample_rate, max_seconds=span, offset=start)
    except AudioError as err:
        if "empty audio" in str(err):
            raise AudioError(f"{path}: empty segment {start}-{end} s") from None
        raise


# ---- trials ----------------------------------------------------------------------------------------
@dataclass
class Trials:
    """Verification trials; ``labels`` 1 = same speaker (target), 0 = different (non-target)."""

    enroll: list[str]
    test: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.enroll, self.test = list(self.enroll), list(self.test)
        labels = np.asarray(self.labels)
        if not (len(self.enroll) == len(self.test) == len(labels)):
            raise ListError(f"trials: enroll/test/labels lengths differ ({len(self.enroll)}, {len(self.test)}, {len(labels)})")
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ListError("trials: labels must be 0 or 1")
        self.labels = labels.astype(np.int8).reshape(-1)

    def __len__(self) -> int:
        return len(self.enroll)

    @property
    def num_target(self) -> int:
        return int(self.labels.sum())

    @property
    def num_nontarget(self) -> int:
        return len(self) - self.num_target

    @property
    def utterances(self) -> set[str]:
        return set(self.enroll) | set(self.test)


_KALDI_LABELS = {"target": 1, "nontarget": 0}


def read_trials(path: str | os.PathLike) -> Trials:
    """Read ``1 enroll test`` (VoxCeleb) or ``enroll test target|nontarget`` (Kaldi); the form is taken
    from the first line and every other line must match it."""
    path = Path(path)
    enroll, test, labels = [], [], []
    form = None
    for number, fields in read_fields(path):
        if len(fields) != 3:
            raise ListError(f"{path}:{number}: expected 3 fields ('1 enroll test' or 'enroll test target'), got {len(fields)}")
        if form is None:
            # Check the Kaldi word first: a Kaldi enroll id could legitimately be "1", a test id is never "target".
            form = "kaldi" if fields[2] in _KALDI_LABELS else "voxceleb" if fields[0] in ("0", "1") else None
            if form is None:
                raise ListError(f"{path}:{number}: neither '0|1 enroll test' nor 'enroll test target|nontarget': {' '.join(fields)!r}")
        if form == "kaldi":
            if fields[2] not in _KALDI_LABELS:
                raise ListError(f"{path}:{number}: label must be 'target' or 'nontarget' (Kaldi form), got {fields[2]!r}")
            enroll.append(fields[0]); test.append(fields[1]); labels.append(_KALDI_LABELS[fields[2]])
        else:
            if fields[0] not in ("0", "1"):
                raise ListError(f"{path}:{number}: label must be 0 or 1 (VoxCeleb form), got {fields[0]!r}")
            labels.append(int(fields[0])); enroll.append(fields[1]); test.append(fields[2])
    if not labels:
        raise ListError(f"{path}: no trials")
    return Trials(enroll, test, np.asarray(labels, dtype=np.int8))


def write_trials(path: str | os.PathLike, trials: Trials, form: str = "voxceleb") -> Path:
    """Write trials in ``voxceleb`` (``1 enroll test``) or ``kaldi`` (``enroll test target``) form, LF endings."""
    if form not in ("voxceleb", "kaldi"):
        raise ValueError(f"trial form must be 'voxceleb' or 'kaldi', got {form!r}")
    for e, t in zip(trials.enroll, trials.test):
        _check_token(e, "trial utterance")
        _check_token(t, "trial utterance")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "voxceleb":
        lines = (f"{int(l)} {e} {t}" for e, t, l in zip(trials.enroll, trials.test, trials.labels))
    else:
        lines = (f"{e} {t} {'target' if l else 'nontarget'}" for e, t, l in zip(trials.enroll, trials.test, trials.labels))
    write_lines_atomic(path, lines)
    return path


# ---- noise / RIR lists -----------------------------------------------------------------------------
class AudioEntry(NamedTuple):
    """One line of a noise or RIR list: ``name category path`` (MUSAN noise/music/speech; RIR room size)."""

    name: str
    category: str
    path: str


def read_audio_list(path: str | os.PathLike, check_files: bool = False) -> list[AudioEntry]:
    """Read a ``name category path`` list (noise or RIR); relative paths resolve against the cwd."""
    path = Path(path)
    out, seen = [], {}
    for number, fields in read_fields(path):
        if len(fields) != 3:
            raise ListError(f"{path}:{number}: expected 3 fields '<name> <category> <path>', got {len(fields)}")
        name, category, file = fields
        if name in seen:
            raise ListError(f"{path}:{number}: duplicate name '{name}' (first on line {seen[name]})")
        if check_files and not os.path.isfile(file):
            raise ListError(f"{path}:{number}: audio file of '{name}' not found: {file}")
        seen[name] = number
        out.append(AudioEntry(name, category, file))
    return out


def write_audio_list(path: str | os.PathLike, entries) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = sorted(entries)
    for e in entries:
        for value, what in zip(e, ("name", "category", "path")):
            _check_token(value, what)
    write_lines_atomic(path, (f"{e.name} {e.category} {e.path}" for e in entries))
    return path
