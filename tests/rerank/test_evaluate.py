"""evaluate_pipeline: embedder-only vs recall -> rerank metrics, side by side."""

from __future__ import annotations

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.eval import evaluate
from vlm2emb.rerank import Reranker, evaluate_pipeline

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _rows() -> list[dict]:
    rows = []
    for i in range(10):
        candidates = [{"text": f"a handwritten digit {w}"} for w in WORDS]
        rows.append(
            {
                "query": {"text": WORDS[i]},
                "candidates": candidates,
                "positive": i,
                "task": "words" if i < 6 else "more-words",
                "instruction": "Find the caption.",
            }
        )
    return rows


class OracleReranker:
    """Knows each query's positive (the caption ending with the query word): a perfect
    reranker, so the pipeline's metrics follow from the embedder's recall alone."""

    def score_pairs(self, pairs, instructions=None, batch_size=16):
        return torch.tensor([1.0 if c["text"].endswith(" " + q["text"]) else 0.0 for q, c in pairs])


@pytest.fixture(scope="module")
def embedder() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


def test_embedder_side_equals_vlm2emb_eval(embedder):
    report = evaluate_pipeline(embedder, OracleReranker(), _rows(), recall_k=3)
    reference = evaluate(embedder, _rows())
    for task, metrics in reference["tasks"].items():
        for name in ("hit@1", "hit@5", "ndcg@10", "mrr", "map"):
            assert report["tasks"][task]["embedder"][name] == pytest.approx(metrics[name], abs=1e-6)
        assert report["tasks"][task]["n"] == metrics["n"]
    assert report["average"]["embedder"]["mrr"] == pytest.approx(reference["average"]["mrr"], abs=1e-6)


@pytest.mark.parametrize("recall_k", [1, 3, 10])
def test_a_perfect_reranker_lifts_hit_at_1_to_the_embedders_recall(embedder, recall_k):
    report = evaluate_pipeline(embedder, OracleReranker(), _rows(), recall_k=recall_k, ks=(1, 3, 10))
    for r in report["tasks"].values():
        # The positive is first after re-ranking exactly when the embedder recalled it.
        assert r["reranked"]["hit@1"] == pytest.approx(r["embedder"][f"hit@{recall_k}"])
        assert r["pairs_reranked"] == r["n"] * recall_k
        assert r["seconds"]["embed"] > 0 and r["seconds"]["rerank"] >= 0
    if recall_k == 10:  # every candidate re-ranked by a perfect reranker
        assert report["average"]["reranked"]["mrr"] == 1.0
    else:  # and the embedder alone is not perfect here, so the test can tell them apart
        assert report["average"]["embedder"]["hit@1"] < 1.0


def test_real_reranker_order_below_recall_k_is_the_embedders(embedder):
    reranker = Reranker.from_pretrained("tiny:qwen2_vl", seed=3)
    rows = _rows()[:3]
    report = evaluate_pipeline(embedder, reranker, rows, recall_k=2, ks=(1, 2, 10))
    # Recompute each row's pipeline order from the parts (the reranker's order of the
    # embedder's top 2, then the embedder's order) and its reciprocal rank: MRR depends on
    # where the positive lands, wherever that is.
    reciprocal = []
    for row in rows:
        q = embedder.encode(row["query"], instruction=row["instruction"])
        c = embedder.encode(row["candidates"])
        order = EmbeddingModel.similarity(q, c)[0].argsort(descending=True).tolist()
        ranked = reranker.rerank(
            row["query"], [row["candidates"][i] for i in order[:2]], instruction=row["instruction"]
        )
        order = [order[h["corpus_id"]] for h in ranked] + order[2:]
        reciprocal.append(1.0 / (order.index(row["positive"]) + 1))
    words = report["tasks"]["words"]
    assert words["reranked"]["mrr"] == pytest.approx(sum(reciprocal) / len(reciprocal), abs=1e-6)
    # Re-ordering inside the top 2 leaves hit@2 as the embedder's.
    assert words["reranked"]["hit@2"] == words["embedder"]["hit@2"]


def test_bad_rows_and_recall_k():
    with pytest.raises(ValueError, match="row 0: 'positive'"):
        evaluate_pipeline(None, None, [{"query": "q", "candidates": ["a"], "positive": 3}])
    with pytest.raises(ValueError, match="recall_k"):
        evaluate_pipeline(None, None, _rows(), recall_k=-1)
    with pytest.raises(ValueError, match="at least one row"):
        evaluate_pipeline(None, None, [])
