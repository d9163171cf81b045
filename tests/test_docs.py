"""The docs stay honest: README's first commands, its length, and every relative link.

README.md is the first thing a hospital IT engineer reads: it must open with the two set-up
commands, stay short (everything else lives in docs/), and its links, the Chinese README's and
every docs page's must lead to files that exist. The docs site itself is built with
``mkdocs --strict`` by ``make docs`` (CI); these checks need no mkdocs and run with the suite.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.harness import ROOT

FIRST_BLOCK = (
    "make demo    # creates .venv, installs, starts the Fuxing alliance (7 nodes) and plays a "
    "referral scenario\n"
    "make test    # creates .venv, installs, runs the test suite (SQLite and a real PostgreSQL)\n"
)
MAX_README_LINES = 160

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    """Every Markdown file the docs tell people to read (docs/pending/ is notes in transit)."""
    top = [ROOT / n for n in ("README.md", "README.zh-CN.md", "CONTRIBUTING.md", "CHANGELOG.md")]
    docs = [
        p
        for p in sorted((ROOT / "docs").rglob("*.md"))
        if "pending" not in p.relative_to(ROOT / "docs").parts
    ]
    return [*top, ROOT / "bench" / "README.md", *docs]


def first_code_block(text: str) -> tuple[str, str]:
    m = FENCE.search(text)
    assert m is not None, "no fenced code block"
    return m.group(0).splitlines()[0], m.group(2)


def relative_links(text: str) -> list[str]:
    """Link and image targets outside code, without external URLs or bare anchors."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return [t for t in LINK.findall(text) if not EXTERNAL.match(t) and not t.startswith("#")]


def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    fence, body = first_code_block(text)
    assert fence == "```sh"
    assert body == FIRST_BLOCK
    # nothing but the title comes before it
    before = text[: text.index(fence)].strip()
    assert before == "# Hutong (互通)"


def test_chinese_readme_opens_with_the_same_commands() -> None:
    text = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    _, body = first_code_block(text)
    commands = [line.split("#")[0].strip() for line in body.splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_is_short_and_the_two_readmes_link_each_other() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    zh = (ROOT / "README.zh-CN.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < MAX_README_LINES
    assert "README.zh-CN.md" in relative_links(readme)
    assert "README.md" in relative_links(zh)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    missing = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            missing.append(target)
    assert missing == [], f"{path.relative_to(ROOT)}: links to nothing: {missing}"


def test_link_finder_sees_links_and_skips_code() -> None:
    """The checker itself: a link in prose is found, one in code is not, URLs are skipped."""
    text = (
        'See [a](docs/a.md#x) and ![b](img/b.png "t").\n`[c](c.md)` [d](https://e.org)\n'
        "```\n[f](f.md)\n```\n[g](#anchor)\n"
    )
    assert relative_links(text) == ["docs/a.md#x", "img/b.png"]


def mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def nav_pages(nav: list) -> list[str]:
    out: list[str] = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            out += nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_site_nav_covers_every_page_and_excludes_pending_notes() -> None:
    cfg = mkdocs_config()
    assert cfg["theme"]["name"] == "material"
    assert cfg["strict"] is True
    assert "pending/" in cfg["exclude_docs"].split()
    pages = nav_pages(cfg["nav"])
    assert len(pages) == len(set(pages))
    on_disk = {
        str(p.relative_to(ROOT / "docs"))
        for p in markdown_files()
        if p.is_relative_to(ROOT / "docs")
    }
    assert set(pages) == on_disk
    # the audiences the site is organised by, in this order
    sections = [
        name for item in cfg["nav"] for name, value in item.items() if isinstance(value, list)
    ]
    assert [s.split(" / ")[1] for s in sections] == [
        "Hospital IT",
        "Clinicians",
        "Auditors",
        "Contributors",
    ]


def test_snippets_and_images_exist() -> None:
    """Pages that include a repository file, and the screenshots they show, are all there."""
    included, shown = set(), set()
    for page in (ROOT / "docs").rglob("*.md"):
        text = page.read_text(encoding="utf-8")
        for name in re.findall(r'^--8<-- "([^":]+)', text, re.M):
            included.add(name)
            assert (ROOT / name).is_file(), f"{page}: snippet {name} missing"
        shown |= {
            (page.parent / t).resolve().name for t in relative_links(text) if t.endswith(".png")
        }
    assert {
        "bench/README.md",
        "mappings/README.md",
        "config/alliances/fuxing/README.md",
        "CONTRIBUTING.md",
        "CHANGELOG.md",
        "fuzz/README.md",
    } <= included
    images = {p.name for p in (ROOT / "docs" / "img").glob("*.png")}
    assert images and images == shown, f"unused or missing screenshots: {images ^ shown}"


def test_license_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(re.findall(r"^\s+\d\. ", text, re.M)) == 9  # sections 1-9, all of them
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()


def test_changelog_keeps_an_unreleased_section_on_top() -> None:
    heads = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert heads[0] == "Unreleased"
    assert "0.1.0" in heads


def test_every_test_file_is_in_the_feature_table() -> None:
    """tests/README.md's feature table names every test file, so a newcomer finds where a
    feature is specified (a new file without its row fails here)."""
    text = (ROOT / "tests" / "README.md").read_text(encoding="utf-8")
    table = text.split("## Feature → the tests that specify it", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    named = {m for row in rows for m in re.findall(r"`(test_\w+\.py)", row)}
    files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    assert files - named == set(), "test files missing from tests/README.md's table"
    assert named - files == set(), "the table names test files that do not exist"
