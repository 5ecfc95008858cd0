"""Download the public corpora of the demo when ``../shared/data`` is absent: resumable, checksummed, with progress.

    python -m svlib.corpora.download --list
    python -m svlib.corpora.download librispeech-test-other librispeech-train-clean-100 speechocean762 esc50 \\
        [--root data/downloads] [--no-extract]

Each archive goes to ``ROOT/<file>`` and is unpacked into ``ROOT/<name>/`` (a ``.complete`` stamp marks a
finished extraction, so a rerun skips it). Transfers are **resumable**: bytes arrive in ``ROOT/<file>.part``;
after a cut (lost connection, killed process) the next attempt asks for the rest with an HTTP ``Range:
bytes=<have>-`` request and appends it. ``retries`` attempts are made in one call, and a rerun resumes too.

**Resumes are validated**, so a part is only ever continued with bytes of the same remote file:

- Beside the part, ``<file>.part.json`` (written atomically) remembers the URL, the remote size and the
  validator the server sent with the first bytes (``ETag``, else ``Last-Modified``). A part without it (a
  foreign file, an older svlib's part) or for another URL is not resumed: the download starts from zero.
- The resume request carries ``If-Range: <validator>``: a server whose file changed since answers 200 with
  the whole new file, which replaces the part.
- A 206 reply must carry ``Content-Range: bytes <have>-.../<size>`` starting at the requested offset and
  naming the remembered size; a 416 reply ("nothing past what you have") counts as complete only when its
  ``Content-Range: bytes */<size>`` equals the part's size. Anything else discards the part and restarts.
- Without a validator (a server that sends neither header) a part is resumed only when a digest will check
  the result (published, or recorded earlier); otherwise the download restarts from zero.

**Checksums.** A finished file is verified before it replaces anything: its MD5 and SHA-256 against the
published digests where there are some (LibriSpeech: the MD5s of openslr's ``md5sum.txt`` and the SHA-256s
torchaudio pins). speechocean762 (openslr 101) and ESC-50's GitHub archive publish none: their size, MD5 and
SHA-256 are recorded in ``ROOT/checksums.json`` on the first complete download ("trust on first use") and every
later download is checked against that record. A mismatch moves the file to ``<file>.bad`` and fails. A file
assembled from a resume never becomes that record (see ``download``).

Errors are one line (``DownloadError``): no network / connection refused, HTTP errors, a cut that retries did
not overcome (rerun to resume), a bad checksum, an unsafe archive member (absolute or ``..`` paths).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from svlib.files import write_json

__all__ = ["SOURCES", "DownloadError", "Source", "download", "extract", "fetch", "file_digests"]

CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download that cannot complete; the message is one line and says what to do."""


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    what: str
    licence: str
    md5: str | None = None      # published digests; None: trust on first use (ROOT/checksums.json)
    sha256: str | None = None
    file: str | None = None     # local file name when the URL's last part is not a good one

    @property
    def filename(self) -> str:
        return self.file or self.url.rsplit("/", 1)[-1]


OPENSLR = "https://www.openslr.org/resources"
SOURCES = {s.name: s for s in (
    Source("librispeech-test-other", f"{OPENSLR}/12/test-other.tar.gz",
           "LibriSpeech test-other (Panayotov et al., ICASSP 2015; openslr 12): the demo's test speakers",
           "CC BY 4.0", md5="fb5a50374b501bb3bac4815ee91d3135",
           sha256="d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29"),
    Source("librispeech-train-clean-100", f"{OPENSLR}/12/train-clean-100.tar.gz",
           "LibriSpeech train-clean-100 (openslr 12): training speakers", "CC BY 4.0",
           md5="2a93770f6d5c6c964bc36631d331a522",
           sha256="d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2"),
    Source("speechocean762", f"{OPENSLR}/101/speechocean762.tar.gz",
           "speechocean762 (Zhang et al., Interspeech 2021; openslr 101): children and adults reading English",
           "CC BY 4.0 (openslr 101); free for commercial and non-commercial use (corpus README)"),
    Source("esc50", "https://github.com/karolpiczak/ESC-50/archive/refs/heads/master.zip",
           "ESC-50 (Piczak, ACM MM 2015), whose esc10 column selects ESC-10: environmental noise",
           "ESC-50 CC BY-NC 3.0; its ESC-10 subset CC BY 3.0 (per-clip Freesound licences)",
           file="ESC-50-master.zip"),
)}


def file_digests(path: str | os.PathLike) -> dict:
    """``{"size", "md5", "sha256"}`` of a file, in one pass."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
            size += len(block)
    return {"size": size, "md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def _check(path: Path, got: dict, expected: dict, url: str) -> None:
    for key in ("size", "md5", "sha256"):
        if expected.get(key) is not None and got[key] != expected[key]:
            bad = path.with_name(path.name.removesuffix(".part") + ".bad")
            os.replace(path, bad)
            raise DownloadError(f"{url}: checksum mismatch ({key} {got[key]}, expected {expected[key]}); the file "
                                f"was moved to {bad}: delete it and rerun (or check the source)")


def _open(url: str, offset: int, validator: str | None, timeout: float):
    """The response to a GET of ``url`` from byte ``offset``; a 416 reply to a range request is returned too
    (its ``Content-Range`` tells whether the part is complete)."""
    headers = {"User-Agent": "svlib-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator is not None:
            headers["If-Range"] = validator  # a changed remote file makes the server answer 200 with all of it
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return err
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (socket.timeout, TimeoutError) as err:
        raise _Cut(f"timeout ({err})") from None
    except urllib.error.URLError as err:  # refused, no route, unknown host: no point retrying at once
        if isinstance(err.reason, (socket.timeout, TimeoutError)):
            raise _Cut(f"timeout ({err.reason})") from None
        raise DownloadError(f"{url}: cannot connect ({err.reason}); no network? Rerun when online, or copy the "
                            "corpora by hand") from None


class _Cut(Exception):
    """The transfer stopped early; the next attempt resumes."""


@dataclass
class _PartState:
    """What ``<file>.part.json`` remembers about the remote file whose bytes the part holds."""

    url: str
    validator: str | None  # strong ETag, else Last-Modified: sent as If-Range on a resume
    size: int | None       # the remote file's size
    resumed: bool = False  # the part holds bytes of more than one response


def _state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_state(part: Path, url: str) -> _PartState | None:
    """The part's remembered state, or None when there is none for ``url`` (then the part cannot be resumed)."""
    try:
        data = json.loads(_state_path(part).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("url") != url:
        return None
    return _PartState(url, data.get("validator"), data.get("size"), bool(data.get("resumed")))


def _discard(part: Path) -> None:
    """Remove the part, then its state (a kill in between leaves a state without a part, which is ignored)."""
    part.unlink(missing_ok=True)
    _state_path(part).unlink(missing_ok=True)


def _validator(headers) -> str | None:
    """The validator ``If-Range`` may carry: a strong ETag (a weak ``W/`` one is not allowed there), else
    ``Last-Modified``; None when the server sent neither."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes <first>-<last>/<size>`` -> ``(first, size)``; ``bytes */<size>`` -> ``(None, size)``; a size of
    ``*`` or an unparsable header gives None there."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if match is None:
        return None, None
    first, size = match.groups()
    return (None if first is None else int(first)), (None if size == "*" else int(size))


def _transfer(url: str, part: Path, timeout: float, bar, checked: bool) -> None:
    """One attempt: append the rest of ``url`` to ``part``, or restart it from zero where the part cannot be
    shown to hold the start of the same remote file (module docstring). ``checked``: a digest will verify the
    result, so a part may be resumed even from a server that sends no validator."""
    if not _attempt(url, part, timeout, bar, checked):
        _attempt(url, part, timeout, bar, checked)  # from zero: the part was discarded


def _attempt(url: str, part: Path, timeout: float, bar, checked: bool) -> bool:
    """``_transfer``'s one request; False when the reply showed the part unusable: it was discarded, and the
    caller starts again from zero."""
    state = _read_state(part, url) if part.exists() else None
    if state is None or not (state.validator is not None or checked):
        _discard(part)
        state = None
    offset = part.stat().st_size if state is not None else 0
    response = _open(url, offset, None if state is None else state.validator, timeout)
    with response:
        status = response.status
        if status == 416:  # "nothing past byte <offset>": complete only when the remote size is what we have
            size = _content_range(response.headers.get("Content-Range"))[1]
            if size == offset and state.size in (None, size):
                return True
            _discard(part)
            return False
        if status == 206:
            first, size = _content_range(response.headers.get("Content-Range"))
            if first != offset or size is None or (offset and state.size is not None and size != state.size):
                if not offset:
                    raise DownloadError(f"{url}: HTTP 206 with Content-Range "
                                        f"{response.headers.get('Content-Range')!r} to a request for the whole file")
                _discard(part)  # not the rest of the bytes we have: never splice it on
                return False
            total = size
        elif status == 200:  # the whole file: a server without Range support, or If-Range saw a changed file
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            offset = 0
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status}")
        if offset:
            state.resumed = True
            write_json(_state_path(part), asdict(state))
        else:
            _discard(part)  # before the new state: a kill in between must not pair old bytes with it
            write_json(_state_path(part), asdict(_PartState(url, _validator(response.headers), total)))
        if bar is not None:
            bar.reset(total=total)
            bar.update(offset)
        received = offset
        with open(part, "ab" if offset else "wb") as f:
            while True:
                try:
                    block = response.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as err:
                    raise _Cut(f"{type(err).__name__} at {received:,} bytes") from None
                if not block:
                    break
                f.write(block)  # what arrived stays on disk: the next attempt asks for the rest
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
        if total is not None and received < total:
            raise _Cut(f"connection closed at {received:,} of {total:,} bytes")
    return True


def _record_path(dest: Path) -> Path:
    return dest.parent / "checksums.json"


def _records(dest: Path) -> dict:
    path = _record_path(dest)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DownloadError(f"{path}: not valid JSON; delete it to record the checksums again") from None


def download(url: str, dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
             size: int | None = None, retries: int = 3, timeout: float = 30.0, progress: bool = True,
             backoff: float = 1.0) -> Path:
    """``url`` -> ``dest``, resumable and verified (module docstring); returns ``dest``.

    Without ``md5``/``sha256``/``size`` the digests recorded in ``dest.parent/checksums.json`` by the first
    complete download are the reference, and the first download records them, but only when its bytes came in
    one response. A file assembled from a resume is kept and used (its resume was validated: If-Range, the
    offset and the size) yet no digest is recorded for it, and a note says so: the record is the reference
    every later download is judged by, so it must not rest on the assumption that two responses, perhaps
    days apart, sent parts of one file. Downloading the whole file again just to record it would double
    the largest transfers for that assumption; to record one, delete the file and download it again.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    published = {"size": size, "md5": md5, "sha256": sha256}
    records = _records(dest)
    recorded = records.get(dest.name)
    expected = published if any(v is not None for v in published.values()) else (recorded or {})
    if dest.is_file():
        if expected:
            _check(dest, file_digests(dest), expected, url)
        return dest
    part = dest.with_name(dest.name + ".part")
    bar = None
    if progress:
        from tqdm import tqdm

        # delay: no bar at all for a transfer that fails at once (no network), only the one-line error
        bar = tqdm(desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, mininterval=0.5,
                   delay=1.0)
    try:
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, timeout, bar, checked=bool(expected))
                break
            except _Cut as cut:
                if attempt == retries:
                    have = part.stat().st_size if part.exists() else 0
                    raise DownloadError(f"{url}: transfer cut ({cut}) after {retries + 1} attempt(s); {have:,} bytes "
                                        f"kept in {part}: rerun to resume") from None
                time.sleep(backoff * (attempt + 1))
    finally:
        if bar is not None:
            bar.close()
    state = _read_state(part, url)
    resumed = state is None or state.resumed
    got = file_digests(part)
    if expected:
        _check(part, got, expected, url)
    os.replace(part, dest)
    _state_path(part).unlink(missing_ok=True)
    if recorded:
        return dest
    if not expected and resumed:
        print(f"note: {dest} was assembled from a resumed transfer: no first-use checksum recorded for it "
              f"(to record one, delete it and download again: a transfer in one piece records it)", file=sys.stderr)
        return dest
    records[dest.name] = {**got, "url": url,
                          "origin": "published" if expected else "first complete download (trust on first use)"}
    write_json(_record_path(dest), records)
    return dest


def _safe_members(names: list[str], archive: Path) -> None:
    for name in names:
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise DownloadError(f"{archive}: unsafe member path {name!r} (absolute or '..'); not extracted")


def extract(archive: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Unpack a .tar.gz / .tar / .zip into ``out`` once (``out/.complete`` marks a finished extraction)."""
    archive, out = Path(archive), Path(out)
    stamp = out / ".complete"
    if stamp.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                _safe_members(z.namelist(), archive)
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                _safe_members(t.getnames(), archive)
                t.extractall(out, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise DownloadError(f"{archive}: cannot unpack ({err}); delete it and rerun") from None
    stamp.write_text(archive.name + "\n")
    return out


def fetch(name: str, root: str | os.PathLike = "data/downloads", unpack: bool = True, **kwargs) -> Path:
    """Download (and unpack into ``root/name``) one of ``SOURCES``; returns the folder, or the archive."""
    if name not in SOURCES:
        raise DownloadError(f"unknown corpus {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    archive = download(source.url, Path(root) / source.filename, md5=source.md5, sha256=source.sha256, **kwargs)
    return extract(archive, Path(root) / name) if unpack else archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svlib.corpora.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"corpora to fetch: {', '.join(SOURCES)}")
    parser.add_argument("--root", default="data/downloads")
    parser.add_argument("--no-extract", action="store_true")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--list", action="store_true", help="print the sources, their licences and checksums")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for s in SOURCES.values():
            digest = f"md5 {s.md5}" if s.md5 else "no published checksum (recorded on first download)"
            print(f"{s.name}: {s.url}\n    {s.what}; licence: {s.licence}; {digest}")
        return 0
    try:
        for name in args.names:
            print(f"{name}: {fetch(name, args.root, unpack=not args.no_extract, retries=args.retries)}")
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
