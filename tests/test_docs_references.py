"""Every file the code and the docs point a reader to exists in this repository.

A bare clone is the product: a docstring or a doc that cites a file (``docs/method.md section 7``,
``bench/study.py``, ``[kernels.md](kernels.md)``, a bare ``METHOD.md``) must name one the clone holds.
"""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
           *sorted((REPO / "appo").rglob("*.py")), *sorted((REPO / "kernels").rglob("*.py"))]
TOP = ("appo", "kernels", "csrc", "docs", "bench", "tests", "scripts", "configs", "examples", ".ci")
# a repository path: a top-level folder then path characters, ending in a file extension
TOP_FOLDER = "|".join(re.escape(top) for top in TOP)
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{TOP_FOLDER})/[\w./-]*\w\.(?:py|md|sh|yaml|toml|json|cpp|cu|h|txt))")
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
BARE_MARKDOWN = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")    # METHOD.md-style names of outside docs
ALLOWED_ELSEWHERE = {"README.md"}          # the README sits at the root
# files folded into another one: a text may name them only beside their successor
RETIRED = {"bench/compare_algos.py": "bench/study.py"}


def cited(text: str, source: Path) -> set[Path]:
    """The repository files ``text`` (from ``source``) points to."""
    found = {REPO / match for match in REPO_PATH.findall(text)
             if not (match in RETIRED and RETIRED[match] in text)}
    for target in MARKDOWN_LINK.findall(text) if source.suffix == ".md" else ():
        if "://" not in target and not target.startswith("mailto:"):
            found.add((source.parent / target).resolve())
    for name in BARE_MARKDOWN.findall(text):
        if name in ALLOWED_ELSEWHERE:
            continue
        beside = [source.parent / name, REPO / "docs" / name, REPO / name]
        found.add(next((path for path in beside if path.exists()), REPO / "docs" / name))
    return found


def test_the_scan_sees_the_citations_it_checks():
    text = "see docs/method.md section 7, [kernels](kernels.md) and METHOD.md; bench/nothing_here.py"
    paths = cited(text, REPO / "docs" / "architecture.md")
    assert {REPO / "docs" / "method.md", REPO / "docs" / "kernels.md"} <= paths
    missing = {path.relative_to(REPO).as_posix() for path in paths if not path.exists()}
    assert missing == {"docs/METHOD.md", "bench/nothing_here.py"}
    # a retired file counts as cited unless its successor is named too
    assert REPO / "bench/compare_algos.py" in cited("run bench/compare_algos.py", REPO / "README.md")
    assert not cited("bench/compare_algos.py, now in bench/study.py", REPO / "README.md") - {
        REPO / "bench/study.py"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_cited_file_exists(source):
    text = source.read_text(encoding="utf-8")
    missing = sorted(path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
                     for path in cited(text, source) if not path.exists())
    assert not missing, f"{source.relative_to(REPO)} cites files this repository lacks: {missing}"
