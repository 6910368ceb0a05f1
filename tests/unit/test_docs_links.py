"""The README stays a short front page, and every relative link in the docs reaches a file and,
where it names one, a heading that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    REPO_ROOT / "README.md",
    REPO_ROOT / "training" / "README.md",
    REPO_ROOT / "k8s" / "README.md",
    *sorted((REPO_ROOT / "docs").glob("*.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_readme_is_a_front_page() -> None:
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert broken == []


def test_the_services_help_names_a_document_that_exists() -> None:
    from gateway.config import GatewaySettings
    from serving.ranking.config import RankingSettings
    from serving.retrieval.config import RetrievalSettings

    for cls in (RankingSettings, RetrievalSettings, GatewaySettings):
        cited = re.findall(r"([\w/.-]+\.md)(?:#([\w-]+))?", cls.__doc__ or "")
        assert cited, f"{cls.__name__}'s --help text cites no document"
        for file_part, anchor in cited:
            assert (REPO_ROOT / file_part).is_file(), file_part
            if anchor:
                assert anchor in anchors(REPO_ROOT / file_part), f"{file_part}#{anchor}"
