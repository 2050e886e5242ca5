"""The user documentation (README.md and docs/*.md, not the research logs in docs/research/)
stays navigable and free of measurement narrative: every relative link and anchor resolves, and
no page names commits, issues or load averages (those belong in docs/research/ or scripts/results/)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL_PAGES = [*PAGES, *sorted((ROOT / "docs" / "research").glob("*.md"))]
README_MAX_LINES = 250


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_anchor_follows_github():
    assert anchor("Scaling out: `ocl extract`, workers and Ray") == "scaling-out-ocl-extract-workers-and-ray"
    assert anchor("Where a step's time goes") == "where-a-steps-time-goes"


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no such heading")
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_carry_no_measurement_narrative(page):
    text = page.read_text()
    found = re.findall(r"(?<!sha1 )\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)  # commit hashes
    # (a weights file's "sha1 70edd489761c", as the tables print it, is not one)
    found += re.findall(r"\bissues? \d+|(?<![\w&])#\d+\b", text, re.I)
    found += re.findall(r"load average", text, re.I)
    assert not found, f"{page.relative_to(ROOT)} names {found}: move the narrative to docs/research/"


def test_readme_stays_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference to docs/"
