"""The tests the documentation names (`FILE::TEST`, as docs/benchmarks.md's reliability tables cite
them) exist, so that a renamed or deleted test cannot leave a row pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_ID = re.compile(r"(test_\w+\.py)::(test_\w+)")


def _cited() -> set[tuple[str, str]]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {m.groups() for doc in docs for m in TEST_ID.finditer(doc.read_text())}


def test_every_test_the_docs_name_exists() -> None:
    cited = _cited()
    assert len(cited) >= 70  # the reliability tables alone name more
    missing = []
    for name, test in sorted(cited):
        files = list((ROOT / "tests").rglob(name))
        if not any(re.search(rf"^def {test}\(", f.read_text(), re.M) for f in files):
            missing.append(f"{name}::{test}")
    assert missing == []
