"""Layering invariants: pipeline/ and trainer/ never import each other (style.md section 1)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _offenders(package: str, forbidden: str) -> list[str]:
    bad = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for mod in _imports(f):
            if mod == f"dpal.{forbidden}" or mod.startswith(f"dpal.{forbidden}."):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    return bad


def test_pipeline_does_not_import_trainer() -> None:
    assert _offenders("pipeline", "trainer") == []


def test_trainer_does_not_import_pipeline() -> None:
    assert _offenders("trainer", "pipeline") == []


def test_shared_modules_import_neither_stage() -> None:
    shared = ["store.py", "views.py", "corpus.py", "config.py", "teachers.py", "vit.py"]
    bad = [
        f"{name} imports {mod}"
        for name in shared
        for mod in _imports(ROOT / name)
        if mod.startswith(("dpal.pipeline", "dpal.trainer"))
    ]
    assert bad == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from dpal.trainer.train import train\nimport dpal.pipeline.cache\n")
    assert _imports(f) == {"dpal.trainer.train", "dpal.pipeline.cache"}
