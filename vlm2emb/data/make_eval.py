"""``vlm2emb data make-eval``: evaluation rows from held-out training rows.

A seeded sample of training rows is held out. Each becomes an evaluation row: its query,
and a candidate list of its own positive(s) plus distractors drawn from the *other* held-out
rows' positives (the same dataset first, then the others), at seeded positions. The
remaining rows are written as the training file, less any row that repeats a held-out
(query, positive) pair, so no evaluation answer is trained on.

Distractors are compared by content, never by row, and never include an answer of the
query: in classification-style data many rows share one label text (i2t) or one query
text (t2i), and a copy of the positive, or another row's positive for the same query, must
not be offered as a wrong answer.
Rows are validated by the training schema first, so a bad row stops the command with its
file and line before anything is written. Media paths are written relative to the output
file's folder when they lie inside it, else absolute; both outputs are written whole or not
at all.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm2emb.data.errors import DataError
from vlm2emb.data.schema import TrainExample, iter_source, train_row_builder

__all__ = ["MakeEvalResult", "make_eval"]


@dataclass
class _Row:
    """One source row: its query and every positive (a row with several gives several)."""

    query: dict[str, Any]
    positives: list[dict[str, Any]]
    negatives: list[dict[str, Any]]
    instruction: str | None
    target_instruction: str | None
    dataset: str
    teacher_scores: list[float] | None
    source: str


@dataclass
class MakeEvalResult:
    """What :func:`make_eval` wrote.

    Attributes:
        eval_rows: Evaluation rows written.
        train_rows: Training rows written.
        dropped_train_rows: Training rows left out because they repeat a held-out (query,
            positive) pair.
        short_rows: Evaluation rows with fewer candidates than asked (too few distinct
            positives among the held-out rows).
        per_task: Evaluation rows per task (the training rows' dataset).
    """

    eval_rows: int
    train_rows: int
    dropped_train_rows: int
    short_rows: int
    per_task: dict[str, int] = field(default_factory=dict)


def _key(item: dict[str, Any]) -> str:
    return json.dumps(item, sort_keys=True, ensure_ascii=False)


def _rows(data: str, media_root: str | None, data_format: str) -> list[_Row]:
    # A row with several positives arrives as one example per positive, all with its source.
    from vlm2emb.mine import item_to_json  # the canonical JSON form of a validated item

    rows: dict[str, _Row] = {}
    ex: TrainExample
    for ex in iter_source(0, data, "training", train_row_builder(data_format), media_root=media_root):
        row = rows.get(ex.source)
        if row is None:
            rows[ex.source] = _Row(
                query=item_to_json(ex.query),
                positives=[item_to_json(ex.positive)],
                negatives=[item_to_json(n) for n in ex.negatives],
                instruction=ex.instruction,
                target_instruction=ex.target_instruction,
                dataset=ex.dataset,
                teacher_scores=ex.teacher_scores,
                source=ex.source,
            )
        else:
            row.positives.append(item_to_json(ex.positive))
    return list(rows.values())


def _relative_to(item: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Media paths relative to ``folder`` when inside it (they stay valid if the folder
    moves), else absolute (anything else would escape the folder, which the schema refuses)."""

    def rel(path: str) -> str:
        p = Path(path)
        return p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p)

    out = dict(item)
    if "images" in out:
        out["images"] = [rel(p) for p in out["images"]]
    for key in ("video", "pdf"):
        if key in out:
            out[key] = rel(out[key])
    return out


def _query_key(row: _Row) -> tuple[str, str | None]:
    # A query is embedded with its instruction: the same text under another one is another query.
    return _key(row.query), row.instruction


def _candidates(
    row: _Row,
    answers: set[str],
    pool: dict[str, list[tuple[str, dict[str, Any]]]],
    n: int,
    rng: random.Random,
) -> tuple[list[dict[str, Any]], list[int]]:
    """The row's positives plus up to ``n - len(positives)`` distinct distractors, none of
    them in ``answers`` (every positive of this query in the data), shuffled; returns
    (candidates, positive indices)."""
    own = answers | {_key(p) for p in row.positives}
    chosen: dict[str, dict[str, Any]] = {}
    need = max(0, n - len(row.positives))
    # Same dataset first (the harder, meaningful choice), then the rest.
    for group in (pool[row.dataset], [c for d, cs in sorted(pool.items()) if d != row.dataset for c in cs]):
        fresh = [(k, item) for k, item in group if k not in own and k not in chosen]
        # Distinct by content: the pool lists a shared label once per row that has it.
        unique = list(dict(fresh).items())
        rng.shuffle(unique)
        for k, item in unique[: need - len(chosen)]:
            chosen[k] = item
        if len(chosen) >= need:
            break
    tagged = [(p, True) for p in row.positives] + [(c, False) for c in chosen.values()]
    rng.shuffle(tagged)
    return [c for c, _ in tagged], [i for i, (_, pos) in enumerate(tagged) if pos]


def _write_atomic(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:  # plain open: the umask's permissions
            fh.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_eval(
    data: str,
    eval_out: str | Path,
    train_out: str | Path,
    *,
    rows: int = 200,
    candidates: int = 10,
    seed: int = 0,
    media_root: str | None = None,
    data_format: str = "auto",
) -> MakeEvalResult:
    """Holds out ``rows`` training rows as evaluation rows; writes both files.

    Args:
        data: Training rows (JSONL, Parquet, ``datasets`` folder; canonical or MMEB layout).
        eval_out: Evaluation rows (JSONL): ``query``, ``candidates``, ``positive`` (indices),
            ``task`` (the training row's dataset), ``instruction`` when the row had one.
        train_out: The training rows that were not held out (JSONL, canonical layout).
        rows: Rows to hold out (at most all rows but one).
        candidates: Candidates per evaluation row, positives included (at least 2).
        seed: Seed of the hold-out sample, the distractors and their order.
        media_root: Folder the rows' relative media paths resolve against (default: the
            data file's folder).
        data_format: ``auto``, ``canonical`` or ``mmeb``.

    Returns:
        Counts of what was written.

    Raises:
        DataError: A bad row (file and line), too few rows, or an output that is the input.
        ValueError: ``rows`` or ``candidates`` out of range.
    """
    if rows < 1:
        raise ValueError(f"--rows must be at least 1, got {rows}")
    if candidates < 2:
        raise ValueError(
            f"--candidates must be at least 2 (the positive and one distractor), got {candidates}"
        )
    eval_path, train_path = Path(eval_out).resolve(), Path(train_out).resolve()
    if eval_path == train_path:
        raise DataError(f"--eval-out and --train-out are the same file: {eval_path}")
    source = Path(data).resolve()
    if source in (eval_path, train_path):
        raise DataError(f"{data}: an output would overwrite the input; write to another file")
    all_rows = _rows(data, media_root, data_format)
    if len(all_rows) < 2 or rows >= len(all_rows):
        raise DataError(
            f"{data}: {len(all_rows)} rows; holding out {rows} leaves no training rows (use --rows below {len(all_rows)})"
        )
    rng = random.Random(seed)
    held = sorted(rng.sample(range(len(all_rows)), rows))
    held_rows = [all_rows[i] for i in held]
    held_set = set(held)

    # The distractor pool: every held-out row's positives, by dataset, in row order.
    pool: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for row in held_rows:
        pool.setdefault(row.dataset, []).extend((_key(p), p) for p in row.positives)

    # Every positive each query has anywhere in the data: none may be a distractor of it.
    answers: dict[tuple[str, str | None], set[str]] = {}
    for row in all_rows:
        answers.setdefault(_query_key(row), set()).update(_key(p) for p in row.positives)

    eval_dir, train_dir = eval_path.parent, train_path.parent
    eval_lines, per_task, short = [], {}, 0
    for row in held_rows:
        cands, pos = _candidates(row, answers[_query_key(row)], pool, candidates, rng)
        short += len(cands) < candidates
        out: dict[str, Any] = {
            "query": _relative_to(row.query, eval_dir),
            "candidates": [_relative_to(c, eval_dir) for c in cands],
            "positive": pos[0] if len(pos) == 1 else pos,
            "task": row.dataset,
        }
        if row.instruction is not None:
            out["instruction"] = row.instruction
        eval_lines.append(json.dumps(out, ensure_ascii=False))
        per_task[row.dataset] = per_task.get(row.dataset, 0) + 1

    # A copy of a held-out pair would train on an evaluation answer. The same query with
    # other positives stays (t2i rows of one class share their query text).
    held_pairs = {(_query_key(r), _key(p)) for r in held_rows for p in r.positives}
    train_lines, dropped = [], 0
    for i, row in enumerate(all_rows):
        if i in held_set:
            continue
        if any((_query_key(row), _key(p)) in held_pairs for p in row.positives):
            dropped += 1
            continue
        rec: dict[str, Any] = {"query": _relative_to(row.query, train_dir)}
        if len(row.positives) == 1:
            rec["positive"] = _relative_to(row.positives[0], train_dir)
        else:
            rec["positives"] = [_relative_to(p, train_dir) for p in row.positives]
        if row.negatives:
            rec["negatives"] = [_relative_to(n, train_dir) for n in row.negatives]
        for key in ("instruction", "target_instruction", "teacher_scores"):
            if getattr(row, key) is not None:
                rec[key] = getattr(row, key)
        rec["dataset"] = row.dataset
        train_lines.append(json.dumps(rec, ensure_ascii=False))
    if not train_lines:
        raise DataError(f"{data}: every remaining row repeats a held-out pair; nothing is left to train on")

    for path in (eval_path, train_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(eval_path, eval_lines)
    _write_atomic(train_path, train_lines)
    return MakeEvalResult(
        eval_rows=len(eval_lines),
        train_rows=len(train_lines),
        dropped_train_rows=dropped,
        short_rows=short,
        per_task=dict(sorted(per_task.items())),
    )
