"""Tests for vlm2emb.eval.runner, using a small deterministic table-lookup "model"."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from PIL import Image

from vlm2emb.eval.runner import _item_key, evaluate, format_report

DIM = 8


def onehot(i: int, scale: float = 1.0) -> list[float]:
    v = [0.0] * DIM
    v[i] = scale
    return v


class TableModel:
    """Maps each item's text to a fixed vector and records every ``encode`` call.

    Query texts may be looked up per instruction (``by_instruction``) to check that the runner
    gives each row the embedding produced under *its* instruction.
    """

    def __init__(
        self,
        table: dict[str, list[float]],
        by_instruction: dict[tuple[str | None, str], list[float]] | None = None,
    ) -> None:
        self.table = table
        self.by_instruction = by_instruction or {}
        self.calls: list[dict[str, Any]] = []

    def encode(
        self,
        items: list[Any],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
    ) -> torch.Tensor:
        texts = [item["text"] for item in items]
        self.calls.append({"texts": texts, "instruction": instruction, "batch_size": batch_size})
        vecs = [self.by_instruction.get((instruction, t), self.table.get(t)) for t in texts]
        return torch.tensor(vecs, dtype=torch.float32)  # [n, DIM]

    @property
    def n_items(self) -> int:
        return sum(len(c["texts"]) for c in self.calls)


def item(text: str, image: Any = None) -> dict[str, Any]:
    return {"text": text, "image": image}


def concept_table(n: int = DIM) -> dict[str, list[float]]:
    """Query "q{i}" and candidate "c{i}" share the one-hot vector e_i: a perfect model."""
    table = {}
    for i in range(n):
        table[f"q{i}"] = onehot(i)
        table[f"c{i}"] = onehot(i)
    return table


def row(q: int, cands: list[int], positive: Any = 0, **extra: Any) -> dict[str, Any]:
    return {
        "query": item(f"q{q}"),
        "candidates": [item(f"c{c}") for c in cands],
        "positive": positive,
        **extra,
    }


def test_perfect_model() -> None:
    rows = [row(i, [i] + [j for j in range(6) if j != i]) for i in range(6)]
    report = evaluate(TableModel(concept_table()), rows)
    metrics = report["tasks"]["default"]
    assert metrics["hit@1"] == 1.0
    assert metrics["mrr"] == 1.0
    assert metrics["ndcg@5"] == pytest.approx(1.0)
    assert metrics["n"] == 6
    assert report["average"]["n_tasks"] == 1


def test_positive_ranked_second() -> None:
    table = concept_table()
    # q0 leans towards c1 (score 0.8 vs 0.6 after normalisation): positive c0 comes second.
    table["q0"] = [0.6, 0.8] + [0.0] * (DIM - 2)
    rows = [row(0, [0, 1, 2, 3])]
    metrics = evaluate(TableModel(table), rows, ks=(1, 2))["tasks"]["default"]
    assert metrics["hit@1"] == 0.0
    assert metrics["hit@2"] == 1.0
    assert metrics["mrr"] == pytest.approx(0.5)
    assert metrics["precision@2"] == pytest.approx(0.5)


def test_positive_not_at_index_zero_and_multiple_positives() -> None:
    table = concept_table()
    table["q0"] = [0.6, 0.8] + [0.0] * (DIM - 2)  # ranking: c1, c0, c2, c3
    rows = [row(0, [2, 3, 0, 1], positive=[3, 2])]  # positives are c1 and c0
    metrics = evaluate(TableModel(table), rows, ks=(2,))["tasks"]["default"]
    assert metrics["recall@2"] == 1.0
    assert metrics["map"] == pytest.approx(1.0)


def test_shared_candidates_encoded_once() -> None:
    pool = list(range(8))
    # Five queries share one pool of 8 candidates; separate but equal dicts must dedupe too.
    rows = [row(i, [i] + [c for c in pool if c != i]) for i in range(5)]
    rows.append(row(0, [0, 1, 2]))  # duplicate query (same text, same instruction)
    model = TableModel(concept_table())
    report = evaluate(model, rows, batch_size=4)

    assert report["tasks"]["default"]["hit@1"] == 1.0
    assert len(model.calls) == 2  # one query call (single instruction) + one candidate call
    query_call, cand_call = model.calls
    assert query_call["texts"] == [f"q{i}" for i in range(5)]  # q0 encoded once
    assert sorted(cand_call["texts"]) == [f"c{i}" for i in pool]
    assert model.n_items == 5 + 8
    assert all(c["batch_size"] == 4 for c in model.calls)


def test_instructions_passed_per_group() -> None:
    table = concept_table()
    # The same query text retrieves a different candidate depending on its instruction, so a
    # row only scores well if it receives the embedding encoded under its own instruction.
    by_instruction = {("find cats", "q"): onehot(1), ("find dogs", "q"): onehot(2)}
    table["q"] = onehot(7)
    rows = [
        {
            "query": item("q"),
            "candidates": [item("c1"), item("c2")],
            "positive": 0,
            "instruction": "find cats",
        },
        {
            "query": item("q"),
            "candidates": [item("c2"), item("c1")],
            "positive": 0,
            "instruction": "find dogs",
        },
        {"query": item("q0"), "candidates": [item("c0"), item("c1")]},  # instruction None
        {
            "query": item("q"),
            "candidates": [item("c1"), item("c2")],
            "positive": 0,
            "instruction": "find cats",
        },
    ]
    model = TableModel(table, by_instruction)
    report = evaluate(model, rows, target_instruction="represent the image")

    assert report["tasks"]["default"]["hit@1"] == 1.0
    query_calls = [c for c in model.calls if c["instruction"] != "represent the image"]
    assert {c["instruction"]: c["texts"] for c in query_calls} == {
        "find cats": ["q"],
        "find dogs": ["q"],
        None: ["q0"],
    }
    cand_calls = [c for c in model.calls if c["instruction"] == "represent the image"]
    assert len(cand_calls) == 1
    assert sorted(cand_calls[0]["texts"]) == ["c0", "c1", "c2"]


def test_per_task_grouping_and_average() -> None:
    table = concept_table()
    table["q5"] = [0.0] * 5 + [0.6, 0.8, 0.0]  # q5 prefers c6 over its positive c5
    rows = [
        row(0, [0, 1, 2], task="easy"),
        row(5, [5, 6, 7], task="hard"),
        row(1, [1, 0, 2], task="easy"),
    ]
    model = TableModel(table)
    report = evaluate(model, rows, ks=(1, 5))

    assert list(report["tasks"]) == ["easy", "hard"]  # first-occurrence order
    easy, hard = report["tasks"]["easy"], report["tasks"]["hard"]
    assert (easy["hit@1"], easy["mrr"], easy["n"]) == (1.0, 1.0, 2)
    assert (hard["hit@1"], hard["mrr"], hard["n"]) == (0.0, 0.5, 1)
    # Unweighted mean over tasks (the 2-query task does not count double).
    avg = report["average"]
    assert avg["hit@1"] == pytest.approx(0.5)
    assert avg["mrr"] == pytest.approx(0.75)
    assert avg["n_tasks"] == 2
    assert "n" not in avg
    # The leaderboard block (VLM2Vec's definitions) is per task only.
    assert set(avg) - {"n_tasks"} == set(easy) - {"n", "leaderboard"}
    # Candidates are deduplicated per task: 2 tasks x (query call + candidate call).
    assert len(model.calls) == 4


def test_varying_candidate_counts_in_one_task() -> None:
    table = concept_table()
    table["q0"] = [0.6, 0.8] + [0.0] * (DIM - 2)  # positive c0 ranked second
    rows = [row(0, [0, 1, 2]), row(3, [3, 4, 5, 6, 7]), row(1, [1, 2])]
    metrics = evaluate(TableModel(table), rows, ks=(1, 5))["tasks"]["default"]
    assert metrics["hit@1"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((0.5 + 1 + 1) / 3)
    # precision@5 clamps k per row: 1/3 (3 candidates), 1/5 and 1/2.
    assert metrics["precision@5"] == pytest.approx((1 / 3 + 1 / 5 + 1 / 2) / 3)


def test_embeddings_are_renormalised() -> None:
    table = concept_table()
    table["q0"] = [0.6, 0.8] + [0.0] * (DIM - 2)
    # A raw dot product would prefer the long wrong vector c2; cosine still prefers c1.
    table["c2"] = [0.5, 0.0, 10.0] + [0.0] * (DIM - 3)
    rows = [row(0, [1, 2])]
    assert evaluate(TableModel(table), rows)["tasks"]["default"]["hit@1"] == 1.0


def test_item_key() -> None:
    assert _item_key({"text": "a", "image": None}) == _item_key({"text": "a"})
    assert _item_key({"text": "a", "image": "x.jpg"}) != _item_key({"text": "a"})
    assert _item_key({"text": "1"}) != _item_key({"text": 1})
    img, same_pixels = Image.new("RGB", (2, 2)), Image.new("RGB", (2, 2))
    assert _item_key({"image": img}) == _item_key({"image": img})
    # Distinct image objects are keyed by identity, never by (costly) pixel comparison.
    assert _item_key({"image": img}) != _item_key({"image": same_pixels})
    hash(_item_key({"text": "t", "image": img}))


def test_pil_candidates_deduped_by_identity() -> None:
    img_a, img_b = Image.new("RGB", (2, 2)), Image.new("RGB", (2, 2))
    table = concept_table()
    rows = [
        {"query": item("q0"), "candidates": [item("c0", img_a), item("c1", img_b)]},
        {"query": item("q1"), "candidates": [item("c1", img_b), item("c0", img_a)]},
    ]
    model = TableModel(table)
    evaluate(model, rows)
    assert len(model.calls[-1]["texts"]) == 2


def test_format_report() -> None:
    table = concept_table()
    table["q5"] = [0.0] * 5 + [0.6, 0.8, 0.0]
    rows = [row(0, [0, 1, 2], task="MSCOCO_t2i"), row(5, [5, 6, 7], task="VisualNews_i2t")]
    text = format_report(evaluate(TableModel(table), rows))
    lines = text.splitlines()
    assert "hit@1" in lines[0] and "ndcg@5" in lines[0] and "mrr" in lines[0]
    task_line = next(line for line in lines if line.startswith("MSCOCO_t2i"))
    assert "1.0000" in task_line
    hard_line = next(line for line in lines if line.startswith("VisualNews_i2t"))
    assert "0.0000" in hard_line and "0.5000" in hard_line
    avg_line = next(line for line in lines if line.startswith("average"))
    assert "0.7500" in avg_line  # mean mrr of 1.0 and 0.5
    # Fixed width: every table row has the same length.
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"candidates": [item("c0")]}, "row 1: missing 'query'"),
        ({"query": item("q0"), "candidates": []}, "row 1: 'candidates'"),
        ({"query": item("q0"), "candidates": [item("c0")], "positive": 3}, "row 1: positive index 3"),
        ({"query": item("q0"), "candidates": [item("c0")], "positive": []}, "row 1: 'positive' is empty"),
    ],
)
def test_invalid_rows_raise(bad_row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(TableModel(concept_table()), [row(0, [0, 1]), bad_row])


def test_empty_rows_raise() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        evaluate(TableModel({}), [])


def test_a_copy_of_the_positive_is_the_positive_but_ties_between_different_items_stay_pessimistic() -> None:
    table = {"q": onehot(0), "pos": onehot(0), "other": onehot(1), "twin": onehot(0)}
    model = TableModel(table)
    # Candidate 2 has the positive's content: it shares its embedding and counts as a hit.
    rows = [{"query": item("q"), "candidates": [item("pos"), item("other"), item("pos")], "task": "copy"}]
    # "twin" is a different item with the positive's score: the tie goes against relevance.
    rows.append({"query": item("q"), "candidates": [item("pos"), item("other"), item("twin")], "task": "tie"})
    report = evaluate(model, rows, ks=(1, 2))["tasks"]
    assert report["copy"]["hit@1"] == 1.0 and report["copy"]["mrr"] == 1.0
    assert report["copy"]["recall@2"] == 1.0  # both copies are relevant and in the top 2
    assert report["tie"]["hit@1"] == 0.0 and report["tie"]["mrr"] == 0.5


def test_mmeb_rows_with_repeated_candidates_score_as_vlm2vec_row_by_row(tmp_path) -> None:
    """Real tiny model, MMEB-eval file: per row, hit@1 equals VLM2Vec v1 (argmax, positive at
    index 0) and V2 (label match), computed by transcriptions of their code."""
    import json
    import random

    import numpy as np

    from tests import vlm2vec_reference as ref
    from vlm2emb.eval.mmeb import load_local_rows
    from vlm2emb.model import EmbeddingModel

    names = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray"]
    rng = random.Random(0)
    mmeb = [
        # The row: the query is the positive's text, so the positive wins, twice.
        {"qry_text": "tench", "tgt_text": ["tench", "goldfish", "tench", "great white shark"]},
    ]
    for _ in range(40):
        cands = [rng.choice(names) for _ in range(5)]
        query = rng.choice([cands[0], *names, "a photo of a " + cands[0]])
        mmeb.append({"qry_text": query, "tgt_text": cands})
    path = tmp_path / "ImageNet-1K.jsonl"
    path.write_text(
        "".join(
            json.dumps({**r, "qry_img_path": "", "tgt_img_path": [""] * len(r["tgt_text"])}) + "\n"
            for r in mmeb
        )
    )
    rows = load_local_rows([str(path)])
    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    report = evaluate(model, [{**row, "task": f"row{i}"} for i, row in enumerate(rows)], ks=(1,))["tasks"]

    texts = sorted({t for r in mmeb for t in [r["qry_text"], *r["tgt_text"]]})
    emb = dict(zip(texts, model.encode(texts).numpy()))
    repeated_hits = 0
    for i, r in enumerate(mmeb):
        keys = list(r["tgt_text"])
        v1 = ref.v1_hit(emb[r["qry_text"]], emb, keys)
        v2 = ref.v2_hit_at_1(emb[r["qry_text"]], emb, keys)
        assert v1 == v2
        assert report[f"row{i}"]["hit@1"] == float(v1), (i, r)
        repeated_hits += v1 and keys.count(keys[0]) > 1
    assert report["row0"]["hit@1"] == 1.0  # a miss before: the later copy outranked the positive
    assert repeated_hits >= 2
    assert np.isfinite(list(emb.values())).all()
