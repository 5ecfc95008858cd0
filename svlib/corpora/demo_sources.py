"""The demo's input folders, from ``../shared/data`` or, without it, from the public corpora (``make prepare-demo``):

    python -m svlib.corpora.demo_sources [--shared ../shared/data] [--downloads data/downloads] \\
        [--public data/public] [--out data/demo] [--mirror URL] [prepare demo options...]

If ``SHARED`` has ``sv-bench/manifest.csv``, ``speechocean762-train/manifest.csv`` and ``esc10-noise/manifest.csv``
they are used as they are. Otherwise the four public corpora (``svlib.corpora.download.SOURCES``) are downloaded and
unpacked into ``DOWNLOADS`` (resumable and checksummed; a corpus whose ``DOWNLOADS/<name>/.complete`` stamp
exists is not fetched again) and ``svlib.corpora.public_corpora.build_public`` rebuilds the three folders under
``PUBLIC`` (skipped when nothing new was fetched and they are complete). Either way the same
``python -m svlib.corpora.prepare demo --sv-bench ... --so762 ... --esc10 ... --out OUT`` follows; options after
the ones above (``--seed``, ``--so762-test-speakers``, ``--rir-cache -``, ...) are passed on to it.

**Mirror.** ``--mirror URL`` (default: the ``SVLIB_DOWNLOAD_MIRROR`` environment variable) fetches every archive
from ``URL/<file>`` (``test-other.tar.gz``, ``train-clean-100.tar.gz``, ``speechocean762.tar.gz``,
``ESC-50-master.zip``) instead of openslr.org and GitHub, e.g. an HTTP(S) proxy or a local copy served over HTTP;
the checksums are checked as for the original sources.

Errors (no network, HTTP errors, bad checksums, unusable corpora) are one line, ``error: ...``, exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Mapping

from svlib.corpora.download import SOURCES, DownloadError, Source, download, extract
from svlib.data.lists import ListError
from svlib.corpora.public_corpora import build_public

__all__ = ["CORPORA", "FOLDERS", "ensure_public", "has_folders", "main", "mirrored"]

CORPORA = ("librispeech-test-other", "librispeech-train-clean-100", "speechocean762", "esc50")
FOLDERS = ("sv-bench/manifest.csv", "speechocean762-train/manifest.csv", "esc10-noise/manifest.csv")
MIRROR_ENV = "SVLIB_DOWNLOAD_MIRROR"


def has_folders(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds the three folders ``prepare demo`` reads (``FOLDERS``)."""
    return all((Path(root) / f).is_file() for f in FOLDERS)


def mirrored(sources: Mapping[str, Source], mirror: str) -> dict[str, Source]:
    """``sources`` with each URL replaced by ``mirror/<file>`` (digests kept)."""
    return {n: dataclasses.replace(s, url=f"{mirror.rstrip('/')}/{s.filename}")
            for n, s in sources.items()}


def ensure_public(downloads: str | os.PathLike, public: str | os.PathLike,
                  sources: Mapping[str, Source] | None = None, progress: bool = True) -> Path:
    """Download and unpack the corpora still missing from ``downloads``, then (re)build ``public``; returns it."""
    downloads, public, sources = Path(downloads), Path(public), sources or SOURCES
    missing = [n for n in CORPORA if not (downloads / n / ".complete").is_file()]
    if not missing and has_folders(public):
        print(f"using {public} (built from {downloads})")
        return public
    if missing:
        print(f"downloading the public corpora {', '.join(missing)} into {downloads} (resumable; LibriSpeech "
              "train-clean-100 alone is 6.3 GB)", flush=True)
    for name in missing:
        s = sources[name]
        extract(download(s.url, downloads / s.filename, md5=s.md5, sha256=s.sha256, progress=progress),
                downloads / name)
    counts = build_public(downloads, public)
    for name, c in counts.items():
        print(f"{public / name}: {c}")
    return public


def _prepare_argv(root: str, out: str, rest: list[str]) -> list[str]:
    """``python -m svlib.corpora.prepare`` arguments: ``demo`` on the three folders under ``root``."""
    return ["demo", "--sv-bench", f"{root}/sv-bench/manifest.csv", "--so762", f"{root}/speechocean762-train",
            "--esc10", f"{root}/esc10-noise/manifest.csv", "--out", out, *rest]


def _check_demo_options(argv: list[str]) -> None:
    """Parse ``argv`` as ``prepare demo`` would, so that a bad option fails before any download."""
    from svlib.corpora.demo_data import add_subcommands

    parser = argparse.ArgumentParser(prog="python -m svlib.corpora.demo_sources ... (prepare demo options)")
    add_subcommands(parser.add_subparsers(dest="command"))
    parser.parse_args(argv)


def main(argv: list[str] | None = None, sources: Mapping[str, Source] | None = None) -> int:
    """The command line; ``sources`` replaces ``SOURCES`` (tests: a local server, no published digests)."""
    parser = argparse.ArgumentParser(prog="python -m svlib.corpora.demo_sources", description=__doc__.split("\n\n")[0],
                                     epilog="Other options go to prepare demo (python -m svlib.corpora.prepare demo -h).",
                                     allow_abbrev=False)  # prefixes of prepare demo options are not ours
    parser.add_argument("--shared", default="../shared/data", help="read-only shared data, used when complete")
    parser.add_argument("--downloads", default="data/downloads", help="where the archives go and are unpacked")
    parser.add_argument("--public", default="data/public", help="the shared-style folders rebuilt from them")
    parser.add_argument("--out", default="data/demo")
    parser.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or None,
                        help=f"fetch the archives from MIRROR/<file> (default: ${MIRROR_ENV})")
    args, rest = parser.parse_known_args(argv)
    _check_demo_options(_prepare_argv(args.shared, args.out, rest))
    shared = Path(args.shared)
    try:
        if has_folders(shared):
            print(f"using {shared}")
            root = shared
        else:
            lacks = "not found" if not shared.is_dir() else "lacks " + ", ".join(
                f for f in FOLDERS if not (shared / f).is_file())
            print(f"{shared} {lacks}: the demo's folders come from the public corpora")
            sources = sources or SOURCES
            root = ensure_public(args.downloads, args.public, mirrored(sources, args.mirror) if args.mirror else sources)
    except (DownloadError, ListError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from svlib.corpora.prepare import main as prepare

    return prepare(_prepare_argv(root.as_posix(), args.out, rest))


if __name__ == "__main__":
    sys.exit(main())
