"""The README and the guide print their result tables from the committed JSON (bench/readme_tables.py), so a
page and bench/results cannot drift apart; and the README is the short front page with a map of docs/."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from bench import readme_tables
from tests.conftest import DOC_PAGES, REPO

README = (REPO / "README.md").read_text()


def test_every_generated_block_of_every_page_is_what_the_json_renders():
    stale = {str(page.relative_to(REPO)): readme_tables.stale_blocks(page) for page in DOC_PAGES}
    assert {page: names for page, names in stale.items() if names} == {}
    # the README's own check command, as it is written there
    command = re.search(r"^python (bench/readme_tables\.py --check [^#\n]+?) +#", README, re.M).group(1).split()
    assert command == ["bench/readme_tables.py", "--check", "README.md", "docs/*.md"]
    pages = [str(p.relative_to(REPO)) for p in DOC_PAGES]
    proc = subprocess.run([sys.executable, command[0], "--check", *pages], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_the_readme_shows_the_headline_tables():
    assert re.findall(r"<!-- generated: python bench/readme_tables\.py ([\w-]+) -->", README) == [
        "demo", "search", "pruning", "speed"]


def test_the_demo_table_prints_the_reports_numbers():
    """Rows of the demo table against bench/results/demo_pipeline.json, number by number."""
    report = json.loads((readme_tables.RESULTS / "demo_pipeline.json").read_text())
    table = readme_tables.render("demo")
    evaluated = report["stages"]["eval"]["lists"]
    ls10, so762 = evaluated["test_ls10"], evaluated["test_so762"]
    assert ("| eval | **{:.2f} [{:.2f}, {:.2f}]** | **{:.3f}** | {:.2f} [{:.2f}, {:.2f}] | {:.2f} [{:.2f}, {:.2f}] | – | "
            "{:.1f} |").format(report["final_test_eer_pct"], *report["final_test_eer_ci"],
                               report["stages"]["eval"]["mindcf_0.01"], ls10["eer_pct"], *ls10["eer_ci_pct"],
                               so762["eer_pct"], *so762["eer_ci_pct"], report["stages"]["eval"]["minutes"]) in table
    assert f"| {report['stages']['s1']['best_val_eer_pct']:.2f} | " in table.split("\n")[2]  # s1's val EER
    random_init = report["baselines"]["random_init"]["lists"]["test_ls10"]
    assert "| baseline: same model, random init | {:.2f} [{:.2f}, {:.2f}] |".format(
        report["baselines"]["random_init"]["eer_pct"], *report["baselines"]["random_init"]["eer_ci_pct"]) in table
    assert "{:.2f} [{:.2f}, {:.2f}]".format(random_init["eer_pct"], *random_init["eer_ci_pct"]) in table
    assert f"{report['wall_minutes']:.1f} minutes in all" in table
    assert "* test: -5.95 points [-8.01, -3.65], no bootstrap replicate crossed 0, significant" in table
    # today's committed run, as the README prints it
    assert "| eval | **8.09 [5.60, 10.78]** | **0.696** | 2.67 [0.67, 4.89] | 9.52 [6.83, 12.44] | – | 0.3 |" in README


def test_check_names_the_page_and_table_that_drifted(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- generated: python bench/readme_tables.py speed -->\n"
                    + readme_tables.render("speed").replace("4.25x", "4.30x") + "<!-- end generated -->\n")
    proc = subprocess.run([sys.executable, "bench/readme_tables.py", "--check", str(page)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {page}: table 'speed' differs from bench/results "
                           f"(python bench/readme_tables.py --write {page})\n")
    assert readme_tables.main(["--write", str(page)]) == 0 and readme_tables.stale_blocks(page) == []
    assert "| pruned (80 % structure) | 124,308,488 | 19.1 | 2.06 | 4.25x |" in page.read_text()


def test_the_readme_is_a_front_page_with_a_map_of_the_guide():
    assert len(README.splitlines()) <= 160
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", README))
    assert linked == {str(p.relative_to(REPO)) for p in DOC_PAGES[1:]}  # every guide page, and no missing one
    for name in ("data", "training", "reliability", "demo", "pruning", "sweeps", "tracking", "using-a-model",
                 "reference-bugs", "CONTRACTS"):
        assert (REPO / "docs" / f"{name}.md").is_file(), name
    # what the recipe search did: the look at test that came before the chosen recipe, and what followed
    assert "| `full_4x64_bn_short` (109bb2a) | 12.46 | 16.13 [13.27, 19.15] | 14.04 | +2.09 [-1.13, +5.58] |" in README
    assert '"The target is not met"' in README and "from 12.46 to 4.65 %" in README


def test_guide_pages_link_back_and_their_images_exist():
    for page in DOC_PAGES[1:]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        assert (REPO / target).exists(), target
