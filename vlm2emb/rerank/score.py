"""Reranker scores written into training rows, as the embedder's distillation targets.

:func:`score_rows` reads canonical training rows (typically the output of ``vlm2emb mine``:
each row's positive and mined negatives), scores ``[positive, *negatives]`` of every row with
a :class:`~vlm2emb.rerank.Reranker`, and writes the rows back with ``teacher_scores``. The
embedder then trains with ``train.loss: distill``, which pulls its in-group ranking towards
the reranker's (docs/losses.md). The reranker's scores are logits
(``logit(yes) - logit(no)``), so ``loss_args.teacher_temperature: 1.0`` reads them as they
are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def score_rows(
    reranker: Any,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    media_root: str | os.PathLike[str] | None = None,
    on_bad_example: str = "error",
) -> int:
    """Writes ``data``'s rows to ``out`` with the reranker's ``teacher_scores``.

    Every row is read and checked before any is scored; ``out`` is written under a
    temporary name and renamed once complete, so a failed run leaves no partial file. A
    row's own ``teacher_scores`` are replaced.

    Args:
        reranker: A :class:`~vlm2emb.rerank.Reranker`.
        data: A training source (``.jsonl``, ``.parquet``, ...; see ``data.train``).
        out: The output JSONL.
        batch_size: Pairs per reranker forward.
        media_root: Folder for relative media paths (default: the data file's folder).
        on_bad_example: ``error`` or ``skip`` (skipped rows are left out of ``out``).

    Returns:
        The number of rows written.

    Raises:
        DataError: A bad row (one line naming file and line) with ``on_bad_example: error``.
    """
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.mine import item_to_json

    rows = load_train_examples(
        [str(data)], media_root=media_root, on_bad_example=on_bad_example, work_dir=Path(out).parent
    )
    pairs, instructions, sizes = [], [], []
    for row in rows:
        group = [row.positive, *row.negatives]
        pairs.extend((row.query, candidate) for candidate in group)
        instructions.extend([row.instruction] * len(group))
        sizes.append(len(group))
    scores = reranker.score_pairs(pairs, instructions, batch_size=batch_size).tolist()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    start = 0
    with partial.open("w", encoding="utf-8") as fh:
        for row, size in zip(rows, sizes):
            record: dict[str, Any] = {
                "query": item_to_json(row.query),
                "positive": item_to_json(row.positive),
            }
            if row.negatives:
                record["negatives"] = [item_to_json(n) for n in row.negatives]
            for key in ("instruction", "target_instruction"):
                if getattr(row, key):
                    record[key] = getattr(row, key)
            record["dataset"] = row.dataset
            record["teacher_scores"] = scores[start : start + size]  # [positive, *negatives]
            start += size
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(target)
    return len(rows)
