"""The per-task instruction record (vlm2emb.items) and how the model card shows it.

Fast: no model is loaded; the record of a real training run is checked in test_export.py.
"""

from __future__ import annotations

import random

import pytest

from vlm2emb.export import model_card
from vlm2emb.items import INSTRUCTION_CAP, instruction_record, task_instruction


def _rows() -> list[tuple[str, str | None, str | None]]:
    rng = random.Random(0)
    rows = [("cls", "Classify the image.", None)] * 5
    # vqa: each row its own question as instruction, some repeated; targets share one.
    questions = [f"Question {i}?" for i in range(12)]
    rows += [("vqa", rng.choice(questions), "Represent the answer.") for _ in range(40)]
    rows += [("mixed", "A.", None), ("mixed", "", None), ("mixed", "A.", None)]  # "" counts as none
    return rows


def test_record_counts_and_orders_by_use() -> None:
    rows = _rows()
    record = instruction_record(rows)
    assert list(record) == ["cls", "vqa", "mixed"]  # order of first appearance
    assert record["cls"] == {
        "rows": 5,
        "query": ["Classify the image."],
        "query_distinct": 1,
        "target": [None],
        "target_distinct": 1,
    }
    # Reference: count by hand, sort by (-count, first position).
    vqa = [q for t, q, _ in rows if t == "vqa"]
    counts = {q: vqa.count(q) for q in vqa}
    ranked = sorted(counts, key=lambda q: (-counts[q], vqa.index(q)))
    entry = record["vqa"]
    assert entry["rows"] == 40 and entry["query_distinct"] == len(counts) > INSTRUCTION_CAP
    assert entry["query"] == ranked[:INSTRUCTION_CAP]
    assert entry["target"] == ["Represent the answer."] and entry["target_distinct"] == 1
    assert record["mixed"]["query"] == ["A.", None] and record["mixed"]["query_distinct"] == 2


def test_task_instruction_reads_one_or_refuses() -> None:
    record = instruction_record(_rows())
    assert task_instruction(record, "cls", "query") == "Classify the image."
    assert task_instruction(record, "cls", "target") is None
    assert task_instruction(record, "vqa", "target") == "Represent the answer."
    with pytest.raises(ValueError, match=r"task 'vqa': its rows had \d+ different query instructions"):
        task_instruction(record, "vqa", "query")
    with pytest.raises(ValueError, match="unknown task 'x'; the model was trained on: cls, vqa, mixed"):
        task_instruction(record, "x", "query")
    with pytest.raises(ValueError, match="records no training instructions"):
        task_instruction(None, "cls", "query")


def test_card_shows_per_row_instructions_and_uses_them() -> None:
    record = instruction_record(_rows())
    config = {"family": "qwen2_vl", "base_model": "b", "instructions": record, "query_instruction": None}
    card = model_card(
        config, run_dir=None, mode="merged", format="vlm2emb", dtype="fp32", license=None, verifications=[]
    )
    vqa = record["vqa"]
    row = next(line for line in card.splitlines() if line.startswith("| vqa |"))
    assert f"per row, {vqa['query_distinct']} distinct; most used: `{vqa['query'][0]}`" in row
    assert row.endswith("| `Represent the answer.` |")
    # Usage: a shared instruction by task=, a per-row one by the caller's own instruction=.
    assert 'model.encode_queries([{"image": "query.png"}, "a query text"], task="cls")' in card
    assert 'model.encode_queries([{"image": "query.png"}, "a query text"], instruction="...")' in card
    assert "# its query instructions varied per row in training" in card
    assert 'model.encode_targets(["a candidate text", {"image": "doc.png"}], task="vqa")' in card
    snippet = card.split("```python\n")[1].split("```")[0]
    compile(snippet, "model card usage", "exec")  # the snippet is valid Python
    # Without a record the card says so and keeps the defaults.
    plain = model_card(
        {"family": "qwen2_vl"},
        run_dir=None,
        mode="merged",
        format="vlm2emb",
        dtype="fp32",
        license=None,
        verifications=[],
    )
    assert "No per-task record" in plain and "encode_queries([" in plain
