"""The documentation's shape: a short README whose links resolve, and a MkDocs nav that lists
every page of docs/ (mkdocs build --strict, run by tests/run.sh, checks the links between
pages). Fast: no torch, no MkDocs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
MKDOCS = REPO / "mkdocs.yml"
MAX_README_LINES = 250

FENCED = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INDENTED = re.compile(r"^(?: {4}|\t).*$", re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:", "#")


def prose(markdown: str) -> str:
    """The text outside code blocks and code spans, where links are links."""
    return CODE_SPAN.sub("", INDENTED.sub("", FENCED.sub("", markdown)))


def relative_links(markdown: str) -> list[str]:
    return [t for t in LINK.findall(prose(markdown)) if not t.lower().startswith(EXTERNAL)]


def nav_pages(entries) -> list[str]:
    """Every page a mkdocs nav names, however deeply its sections nest."""
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in nav_pages(value)]
    return []


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES} and move detail "
        "to docs/"
    )


def test_link_finder_skips_code_and_external_links():
    text = (
        "[a](docs/a.md) [b](https://x.org) [c](#here) ![d](img/d.png \"title\")\n"
        "`[e](not/a/link.md)`\n\n```text\n[f](nor/this.md)\n```\n\n    [g](nor/that.md)\n"
    )
    assert relative_links(text) == ["docs/a.md", "img/d.png"]


def test_readme_relative_links_resolve():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links to no file: the link finder is broken"
    missing = []
    for target in links:
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (REPO / path).exists():
            missing.append(target)
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))
    docs_dir = REPO / config.get("docs_dir", "docs")
    assert docs_dir == DOCS
    listed = nav_pages(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert pages, "docs/ holds no page"
    assert len(listed) == len(set(listed)), f"pages listed twice in the nav: {listed}"
    unlisted = sorted(set(pages) - set(listed))
    assert not unlisted, f"pages missing from mkdocs.yml's nav: {unlisted}"
    absent = sorted(set(listed) - set(pages))
    assert not absent, f"nav entries without a page in docs/: {absent}"
