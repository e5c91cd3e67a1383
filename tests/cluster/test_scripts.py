"""The batch scripts are the ones docs/training.md shows, whole, and they parse as bash. No SLURM
needed. The cluster tier submits all but distill-multinode.sbatch (slurm-local is one node)."""

from __future__ import annotations

import subprocess

import dpal_tests_cluster_util as cu  # registered by tests/cluster/conftest.py
import pytest

SBATCH = sorted(cu.SCRIPTS.glob("*.sbatch"))


def test_there_are_scripts() -> None:
    assert [p.name for p in SBATCH] == ["cache-array.sbatch", "distill-multinode.sbatch", "distill.sbatch"]


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_docs_show_the_submitted_script(script) -> None:
    docs = (cu.REPO_ROOT / "docs" / "training.md").read_text()
    assert f"```bash\n{script.read_text()}```\n" in docs, (
        f"docs/training.md must show {script.relative_to(cu.REPO_ROOT)} whole, in a ```bash block"
    )


@pytest.mark.parametrize("script", [*SBATCH, cu.START_STOP], ids=lambda p: p.name)
def test_parses_as_bash(script) -> None:
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
