"""What a reranker buys and costs: embedder-only and recall -> rerank metrics side by side.

:func:`evaluate_pipeline` takes local-candidate evaluation rows (``{"query", "candidates",
"positive", "task", "instruction"}``, the rows ``vlm2emb eval --data`` reads), ranks each
row's candidates with the embedder alone, then lets the reranker re-order the embedder's
best ``recall_k`` candidates, and reports both sets of metrics per task with the seconds
each stage took.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlm2emb.eval.metrics import metric_names, ranking_metrics
from vlm2emb.items import resolve_instruction

# Re-ranked candidates are lifted above every other by this offset (embedding cosines lie in
# [-1, 1]; reranker logits are far smaller than it), so one score row gives the pipeline's order.
_RERANKED = 1e6


def evaluate_pipeline(
    embedder: Any,
    reranker: Any,
    rows: Iterable[Mapping[str, Any]],
    *,
    recall_k: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    rerank_batch_size: int = 16,
) -> dict[str, Any]:
    """Metrics of the embedder alone and of embedder recall -> reranker, per task.

    For each row the embedder scores every candidate (cosine); the pipeline keeps that order
    below the ``recall_k`` best and re-orders those by reranker score. A row's
    ``instruction`` goes to the embedder's query side (its default when absent) and to the
    reranker (its default when absent), as in training. Relevant candidates are the row's
    ``positive`` index or indices.

    Args:
        embedder: An :class:`~vlm2emb.model.EmbeddingModel`.
        reranker: A :class:`~vlm2emb.rerank.Reranker` (or an object with its ``score_pairs``).
        rows: Local-candidate evaluation rows.
        recall_k: Candidates per row handed to the reranker.
        ks: Cut-offs for the ``@k`` metrics.
        batch_size: Embedding batch size.
        rerank_batch_size: Pairs per reranker forward.

    Returns:
        ``{"tasks": {task: {"embedder": {metric: value}, "reranked": {metric: value}, "n":
        queries, "pairs_reranked": n, "seconds": {"embed": s, "rerank": s}}}, "average":
        {"embedder": ..., "reranked": ..., "n_tasks": n}, "recall_k": k}``; averages are
        unweighted means over tasks, as in :func:`vlm2emb.eval.evaluate`.

    Raises:
        ValueError: No rows, a malformed row (named by its index) or a bad ``recall_k``.
    """
    if isinstance(recall_k, bool) or recall_k < 1:
        raise ValueError(f"recall_k must be a positive integer, got {recall_k!r}")
    names = metric_names(ks)
    tasks: dict[str, list[tuple[Mapping[str, Any], list[int]]]] = {}
    for index, row in enumerate(rows):
        tasks.setdefault(str(row.get("task") or "default"), []).append((row, _positives(row, index)))
    if not tasks:
        raise ValueError("evaluate_pipeline needs at least one row")
    reports: dict[str, dict[str, Any]] = {}
    for task, task_rows in tasks.items():
        reports[task] = _evaluate_task(
            embedder, reranker, task_rows, recall_k, tuple(ks), batch_size, rerank_batch_size
        )
    average = {
        side: {name: float(np.mean([r[side][name] for r in reports.values()])) for name in names}
        for side in ("embedder", "reranked")
    }
    return {"tasks": reports, "average": {**average, "n_tasks": len(reports)}, "recall_k": recall_k}


def evaluate_reranker(
    reranker: Any, rows: Iterable[Mapping[str, Any]], *, ks: Sequence[int] = (1, 5, 10), batch_size: int = 16
) -> dict[str, Any]:
    """The reranker alone: every candidate of each local-candidate row scored against its
    query, ranked by score, metrics per task (the report form of :func:`vlm2emb.eval.evaluate`).

    What the trainer reports for ``model.kind: reranker`` with ``data.eval``.

    Args:
        reranker: A :class:`~vlm2emb.rerank.Reranker` (or an object with its ``score_pairs``).
        rows: Local-candidate evaluation rows (``query``, ``candidates``, ``positive``,
            ``task``, ``instruction``; the reranker's own instruction when it is None).
        ks: Cut-offs for the ``@k`` metrics.
        batch_size: Pairs per reranker forward.

    Returns:
        ``{"tasks": {task: {metric: value, ..., "n": queries}}, "average": {metric: value,
        ..., "n_tasks": n}}``; the average is the unweighted mean over tasks.

    Raises:
        ValueError: No rows, or a malformed row (named by its index).
    """
    names = metric_names(ks)
    tasks: dict[str, list[tuple[Mapping[str, Any], list[int]]]] = {}
    for index, row in enumerate(rows):
        tasks.setdefault(str(row.get("task") or "default"), []).append((row, _positives(row, index)))
    if not tasks:
        raise ValueError("evaluate_reranker needs at least one row")
    flat_rows = [(row, positives) for task_rows in tasks.values() for row, positives in task_rows]
    pairs = [(row["query"], c) for row, _ in flat_rows for c in row["candidates"]]
    instructions = [row.get("instruction") for row, _ in flat_rows for _ in row["candidates"]]
    scores = reranker.score_pairs(pairs, instructions, batch_size=batch_size).double()  # [all pairs]
    reports: dict[str, dict[str, Any]] = {}
    offset = 0
    for task, task_rows in tasks.items():
        per_row = []
        for row, positives in task_rows:
            m = len(row["candidates"])
            per_row.append(ranking_metrics(scores[offset : offset + m][None], [positives], ks=ks))
            offset += m
        reports[task] = {name: float(np.mean([r[name] for r in per_row])) for name in names}
        reports[task]["n"] = len(task_rows)
    average: dict[str, Any] = {name: float(np.mean([r[name] for r in reports.values()])) for name in names}
    average["n_tasks"] = len(reports)
    return {"tasks": reports, "average": average}


def _positives(row: Mapping[str, Any], index: int) -> list[int]:
    candidates = row.get("candidates")
    if (
        "query" not in row
        or not isinstance(candidates, Sequence)
        or isinstance(candidates, str)
        or not candidates
    ):
        raise ValueError(f"row {index}: needs 'query' and a non-empty 'candidates' list")
    positive = row.get("positive", 0)
    values = [positive] if isinstance(positive, int) and not isinstance(positive, bool) else positive
    if (
        not isinstance(values, Sequence)
        or not values
        or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(candidates) for p in values
        )
    ):
        raise ValueError(f"row {index}: 'positive' must be candidate indices, got {positive!r}")
    return list(values)


def _evaluate_task(
    embedder: Any,
    reranker: Any,
    task_rows: list[tuple[Mapping[str, Any], list[int]]],
    recall_k: int,
    ks: tuple[int, ...],
    batch_size: int,
    rerank_batch_size: int,
) -> dict[str, Any]:
    start = time.perf_counter()
    queries = _encode_queries(embedder, [row for row, _ in task_rows], batch_size)  # [n, d]
    flat = [c for row, _ in task_rows for c in row["candidates"]]
    cand = torch.nn.functional.normalize(embedder.encode_targets(flat, batch_size=batch_size).float(), dim=-1)
    embed_s = time.perf_counter() - start

    embed_scores: list[torch.Tensor] = []  # per row [m_i]
    offset = 0
    for (row, _), q in zip(task_rows, queries):
        m = len(row["candidates"])
        embed_scores.append(cand[offset : offset + m] @ q)
        offset += m
    heads = [s.topk(min(recall_k, s.numel())).indices.tolist() for s in embed_scores]
    pairs = [(row["query"], row["candidates"][c]) for (row, _), head in zip(task_rows, heads) for c in head]
    instructions = [row.get("instruction") for (row, _), head in zip(task_rows, heads) for _ in head]
    start = time.perf_counter()
    rerank_flat = reranker.score_pairs(pairs, instructions, batch_size=rerank_batch_size).double()
    rerank_s = time.perf_counter() - start

    embedder_metrics, reranked_metrics = [], []
    offset = 0
    for (_, positives), scores, head in zip(task_rows, embed_scores, heads):
        piped = scores.double().clone()
        piped[head] = _RERANKED + rerank_flat[offset : offset + len(head)]
        offset += len(head)
        embedder_metrics.append(ranking_metrics(scores[None], [positives], ks=ks))
        reranked_metrics.append(ranking_metrics(piped[None], [positives], ks=ks))
    names = metric_names(ks)
    return {
        "embedder": {k: float(np.mean([m[k] for m in embedder_metrics])) for k in names},
        "reranked": {k: float(np.mean([m[k] for m in reranked_metrics])) for k in names},
        "n": len(task_rows),
        "pairs_reranked": len(pairs),
        "seconds": {"embed": round(embed_s, 4), "rerank": round(rerank_s, 4)},
    }


def _encode_queries(embedder: Any, rows: list[Mapping[str, Any]], batch_size: int) -> torch.Tensor:
    """[n, d] normalised query embeddings, each with its row's instruction (or the model's)."""
    default = getattr(getattr(embedder, "config", None), "query_instruction", None)
    groups: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(resolve_instruction(row.get("instruction"), default), []).append(i)
    out: torch.Tensor | None = None
    for instruction, idx in groups.items():
        emb = embedder.encode([rows[i]["query"] for i in idx], instruction=instruction, batch_size=batch_size)
        if out is None:
            out = torch.empty(len(rows), emb.shape[-1])
        out[torch.tensor(idx)] = emb.float()
    assert out is not None
    return torch.nn.functional.normalize(out, dim=-1)
