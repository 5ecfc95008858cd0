"""The result tables of the README and docs/, rendered from the committed JSON under bench/results/.

    python bench/readme_tables.py demo                      # print one table (see TABLES)
    python bench/readme_tables.py --check README.md docs/*.md   # exit 1 naming each block that differs
    python bench/readme_tables.py --write README.md docs/*.md   # rewrite those blocks in place

A page holds a table as a generated block::

    <!-- generated: python bench/readme_tables.py demo -->
    ...the table...
    <!-- end generated -->

Every number inside such a block comes from a committed file (a benchmark JSON, or a stage YAML for the
demo's step counts), so a page cannot print a figure that no file holds, and tests/test_readme_tables.py fails
when a page and its JSON drift apart (rerun the benchmark, then ``--write``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEMO_PIPELINE = REPO / "experiments" / "configs" / "demo" / "pipeline.yaml"
BLOCK = re.compile(r"(<!-- generated: python bench/readme_tables\.py (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                   r"(<!-- end generated -->)", re.S)
DASH = "–"


def read(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def eer(value: float, ci: list[float] | None = None) -> str:
    """``8.09 [5.60, 10.78]``: an EER in % with its 95 % interval, when it has one."""
    return f"{value:.2f}" + (" [{:.2f}, {:.2f}]".format(*ci) if ci else "")


def paired(ci: list[float]) -> str:
    """``[-0.88, +0.69]``: a paired difference's 95 % interval, signs shown (0 inside: no difference)."""
    return "[{:+.2f}, {:+.2f}]".format(*ci)


def thousands(count: float) -> str:
    return f"{round(count / 1000):,}k"


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def demo_stage_labels() -> dict[str, str]:
    """What each demo stage did, in words and in the numbers of its committed stage YAML."""
    sys.path.insert(0, str(REPO))
    from experiments.pipeline import load_pipeline

    _, stages = load_pipeline(DEMO_PIPELINE)
    s1, s2, s3 = stages["s1"], stages["s2"], stages["s3"]
    crops = "-".join(f"{c:g}" for c in s3.sampling.crop_seconds)
    return {"s1": f"s1 (encoder frozen{' + LoRA' if s1.lora else ''}, {s1.train.steps} steps)", "merge": "merge",
            "s2": f"s2 (joint, {s2.train.steps:,} steps)", "s3": f"s3 (margin {s3.head.margin:g}, {crops} s crops)",
            "eval": "eval"}


def list_cell(lists: dict, name: str) -> str:
    res = lists.get(name)
    return eer(res["eer_pct"], res.get("eer_ci_pct")) if res else DASH


def demo() -> list[str]:
    """The demo pipeline per stage (bench/results/demo_pipeline.json), its seed spread (pruning_curve.json) and
    the paired comparison with the mean/std log-mel baseline."""
    report, seeds = read("demo_pipeline.json"), read("pruning_curve.json")["seeds"]
    labels = demo_stage_labels()
    final = list(report["stages"])[-1]
    rows = []
    for name, stage in report["stages"].items():
        lists = stage.get("lists", {})
        test = lists.get("test")
        bold = (lambda s: f"**{s}**") if name == final else (lambda s: s)
        rows.append([labels.get(name, name), bold(list_cell(lists, "test")) if test else DASH,
                     bold(f"{test['mindcf_0.01']:.3f}") if test else DASH, list_cell(lists, "test_ls10"),
                     list_cell(lists, "test_so762"),
                     f"{stage['best_val_eer_pct']:.2f}" if "best_val_eer_pct" in stage else DASH,
                     f"{stage['minutes']:.1f}"])
    eers = [s["eer_pct"] for s in seeds]
    rows.append([f"{final}, {len(seeds)} seeds ({', '.join(str(s['seed']) for s in seeds)}): mean, min-max",
                 f"{sum(eers) / len(eers):.2f}, {min(eers):.2f}-{max(eers):.2f}", "", "", "", "", ""])
    names = {"random_init": "baseline: same model, random init", "fbank": "baseline: mean/std log-mel cosine"}
    for name, base in report["baselines"].items():
        lists = base["lists"]
        rows.append([names.get(name, f"baseline: {name}"), list_cell(lists, "test"),
                     f"{lists['test']['mindcf_0.01']:.3f}", list_cell(lists, "test_ls10"),
                     list_cell(lists, "test_so762"), DASH, f"{base['minutes']:.1f}"])
    machine = report["machine"]
    lines = markdown(["stage", "test EER % [95 % CI]", "minDCF 0.01", "test_ls10 EER %", "test_so762 EER %",
                      "best val EER %", "minutes"], rows)
    # a rerun skips finished stages and keeps their minutes, so the load is that of the report's own run
    lines += ["", f"{report['wall_minutes']:.1f} minutes in all: each stage's minutes from the run that trained it, "
              f"plus the baselines ({machine['threads']} threads on {machine['cpu_count']} cores; load average "
              f"{machine['load_average_start'][0]:.2f} at the start of the report's run, "
              f"{machine['load_average_end'][0]:.2f} at its end); test = {report['test_speakers']} speakers. "
              f"EER({final}) - EER(mean/std log-mel baseline), paired on the same trials:", ""]
    for name, cmp in report["final_vs_fbank"].items():
        # a small list's note says why no call is made (bootstrap.MIN_SPEAKERS); else the call itself
        call = cmp.get("note") or ("significant" if cmp["final_better"] else "not significant")
        p_value = f"p {cmp['p_value']:.3f}" if cmp["p_value"] > 0 else "no bootstrap replicate crossed 0"
        lines.append(f"* {name}: {cmp['eer_diff']:+.2f} points {paired(cmp['eer_diff_ci'])}, {p_value}, {call}")
    return lines


def search() -> list[str]:
    """The recipe search's looks at the test lists (bench/results/demo_recipe_search.json ``test_looks``)."""
    record = read("demo_recipe_search.json")
    recipes = record["recipes"]
    rows = [[f"`{look['recipe']}` ({look['commit']})", f"{recipes[look['recipe']]['val_eer_pct']:.2f}",
             eer(look["test_eer_pct"], look["test_eer_ci"]), f"{look['baseline_fbank_test_eer_pct']:.2f}",
             f"{look['paired_eer_diff']:+.2f} {paired(look['paired_eer_diff_ci'])}"]
            for look in record["test_looks"]]
    return markdown(["chosen recipe (commit)", "val EER %", "test EER % [95 % CI]", "baseline test EER %",
                     "model - baseline, paired"], rows)


def recipes() -> list[str]:
    """Every recipe of the search on val, as bench/demo_recipe_search.py printed it (its ``table``, title cut)."""
    return ["```", *read("demo_recipe_search.json")["table"].splitlines()[1:], "```"]


def kd_point(points: list[dict], method: str, target: float) -> dict | None:
    return next((p for p in points if p["method"] == method and p["target"] == target), None)


def pruning() -> list[str]:
    """KD-guided pruning of the demo's s2 against random structures and task-loss pruning, with the controls
    (bench/results/pruning_curve.json)."""
    curve = read("pruning_curve.json")
    points, rows = curve["points"], []
    for target in curve["targets"]:
        kd = kd_point(points, "kd", target)
        row = [f"{target:g}", f"{kd['achieved_sparsity']:.3f}", thousands(kd["params_encoder"]),
               eer(kd["eer_pct"], kd["eer_ci"]), paired(kd["eer_diff_vs_teacher_ci"])]
        for method in ("random", "task"):
            other = kd_point(points, method, target)
            if other is None:
                row += [DASH, DASH]
                continue
            off_target = f" ({other['achieved_sparsity']:.3f})" if round(other["achieved_sparsity"], 2) != round(
                kd["achieved_sparsity"], 2) else ""
            row += [f"{other['eer_pct']:.2f}{off_target}", paired(other["eer_diff_vs_kd_ci"])]
        rows.append(row)
    teacher, controls = curve["teacher"], curve["controls"]
    lines = [f"Teacher: the demo's s2, test EER {eer(teacher['eer_pct'], teacher['eer_ci'])}, "
             f"{thousands(teacher['params_encoder'])} encoder parameters; {curve['stage_minutes_total']:.0f} "
             "stage-minutes for the whole figure.", ""]
    lines += markdown(["target", "achieved sparsity", "encoder params", "KD test EER %", "KD - teacher",
                       "random (per layer)", "random - KD", "task loss", "task - KD"], rows)
    removed, fresh = controls["encoder_removed"], controls["random_init"]
    lines += ["", f"Controls (same graft and fine-tune): **encoder removed** ({removed['achieved_sparsity']:.3f} "
              f"sparsity) {eer(removed['eer_pct'], removed['eer_ci'])} %, minus the teacher "
              f"{paired(removed['eer_diff_vs_teacher_ci'])}; **random init** {eer(fresh['eer_pct'], fresh['eer_ci'])} "
              f"%, minus the teacher {paired(fresh['eer_diff_vs_teacher_ci'])}."]
    return lines


def snapshots() -> list[str]:
    """The one-run curve (prune1 snapshots) against the separately trained grid (pruning_curve.json)."""
    snap = read("pruning_curve.json")["snapshot_vs_grid"]
    rows = [[f"{p['target']:g}", f"{p['achieved_sparsity']:.3f}", eer(p["eer_pct"], p["eer_ci"]),
             f"{p['grid_eer_pct']:.2f}", paired(p["eer_diff_vs_grid_ci"])] for p in snap["points"]]
    lines = markdown(["target", "snapshot sparsity", "snapshot test EER %", "grid KD test EER %",
                      "snapshot - grid"], rows)
    return lines + ["", f"Compute: {snap['snapshot_minutes']:.1f} stage-minutes for the snapshots against "
                        f"{snap['grid_minutes']:.1f} for the grid ({snap['compute_ratio']:.2f}x)."]


def speed() -> list[str]:
    """Full-size W2V-BERT 2.0, dense against the reference's 80 % structure (bench/results/prune_speed.json)."""
    run = read("prune_speed.json")
    setup = run["setup"]
    batch, frames = setup["input"][0], setup["input"][1]
    rows = [["dense", f"{run['params_dense']:,}", f"{run['macs_dense_per_utt'] / 1e9:.1f}",
             f"{run['seconds_dense']:.2f}", "1.00x"],
            ["pruned (80 % structure)", f"{run['params_pruned']:,}", f"{run['macs_pruned_per_utt'] / 1e9:.1f}",
             f"{run['seconds_pruned']:.2f}", f"{run['speedup']:.2f}x"]]
    lines = markdown(["W2V-BERT 2.0 encoder", "parameters", "GMACs per utterance",
                      f"forward s, batch {batch} x {frames} frames", "speed-up"], rows)
    load = setup["load_average_1min"]
    return lines + ["", f"{setup['device'].upper()}, {setup['threads']} threads, torch {setup['torch']}, median of "
                        f"{'/'.join(map(str, setup['repeats']))} runs, load average {load[0]:.2f} before, {load[1]:.2f} after."]


TABLES = {"demo": demo, "search": search, "recipes": recipes, "pruning": pruning, "snapshots": snapshots, "speed": speed}


def render(name: str) -> str:
    return "\n".join(TABLES[name]()) + "\n"


def refresh(text: str) -> str:
    """``text`` with every generated block re-rendered from the JSON."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name")) + m.group(4), text)


def stale_blocks(path: Path) -> list[str]:
    """The names of the generated blocks of ``path`` that differ from what the JSON renders."""
    return [m.group("name") for m in BLOCK.finditer(path.read_text()) if m.group("body") != render(m.group("name"))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", choices=sorted(TABLES), help="print this table")
    parser.add_argument("--check", nargs="+", metavar="PAGE", help="pages whose generated blocks must be current")
    parser.add_argument("--write", nargs="+", metavar="PAGE", help="re-render the generated blocks of these pages")
    args = parser.parse_args(argv)
    if args.table:
        print(render(args.table), end="")
    for page in args.write or []:
        Path(page).write_text(refresh(Path(page).read_text()))
    stale = [f"{page}: table {name!r} differs from bench/results (python bench/readme_tables.py --write {page})"
             for page in args.check or [] for name in stale_blocks(Path(page))]
    for line in stale:
        print(f"error: {line}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
