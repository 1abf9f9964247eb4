"""Reranker scores written into training rows as the embedder's distillation targets."""

from __future__ import annotations

import json

import pytest
import torch

from vlm2emb.data.schema import DataError, load_train_examples
from vlm2emb.rerank import Reranker, score_rows


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker.from_pretrained("tiny:qwen2_vl")


def test_teacher_scores_are_the_rerankers_scores_of_each_group(reranker, tmp_path, digit_images):
    rows = []
    for i in range(3):
        digit_images[i].save(tmp_path / f"d{i}.png")
        rows.append(
            {
                "query": {"image": f"d{i}.png"},
                "positive": {"text": f"digit {i}"},
                "negatives": [{"text": f"digit {j + 5}"} for j in range(i + 1)],  # ragged groups
                "instruction": "Which digit?",
                "teacher_scores": [9.0] * (i + 2),  # replaced
            }
        )
    src = tmp_path / "mined.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored" / "rows.jsonl"
    assert score_rows(reranker, src, out, batch_size=2) == 3
    assert not out.with_name("rows.jsonl.partial").exists()
    examples = load_train_examples([str(out)])  # the embedder's loader accepts them
    for row, ex in zip(rows, examples):
        group = [row["positive"], *row["negatives"]]
        want = reranker.score_pairs(
            [({"image": str(tmp_path / row["query"]["image"])}, c) for c in group], "Which digit?"
        )
        torch.testing.assert_close(torch.tensor(ex.teacher_scores), want, atol=1e-5, rtol=0)
        assert ex.instruction == "Which digit?"


def test_a_bad_row_writes_nothing(reranker, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"query": {"text": "q"}, "positive": {"text": "p"}}) + "\n" + "{not json\n")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        score_rows(reranker, src, out)
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()
