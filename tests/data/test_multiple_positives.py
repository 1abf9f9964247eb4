"""Rows with several positives: one pair per positive, the query's other positives masked."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlm2emb.data.collate import ContrastiveCollator
from vlm2emb.data.schema import DataError, load_train_examples
from vlm2emb.losses import info_nce_loss


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_row_with_positives_becomes_one_pair_per_positive(tmp_path):
    path = _write(
        tmp_path / "t.jsonl",
        [
            {"query": "q", "positives": ["p1", {"text": "p2"}, "p3"], "negatives": ["n"], "instruction": "I"},
            {"query": "r", "positive": "s"},
        ],
    )
    rows = load_train_examples([str(path)])
    assert [ex.positive["text"] for ex in rows] == ["p1", "p2", "p3", "s"]
    assert all(ex.query == rows[0].query and ex.negatives == [{"text": "n"}] for ex in rows[:3])
    assert {ex.source for ex in rows[:3]} == {f"{path}:1"} and rows[0].instruction == "I"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"query": "q", "positive": "p", "positives": ["p2"]}, "either positive or positives"),
        ({"query": "q", "positives": []}, "positives must be a non-empty list"),
        ({"query": "q", "positives": "p"}, "positives must be a non-empty list"),
        ({"query": "q", "positives": ["p", "p"]}, "positives[1] repeats"),
        ({"query": "q", "positives": ["p", "o"], "negatives": ["o"]}, "negatives[0] is also a positive"),
        (
            {"query": "q", "positives": ["p", "o"], "teacher_scores": [1.0]},
            "teacher_scores cannot be combined",
        ),
        ({"query": "q", "positives": ["p", 3]}, "positives[1] must be an object"),
        ({"query": "q"}, "missing field 'positive'"),
    ],
)
def test_bad_positives_name_the_line(tmp_path, row, reason):
    path = _write(tmp_path / "t.jsonl", [{"query": "a", "positive": "b"}, row])
    with pytest.raises(DataError, match=r"t\.jsonl:2: .*" + reason.replace("[", r"\[").replace("]", r"\]")):
        load_train_examples([str(path)])


def _reference(q, t, groups):
    """Per pair i: -log e^{s_ii} / (e^{s_ii} + sum over candidates outside i's group)."""
    out = []
    for i in range(q.shape[0]):
        s = [float(q[i] @ t[j]) / 0.05 for j in range(t.shape[0])]
        keep = [s[i]] + [s[j] for j in range(len(s)) if groups[j] != groups[i]]
        out.append(-(s[i] - math.log(sum(math.exp(x) for x in keep))))
    return sum(out) / len(out)


def test_the_querys_other_positives_are_masked_in_the_loss(tmp_path, tiny_qwen2_vl_dir):
    from vlm2emb import EmbeddingModel

    path = _write(
        tmp_path / "t.jsonl",
        [{"query": "q", "positives": ["p1", "p2", "p3"]}, {"query": "r", "positive": "s"}],
    )
    rows = load_train_examples([str(path)])
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    batch = ContrastiveCollator(model.inputs)(rows)
    groups = batch.positive_keys.tolist()
    assert groups[0] == groups[1] == groups[2] != groups[3]  # one query: one group
    q = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    got = info_nce_loss(q, t, temperature=0.05, positive_keys=batch.positive_keys)
    assert float(got) == pytest.approx(_reference(q, t, groups), rel=1e-9)
    # Without the keys the other positives would count as negatives: a different loss.
    assert float(info_nce_loss(q, t, temperature=0.05)) != pytest.approx(float(got), rel=1e-6)
