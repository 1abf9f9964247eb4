"""What a reranker buys and costs: embedder-only and recall -> rerank metrics side by side.

Both entry points run the embedder's own evaluation code (:func:`vlm2emb.eval.evaluate`,
:func:`vlm2emb.eval.run_suite` and the task kinds behind it) with a :class:`RerankStage`
as its ``rescore`` hook (:mod:`vlm2emb.eval.rescore`): where the embedder has scored a
block of queries against their candidates, the stage lets the reranker re-order each
query's best ``rerank_top_k``, and the task's metrics of that order come from the same
metric code, relevance and tie rule as the embedder's column.

- :func:`evaluate_pipeline`: local-candidate rows (``vlm2emb rerank eval --data``).
- :func:`evaluate_suite_pipeline`: every task of an eval suite (``--suite``): local
  candidates, MMEB-eval rows, corpus + qrels, BEIR folders, MMEB-V2 video tables.

Seconds per task and stage: ``embed`` (the embedder's encode calls, cache reads included),
``rerank`` (the reranker's ``score_pairs`` calls) and ``search`` (the rest of the task:
the score matrix, the top-``k`` selection, ranking and both metric sets).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm2emb.eval.cache import CachedEncoder
from vlm2emb.eval.metrics import metric_names, ranking_metrics
from vlm2emb.items import resolve_instruction

__all__ = [
    "RerankStage",
    "evaluate_pipeline",
    "evaluate_reranker",
    "evaluate_suite_pipeline",
    "format_pipeline_report",
]

_STAGES = ("embed", "search", "rerank")


class RerankStage:
    """A :class:`~vlm2emb.eval.rescore.Rescorer`: the reranker re-orders each query's best
    ``top_k`` candidates by the embedder's score; the rest keep the embedder's scores.

    The re-ranked candidates get ``reranker score + offset``, the offset chosen per query so
    that the lowest of them lies 1 above the best candidate left out; the metric code then
    ranks the re-ranked block first, in the reranker's order, and ties (equal reranker
    scores) go by its usual rule. The head is picked by a stable sort, so embedder ties at
    the cut keep the candidates' order.

    Args:
        reranker: A :class:`~vlm2emb.rerank.Reranker`, or any object with
            ``score_pairs(pairs, instructions, batch_size=...)`` returning ``[n]`` scores.
        top_k: Candidates per query handed to the reranker; 0 leaves the embedder's order.
        batch_size: Pairs per reranker forward.
        embedder_instruction: The embedder's own default query instruction. A query that
            was embedded with it gets the reranker's default instead (an instruction written
            for embedding is not a question for the reranker); a row's or a task's own
            instruction goes to the reranker as it is, as in training.

    Attributes:
        seconds: Time spent in ``score_pairs`` so far.
        pairs: Pairs scored so far.
    """

    def __init__(
        self, reranker: Any, top_k: int, *, batch_size: int = 16, embedder_instruction: str | None = None
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"rerank_top_k must be a non-negative integer, got {top_k!r}")
        self.reranker = reranker
        self.top_k = top_k
        self.batch_size = batch_size
        self.embedder_instruction = embedder_instruction
        self.seconds = 0.0
        self.pairs = 0

    def __call__(
        self,
        scores: torch.Tensor,
        queries: Sequence[Any],
        instructions: Sequence[str | None],
        candidates: Sequence[Sequence[Any]],
    ) -> torch.Tensor:
        """``[b, m]`` pipeline scores from the embedder's ``[b, m]`` ``scores``."""
        b, m = scores.shape
        k = min(self.top_k, m)
        if k == 0 or b == 0:
            return scores
        scores = scores.detach().to("cpu", torch.float64)
        head = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [b, k]
        head_list = head.tolist()
        pairs = [(queries[i], candidates[i][j]) for i in range(b) for j in head_list[i]]
        wanted = [self._instruction(instructions[i]) for i in range(b) for _ in range(k)]
        start = time.perf_counter()
        rr = self.reranker.score_pairs(pairs, wanted, batch_size=self.batch_size)
        self.seconds += time.perf_counter() - start
        self.pairs += len(pairs)
        rr = torch.as_tensor(rr).detach().to("cpu", torch.float64).reshape(b, k)  # [b, k]
        if torch.isnan(rr).any():
            raise ValueError("the reranker returned NaN scores")
        rest = scores.scatter(1, head, float("-inf"))  # [b, m], the head masked out
        best_rest = rest.max(dim=1).values  # [b]; -inf when every candidate is in the head
        floor = torch.where(torch.isfinite(best_rest), best_rest, torch.zeros_like(best_rest))
        offset = floor - rr.min(dim=1).values + 1.0  # [b]
        return scores.scatter(1, head, rr + offset[:, None])  # [b, m]

    def _instruction(self, used: str | None) -> str | None:
        if used is not None and used == self.embedder_instruction:
            return None
        return used


class _TimedEncoder(CachedEncoder):
    """The eval's caching encoder, adding up the seconds its ``encode`` calls take."""

    seconds: float = 0.0

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().encode(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


class _Clock:
    """Per-task stage seconds from the encoder's and the stage's running totals."""

    def __init__(self, encoder: _TimedEncoder, stage: RerankStage) -> None:
        self.encoder, self.stage = encoder, stage

    def __enter__(self) -> _Clock:
        self.start = time.perf_counter()
        self.embed0, self.rerank0, self.pairs0 = self.encoder.seconds, self.stage.seconds, self.stage.pairs
        return self

    def __exit__(self, *exc: Any) -> None:
        total = time.perf_counter() - self.start
        embed = self.encoder.seconds - self.embed0
        rerank = self.stage.seconds - self.rerank0
        self.seconds = {"embed": embed, "search": max(total - embed - rerank, 0.0), "rerank": rerank}
        self.pairs = self.stage.pairs - self.pairs0


def evaluate_pipeline(
    embedder: Any,
    reranker: Any,
    rows: Iterable[Mapping[str, Any]],
    *,
    recall_k: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32,
    rerank_batch_size: int = 16,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of the embedder alone and of embedder recall -> reranker, per task of ``rows``.

    Each task runs through :func:`vlm2emb.eval.evaluate` (so the embedder side is what
    ``vlm2emb eval --data`` reports) with a :class:`RerankStage` re-ordering each row's
    best ``recall_k`` candidates. A row's ``instruction`` goes to the embedder's query side
    (its default when absent) and to the reranker (its default when absent). Relevant
    candidates are the row's ``positive`` index or indices, and candidates equal to one.

    Args:
        embedder: An :class:`~vlm2emb.model.EmbeddingModel`.
        reranker: A :class:`~vlm2emb.rerank.Reranker` (or an object with its ``score_pairs``).
        rows: Local-candidate evaluation rows.
        recall_k: Candidates per row handed to the reranker (0: the embedder's order).
        ks: Cut-offs for the ``@k`` metrics.
        batch_size: Embedding batch size.
        rerank_batch_size: Pairs per reranker forward.
        cache_dir: Embedding cache root (:mod:`vlm2emb.eval.cache`); None: no cache.

    Returns:
        ``{"tasks": {task: {"embedder": {metric: value}, "reranked": {metric: value}, "n":
        queries, "pairs_reranked": n, "seconds": {"embed", "search", "rerank"}}},
        "average": {"embedder": ..., "reranked": ..., "n_tasks": n}, "recall_k": k,
        "rerank_top_k": k, "cache": {...}}``; averages are unweighted means over tasks, as in
        :func:`vlm2emb.eval.evaluate`.

    Raises:
        ValueError: No rows, a malformed row (named by its index) or a bad ``recall_k``.
    """
    from vlm2emb.eval.runner import evaluate

    if isinstance(recall_k, bool) or not isinstance(recall_k, int) or recall_k < 0:
        raise ValueError(f"recall_k must be a non-negative integer, got {recall_k!r}")
    names = metric_names(ks)
    default = getattr(getattr(embedder, "config", None), "query_instruction", None)
    tasks: dict[str, list[dict[str, Any]]] = {}
    for index, row in enumerate(rows):
        _check_row(row, index)
        task = str(row.get("task") or "default")
        instruction = resolve_instruction(row.get("instruction"), default)
        tasks.setdefault(task, []).append({**row, "task": task, "instruction": instruction})
    if not tasks:
        raise ValueError("evaluate_pipeline needs at least one row")
    encoder = _TimedEncoder(embedder, cache_dir)
    stage = RerankStage(reranker, recall_k, batch_size=rerank_batch_size, embedder_instruction=default)
    target_instruction = getattr(getattr(embedder, "config", None), "target_instruction", None)
    reports: dict[str, dict[str, Any]] = {}
    for task, task_rows in tasks.items():
        with _Clock(encoder, stage) as clock:
            result = evaluate(
                encoder,
                task_rows,
                ks=ks,
                batch_size=batch_size,
                target_instruction=target_instruction,
                rescore=stage,
            )["tasks"][task]
        reports[task] = {
            "embedder": {name: result[name] for name in names},
            "reranked": {name: result["rescored"][name] for name in names},
            "n": result["n"],
            "pairs_reranked": clock.pairs,
            "seconds": _rounded(clock.seconds),
        }
    average = {
        side: {name: float(np.mean([r[side][name] for r in reports.values()])) for name in names}
        for side in ("embedder", "reranked")
    }
    return {
        "tasks": reports,
        "average": {**average, "n_tasks": len(reports)},
        "recall_k": recall_k,
        "rerank_top_k": recall_k,
        "cache": dataclasses.asdict(encoder.stats),
    }


def evaluate_suite_pipeline(
    embedder: Any,
    reranker: Any,
    suite: Any,
    *,
    loaded: list[Any] | None = None,
    rerank_top_k: int = 10,
    batch_size: int = 32,
    rerank_batch_size: int = 16,
    cache_dir: str | Path | None = None,
    default_query_instruction: str | None = None,
    default_target_instruction: str | None = None,
) -> dict[str, Any]:
    """The embedder alone and embedder -> reranker on every task of an eval suite.

    Each task is loaded and scored by its kind (:mod:`vlm2emb.eval.kinds`) through
    :func:`vlm2emb.eval.harness.run_suite`, with the embedding cache, the suite's prompt
    style and instruction rules, so the ``embedder`` side of a task equals what
    ``vlm2emb eval --suite`` reports for it. The reranker re-orders each query's best
    ``rerank_top_k`` by embedder score (a corpus task: of the whole corpus); the
    ``reranked`` side holds the metrics of that order.

    Args:
        embedder: An :class:`~vlm2emb.model.EmbeddingModel`.
        reranker: A :class:`~vlm2emb.rerank.Reranker` (or an object with its ``score_pairs``).
        suite: A :class:`~vlm2emb.eval.suite.SuiteConfig` (:func:`~vlm2emb.eval.suite.load_suite`).
        loaded: :func:`~vlm2emb.eval.harness.load_suite_tasks`'s output (read here if None).
        rerank_top_k: Candidates per query the reranker re-orders (0: the embedder's order).
        batch_size: Embedding batch size.
        rerank_batch_size: Pairs per reranker forward.
        cache_dir: Embedding cache root; None disables it.
        default_query_instruction: For queries without one, as the task's
            ``instruction_fallback`` allows (``vlm2emb eval`` passes the model's saved one).
            Queries embedded with it get the reranker's own default instruction.
        default_target_instruction: For tasks without ``target_instruction``, likewise.

    Returns:
        ``{"suite", "rerank_top_k", "tasks": {name: {"kind", "meta_task", "metric", "n",
        "embedder": {"score", metric: value, ...}, "reranked": {...}, "pairs_reranked",
        "seconds": {"embed", "search", "rerank"}}}, "meta_tasks": {meta: {"embedder",
        "reranked", "n_tasks"}}, "average": {"embedder", "reranked", "n_tasks", "seconds"},
        "cache", "seconds"}`` (plus ``not_run`` for pending tasks). ``score`` is the task's
        headline metric; averages are unweighted means over tasks, as ``vlm2emb eval``'s.

    Raises:
        DataError: A task whose kind cannot take a re-ranking stage (before any model work).
        ValueError: A negative ``rerank_top_k``.
    """
    from vlm2emb.data.schema import DataError
    from vlm2emb.eval.harness import load_suite_tasks, run_suite, summarize
    from vlm2emb.eval.kinds import get_task_kind

    stage = RerankStage(
        reranker, rerank_top_k, batch_size=rerank_batch_size, embedder_instruction=default_query_instruction
    )
    for spec in suite.tasks:
        kind = get_task_kind(spec.kind)
        if kind.runnable and not kind.supports_rescore:
            raise DataError(f"task {spec.name!r}: kind {spec.kind!r} cannot report a re-ranked pipeline")
    start = time.perf_counter()
    loaded = loaded if loaded is not None else load_suite_tasks(suite)
    encoder = _TimedEncoder(embedder, cache_dir)
    names = metric_names(tuple(suite.ks))
    sides: dict[str, dict[str, dict[str, Any]]] = {"embedder": {}, "reranked": {}}
    tasks: dict[str, dict[str, Any]] = {}
    not_run: dict[str, str] = {}
    for spec, payload in zip(suite.tasks, loaded, strict=True):
        # One task at a time through the harness, so each gets its own stage seconds.
        with _Clock(encoder, stage) as clock:
            part = run_suite(
                encoder,
                dataclasses.replace(suite, tasks=[spec]),
                loaded=[payload],
                batch_size=batch_size,
                default_query_instruction=default_query_instruction,
                default_target_instruction=default_target_instruction,
                rescore=stage,
            )
        not_run.update(part.get("not_run", {}))
        if spec.name not in part["tasks"]:
            continue
        result = dict(part["tasks"][spec.name])
        rescored = result.pop("rescored")
        info = {key: result.pop(key) for key in ("kind", "meta_task", "metric")}
        sides["embedder"][spec.name] = {**result, "meta_task": info["meta_task"]}
        sides["reranked"][spec.name] = {**rescored, "meta_task": info["meta_task"]}
        tasks[spec.name] = {
            **info,
            "n": result["n"],
            "embedder": _metrics_only(result),
            "reranked": _metrics_only(rescored),
            "pairs_reranked": clock.pairs,
            "seconds": _rounded(clock.seconds),
        }
        for key in ("n_skipped", "corpus_size"):
            if key in result:
                tasks[spec.name][key] = result[key]
    summaries = {side: summarize(reports, names) for side, reports in sides.items()}
    metas = summaries["embedder"]["meta_tasks"]
    report: dict[str, Any] = {
        "suite": suite.name,
        "rerank_top_k": rerank_top_k,
        "tasks": tasks,
        "meta_tasks": {
            meta: {
                "embedder": _metrics_only(summaries["embedder"]["meta_tasks"][meta]),
                "reranked": _metrics_only(summaries["reranked"]["meta_tasks"][meta]),
                "n_tasks": metas[meta]["n_tasks"],
            }
            for meta in metas
        },
        "average": {
            "embedder": _metrics_only(summaries["embedder"]["average"]),
            "reranked": _metrics_only(summaries["reranked"]["average"]),
            "n_tasks": len(tasks),
            "seconds": _rounded(
                {stage_name: sum(t["seconds"][stage_name] for t in tasks.values()) for stage_name in _STAGES}
            ),
        },
    }
    if not_run:
        report["not_run"] = not_run
    report["cache"] = dataclasses.asdict(encoder.stats)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def format_pipeline_report(report: Mapping[str, Any], metrics: Sequence[str] | None = None) -> str:
    """A text table: per task, the embedder's and the pipeline's metrics and stage seconds.

    Args:
        report: :func:`evaluate_pipeline`'s or :func:`evaluate_suite_pipeline`'s report.
        metrics: Columns shown for each side; default ``score`` (suites), ``hit@1``,
            ``ndcg@10`` (when computed) and ``mrr``.

    Returns:
        The table (no trailing newline); the last line is the unweighted average over tasks.
    """
    k = report["rerank_top_k"]
    tasks: Mapping[str, Mapping[str, Any]] = report["tasks"]
    average = report["average"]
    if metrics is None:
        present = set(average["embedder"])
        metrics = [m for m in ("score", "hit@1", "ndcg@10", "mrr") if m in present]
    width = max([len("average"), len("task"), *(len(t) for t in tasks)])
    head = [f"{'task':<{width}}", f"{'n':>6}"]
    head += [f"{m + ' emb':>12}" for m in metrics] + [f"{m + f' +rr@{k}':>14}" for m in metrics]
    head += [f"{s + ' s':>9}" for s in _STAGES]
    lines = ["  ".join(head)]

    def cells(name: str, n: Any, rep: Mapping[str, Any], seconds: Mapping[str, float] | None) -> str:
        out = [f"{name:<{width}}", f"{n!s:>6}"]
        out += [_cell(rep["embedder"].get(m), 12) for m in metrics]
        out += [_cell(rep["reranked"].get(m), 14) for m in metrics]
        out += [f"{seconds[s]:>9.2f}" if seconds else f"{'-':>9}" for s in _STAGES]
        return "  ".join(out)

    for task, rep in tasks.items():
        lines.append(cells(task, rep["n"], rep, rep["seconds"]))
    lines.append("-" * len(lines[0]))
    total_n = sum(int(rep["n"]) for rep in tasks.values())
    seconds = average.get("seconds") or _rounded(
        {s: sum(rep["seconds"][s] for rep in tasks.values()) for s in _STAGES}
    )
    lines.append(cells("average", total_n, average, seconds))
    meta = report.get("meta_tasks") or {}
    if meta:  # suites: the per-meta-task means of the headline score, as vlm2emb eval prints them
        width = max(len("meta-task"), *(len(m) for m in meta))
        lines += ["", f"{'meta-task':<{width}}  {'score emb':>10}  {f'score +rr@{k}':>14}  {'tasks':>5}"]
        for name, rep in meta.items():
            lines.append(
                f"{name:<{width}}  {_cell(rep['embedder'].get('score'), 10)}  "
                f"{_cell(rep['reranked'].get('score'), 14)}  {rep['n_tasks']:>5}"
            )
    not_run = report.get("not_run") or {}
    if not_run:
        lines.append(f"not run ({len(not_run)} tasks, not in the averages): {', '.join(not_run)}")
    cache = report.get("cache")
    if cache:
        lines.append("")
        lines.append(
            f"embedding cache: {cache['hits']} hits, {cache['misses']} misses "
            f"({cache['items_from_cache']} items from cache, {cache['items_encoded']} encoded)"
        )
    return "\n".join(lines)


def _cell(value: Any, width: int) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _metrics_only(values: Mapping[str, Any]) -> dict[str, Any]:
    """The metric values of a task or average report (no counts, kinds or names)."""
    skip = {"n", "n_tasks", "n_skipped", "corpus_size", "meta_task", "kind", "metric"}
    return {key: value for key, value in values.items() if key not in skip}


def _rounded(seconds: Mapping[str, float]) -> dict[str, float]:
    return {name: round(value, 6) for name, value in seconds.items()}


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
    """A checked row's positive candidate indices (:func:`_check_row`'s rules)."""
    _check_row(row, index)
    positive = row.get("positive", 0)
    return [positive] if isinstance(positive, int) else list(positive)


def _check_row(row: Any, index: int) -> None:
    """The pipeline's own row check, before any model work (messages name the row)."""
    candidates = row.get("candidates") if isinstance(row, Mapping) else None
    if (
        not isinstance(row, Mapping)
        or "query" not in row
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
