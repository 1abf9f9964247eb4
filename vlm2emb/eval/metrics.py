"""Ranking metrics for retrieval-style evaluation of embedding models.

Everything here works on a dense score matrix ``scores[q, c]`` (higher means candidate ``c``
is a better match for query ``q``) plus, per query, the set of relevant candidate indices.
The metrics use binary relevance (a candidate is either relevant or not), except
``ndcg@k`` when graded ``gains`` are given: then it is trec_eval's (and so pytrec_eval's,
BEIR's and ViDoRe's) nDCG with linear gain, ``DCG@k = sum_{i<=k} gain_i / log2(i + 1)`` over
the judged gains and ``IDCG@k`` the DCG of the gains sorted high to low.

Tie-breaking:
    Ties are broken pessimistically: among candidates with exactly the same score, relevant
    ones rank after irrelevant ones, lower gains before higher ones (then by candidate
    index, which cannot change any metric: only equally relevant candidates are left). A degenerate model that gives
    every candidate the same score therefore scores as badly as possible instead of collecting
    a perfect ``hit@1`` from MMEB rows, which put the positive at index 0. Real floating-point
    embeddings almost never tie exactly, so this only matters for broken models.

Only numpy is needed at import time; torch tensors are accepted (by duck typing) and moved to
the CPU as float64 before ranking.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["RankedQueries", "metric_names", "per_query_ranks", "rank_queries", "ranking_metrics"]

# Per-k metric families, in the order their keys appear in the returned dict.
_PER_K_METRICS = ("hit", "ndcg", "recall", "precision")


def metric_names(ks: Iterable[int] = (1, 5, 10)) -> list[str]:
    """Return the keys that :func:`ranking_metrics` produces for the given cut-offs.

    Args:
        ks: Cut-off ranks.

    Returns:
        Metric names in the order :func:`ranking_metrics` returns them, e.g.
        ``["hit@1", "hit@5", ..., "precision@10", "mrr", "map"]``.
    """
    ks = _validate_ks(ks)
    return [f"{name}@{k}" for name in _PER_K_METRICS for k in ks] + ["mrr", "map"]


def per_query_ranks(scores: Any, relevant: Sequence[Any]) -> list[np.ndarray]:
    """Return the 1-based ranks of each query's relevant candidates.

    Useful for failure analysis (e.g. "which queries have their positive outside the top 10").
    Ties rank relevant candidates last, see the module docstring.

    Args:
        scores: ``[n_queries, n_candidates]`` torch tensor, numpy array or nested list;
            higher is better.
        relevant: One entry per query: an int or a sequence of ints (relevant candidate
            indices). Duplicate indices are counted once.

    Returns:
        A list with one int64 array per query holding the ranks (1 = best) of that query's
        distinct relevant candidates, sorted ascending.

    Raises:
        ValueError: If ``scores`` is not a non-empty 2-D matrix without NaN, if
            ``relevant`` has the wrong length, or if a query has no relevant index or an index
            out of range (the message names the query).
    """
    score_arr = _as_score_array(scores)
    rel_mask = _relevance_mask(relevant, *score_arr.shape)
    order = _rank_order(score_arr, rel_mask)  # [Q, C]: order[q, r] = candidate at 0-based rank r
    n_queries, n_candidates = score_arr.shape
    # Invert the permutation: rank_of[q, c] = 1-based rank of candidate c for query q.
    rank_of = np.empty_like(order)  # [Q, C]
    positions = np.broadcast_to(np.arange(1, n_candidates + 1), order.shape)
    np.put_along_axis(rank_of, order, positions, axis=1)
    return [np.sort(rank_of[q][rel_mask[q]]) for q in range(n_queries)]


def ranking_metrics(
    scores: Any,
    relevant: Sequence[Any],
    ks: Iterable[int] = (1, 5, 10),
    gains: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """Compute standard ranking metrics, averaged over queries.

    For every cut-off ``k`` in ``ks`` (with ``R`` the number of distinct relevant items of a
    query and ranks counted from 1):

    * ``hit@k``: 1 if any relevant item is in the top ``k``, else 0.
    * ``ndcg@k``: binary-gain DCG with discount ``1 / log2(rank + 1)``, divided by the ideal
      DCG of ``min(R, k)`` relevant items at the top.
    * ``recall@k``: (relevant items in the top ``k``) / ``R``.
    * ``precision@k``: (relevant items in the top ``k``) / ``k``.

    plus the cut-off free

    * ``mrr``: 1 / rank of the first relevant item.
    * ``map``: average precision, i.e. the mean over all ``R`` relevant items of
      (precision at that item's rank).

    A ``k`` larger than the number of candidates is clamped to the number of candidates (so
    ``precision@k`` divides by the clamped value), but the key keeps the requested ``k`` so
    reports from tasks with different candidate counts line up.

    Ties rank relevant candidates last; see the module docstring.

    Args:
        scores: ``[n_queries, n_candidates]`` torch tensor, numpy array or nested list;
            higher is better. NaN is rejected; +/-inf are allowed and ordered as usual.
        relevant: One entry per query: an int or a sequence of ints (relevant candidate
            indices). A 1-D integer array/tensor (one relevant index per query) also works.
            Duplicate indices are counted once.
        ks: Positive cut-off ranks.
        gains: Graded relevance for ``ndcg@k`` only: per query, one positive gain per entry
            of its ``relevant`` (same order; a repeated index keeps its largest gain). None
            means gain 1 for every relevant candidate (binary nDCG). Every other metric stays
            binary, as in trec_eval.

    Returns:
        ``{"hit@k": ..., "ndcg@k": ..., "recall@k": ..., "precision@k": ..., "mrr": ...,
        "map": ...}`` as Python floats, keys ordered as in :func:`metric_names`.

    Raises:
        ValueError: On malformed input: non-2-D or empty ``scores``, NaN scores, a ``relevant``
            of the wrong length, a query with no relevant index or with an index outside
            ``[0, n_candidates)`` (the message names the query), or a non-positive ``k``.
        TypeError: If a relevant index is not an integer.

    Example:
        >>> ranking_metrics([[0.9, 0.1, 0.5]], [[2]], ks=(1, 2))["mrr"]
        0.5
    """
    ks = _validate_ks(ks)
    ranked = rank_queries(scores, relevant, gains)
    n_candidates = ranked.gain.shape[1]
    gain, sorted_rel, sorted_gain, n_rel = ranked.gain, ranked.sorted_rel, ranked.sorted_gain, ranked.n_rel

    ranks = np.arange(1, n_candidates + 1, dtype=np.float64)  # [C]
    discounts = 1.0 / np.log2(ranks + 1.0)  # [C]
    hits_cum = np.cumsum(sorted_rel, axis=1)  # [Q, C]: relevant items within the top r+1
    dcg_cum = np.cumsum(sorted_gain * discounts, axis=1)  # [Q, C]
    # Ideal DCG per query and depth: its gains sorted high to low, ranked first.
    ideal_cum = np.cumsum(-np.sort(-gain, axis=1) * discounts, axis=1)  # [Q, C]

    per_query: dict[str, np.ndarray] = {}
    for k in ks:
        kc = min(k, n_candidates)  # clamp; the key still uses the requested k
        hits_at_k = hits_cum[:, kc - 1]  # [Q]
        per_query[f"hit@{k}"] = (hits_at_k > 0).astype(np.float64)
        per_query[f"ndcg@{k}"] = dcg_cum[:, kc - 1] / ideal_cum[:, kc - 1]
        per_query[f"recall@{k}"] = hits_at_k / n_rel
        per_query[f"precision@{k}"] = hits_at_k / kc

    # Every query has at least one relevant item, so argmax finds the first True.
    first_rank = np.argmax(sorted_rel > 0, axis=1) + 1.0  # [Q]
    mrr = 1.0 / first_rank
    # Average precision: at each relevant position r, precision = hits_cum / rank.
    ap = (sorted_rel * hits_cum / ranks).sum(axis=1) / n_rel  # [Q]

    out = {name: float(per_query[name].mean()) for name in metric_names(ks)[:-2]}
    out["mrr"] = float(mrr.mean())
    out["map"] = float(ap.mean())
    return out


class RankedQueries(NamedTuple):
    """Each query's candidates in ranked order (:func:`rank_queries`); every array ``[Q, C]``
    except ``n_rel``."""

    gain: np.ndarray  # gain of each candidate, in candidate order (0: not relevant)
    sorted_rel: np.ndarray  # 1.0 where the candidate at 0-based rank r is relevant
    sorted_gain: np.ndarray  # gain of the candidate at rank r
    n_rel: np.ndarray  # [Q] relevant candidates per query (>= 1 after validation)


def rank_queries(
    scores: Any, relevant: Sequence[Any], gains: Sequence[Sequence[float]] | None = None
) -> RankedQueries:
    """Validates the inputs of :func:`ranking_metrics` and ranks every query's candidates
    with the tie rule of the module docstring; the MMEB leaderboard block
    (:mod:`vlm2emb.eval.leaderboard`) ranks the same way."""
    score_arr = _as_score_array(scores)
    n_queries, n_candidates = score_arr.shape
    rel_mask = _relevance_mask(relevant, n_queries, n_candidates)  # [Q, C] bool
    gain = rel_mask.astype(np.float64) if gains is None else _gain_matrix(relevant, gains, rel_mask)  # [Q, C]
    order = _rank_order(score_arr, gain)  # [Q, C]
    return RankedQueries(
        gain=gain,
        sorted_rel=np.take_along_axis(rel_mask, order, axis=1).astype(np.float64),
        sorted_gain=np.take_along_axis(gain, order, axis=1),
        n_rel=rel_mask.sum(axis=1).astype(np.float64),
    )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _validate_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Check cut-offs are positive ints and drop duplicates while keeping order."""
    out: list[int] = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise ValueError("ks must contain at least one cut-off")
    return tuple(out)


def _as_score_array(scores: Any) -> np.ndarray:
    """Convert a torch tensor / numpy array / nested list into a float64 ``[Q, C]`` array."""
    if hasattr(scores, "detach") and hasattr(scores, "cpu"):
        # torch.Tensor: go through float64 on the CPU; bf16 has no numpy dtype.
        scores = scores.detach().cpu().double().numpy()
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"scores must be a 2-D [n_queries, n_candidates] matrix, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"scores must have at least one query and one candidate, got shape {arr.shape}")
    if np.isnan(arr).any():
        bad = int(np.argwhere(np.isnan(arr))[0, 0])
        raise ValueError(f"scores contain NaN (first at query {bad})")
    return arr


def _rank_order(scores: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Candidate indices sorted best-first; among equal scores lower gains (irrelevant: 0) first.

    So the metrics of tied candidates never depend on where they sit in the candidate list:
    the only order left to the index is among candidates of equal gain.
    """
    # np.lexsort sorts by the last key first: score descending, then gain ascending, then index.
    index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((index, gain, -scores), axis=1)


def _gain_matrix(
    relevant: Sequence[Any], gains: Sequence[Sequence[float]], rel_mask: np.ndarray
) -> np.ndarray:
    """Per-query graded gains as a ``[Q, C]`` matrix (0 where not relevant)."""
    if hasattr(relevant, "detach") and hasattr(relevant, "cpu"):
        relevant = relevant.detach().cpu().numpy()
    relevant = list(relevant)
    if len(gains) != len(relevant):
        raise ValueError(f"gains has {len(gains)} entries but relevant has {len(relevant)}")
    out = np.zeros(rel_mask.shape, dtype=np.float64)
    for q, (entry, row_gains) in enumerate(zip(relevant, gains, strict=True)):
        indices = _as_index_list(entry, q)
        row_gains = list(row_gains)
        if len(row_gains) != len(indices):
            raise ValueError(f"query {q}: {len(row_gains)} gains for {len(indices)} relevant indices")
        for idx, g in zip(indices, row_gains, strict=True):
            if not g > 0:
                raise ValueError(f"query {q}: gain {g!r} is not positive (leave irrelevant items out)")
            out[q, idx] = max(out[q, idx], float(g))
    return out


def _relevance_mask(relevant: Sequence[Any], n_queries: int, n_candidates: int) -> np.ndarray:
    """Turn per-query relevant indices into a validated ``[Q, C]`` boolean mask."""
    if hasattr(relevant, "detach") and hasattr(relevant, "cpu"):
        relevant = relevant.detach().cpu().numpy()
    relevant = list(relevant)
    if len(relevant) != n_queries:
        raise ValueError(f"relevant has {len(relevant)} entries but scores has {n_queries} queries")
    mask = np.zeros((n_queries, n_candidates), dtype=bool)
    for q, entry in enumerate(relevant):
        indices = _as_index_list(entry, q)
        if not indices:
            raise ValueError(f"query {q} has no relevant candidate")
        for idx in indices:
            if not 0 <= idx < n_candidates:
                raise ValueError(
                    f"query {q}: relevant index {idx} is out of range for {n_candidates} candidates"
                )
            mask[q, idx] = True
    return mask


def _as_index_list(entry: Any, query: int) -> list[int]:
    """Normalise one query's relevant entry (int or iterable of ints) to a list of ints."""
    try:
        # Scalars: Python/numpy ints and 0-d arrays/tensors.
        if isinstance(entry, numbers.Integral) or getattr(entry, "ndim", None) == 0:
            return [_as_index(entry)]
        return [_as_index(v) for v in entry]
    except TypeError as err:
        raise TypeError(f"query {query}: relevant indices must be integers, got {entry!r}") from err


def _as_index(value: Any) -> int:
    # bool is an int subclass, but True/False as an index is almost certainly a mistake.
    if isinstance(value, bool):
        raise TypeError("bool is not a valid candidate index")
    return operator.index(value)
