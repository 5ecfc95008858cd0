"""The ``prepare`` command: build data directories and lists from the shared manifests and corpus layouts.

    python -m svlib.corpora.prepare manifest --manifest ../shared/data/sv-bench/manifest.csv --out data/sv-bench [--seed 0]
    python -m svlib.corpora.prepare voxceleb --root <vox1>/wav [--root <vox2>/dev/aac] --out data/vox
    python -m svlib.corpora.prepare voxceleb --root <vox2>/dev/aac --out data/vox2_dev --val-speakers 500 --val-out data/vox2_val
    python -m svlib.corpora.prepare cnceleb  --root <CN-Celeb_flac> [--root2 <CN-Celeb2_flac>] --out data/cnceleb
    python -m svlib.corpora.prepare musan    --root <musan> --out data/musan.list
    python -m svlib.corpora.prepare rirs     --root <RIRS_NOISES> --out data/rirs.list
    python -m svlib.corpora.prepare demo     --sv-bench <sv-bench>/manifest.csv --so762 <speechocean762-train> \
                                             --esc10 <esc10-noise>/manifest.csv --out data/demo
    python -m svlib.corpora.prepare esc10 | simrirs | demo-table ...

(``python -m svlib.data.prepare ...``, the old path, runs the same command.)

Run from the repo root: audio paths are written relative to the working directory (``--relative-to``), which is
where ``DataDir.load`` resolves them (Kaldi convention), so lists stay portable between machines.

The subcommands live with their corpus, one module per corpus family (``CORPUS_MODULES``): each module has
``SUBCOMMANDS`` (its names), ``add_subcommands(subparsers)`` and ``run_subcommand(args)``. This command only
collects them; no corpus module imports it, so adding a corpus is one new module and one line in the table.
Every list written is checked by decoding its first file, so a missing decoder or an unreadable corpus fails
there, in one line, and not at the first training batch after the model has loaded.
"""
from __future__ import annotations

import argparse
import sys

from svlib.corpora import cnceleb, demo_data, manifest, noise, voxceleb
from svlib.data.lists import ListError

# in the order ``-h`` lists them
CORPUS_MODULES = (manifest, voxceleb, cnceleb, noise, demo_data)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The parser of every corpus module's subcommands, and which module runs each one."""
    parser = argparse.ArgumentParser(prog="python -m svlib.corpora.prepare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relative-to", default=None,
                        help="write audio paths relative to this folder (default: the working directory, i.e. the repo root)")
    sub = parser.add_subparsers(dest="command", required=True)
    runs: dict[str, object] = {}
    for module in CORPUS_MODULES:
        module.add_subcommands(sub)
        runs |= dict.fromkeys(module.SUBCOMMANDS, module)
    return parser, runs


def main(argv: list[str] | None = None) -> int:
    parser, runs = build_parser()
    args = parser.parse_args(argv)
    try:
        runs[args.command].run_subcommand(args)
    except ListError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
