"""The MMEB leaderboard's metric block and its submission file.

VLM2Vec's evaluation writes one ``<TASK>_score.json`` per task, and its
``experiments/report_score_v2.py`` gathers them into the file the MMEB leaderboard takes::

    {"metadata": {"model_name": ..., ...,  "report_generated_date": ISO time},
     "metrics": {"image":  {"ImageNet-1K": {"hit@1": ..., ..., "num_pred": ..., "num_data": ...}, ...},
                 "video":  {...},
                 "visdoc": {...}}}

A task that did not run is the string ``"FILE_N/A"`` there, as in VLM2Vec's script. The
leaderboard reads ``hit@1`` for image and video tasks and ``ndcg_linear@5`` for visual
documents.

:func:`mmeb_metrics` computes a task's block with the definitions of VLM2Vec's
``RankingMetrics`` (``src/utils/eval_utils/metrics.py``, commit 6e1e1d4), which differ from
:func:`vlm2emb.eval.metrics.ranking_metrics` in places, so both are kept:

* ``precision@k`` divides by ``k`` even when a task has fewer than ``k`` candidates;
* ``map@k`` divides the summed precisions by ``min(R, k)`` (``R`` relevant items);
* ``mrr@k`` is 0 when no relevant item is in the top ``k``;
* ``ndcg_linear@k`` (gain ``rel``) and ``ndcg_exponential@k`` (gain ``2**rel - 1``) use the
  graded qrels when the task has them, with the ideal DCG over the ``k`` largest gains;
* ``f1@k`` is ``2 p r / (p + r)`` of the two above, 0 when both are 0.

Rankings are :func:`~vlm2emb.eval.metrics.ranking_metrics`' own (ties: relevant candidates last);
VLM2Vec sorts with ``np.argsort(-scores)``, whose order among exactly equal scores is
unspecified, so the two can differ only on exact ties.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# The input checks and the tie rule are ranking_metrics' own, so both reports rank alike.
from vlm2emb.eval.metrics import rank_queries

__all__ = ["MISSING", "MMEB_FAMILIES", "MODALITIES", "accumulate", "mmeb_metrics", "mmeb_submission"]

# The per-k metric families of VLM2Vec's score files, in their order.
MMEB_FAMILIES = (
    "hit",
    "ndcg_linear",
    "ndcg_exponential",
    "precision",
    "recall",
    "f1",
    "map",
    "mrr",
)
MODALITIES = ("image", "video", "visdoc")  # the blocks of the submission file, in its order
MISSING = "FILE_N/A"  # what report_score_v2.py writes for a task without a score file


def mmeb_metrics(
    scores: Any,
    relevant: Sequence[Any],
    ks: Iterable[int] = (1, 5, 10),
    gains: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """One task's metric block as VLM2Vec's score files hold it, averaged over queries.

    Args:
        scores: ``[n_queries, n_candidates]`` scores, higher is better.
        relevant: Per query, its relevant candidate indices (as for ``ranking_metrics``).
        ks: Cut-offs.
        gains: Per query, one graded relevance per entry of ``relevant``; None = binary.

    Returns:
        ``{"hit@1": ..., ..., "mrr@10": ..., "num_pred": Q, "num_data": Q}`` with the keys in
        VLM2Vec's order (families of :data:`MMEB_FAMILIES`, each over ``ks``).

    Example:
        >>> m = mmeb_metrics([[0.1, 0.9, 0.5]], [[2]], ks=(1, 2))
        >>> m["hit@1"], m["mrr@2"], m["precision@2"]
        (0.0, 0.5, 0.5)
    """
    ks = tuple(int(k) for k in ks)
    ranked = rank_queries(scores, relevant, gains)
    gain, sorted_rel, sorted_gain, n_rel = ranked.gain, ranked.sorted_rel, ranked.sorted_gain, ranked.n_rel
    n_queries, n_candidates = gain.shape
    ideal = -np.sort(-gain, axis=1)  # [Q, C]: the gains high to low

    ranks = np.arange(1, n_candidates + 1, dtype=np.float64)  # [C]
    discount = 1.0 / np.log2(ranks + 1.0)  # [C]
    hits_cum = np.cumsum(sorted_rel, axis=1)  # [Q, C]
    # Precision at each relevant position (0 elsewhere), summed up to depth r.
    ap_cum = np.cumsum(sorted_rel * hits_cum / ranks, axis=1)  # [Q, C]
    first = np.where(sorted_rel.any(axis=1), np.argmax(sorted_rel > 0, axis=1) + 1, n_candidates + 1)  # [Q]

    def ndcg(transform: Any, kc: int) -> np.ndarray:
        dcg = (transform(sorted_gain[:, :kc]) * discount[:kc]).sum(axis=1)  # [Q]
        idcg = (transform(ideal[:, :kc]) * discount[:kc]).sum(axis=1)  # [Q]
        return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)

    families: dict[str, dict[int, np.ndarray]] = {f: {} for f in MMEB_FAMILIES}
    for k in ks:
        kc = min(k, n_candidates)  # the top k of a shorter list is the whole list
        hits = hits_cum[:, kc - 1]  # [Q]
        precision = hits / k  # VLM2Vec divides by k, not by the list's length
        recall = hits / n_rel
        families["hit"][k] = (hits > 0).astype(np.float64)
        families["ndcg_linear"][k] = ndcg(lambda g: g, kc)
        families["ndcg_exponential"][k] = ndcg(lambda g: 2.0**g - 1.0, kc)
        families["precision"][k] = precision
        families["recall"][k] = recall
        pr = precision + recall
        families["f1"][k] = np.divide(2 * precision * recall, pr, out=np.zeros_like(pr), where=pr > 0)
        families["map"][k] = ap_cum[:, kc - 1] / np.minimum(n_rel, k)
        families["mrr"][k] = np.where(first <= kc, 1.0 / first, 0.0)
    out = {f"{family}@{k}": float(values[k].mean()) for family, values in families.items() for k in ks}
    out["num_pred"] = out["num_data"] = n_queries
    return out


def accumulate(totals: dict[str, Any], metrics: Mapping[str, Any], weight: float) -> None:
    """Adds ``weight`` times each number of ``metrics`` into ``totals`` (nested blocks too).

    Tasks score their queries in groups (by candidate count, or in blocks of a corpus);
    per-query means weighted by group size add up to the task's mean. Counts (``num_*``)
    add up unweighted.
    """
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            accumulate(totals.setdefault(name, {}), value, weight)
        elif name.startswith("num_"):
            totals[name] = totals.get(name, 0) + value
        else:
            totals[name] = totals.get(name, 0.0) + value * weight


def mmeb_submission(
    report: Mapping[str, Any],
    modalities: Mapping[str, str | None],
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The leaderboard's file for a suite report (:func:`vlm2emb.eval.harness.run_suite`).

    Args:
        report: The suite report; each run task carries its ``leaderboard`` block.
        modalities: Task name -> leaderboard block (``image``, ``video``, ``visdoc``) for
            every task of the suite, run or not; tasks mapped to None are left out.
        metadata: ``model_name`` and whatever else the leaderboard shows (size,
            embedding dimension, url, ...); ``report_generated_date`` is added.

    Returns:
        ``{"metadata": {...}, "metrics": {modality: {task: block or "FILE_N/A"}}}``.

    Raises:
        ValueError: No task has a modality (the suite is not a leaderboard suite).
    """
    if not any(modalities.values()):
        raise ValueError(
            f"suite {report.get('suite')!r} gives no task a modality (image, video or visdoc): "
            "it has no leaderboard submission format"
        )
    tasks = report.get("tasks", {})
    metrics: dict[str, dict[str, Any]] = {m: {} for m in MODALITIES if m in modalities.values()}
    for name, modality in modalities.items():
        if modality is None:
            continue
        block = tasks.get(name, {}).get("leaderboard")
        metrics.setdefault(modality, {})[name] = dict(block) if block else MISSING
    meta = {"model_name": "model", **(metadata or {})}
    meta["report_generated_date"] = datetime.datetime.now().isoformat()
    return {"metadata": meta, "metrics": metrics}
