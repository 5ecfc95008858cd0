"""The corpus downloader against a local HTTP server (127.0.0.1) that supports Range and can cut a transfer."""
from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from svlib.corpora.download import SOURCES, DownloadError, download, extract, file_digests, main


def _archive() -> bytes:
    """A small .tar.gz of two files (~200 kB: noise does not compress, so it needs many reads)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in (("corpus/a.bin", np.random.default_rng(0).bytes(200_000)), ("corpus/README", b"hello\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    """Serves ``files`` (path -> bytes); ``cut[path] = n``: the next GET of it sends only ``n`` bytes (its
    headers announce all of them) and drops the connection. Records each request's Range and If-Range header.

    Like a real server it sends an ETag (a digest of the content; ``etag = False``: none) and honours If-Range
    (a stale validator: the whole file, 200). ``wrong_range = True``: a broken server that answers every
    range request 206 with the whole file (``Content-Range: bytes 0-...``)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ranges: list[str | None] = []
        self.if_ranges: list[str | None] = []
        self.etag = True
        self.wrong_range = False
        self.sent = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = owner.files.get(self.path)
                owner.ranges.append(self.headers.get("Range"))
                if data is None:
                    self.send_error(404)
                    return
                owner.if_ranges.append(self.headers.get("If-Range"))
                etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
                stale = self.headers.get("If-Range") not in (None, etag)
                start = 0
                if self.headers.get("Range") and not stale:
                    start = 0 if owner.wrong_range else int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if owner.etag:
                    self.send_header("ETag", etag)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                n = owner.cut.pop(self.path, None)
                chunk = body[:n] if n is not None else body
                # counted before the write: the client may hold every byte (and the test assert) before this
                # thread runs again, so counting after the write raced with the assertion under load
                owner.sent += len(chunk)
                self.wfile.write(chunk)
                if n is not None:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server()
    s.files["/c.tar.gz"] = _archive()
    yield s
    s.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_complete_download_is_verified_and_extracted(server, tmp_path):
    data = server.files["/c.tar.gz"]
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", md5=hashlib.md5(data).hexdigest(),
                    sha256=_sha(data), progress=True)
    assert dest.read_bytes() == data and not (tmp_path / "c.tar.gz.part").exists()
    out = extract(dest, tmp_path / "c")
    assert (out / "corpus" / "README").read_text() == "hello\n" and (out / ".complete").is_file()
    record = json.loads((tmp_path / "checksums.json").read_text())["c.tar.gz"]
    assert record["sha256"] == _sha(data) and record["size"] == len(data) and record["origin"] == "published"
    before = len(server.ranges)
    assert download(f"{server.url}/c.tar.gz", dest, sha256=_sha(data)) == dest   # present and good: no request
    assert len(server.ranges) == before


def test_resume_after_a_cut(server, tmp_path):
    data = server.files["/c.tar.gz"]
    server.cut["/c.tar.gz"] = 70_000
    with pytest.raises(DownloadError, match=r"transfer cut .* rerun to resume"):
        download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", sha256=_sha(data), retries=0, progress=False)
    part = tmp_path / "c.tar.gz.part"
    assert part.stat().st_size == 70_000 and not (tmp_path / "c.tar.gz").exists()
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", sha256=_sha(data), retries=0, progress=False)
    assert dest.read_bytes() == data
    assert server.ranges == [None, "bytes=70000-"]            # the second request asked only for the rest
    assert server.sent == len(data)                           # no byte was sent twice


def test_retries_resume_within_one_call(server, tmp_path):
    data = server.files["/c.tar.gz"]
    server.cut["/c.tar.gz"] = 123_457
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", sha256=_sha(data), retries=2, backoff=0.0,
                    progress=False)
    assert dest.read_bytes() == data and server.ranges == [None, "bytes=123457-"]


# ---- resumes are validated: no byte of another file, or of a stale part, ends up in a download ----------
def _cut_first_try(server, tmp_path, at: int = 70_000):
    """A download with no digest (trust on first use, like speechocean762 / ESC-50) cut after ``at`` bytes."""
    server.cut["/c.tar.gz"] = at
    with pytest.raises(DownloadError, match="rerun to resume"):
        download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", retries=0, progress=False)
    assert (tmp_path / "c.tar.gz.part").stat().st_size == at


def _record(tmp_path):
    path = tmp_path / "checksums.json"
    return json.loads(path.read_text()).get("c.tar.gz") if path.is_file() else None


def test_a_416_is_complete_only_at_the_remote_size(server, tmp_path):
    data = server.files["/c.tar.gz"]
    part = tmp_path / "c.tar.gz.part"
    _cut_first_try(server, tmp_path)
    part.write_bytes(data + bytes(70))   # 70 bytes longer than the file (200,402 vs 200,332 in the issue)
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", retries=0, progress=False)
    assert dest.read_bytes() == data     # the 416 said "*/200332": the part was dropped and fetched whole
    assert server.ranges == [None, f"bytes={len(data) + 70}-", None]
    assert _record(tmp_path)["origin"] == "first complete download (trust on first use)"
    assert not part.exists() and not (tmp_path / "c.tar.gz.part.json").exists()
    # the same over-long part left by hand (no record of where it came from): not even asked about
    dest.unlink()
    part.write_bytes(data + bytes(70))
    assert download(f"{server.url}/c.tar.gz", dest, retries=0, progress=False).read_bytes() == data
    assert server.ranges[3:] == [None]


def test_a_prefix_of_another_file_is_never_spliced_in(server, tmp_path):
    old = server.files["/c.tar.gz"]
    new = np.random.default_rng(1).bytes(len(old))
    _cut_first_try(server, tmp_path)
    server.files["/c.tar.gz"] = new       # the remote file changed between the cut and the rerun
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", retries=0, progress=False)
    etag_of_old = f'"{_sha(old)[:16]}"'
    assert server.ranges[1] == "bytes=70000-" and server.if_ranges[1] == etag_of_old
    assert dest.read_bytes() == new       # If-Range did not match: 200 with the whole new file
    # a 70 kB prefix of another file left as the part: restarted from zero, never resumed
    dest.unlink()
    (tmp_path / "checksums.json").unlink()
    (tmp_path / "c.tar.gz.part").write_bytes(old[:70_000])
    assert download(f"{server.url}/c.tar.gz", dest, retries=0, progress=False).read_bytes() == new
    assert server.ranges[2:] == [None]


def test_a_206_must_start_at_the_requested_offset(server, tmp_path):
    data = server.files["/c.tar.gz"]
    _cut_first_try(server, tmp_path)
    server.wrong_range = True             # answers "bytes=70000-" with 206 "bytes 0-200331/200332"
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", retries=0, progress=False)
    assert dest.read_bytes() == data and server.ranges == [None, "bytes=70000-", None]


def test_a_resumed_download_records_no_first_use_digest(server, tmp_path, capsys):
    data = server.files["/c.tar.gz"]
    _cut_first_try(server, tmp_path)
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", retries=0, progress=False)
    assert dest.read_bytes() == data and server.ranges == [None, "bytes=70000-"]   # resumed (the ETag held)
    assert _record(tmp_path) is None
    assert (f"note: {dest} was assembled from a resumed transfer: no first-use checksum recorded for it"
            in capsys.readouterr().err)
    dest.unlink()                         # the next download in one piece records it
    download(f"{server.url}/c.tar.gz", dest, retries=0, progress=False)
    assert _record(tmp_path) == {**file_digests(dest), "url": f"{server.url}/c.tar.gz",
                                 "origin": "first complete download (trust on first use)"}


def test_no_validator_and_no_digest_restarts_from_zero(server, tmp_path):
    data = server.files["/c.tar.gz"]
    server.etag = False                   # nothing to send as If-Range, nothing to check the result by
    _cut_first_try(server, tmp_path)
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", retries=0, progress=False)
    assert dest.read_bytes() == data and server.ranges == [None, None]
    assert _record(tmp_path)["sha256"] == _sha(data)


def test_bad_checksum_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="checksum mismatch \\(sha256 [0-9a-f]{64}, expected 0{64}\\)"):
        download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", sha256="0" * 64, progress=False)
    assert not (tmp_path / "c.tar.gz").exists() and (tmp_path / "c.tar.gz.bad").is_file()


def test_trust_on_first_use(server, tmp_path):
    data = server.files["/c.tar.gz"]
    dest = download(f"{server.url}/c.tar.gz", tmp_path / "c.tar.gz", progress=False)   # no published digest
    record = json.loads((tmp_path / "checksums.json").read_text())["c.tar.gz"]
    assert record == {**file_digests(dest), "url": f"{server.url}/c.tar.gz",
                      "origin": "first complete download (trust on first use)"}
    assert record["sha256"] == _sha(data)
    dest.unlink()
    server.files["/c.tar.gz"] = data[:-1] + bytes([data[-1] ^ 1])   # the source changed since
    with pytest.raises(DownloadError, match="checksum mismatch \\(md5"):
        download(f"{server.url}/c.tar.gz", dest, progress=False)


def test_no_network_and_http_errors(server, tmp_path):
    with socket.socket() as s:     # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"cannot connect \(.*refused.*\); no network\?"):
        download(f"http://127.0.0.1:{port}/c.tar.gz", tmp_path / "c.tar.gz", progress=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.tar.gz", tmp_path / "m.tar.gz", progress=False)


def test_unsafe_archives_are_not_extracted(tmp_path):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as t:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="unsafe member path '../outside.txt'"):
        extract(path, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(DownloadError, match="cannot unpack"):
        extract(tmp_path / "junk.tar.gz", tmp_path / "out2")


def test_sources_and_cli(capsys):
    assert set(SOURCES) == {"librispeech-test-other", "librispeech-train-clean-100", "speechocean762", "esc50"}
    assert all(s.url.startswith("https://") and s.licence for s in SOURCES.values())
    assert SOURCES["librispeech-test-other"].md5 == "fb5a50374b501bb3bac4815ee91d3135"
    assert SOURCES["esc50"].filename == "ESC-50-master.zip"
    assert main(["--list"]) == 0 and "CC BY 4.0" in capsys.readouterr().out
    assert main(["nonsense"]) == 2 and "unknown corpus 'nonsense'" in capsys.readouterr().err
