"""The docs that ship with the project: every reference to the method notes lands on one of their
sections, and nothing points at a file outside the repository."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in names.splitlines():
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".smk", ""} and path.is_file():
            yield path


def anchor(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_method_references_name_existing_sections():
    method = (REPO / "docs" / "method.md").read_text()
    anchors = {anchor(h) for h in re.findall(r"^#+ (.+)$", method, re.M)}
    cited = {}
    for path in tracked_text_files():
        for a in re.findall(r"docs/method\.md#([\w-]+)", path.read_text(errors="replace")):
            cited.setdefault(a, path)
    assert cited, "no file cites a section of docs/method.md"
    missing = {a: str(p.relative_to(REPO)) for a, p in cited.items() if a not in anchors}
    assert not missing, missing


def test_no_reference_to_files_outside_the_repository():
    # the project's own method notes are docs/method.md; the spec it was written from is not shipped
    offenders = [str(p.relative_to(REPO)) for p in tracked_text_files()
                 if p.name != "test_docs.py" and "PAPER.md" in p.read_text(errors="replace")]
    assert not offenders
