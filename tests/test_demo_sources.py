"""``make prepare-demo``'s entry point: the shared folders when present, else download (from a local HTTP server on
127.0.0.1 serving tiny fake archives), rebuild data/public and run the same ``prepare demo``."""
from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest

from svlib.corpora.demo_sources import MIRROR_ENV, main, mirrored
from svlib.corpora.download import SOURCES
from svlib.corpora.public_corpora import build_public
from svlib.data.lists import DataDir, read_trials
from tests.fake_corpora import write_archives, write_layout
from tests.test_download import Server

# sized for the fake corpora (8 speechocean762 speakers, train-clean-100 recordings < 2 x 3 s); no RIR simulation
DEMO_OPTIONS = ["--so762-test-speakers", "4", "--so762-val-speakers", "2", "--val-long-speakers", "0",
                "--rir-cache", "-"]
# the fake archives have no published digests: checked on first use, as speechocean762's and ESC-50's are
UNPUBLISHED = {n: dataclasses.replace(s, md5=None, sha256=None) for n, s in SOURCES.items()}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    base = tmp_path_factory.mktemp("corpora")
    layout = write_layout(base / "layout", utts_per_chapter=5)  # 10 utterances per test-other speaker
    return layout, write_archives(layout, base / "archives")


@pytest.fixture()
def server(corpora):
    s = Server()
    for path in corpora[1].values():
        s.files[f"/mirror/{path.name}"] = path.read_bytes()
    yield s
    s.close()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv), sources=UNPUBLISHED)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _check_demo(out: Path) -> dict:
    for split in ("train", "val", "test"):
        d = DataDir.load(out / split, check_files=True)
        assert len(d) > 0
    for trials in ("val", "test", "test_ls10", "test_so762"):
        assert len(read_trials(out / f"{trials}_trials.txt")) > 0
    for noise in ("noise_train.list", "noise_heldout.list"):
        assert len((out / noise).read_text().splitlines()) == 2
    return json.loads((out / "split_summary.json").read_text())


def test_mirror_urls():
    m = mirrored(SOURCES, "https://mirror.example/corpora/")
    assert m["librispeech-train-clean-100"].url == "https://mirror.example/corpora/train-clean-100.tar.gz"
    assert m["esc50"].url == "https://mirror.example/corpora/ESC-50-master.zip"
    assert m["librispeech-test-other"].md5 == SOURCES["librispeech-test-other"].md5   # still verified


def test_shared_folders_are_used_and_nothing_is_downloaded(corpora, server, tmp_path, monkeypatch, capsys):
    build_public(corpora[0], tmp_path / "shared")   # a complete shared-style folder
    monkeypatch.chdir(tmp_path)
    rc, out, _ = _run(capsys, "--shared", "shared", "--mirror", f"{server.url}/mirror", *DEMO_OPTIONS)
    assert rc == 0 and out.splitlines()[0] == "using shared"
    assert server.ranges == [] and not Path("data/downloads").exists() and not Path("data/public").exists()
    summary = _check_demo(Path("data/demo"))
    assert summary["sv_bench_manifest"] == "shared/sv-bench/manifest.csv" and summary["so762"] == "shared/speechocean762-train"


def test_without_shared_downloads_build_and_prepare_then_rerun(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--shared", "no/such/folder", "--mirror", f"{server.url}/mirror", *DEMO_OPTIONS]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "no/such/folder not found: the demo's folders come from the public corpora"
    assert lines[1].startswith("downloading the public corpora librispeech-test-other, librispeech-train-clean-100, "
                               "speechocean762, esc50 into data/downloads")
    assert server.ranges == [None] * 4                                      # one whole GET per archive
    assert all((Path("data/downloads") / n / ".complete").is_file() for n in SOURCES)
    assert set(json.loads(Path("data/downloads/checksums.json").read_text())) == {s.filename for s in SOURCES.values()}
    summary = _check_demo(Path("data/demo"))
    assert summary["sv_bench_manifest"] == "data/public/sv-bench/manifest.csv"
    assert summary["splits"]["test"]["speakers"] == 3 + 4 and summary["splits"]["train"]["speakers"] == 3 + 2
    first = {p.name: p.read_bytes() for p in Path("data/demo").glob("*_trials.txt")}

    rc, out, _ = _run(capsys, *argv)                                        # rerun: nothing fetched or rebuilt
    assert rc == 0 and "using data/public (built from data/downloads)" in out and "downloading" not in out
    assert len(server.ranges) == 4
    for archive in Path("data/downloads").glob("*.*z*"):                   # extracted corpora need no archive
        archive.unlink()
    Path("data/public/esc10-noise/manifest.csv").unlink()
    rc, out, _ = _run(capsys, *argv)                                        # rebuilt from the extracted folders
    assert rc == 0 and "downloading" not in out and len(server.ranges) == 4
    assert {p.name: p.read_bytes() for p in Path("data/demo").glob("*_trials.txt")} == first


def test_no_network_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:     # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}")
    rc, out, err = _run(capsys, "--shared", "absent", *DEMO_OPTIONS)
    assert rc == 2 and "downloading the public corpora" in out
    errors = [line for line in err.splitlines() if line.strip()]
    assert errors[-1].startswith(f"error: http://127.0.0.1:{port}/test-other.tar.gz: cannot connect")
    assert sum("error" in line for line in errors) == 1 and "Traceback" not in err   # (the rest: a tqdm bar at 0 B)
    assert not Path("data/demo").exists()


def test_bad_demo_option_fails_before_downloading(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--shared", "absent", "--mirror", f"{server.url}/mirror", "--so762-test-speakerz", "4"],
             sources=UNPUBLISHED)
    assert exit_.value.code == 2 and server.ranges == [] and not Path("data/downloads").exists()
