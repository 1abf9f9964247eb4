"""``vlm2emb rerank train | eval | score`` end to end on tiny models, and their user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm2emb.cli import main

WORDS = ["zero", "one", "two", "three"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "train.jsonl",
        [
            {
                "query": {"text": f"digit {w}"},
                "positive": {"text": w},
                "negatives": [{"text": WORDS[(i + 1) % 4]}],
            }
            for i, w in enumerate(WORDS)
        ],
    )


def test_help_exits_zero(capsys):
    for argv in (["rerank", "--help"], ["rerank", "train", "--help"], ["rerank", "eval", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "--recall-k" in capsys.readouterr().out


def test_train_with_overrides(tmp_path, train_file, capsys):
    recipe = tmp_path / "rr.yaml"
    recipe.write_text(f"data:\n  train: [{train_file}]\ngroup_size: 2\nmax_steps: 5\n")
    out = tmp_path / "run"
    assert main(["rerank", "train", str(recipe), "max_steps=2", f"output_dir={out}"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert json.loads((out / "recipe.json").read_text())["max_steps"] == 2
    assert (out / "final" / "vlm2emb_reranker.json").is_file()


def test_eval_prints_both_sides_and_writes_the_report(tmp_path, capsys):
    rows = [
        {"query": {"text": w}, "candidates": [{"text": f"the digit {c}"} for c in WORDS], "positive": i}
        for i, w in enumerate(WORDS)
    ]
    data = _write(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "report.json"
    argv = ["rerank", "eval", "--embedder", "tiny:qwen2_vl", "--reranker", "tiny:qwen2_vl"]
    assert main([*argv, "--data", str(data), "--recall-k", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hit@1 emb" in printed and "hit@1 +rr@2" in printed and "average" in printed
    report = json.loads(out.read_text())
    task = report["tasks"]["eval"]  # the task is named after the file, as in vlm2emb eval
    assert report["recall_k"] == 2 and task["n"] == 4 and task["pairs_reranked"] == 8
    assert set(task["embedder"]) == set(task["reranked"]) and "mrr" in task["reranked"]
    assert task["seconds"]["embed"] > 0 and task["seconds"]["rerank"] > 0


def test_score_writes_teacher_scores(tmp_path, train_file, capsys):
    out = tmp_path / "scored.jsonl"
    assert (
        main(["rerank", "score", "--reranker", "tiny:qwen2_vl", "--data", str(train_file), "--out", str(out)])
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["teacher_scores"]) for r in rows] == [2, 2, 2, 2]
    assert "scored 4 rows" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, train_file, capsys):
    recipe = tmp_path / "rr.yaml"
    recipe.write_text(f"data:\n  train: [{train_file}]\ngrup_size: 2\n")
    assert main(["rerank", "train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm2emb: error: unknown key 'grup_size'") and "\n" not in err
    bad = _write(tmp_path / "bad.jsonl", [{"query": {"text": "q"}}])
    assert (
        main(["rerank", "score", "--reranker", "tiny:qwen2_vl", "--data", str(bad), "--out", "x.jsonl"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:1" in err and "\n" not in err
    assert main(["rerank", "train", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err
