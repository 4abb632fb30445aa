"""The README and docs/ against the code and BENCHMARKS.md: what a new user reads first must be true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from compressor.pipeline import EXPORTED_PROGRAM_FILE, OUTPUT_FILES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FIRST_SCREEN = 60
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables as rows of stripped cells (the |---| rule left out)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-: ") for cell in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_first_screen_has_both_commands_and_the_test_time():
    screen = README.splitlines()[:FIRST_SCREEN]
    demo = [line for line in screen if line.startswith("scripts/demo.sh")]
    test = [line for line in screen if line.startswith("scripts/test.sh")]
    assert demo and test, "scripts/demo.sh and scripts/test.sh must be on the README's first screen"
    assert re.search(r"\d+ min .*2-core", test[0]), f"the test command should state its time on an idle 2-core machine: {test[0]!r}"
    tables = _tables("\n".join(screen))
    assert tables, "no results table on the README's first screen"


def _numbers(cell: str) -> list[str]:
    """Signed decimals as written (``-0.45``, ``2.05`` of ``2.05x``, both of ``-0.45 ± 0.20``)."""
    return re.findall(r"[-+]?\d+\.\d+", cell)


def test_every_readme_result_row_is_a_benchmarks_md_row():
    benchmark_rows = [
        {number for cell in row for number in _numbers(cell)} for table in _tables((ROOT / "BENCHMARKS.md").read_text()) for row in table
    ]
    (results, *_) = _tables(README)
    for row in results[1:]:
        assert all(_numbers(cell) for cell in row[1:]), f"a results cell without a number: {row}"
        numbers = {number for cell in row[1:] for number in _numbers(cell)}
        matching = [cells for cells in benchmark_rows if numbers <= cells]
        assert matching, f"README row {row}: no BENCHMARKS.md row holds all of {sorted(numbers)}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    links = re.findall(r"\]\(([^)#]*)(?:#([^)]*))?\)", page.read_text())
    broken = []
    for link, anchor in links:
        if "://" in link:
            continue
        target = page.parent / link if link else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            broken.append(f"{link}#{anchor}" if anchor else link)
    assert not broken, f"{page.name}: broken links {broken}"


def test_readme_links_every_docs_page():
    unlinked = [page.name for page in PAGES if f"docs/{page.name}" not in README]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_says_nothing_about_shared():
    assert "../shared" not in README, "statements about ../shared belong in docs/benchmarks.md"


def test_usage_names_every_file_a_run_can_write():
    usage = (ROOT / "docs" / "usage.md").read_text()
    missing = [name for name in (*OUTPUT_FILES, EXPORTED_PROGRAM_FILE) if f"`{name}`" not in usage]
    assert not missing, f"docs/usage.md does not name {missing}"


def test_api_docs_describe_what_save_writes():
    api = (ROOT / "docs" / "api.md").read_text()
    described = api[api.index("result.save("):]
    missing = [name for name in OUTPUT_FILES if not name.endswith(".png") and name not in described]
    assert not missing, f"docs/api.md's result.save does not name {missing}"
    assert not re.search(r"all (two|three|four|five|six) output files", api), "save writes as many files as the recipe asks"


def test_recipes_page_names_every_method():
    from compressor.methods import METHODS

    recipes = (ROOT / "docs" / "recipes.md").read_text()
    missing = [name for name in (*METHODS, "keep") if f"`{name}`" not in recipes]
    assert not missing, f"docs/recipes.md does not name the methods {missing}"
