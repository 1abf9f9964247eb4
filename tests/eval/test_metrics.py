"""Tests for vlm2emb.eval.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, ndcg_score

from vlm2emb.eval.metrics import metric_names, per_query_ranks, ranking_metrics

# Query 0: candidates ranked 1, 2, 3, 0 (scores 0.9 > 0.5 > 0.3 > 0.1); relevant {2, 3} sit at
#          ranks 2 and 3.
# Query 1: candidates ranked 0, 1, 2, 3; relevant {0} at rank 1.
SCORES = [[0.1, 0.9, 0.5, 0.3], [3.0, 2.0, 1.0, 0.0]]
RELEVANT = [[2, 3], 0]
LOG2_3 = math.log2(3)


def test_hand_worked_single_query() -> None:
    m = ranking_metrics([SCORES[0]], [RELEVANT[0]], ks=(1, 3))
    # Nothing relevant at rank 1.
    assert m["hit@1"] == 0.0
    assert m["recall@1"] == 0.0
    assert m["precision@1"] == 0.0
    assert m["ndcg@1"] == 0.0
    # Both relevant items are within the top 3.
    assert m["hit@3"] == 1.0
    assert m["recall@3"] == 1.0  # 2 of 2 relevant
    assert m["precision@3"] == pytest.approx(2 / 3)  # 2 relevant among 3 shown
    # DCG@3 = 1/log2(3) + 1/log2(4); ideal (2 relevant first) = 1/log2(2) + 1/log2(3).
    assert m["ndcg@3"] == pytest.approx((1 / LOG2_3 + 0.5) / (1 + 1 / LOG2_3))  # ~0.6934
    # First relevant item at rank 2.
    assert m["mrr"] == pytest.approx(0.5)
    # AP = mean(precision@2, precision@3) = (1/2 + 2/3) / 2 = 7/12.
    assert m["map"] == pytest.approx(7 / 12)


def test_hand_worked_average_over_queries() -> None:
    m = ranking_metrics(SCORES, RELEVANT, ks=(1, 3))
    # Query 1 is perfect on every metric except precision@3 = 1/3; means over the two queries:
    assert m["hit@1"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert m["hit@3"] == pytest.approx(1.0)
    assert m["recall@1"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert m["precision@3"] == pytest.approx(0.5)  # (2/3 + 1/3) / 2
    assert m["ndcg@3"] == pytest.approx(((1 / LOG2_3 + 0.5) / (1 + 1 / LOG2_3) + 1) / 2)
    assert m["mrr"] == pytest.approx(0.75)  # (1/2 + 1) / 2
    assert m["map"] == pytest.approx((7 / 12 + 1) / 2)


def test_recall_and_ndcg_with_more_relevant_than_k() -> None:
    # Ranking is 0, 1, 2, 3, 4; relevant {0, 2, 4}.
    m = ranking_metrics([[5.0, 4.0, 3.0, 2.0, 1.0]], [[0, 2, 4]], ks=(2,))
    assert m["recall@2"] == pytest.approx(1 / 3)  # only candidate 0 of 3 relevant in top 2
    assert m["precision@2"] == pytest.approx(1 / 2)
    # DCG@2 = 1 (rank 1); ideal uses min(3, 2) = 2 relevant: 1 + 1/log2(3).
    assert m["ndcg@2"] == pytest.approx(1 / (1 + 1 / LOG2_3))
    # AP = (1/1 + 2/3 + 3/5) / 3.
    assert m["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_key_order_matches_metric_names() -> None:
    m = ranking_metrics(SCORES, RELEVANT, ks=(1, 3))
    assert list(m) == metric_names((1, 3))
    assert list(m)[:2] == ["hit@1", "hit@3"]
    assert list(m)[-2:] == ["mrr", "map"]
    assert all(isinstance(v, float) for v in m.values())


def test_ties_are_pessimistic_for_relevant_items() -> None:
    flat = [[1.0, 1.0, 1.0]]
    # A constant-score model must not be rewarded: the relevant item ranks after its ties.
    assert ranking_metrics(flat, [[0]], ks=(1,))["hit@1"] == 0.0
    assert ranking_metrics(flat, [[2]], ks=(1,))["mrr"] == pytest.approx(1 / 3)
    assert ranking_metrics(flat, [[0]], ks=(1,))["mrr"] == pytest.approx(1 / 3)
    # Partial tie: candidates 1 (relevant) and 3 (irrelevant) share the top score -> 3 first.
    assert per_query_ranks([[0.0, 2.0, 1.0, 2.0]], [[1]])[0].tolist() == [2]
    # Two relevant items tied at the top keep index order between themselves.
    assert per_query_ranks([[0.0, 2.0, 1.0, 2.0]], [[3, 1]])[0].tolist() == [1, 2]


def test_k_larger_than_candidates_is_clamped() -> None:
    m = ranking_metrics([[0.2, 0.1, 0.0]], [[0]], ks=(10,))
    assert m["hit@10"] == 1.0
    assert m["recall@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1.0)
    assert m["precision@10"] == pytest.approx(1 / 3)  # k clamped to 3 candidates


def test_relevant_duplicates_counted_once() -> None:
    assert ranking_metrics(SCORES, [[2, 3, 3, 2], [0, 0]], ks=(3,)) == ranking_metrics(
        SCORES, RELEVANT, ks=(3,)
    )


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_ndcg_matches_sklearn(k: int) -> None:
    rng = np.random.default_rng(k)
    n_queries, n_candidates = 30, 20
    scores = rng.normal(size=(n_queries, n_candidates))  # continuous: no ties
    y_true = np.zeros((n_queries, n_candidates))
    for q in range(n_queries):
        n_rel = rng.integers(1, 6)
        y_true[q, rng.choice(n_candidates, size=n_rel, replace=False)] = 1
    relevant = [np.flatnonzero(row).tolist() for row in y_true]

    ours = ranking_metrics(scores, relevant, ks=(k,))
    assert ours[f"ndcg@{k}"] == pytest.approx(ndcg_score(y_true, scores, k=k), abs=1e-12)
    # Cross-check mean average precision too: with no ties sklearn's AP is the same quantity.
    sk_map = np.mean([average_precision_score(y_true[q], scores[q]) for q in range(n_queries)])
    assert ours["map"] == pytest.approx(sk_map, abs=1e-12)


def test_numpy_torch_and_list_inputs_agree() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(8, 12)).astype(np.float32)
    relevant = [[int(i)] for i in rng.integers(0, 12, size=8)]
    ref = ranking_metrics(scores, relevant)
    assert ranking_metrics(torch.from_numpy(scores), relevant) == ref
    assert ranking_metrics(scores.tolist(), relevant) == ref
    # Relevant given as a 1-D tensor / array of single indices.
    flat = [r[0] for r in relevant]
    assert ranking_metrics(scores, torch.tensor(flat)) == ref
    assert ranking_metrics(scores, np.array(flat)) == ref


def test_bfloat16_tensor_accepted() -> None:
    scores = torch.tensor([[0.5, 0.25, 1.0]], dtype=torch.bfloat16)
    assert ranking_metrics(scores, [2], ks=(1,))["hit@1"] == 1.0


def test_per_query_ranks() -> None:
    ranks = per_query_ranks(SCORES, RELEVANT)
    assert [r.tolist() for r in ranks] == [[2, 3], [1]]


@pytest.mark.parametrize(
    ("relevant", "message"),
    [
        ([[2, 3], [4]], "query 1: relevant index 4 is out of range"),
        ([[2, 3], [-1]], "query 1: relevant index -1 is out of range"),
        ([[], [0]], "query 0 has no relevant"),
        ([[0]], "relevant has 1 entries"),
    ],
)
def test_invalid_relevant_raises(relevant: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(SCORES, relevant)


def test_non_integer_relevant_raises() -> None:
    with pytest.raises(TypeError, match="query 0"):
        ranking_metrics(SCORES, [[1.5], [0]])


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        ([0.1, 0.2], "2-D"),
        (np.zeros((0, 3)), "at least one query"),
        ([[0.1, float("nan")], [0.0, 1.0]], "NaN"),
    ],
)
def test_invalid_scores_raise(scores: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(scores, [0, 0])


@pytest.mark.parametrize("ks", [(0,), (1, -5), (), (2.5,)])
def test_invalid_ks_raise(ks: tuple) -> None:
    with pytest.raises(ValueError, match="k"):
        ranking_metrics(SCORES, RELEVANT, ks=ks)


def _loop_metrics(scores: np.ndarray, relevant: list[list[int]], k: int) -> dict[str, float]:
    """Independent per-query loop: sort by (-score, relevant last, index), then count."""
    out: dict[str, list[float]] = {n: [] for n in ("hit", "ndcg", "recall", "precision", "mrr", "map")}
    for q, rel in enumerate(relevant):
        rel_set = set(rel)
        order = sorted(range(scores.shape[1]), key=lambda c: (-scores[q, c], c in rel_set, c))
        flags = [c in rel_set for c in order]
        top = flags[:k]
        out["hit"].append(float(any(top)))
        out["recall"].append(sum(top) / len(rel_set))
        out["precision"].append(sum(top) / min(k, len(flags)))
        dcg = sum(1 / np.log2(r + 2) for r, f in enumerate(top) if f)
        out["ndcg"].append(dcg / sum(1 / np.log2(r + 2) for r in range(min(k, len(rel_set)))))
        out["mrr"].append(1 / (flags.index(True) + 1))
        hits, precisions = 0, []
        for r, f in enumerate(flags):
            if f:
                hits += 1
                precisions.append(hits / (r + 1))
        out["map"].append(float(np.mean(precisions)))
    return {name: float(np.mean(v)) for name, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_ties_and_several_relevant_match_a_loop_and_bound_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(25, 12)).astype(float)  # only 4 values: ties everywhere
    relevant = [rng.choice(12, size=rng.integers(1, 5), replace=False).tolist() for _ in range(25)]
    k = 5
    ours = ranking_metrics(scores, relevant, ks=(k,))
    want = _loop_metrics(scores, relevant, k)
    for name in ("hit", "ndcg", "recall", "precision"):
        assert ours[f"{name}@{k}"] == pytest.approx(want[name], abs=1e-12), name
    assert ours["mrr"] == pytest.approx(want["mrr"], abs=1e-12)
    assert ours["map"] == pytest.approx(want["map"], abs=1e-12)
    # sklearn averages over the orderings of tied items; the pessimistic rule can only be lower.
    y_true = np.zeros_like(scores)
    for q, rel in enumerate(relevant):
        y_true[q, rel] = 1
    assert ours[f"ndcg@{k}"] <= ndcg_score(y_true, scores, k=k) + 1e-12
    assert ours[f"ndcg@{k}"] < ndcg_score(y_true, scores, k=k)  # ties do occur here
