"""References into docs/ resolve: every `docs/PAGE.md#anchor` named in the code, in README.md or in
the docs themselves points at a page that exists and a heading that has that anchor (GitHub's
slugs), and no code cites the old design note (DESIGN.md, not in the repository) by section.

Scanned: every *.py file under the repository root except hidden folders (.venv, .git), runs/,
build outputs and this file; README.md files; docs/*.md (their relative links).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SKIP_DIRS = {"runs", "build", "dist", "node_modules", "__pycache__"}

# `docs/x.md` or `docs/x.md#anchor`, not inside a longer path or URL (readthedocs/, site/docs/)
DOC_REF = re.compile(r"(?<![\w/.-])docs/([\w./-]*\w)(?:#([\w-]+))?")
# the old design note, cited by section or by name (split so this file does not match itself)
OLD_DESIGN = re.compile("DESIGN" + r"(?:\s*§|\.md)")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links reduced to their text, lower case, every character
    that is not a letter, digit, space, '-' or '_' removed, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown text (outside fenced code), duplicates suffixed -1, -2 ..."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_doc_refs(text: str, docs: Path = DOCS) -> list[str]:
    """The `docs/...` references in `text` that name no page under `docs`, or no heading of it."""
    bad = []
    for m in DOC_REF.finditer(text):
        page, anchor = docs / m.group(1), m.group(2)
        if not page.is_file() or page.suffix != ".md":
            bad.append(f"{m.group(0)}: no page {page.relative_to(docs.parent)}")
        elif anchor and anchor not in anchors(page.read_text(encoding="utf-8")):
            bad.append(f"{m.group(0)}: no heading with anchor #{anchor} in {page.name}")
    return bad


def broken_links(page: Path) -> list[str]:
    """Relative links of a Markdown page (`x.md`, `x.md#a`, `#a`) that do not resolve."""
    bad = []
    text = page.read_text(encoding="utf-8")
    for target in MD_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: link {target}: {path} does not exist")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text(encoding="utf-8"))):
            bad.append(f"{page.name}: link {target}: no heading with anchor #{anchor}")
    return bad


def source_files() -> list[Path]:
    """*.py under the repository, without hidden folders (.venv, .git), runs, builds, this file."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return [p for p in sorted(out) if p.resolve() != Path(__file__).resolve()]


def readme_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "deploy").glob("**/README.md"))]


# --- the checker itself ------------------------------------------------------------------------


def test_slug_follows_github() -> None:
    assert slug("Sessions and `id_in_use`") == "sessions-and-id_in_use"
    assert slug("The staleness rule η") == "the-staleness-rule-η"
    assert slug("Heartbeats, liveness & reconnect") == "heartbeats-liveness--reconnect"
    assert slug("See [the code](x.py)") == "see-the-code"


def test_anchors_skip_code_and_number_duplicates() -> None:
    text = "# Top\n## Part\n```\n# not a heading\n```\n## Part\n"
    assert anchors(text) == {"top", "part", "part-1"}


def test_checker_finds_a_broken_reference(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "page.md").write_text("# Page\n## Good part\n", encoding="utf-8")
    ref = "doc" + "s/"  # kept out of this file's own text
    assert broken_doc_refs(f"see {ref}page.md#good-part and {ref}page.md.", docs) == []
    bad = broken_doc_refs(f"{ref}page.md#bad-part, {ref}gone.md, {ref}page", docs)
    assert len(bad) == 3, bad
    assert broken_doc_refs(f"https://readthe{ref}gone.md", docs) == []


def test_checker_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n[ok](b.md#part) [ok](#a) [web](https://x.org/y.md#z)\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# B\n## Part\n[bad](a.md#nope) [gone](c.md) [bad](#part-2)\n", encoding="utf-8")
    assert broken_links(tmp_path / "a.md") == []
    assert len(broken_links(tmp_path / "b.md")) == 3


# --- the repository ----------------------------------------------------------------------------


def test_docs_exist() -> None:
    assert (DOCS / "README.md").is_file(), "docs/README.md (the index) is missing"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_references_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="replace")
    old = [text[m.start():m.start() + 40].splitlines()[0] for m in OLD_DESIGN.finditer(text)]
    assert not old, f"{path.relative_to(ROOT)} cites the old design note ({old}): point at a docs/ page instead"
    bad = broken_doc_refs(text)
    assert not bad, f"{path.relative_to(ROOT)}: {bad}"


@pytest.mark.parametrize("path", readme_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_readme_references_resolve(path: Path) -> None:
    bad = broken_doc_refs(path.read_text(encoding="utf-8"))
    assert not bad, f"{path.relative_to(ROOT)}: {bad}"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda p: p.name)
def test_docs_links_resolve(page: Path) -> None:
    bad = broken_links(page) + broken_doc_refs(page.read_text(encoding="utf-8"))
    assert not bad, bad
