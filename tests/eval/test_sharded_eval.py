"""`accelerate launch --num_processes 2 -m vlm2emb eval`: each process encodes half, results match."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import accelerate_launch, launch_env
from vlm2emb.cli import main
from vlm2emb.data.demo import write_digits

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_two_process_eval_matches_one_process(tmp_path: Path) -> None:
    root = write_digits(tmp_path / "digits")
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    small = root / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:25] + rows[-5:]))  # both tasks
    args = ["eval", "--model", "tiny:qwen2_vl", "--data", str(small), "--batch-size", "8"]

    assert main([*args, "--cache-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "one.json")]) == 0
    env = launch_env()
    launch = [*accelerate_launch("ddp"), "-m", "vlm2emb"]
    cmd = [*launch, *args, "--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("average") == 1  # only the main process prints the table

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["cache"]["processes"] == 2 and one["cache"]["processes"] == 1
    assert two["cache"]["misses"] == one["cache"]["misses"] == 4  # 2 tasks x (queries, candidates)
    for task, metrics in one["tasks"].items():
        for name, value in metrics.items():
            assert two["tasks"][task][name] == pytest.approx(value, abs=1e-6), (task, name)
    # The gathered embeddings equal the single-process ones, row for row (same cache keys).
    files1 = sorted(p.relative_to(tmp_path / "c1") for p in (tmp_path / "c1").glob("*/*.safetensors"))
    files2 = sorted(p.relative_to(tmp_path / "c2") for p in (tmp_path / "c2").glob("*/*.safetensors"))
    assert files1 == files2 and len(files1) == 4
    for rel in files1:
        a = load_file(str(tmp_path / "c1" / rel))["embeddings"]
        b = load_file(str(tmp_path / "c2" / rel))["embeddings"]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
