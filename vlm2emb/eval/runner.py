"""Evaluate an embedding model on MMEB-style rows with per-query local candidate lists.

Each row is one query with its own candidate list (MMEB ships e.g. 1000 candidates per query,
positive first). Rows are plain Python objects::

    {
        "query": {"text": "a photo of a cat", "image": None},
        "candidates": [{"text": None, "image": "cat.jpg"}, {"text": None, "image": "dog.jpg"}],
        "positive": 0,            # int or list of ints; default 0
        "task": "VisualNews_t2i", # default "default"
        "instruction": "Find an image that matches the caption.",  # default None
    }

Encoding is deduplicated because it dominates evaluation time: within a task, every distinct
query is embedded once per instruction (one ``encode`` call per distinct instruction) and every
distinct candidate once (a single ``encode`` call with ``target_instruction``), even when the same
candidate pool is shared by hundreds of queries.

The model only needs an ``encode`` method (see :class:`SupportsEncode`), so this module does not
import transformers.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from vlm2emb.eval.leaderboard import accumulate, mmeb_metrics
from vlm2emb.eval.metrics import metric_names, ranking_metrics
from vlm2emb.eval.rescore import Rescorer
from vlm2emb.eval.scoring import Scoring, get_scoring

__all__ = ["SupportsEncode", "evaluate", "format_report"]

logger = logging.getLogger(__name__)

# Columns shown by format_report by default (the MMEB headline numbers).
_REPORT_COLUMNS = ("hit@1", "hit@5", "ndcg@5", "mrr")


class SupportsEncode(Protocol):
    """What :func:`evaluate` needs from a model."""

    def encode(
        self,
        items: list[Any],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
    ) -> torch.Tensor:
        """Embed ``items`` into an ``[len(items), dim]`` tensor (ideally L2-normalised)."""
        ...


def evaluate(
    model: SupportsEncode,
    rows: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    ks: Sequence[int] = (1, 5, 10),
    target_instruction: str | None = None,
    show_progress_bar: bool = False,
    scoring: str = "cosine",
    rescore: Rescorer | None = None,
) -> dict[str, Any]:
    """Embed queries and candidates, rank each row's candidates and report metrics per task.

    Scores are cosine similarities by default: embeddings are L2-normalised again here (the
    model should already do it, but an un-normalised model would otherwise silently favour
    long vectors). ``scoring="maxsim"`` scores the multi-vector head's token sets by MaxSim
    (:mod:`vlm2emb.eval.scoring`).
    A candidate whose content equals a positive's (same text and image; it gets the same
    embedding) is relevant too, so MMEB rows that repeat the positive score as in VLM2Vec.
    Ties between different candidates rank relevant ones last (pessimistic), see
    :mod:`vlm2emb.eval.metrics`.

    Rows of one task may have different candidate counts; metrics are then computed per
    candidate count and combined weighted by the number of queries, which equals averaging the
    per-query metrics over the whole task.

    Args:
        model: Object with ``encode(items, instruction=None, batch_size=..., show_progress_bar=...)``
            returning a ``[n, dim]`` float tensor.
        rows: MMEB-style rows (see the module docstring). Consumed once.
        batch_size: Passed to ``model.encode``.
        ks: Cut-offs for the ``@k`` metrics.
        target_instruction: Instruction used when encoding candidates (``None`` for none).
        show_progress_bar: Passed to ``model.encode``.
        scoring: ``cosine`` or ``maxsim`` (:data:`vlm2emb.eval.scoring.SCORINGS`).
        rescore: Optional second ranking (:class:`vlm2emb.eval.rescore.Rescorer`): each
            task's metrics of its scores are added under ``"rescored"`` (same metric code,
            same relevant candidates).

    Returns:
        ``{"tasks": {task: {metric: value, ..., "n": n_queries}}, "average": {metric: value,
        ..., "n_tasks": n_tasks}}``. Metric keys are those of :func:`ranking_metrics`; the
        average is the unweighted mean over tasks (each task counts once, regardless of size).
        Tasks appear in order of first occurrence.

    Raises:
        ValueError: If ``rows`` is empty or a row is malformed (the message names the row).
    """
    ks = tuple(ks)
    names = metric_names(ks)  # also validates ks before any expensive encoding
    scorer = get_scoring(scoring)

    # Group rows by task, keeping each row's position in the input for error messages.
    tasks: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    n_rows = 0
    for i, row in enumerate(rows):
        _validate_row(row, i)
        tasks.setdefault(str(row.get("task") or "default"), []).append((i, row))
        n_rows += 1
    if n_rows == 0:
        raise ValueError("evaluate() needs at least one row")

    task_reports: dict[str, dict[str, Any]] = {}
    for task, task_rows in tasks.items():
        logger.info("evaluating task %s (%d queries)", task, len(task_rows))
        metrics = _evaluate_task(
            model,
            scorer,
            task_rows,
            ks=ks,
            batch_size=batch_size,
            target_instruction=target_instruction,
            show_progress_bar=show_progress_bar,
            rescore=rescore,
        )
        task_reports[task] = {**metrics, "n": len(task_rows)}

    average: dict[str, Any] = {
        name: sum(rep[name] for rep in task_reports.values()) / len(task_reports) for name in names
    }
    average["n_tasks"] = len(task_reports)
    return {"tasks": task_reports, "average": average}


def format_report(report: Mapping[str, Any], columns: Sequence[str] = _REPORT_COLUMNS) -> str:
    """Render an :func:`evaluate` report as a fixed-width text table.

    One line per task with the chosen metric columns and the query count ``n``, then an
    ``average`` line (unweighted mean over tasks; its ``n`` column is the total query count).
    Metrics missing from the report (e.g. ``hit@5`` when 5 was not in ``ks``) show as ``-``.

    Args:
        report: The dict returned by :func:`evaluate`.
        columns: Metric keys to show, in order.

    Returns:
        The table as a multi-line string (no trailing newline).
    """
    task_reports: Mapping[str, Mapping[str, Any]] = report["tasks"]
    average: Mapping[str, Any] = report["average"]
    total_n = sum(int(rep.get("n", 0)) for rep in task_reports.values())

    name_width = max([len("task"), len("average"), *(len(t) for t in task_reports)])
    col_width = max([8, *(len(c) for c in columns)])
    n_width = max(6, len(str(total_n)))

    def fmt_line(name: str, values: Mapping[str, Any], n: int | str) -> str:
        cells = []
        for col in columns:
            value = values.get(col)
            cells.append(f"{value:>{col_width}.4f}" if value is not None else f"{'-':>{col_width}}")
        return f"{name:<{name_width}}  " + "  ".join(cells) + f"  {n:>{n_width}}"

    header = f"{'task':<{name_width}}  " + "  ".join(f"{c:>{col_width}}" for c in columns)
    header += f"  {'n':>{n_width}}"
    rule = "-" * len(header)
    lines = [header, rule]
    lines += [fmt_line(task, rep, int(rep.get("n", 0))) for task, rep in task_reports.items()]
    lines += [rule, fmt_line("average", average, total_n)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------------


def _item_key(item: Any) -> Hashable:
    """Return a hashable key identifying an item, used to encode equal items only once.

    For a dict item the key is built from its non-``None`` fields (normally ``text`` and
    ``image``), so ``{"text": "a"}`` and ``{"text": "a", "image": None}`` share a key. Field
    values that are hashable (strings, paths) are keyed by value; unhashable ones such as PIL
    images or numpy arrays are keyed by ``id()``. Identity is the right notion for in-memory
    images: comparing pixels would cost more than it saves, and ``id`` is stable here because
    the rows keep the objects alive for the whole evaluation.

    Args:
        item: A query or candidate item (normally a dict; bare values also work).

    Returns:
        A hashable key; equal keys mean the item is encoded once and its embedding reused.
    """
    if isinstance(item, Mapping):
        return ("dict", tuple(sorted((str(k), _value_key(v)) for k, v in item.items() if v is not None)))
    return _value_key(item)


def _value_key(value: Any) -> Hashable:
    if isinstance(value, os.PathLike):
        # Path("a.jpg") and "a.jpg" name the same file.
        value = os.fspath(value)
    if isinstance(value, (list, tuple)):
        # Lists of image paths (the schema's "images") key by content, not identity.
        return ("seq", tuple(_value_key(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    # Tag by type so e.g. the int 1 and the string "1" never collide, nor a value with an id.
    return ("value", type(value).__name__, value)


def _validate_row(row: Any, index: int) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"row {index}: expected a dict, got {type(row).__name__}")
    if "query" not in row:
        raise ValueError(f"row {index}: missing 'query'")
    candidates = row.get("candidates")
    if not isinstance(candidates, Sequence) or isinstance(candidates, (str, bytes)) or not candidates:
        raise ValueError(f"row {index}: 'candidates' must be a non-empty list")
    positives = _positives(row, index)
    if not positives:
        raise ValueError(f"row {index}: 'positive' is empty")
    for p in positives:
        if not 0 <= p < len(candidates):
            raise ValueError(
                f"row {index}: positive index {p} is out of range for {len(candidates)} candidates"
            )


def _positives(row: Mapping[str, Any], index: int) -> list[int]:
    positive = row.get("positive", 0)
    values = [positive] if isinstance(positive, numbers.Integral) else list(positive)
    if any(isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in values):
        raise ValueError(f"row {index}: 'positive' must be an int or a list of ints, got {positive!r}")
    return [int(p) for p in values]


def _evaluate_task(
    model: SupportsEncode,
    scorer: Scoring,
    task_rows: list[tuple[int, Mapping[str, Any]]],
    *,
    ks: tuple[int, ...],
    batch_size: int,
    target_instruction: str | None,
    show_progress_bar: bool,
    rescore: Rescorer | None = None,
) -> dict[str, Any]:
    """Encode one task's queries/candidates (deduplicated) and return its averaged metrics."""
    # ---- queries: one encode call per distinct instruction, distinct queries only ----
    # groups[instruction] = (items to encode, key -> position in that list)
    groups: dict[str | None, tuple[list[Any], dict[Hashable, int]]] = {}
    query_ref: list[tuple[str | None, int]] = []  # per row: (instruction, position in its group)
    for _, row in task_rows:
        instruction = row.get("instruction")
        items, positions = groups.setdefault(instruction, ([], {}))
        key = _item_key(row["query"])
        if key not in positions:
            positions[key] = len(items)
            items.append(row["query"])
        query_ref.append((instruction, positions[key]))

    group_embs = {
        instruction: scorer.encode(model, items, instruction, batch_size, show_progress_bar=show_progress_bar)
        for instruction, (items, _) in groups.items()
    }
    # Stack all groups so every row's query embedding is a single index into one matrix.
    offsets: dict[str | None, int] = {}
    total = 0
    for instruction, emb in group_embs.items():
        offsets[instruction] = total
        total += len(emb)
    query_emb = scorer.concat(list(group_embs.values()))  # [n_distinct_queries, ...]
    query_idx = [offsets[instr] + pos for instr, pos in query_ref]  # per row

    # ---- candidates: every distinct candidate of the task in one encode call ----
    cand_items: list[Any] = []
    cand_pos: dict[Hashable, int] = {}
    cand_idx: list[list[int]] = []  # per row: index of each candidate into cand_emb
    for _, row in task_rows:
        row_idx = []
        for cand in row["candidates"]:
            key = _item_key(cand)
            if key not in cand_pos:
                cand_pos[key] = len(cand_items)
                cand_items.append(cand)
            row_idx.append(cand_pos[key])
        cand_idx.append(row_idx)
    # [n_distinct_candidates, ...]
    cand_emb = scorer.encode(
        model, cand_items, target_instruction, batch_size, show_progress_bar=show_progress_bar
    )

    # ---- score and rank, grouping rows by candidate count so each group is a dense matrix ----
    by_count: dict[int, list[int]] = {}
    for r, idx in enumerate(cand_idx):
        by_count.setdefault(len(idx), []).append(r)

    weighted: dict[str, Any] = {}
    n_total = len(task_rows)
    for n_cand, row_ids in by_count.items():
        scores = scorer.score_rows(
            query_emb, cand_emb, [query_idx[r] for r in row_ids], [cand_idx[r] for r in row_ids]
        )
        relevant = [_relevant(cand_idx[r], _positives(task_rows[r][1], task_rows[r][0])) for r in row_ids]
        metrics: dict[str, Any] = ranking_metrics(scores, relevant, ks=ks)
        metrics["leaderboard"] = mmeb_metrics(scores, relevant, ks=ks)  # VLM2Vec's definitions
        # Metrics are per-query means, so weighting by group size gives the task-wide mean.
        # (The weight is exactly 1.0 in the common single-group case, so values stay exact.)
        accumulate(weighted, metrics, len(row_ids) / n_total)
        logger.debug("%d rows with %d candidates: %s", len(row_ids), n_cand, metrics)
        if rescore is not None:
            rows_of = [task_rows[r][1] for r in row_ids]
            new_scores = rescore(
                scores,  # [b, n_cand]
                [row["query"] for row in rows_of],
                [row.get("instruction") for row in rows_of],
                [[cand_items[i] for i in cand_idx[r]] for r in row_ids],
            )  # [b, n_cand]
            rescored: dict[str, Any] = ranking_metrics(new_scores, relevant, ks=ks)
            rescored["leaderboard"] = mmeb_metrics(new_scores, relevant, ks=ks)
            accumulate(weighted.setdefault("rescored", {}), rescored, len(row_ids) / n_total)
    return weighted


def _relevant(row_cand_idx: list[int], positives: list[int]) -> list[int]:
    """A row's relevant candidate positions: its positives and every candidate equal to one.

    Equal candidates share one embedding (one ``cand_idx`` entry), so they always tie; a
    candidate whose content equals a positive is that positive. Otherwise the pessimistic
    tie rule would rank the positive after its own copy, where VLM2Vec counts a hit (v1:
    argmax over the candidate list; V2: the top candidate's label equals the positive's).
    """
    wanted = {row_cand_idx[p] for p in positives}
    return [i for i, c in enumerate(row_cand_idx) if c in wanted]
