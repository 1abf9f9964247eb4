"""`vlm2emb export --overwrite` never deletes the run it exports from, the working folder or
a folder that is not an export; it replaces an earlier export by swapping the new one in."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vlm2emb.cli import main


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path: Path, tiny_qwen2_vl_dir: Path) -> Path:
    """A training run's folder: final/, checkpoints/, metrics and recipe."""
    out = tmp_path / "run"
    shutil.copytree(tiny_qwen2_vl_dir, out / "final")
    shutil.copytree(tiny_qwen2_vl_dir, out / "checkpoints" / "step-1")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "recipe.yaml").write_text("output_dir: run\n")
    return out


def test_exporting_into_the_run_folder_keeps_the_run(run: Path, capsys) -> None:
    before = _tree(run)
    assert main(["export", str(run / "final"), str(run), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"vlm2emb: error: {run}: holds the checkpoint {run / 'final'}; export to a new folder instead"
    )
    assert _tree(run) == before


def test_exporting_into_the_current_folder_keeps_it(run: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(run)
    before = _tree(run)
    # "." holds final/ as well; a sibling folder that holds the cwd is refused for the cwd.
    assert main(["export", "final", ".", "--overwrite"]) == 2
    assert "holds the checkpoint" in capsys.readouterr().err
    monkeypatch.chdir(run / "checkpoints")
    assert main(["export", str(run / "final"), str(run / "checkpoints"), "--overwrite"]) == 2
    assert "holds the current directory" in capsys.readouterr().err
    assert _tree(run) == before


def test_overwrite_refuses_a_folder_that_is_not_an_export(run: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    assert main(["export", str(run / "final"), str(mine), "--overwrite"]) == 2
    assert "not a vlm2emb export (no vlm2emb_config.json)" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "months of work"


def test_overwrite_replaces_an_earlier_export_and_leaves_no_temporaries(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert main(["export", str(run / "final"), str(out)]) == 0
    (out / "stale.txt").write_text("from the earlier export")
    assert main(["export", str(run / "final"), str(out), "--overwrite", "--dtype", "bf16"]) == 0
    assert not (out / "stale.txt").exists() and (out / "vlm2emb_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "run"]  # nothing left beside it
