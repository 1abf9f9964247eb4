"""What the commands write gets the permissions the process's umask gives any new file:
readable by group and others under 022, private under 077 (issue 21: run folders were 0700)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from vlm2emb.cli import main

REPO = Path(__file__).resolve().parents[1]


def modes(root: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(os.stat(p).st_mode) for p in [root, *root.rglob("*")] if not p.is_symlink()}


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["022", "077"])
def test_a_run_folder_and_make_eval_output_follow_the_umask(tmp_path: Path, mask: int) -> None:
    out = tmp_path / "run"
    argv = ["train", str(REPO / "recipes" / "demo.yaml"), f"output_dir={out}", "train.max_steps=2"]
    argv += ["train.batch_size=8", "train.save_steps=1", "data.eval=[]", "--no-progress"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(8)))
    previous = os.umask(mask)
    try:
        assert main(argv) == 0
        make = ["data", "make-eval", str(rows), "--eval-out", str(tmp_path / "ev" / "e.jsonl")]
        assert main([*make, "--train-out", str(tmp_path / "ev" / "t.jsonl"), "--rows", "3"]) == 0
    finally:
        os.umask(previous)
    written = {**modes(out / "final"), **modes(out / "checkpoints"), **modes(tmp_path / "ev")}
    assert any(p.suffix == ".safetensors" for p in written)  # safetensors writes 0600 by itself
    assert (out / "checkpoints" / "step-1").is_dir()
    for path, mode in written.items():
        assert mode == (0o777 if path.is_dir() else 0o666) & ~mask, (path, oct(mode))
    readable = all(mode & stat.S_IROTH for mode in written.values())
    assert readable == (mask == 0o022)
