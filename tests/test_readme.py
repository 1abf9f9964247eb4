"""The README's commands and CI stay in step; the code base stays lint-clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("python3 -m venv")
    ]
    assert len(ci_lines) == 1
    readme = (ROOT / "README.md").read_text()
    assert ci_lines[0] in readme
    assert "vlm2emb train recipes/demo.yaml" in readme


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(args):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
