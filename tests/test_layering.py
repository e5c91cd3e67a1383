"""Layering invariants: pipeline/ and trainer/ never import each other (docs/architecture.md).

Every import is checked, absolute or relative: `from ..pipeline import engine` in
dpal/trainer/x.py is resolved against the module's package to dpal.pipeline.engine first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the `dpal` package (pyproject: package-dir dpal = ".")


def _module_name(path: Path, root: Path = ROOT) -> str:
    """dpal.trainer.train for ROOT/trainer/train.py; dpal.trainer for ROOT/trainer/__init__.py."""
    parts = ["dpal", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) may import, relative imports made absolute.

    `from A import b` yields A and A.b, since b may be a submodule (`from dpal import trainer`).
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # level 1 is the module's own package, each further dot one package up
                assert node.level <= len(package), f"{module}: relative import beyond the top package"
                base = package[: len(package) - node.level + 1]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            out.add(parent)
            out.update(f"{parent}.{a.name}" for a in node.names if a.name != "*")
    return out


def _file_imports(path: Path, root: Path = ROOT) -> set[str]:
    return _imports(path.read_text(), _module_name(path, root), is_package=path.name == "__init__.py")


def _offenders(package: str, forbidden: str, root: Path = ROOT) -> list[str]:
    bad = []
    for f in sorted((root / package).rglob("*.py")):
        for mod in sorted(_file_imports(f, root)):
            if mod == f"dpal.{forbidden}" or mod.startswith(f"dpal.{forbidden}."):
                bad.append(f"{f.relative_to(root)} imports {mod}")
    return bad


def test_pipeline_does_not_import_trainer() -> None:
    assert _offenders("pipeline", "trainer") == []


def test_trainer_does_not_import_pipeline() -> None:
    assert _offenders("trainer", "pipeline") == []


def test_shared_modules_import_neither_stage() -> None:
    shared = [
        *(p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "store").glob("*.py"))),
        "common.py",
        "views.py",
        "corpus.py",
        "config.py",
        "teachers.py",
        "vit.py",
    ]
    assert "store/codecs.py" in shared
    bad = [
        f"{name} imports {mod}"
        for name in shared
        for mod in _file_imports(ROOT / name)
        if mod.startswith(("dpal.pipeline", "dpal.trainer"))
    ]
    assert bad == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text(
        "from dpal.trainer.train import train\nimport dpal.pipeline.cache\nfrom dpal import trainer\n"
    )
    assert _imports(f.read_text(), "dpal.x") == {
        "dpal.trainer.train",
        "dpal.trainer.train.train",
        "dpal.pipeline.cache",
        "dpal",
        "dpal.trainer",
    }


def test_checker_resolves_relative_imports() -> None:
    assert _imports(
        "from ..store import x\nfrom . import y\nfrom .data import z\n", "dpal.trainer.train"
    ) == {
        "dpal.store",
        "dpal.store.x",
        "dpal.trainer",
        "dpal.trainer.y",
        "dpal.trainer.data",
        "dpal.trainer.data.z",
    }
    # in a package's __init__, `.` is that package itself
    assert _imports("from . import cache\nfrom .. import views\n", "dpal.pipeline", is_package=True) == {
        "dpal.pipeline",
        "dpal.pipeline.cache",
        "dpal",
        "dpal.views",
    }


def test_checker_catches_relative_imports_across_the_stages(tmp_path: Path) -> None:
    # a copy of the layout with relative imports across pipeline/ and trainer/, in a module, in a
    # package __init__ and one level down
    (tmp_path / "trainer" / "sub").mkdir(parents=True)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "trainer" / "__init__.py").write_text("from ..pipeline import cache\n")
    (tmp_path / "trainer" / "ok.py").write_text("from ..store import StoreReader\nfrom . import data\n")
    (tmp_path / "trainer" / "sub" / "deep.py").write_text("from ...pipeline.engine import run\n")
    (tmp_path / "pipeline" / "engine.py").write_text("from .. import trainer\n")
    assert _offenders("trainer", "pipeline", tmp_path) == [
        "trainer/__init__.py imports dpal.pipeline",
        "trainer/__init__.py imports dpal.pipeline.cache",
        "trainer/sub/deep.py imports dpal.pipeline.engine",
        "trainer/sub/deep.py imports dpal.pipeline.engine.run",
    ]
    assert _offenders("pipeline", "trainer", tmp_path) == ["pipeline/engine.py imports dpal.trainer"]


MAX_FUNCTION_LINES = 60
NOT_PRODUCT = {".venv", "tests", "bench", "scripts", "sample_data", "build", "demo_out"}


def _long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of each function whose body, its docstring left out, spans more than `limit` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            has_doc = (
                isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            )
            first = body[1] if has_doc and len(body) > 1 else body[0]
            lines = node.end_lineno - first.lineno + 1
            if lines > limit:
                out.append((node.name, lines))
    return out


def test_long_function_detector_counts_the_body_without_its_docstring() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert _long_functions(f'def f():\n    """Doc\n\n    more doc.\n    """\n{body}\n') == [("f", 61)]
    assert _long_functions(f'def f():\n    """Doc."""\n{body}\n', limit=61) == []
    assert _long_functions("def g():\n    return 1\n") == []


def test_no_function_in_the_product_is_longer_than_sixty_lines() -> None:
    """The product's functions stay short enough to read at once (bench/, scripts/ and tests/ aside)."""
    long = {}
    for path in sorted(ROOT.rglob("*.py")):
        if NOT_PRODUCT.isdisjoint(path.relative_to(ROOT).parts):
            long.update(
                {f"{path.relative_to(ROOT)}:{name}": n for name, n in _long_functions(path.read_text())}
            )
    assert long == {}
