"""Recall then re-rank: EmbeddingModel.search(..., reranker=..., rerank_top_k=...)."""

from __future__ import annotations

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.rerank import Reranker

CORPUS = [
    "zero",
    "one",
    "a handwritten digit two",
    "three",
    "four four four",
    "five",
    "six",
    "the digit seven",
    "eight",
]
QUERIES = ["a handwritten digit seven", "one", "an image of the number five"]


class OracleReranker:
    """A perfect reranker for the test: it knows the right order of the corpus per query.

    Not a stand-in for vlm2emb code: it implements the scoring interface search() calls on any
    reranker (``score_pairs``) with known answers, so the pipeline's re-ordering can be
    checked exactly; the real Reranker is checked against it in the last test.
    """

    def __init__(self, ideal: dict[str, list[str]]) -> None:
        self.ideal = ideal  # query -> corpus texts, best first
        self.calls = 0

    def score_pairs(self, pairs, instructions=None, batch_size=16):
        self.calls += 1
        return torch.tensor([float(len(CORPUS) - self.ideal[q].index(c)) for q, c in pairs])


@pytest.fixture(scope="module")
def embedder() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


@pytest.fixture(scope="module")
def corpus_emb(embedder) -> torch.Tensor:
    return embedder.encode(CORPUS)


def _ideal() -> dict[str, list[str]]:
    # An order unrelated to the random embedder's: reversed corpus, rotated per query.
    return {q: (CORPUS[::-1] * 2)[i : i + len(CORPUS)] for i, q in enumerate(QUERIES)}


def test_reranking_every_hit_gives_the_rerankers_order(embedder, corpus_emb):
    oracle = OracleReranker(_ideal())
    hits = embedder.search(
        QUERIES, corpus_emb, top_k=4, reranker=oracle, rerank_top_k=len(CORPUS), corpus=CORPUS
    )
    assert oracle.calls == 1  # every query's pairs in one batched call
    cos = EmbeddingModel.similarity(embedder.encode_queries(QUERIES), corpus_emb)  # [n, m]
    for qi, (query, row) in enumerate(zip(QUERIES, hits)):
        assert [CORPUS[h["corpus_id"]] for h in row] == _ideal()[query][:4]
        for h in row:  # the embedding score is kept beside the reranker's
            assert h["score"] == pytest.approx(float(cos[qi, h["corpus_id"]]), abs=1e-6)
            assert h["rerank_score"] == float(len(CORPUS) - _ideal()[query].index(CORPUS[h["corpus_id"]]))


def test_hits_below_rerank_top_k_are_untouched(embedder, corpus_emb):
    plain = embedder.search(QUERIES, corpus_emb, top_k=7)
    hits = embedder.search(
        QUERIES, corpus_emb, top_k=7, reranker=OracleReranker(_ideal()), rerank_top_k=3, corpus=CORPUS
    )
    for query, row, base in zip(QUERIES, hits, plain):
        recalled = {h["corpus_id"] for h in base[:3]}
        head = [h["corpus_id"] for h in row[:3]]
        assert set(head) == recalled  # only the recall set is re-ordered ...
        rank = _ideal()[query].index
        assert head == sorted(recalled, key=lambda i: rank(CORPUS[i]))  # ... in the reranker's order
        assert row[3:] == base[3:]  # the rest: same ids, same scores, same order, no rerank_score
        assert all("rerank_score" not in h for h in row[3:])


def test_rerank_top_k_deeper_than_top_k_recalls_more(embedder, corpus_emb):
    # The reranker may pull a hit from below top_k into the answer.
    hits = embedder.search(
        QUERIES, corpus_emb, top_k=2, reranker=OracleReranker(_ideal()), rerank_top_k=9, corpus=CORPUS
    )
    assert [[CORPUS[h["corpus_id"]] for h in row] for row in hits] == [_ideal()[q][:2] for q in QUERIES]


def test_without_reranker_search_is_unchanged(embedder, corpus_emb):
    hits = embedder.search(QUERIES, corpus_emb, top_k=3)
    _, idx = EmbeddingModel.similarity(embedder.encode_queries(QUERIES), corpus_emb).topk(3, dim=1)
    assert [[h["corpus_id"] for h in row] for row in hits] == idx.tolist()


def test_search_with_the_real_reranker_equals_rerank_of_the_recall_set(embedder, corpus_emb):
    reranker = Reranker.from_pretrained("tiny:qwen2_vl", seed=1)
    plain = embedder.search(QUERIES, corpus_emb, top_k=5)
    hits = embedder.search(QUERIES, corpus_emb, top_k=5, reranker=reranker, corpus=CORPUS)
    for query, row, base in zip(QUERIES, hits, plain):
        recalled = [h["corpus_id"] for h in base]
        want = reranker.rerank(query, [CORPUS[i] for i in recalled])
        assert [h["corpus_id"] for h in row] == [recalled[w["corpus_id"]] for w in want]
        torch.testing.assert_close(
            torch.tensor([h["rerank_score"] for h in row]),
            torch.tensor([w["score"] for w in want]),
            atol=1e-5,
            rtol=0,
        )


def test_reranked_search_errors(embedder, corpus_emb):
    oracle = OracleReranker(_ideal())
    with pytest.raises(ValueError, match="needs the query items"):
        embedder.search(embedder.encode(QUERIES), corpus_emb, reranker=oracle, corpus=CORPUS)
    with pytest.raises(ValueError, match="needs corpus="):
        embedder.search(QUERIES, corpus_emb, reranker=oracle)
    with pytest.raises(ValueError, match="needs corpus="):
        embedder.search(QUERIES, corpus_emb, reranker=oracle, corpus=CORPUS[:3])
    with pytest.raises(ValueError, match="rerank_top_k"):
        embedder.search(QUERIES, corpus_emb, reranker=oracle, corpus=CORPUS, rerank_top_k=0)
