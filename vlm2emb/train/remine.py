"""Re-mining hard negatives during training (ANCE-style): ``train.remine_steps``.

Every ``remine_steps`` steps (never at the last step) the model being trained mines new hard
negatives for every training row with :func:`vlm2emb.mine.mine_negatives`, one call per
``data.train`` source, and training goes on with them from the next step.

Files: ``output_dir/mined/step-N/<source index>.jsonl`` (canonical rows, one per training
row of that source, in training order) plus ``mine``'s ``.report.json`` beside each. A
refresh is written into ``mined/.tmp-step-N/`` and renamed once every file is complete, so a
run killed while mining leaves no ``step-N`` that a resume could trust.

Exact resume: the batch order never depends on the negatives (the sampler is planned once,
from the rows as loaded), and a refresh only replaces each row's ``negatives`` (and
``teacher_scores``). A run resumed at step K therefore loads ``mined/step-M`` for the last
refresh M <= K and continues exactly as the uninterrupted run did. The refresh at step N
runs before the checkpoint of step N is saved, so that checkpoint already trains on it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

__all__ = [
    "REFRESH_DIR",
    "apply_refresh",
    "check_remine_rows",
    "last_refresh",
    "prune_refreshes",
    "refresh_due",
    "refresh_negatives",
]

REFRESH_DIR = "mined"


def refresh_due(step: int, every: int, max_steps: int) -> bool:
    """Whether a refresh follows ``step``: every ``every`` steps, never after the last one."""
    return every > 0 and step % every == 0 and step < max_steps


def last_refresh(step: int, every: int, max_steps: int | None = None) -> int:
    """The step of the newest refresh at or before ``step`` (0: none yet) in a run of
    ``max_steps`` steps (:func:`refresh_due`: none follows the last step); None: a step
    before the last."""
    if max_steps is not None and step >= max_steps:
        step = max_steps - 1
    return step // every * every if every > 0 else 0


def _by_source(examples: list[Any]) -> dict[int, list[int]]:
    """Row positions per ``data.train`` source, in training order."""
    out: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        out.setdefault(ex.origin, []).append(i)
    return out


def check_remine_rows(examples: list[Any], keep_existing: bool) -> None:
    """Refuses rows a refresh could not write to a file, before training starts.

    Mined rows are canonical JSON rows, so every query and positive (and, kept, every
    negative) must reference its media by path, not hold an in-memory image.

    Raises:
        vlm2emb.data.errors.DataError: Naming the row (``file:line``) and the problem.
    """
    from vlm2emb.data.errors import DataError
    from vlm2emb.mine import item_to_json

    for ex in examples:
        items = [ex.query, ex.positive, *(ex.negatives if keep_existing else [])]
        for item in items:
            try:
                item_to_json(item)
            except ValueError as exc:
                raise DataError(f"{ex.source or 'training row'}: train.remine_steps: {exc}") from None


def refresh_negatives(
    model: Any,
    examples: list[Any],
    run_dir: Path,
    step: int,
    settings: Any,
    *,
    is_main: bool,
    barrier: Any,
    shard: bool,
) -> dict[str, Any]:
    """Mines new negatives for ``examples`` with ``model`` into ``run_dir/mined/step-N``.

    Every process calls it (the embedding passes are collective); the main one writes.

    Args:
        model: The :class:`~vlm2emb.model.EmbeddingModel` being trained (unwrapped).
        examples: The training rows as loaded (their own negatives, not a refresh's).
        run_dir: The run's ``output_dir``.
        step: The step just finished.
        settings: The recipe's :class:`~vlm2emb.train.config.RemineConfig`.
        is_main: Whether this is the main process (the one that writes).
        barrier: Waits for every process (``accelerator.wait_for_everyone``).
        shard: Split embedding passes across processes (False under ZeRO-3).

    Returns:
        The ``remine`` part of the metrics record: ``seconds``, ``rows``, ``negatives``,
        ``short_rows``, ``negative_score_mean``, ``positive_score_mean``, ``margin_p50``.
    """
    from vlm2emb.mine import mine_negatives

    started = time.perf_counter()
    root = run_dir / REFRESH_DIR
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # a refresh killed half-way: start it again
        tmp.mkdir(parents=True)
    barrier()
    rows = negatives = short = 0
    neg_sum = pos_sum = 0.0
    margins: list[float] = []
    for origin, idx in _by_source(examples).items():
        report = mine_negatives(
            model,
            [examples[i] for i in idx],
            tmp / f"{origin}.jsonl",
            settings.mine_config(),
            across_datasets=settings.across_datasets,
            cache_dir=None,  # the weights change between refreshes: nothing to reuse
            shard=shard,
        )
        rows += report.rows
        negatives += report.negatives
        short += report.short_rows
        neg_sum += report.scores.get("negative", {}).get("mean", 0.0) * report.negatives
        pos_sum += report.scores.get("positive", {}).get("mean", 0.0) * report.rows
        if "p50" in report.scores.get("margin", {}):
            margins.append(report.scores["margin"]["p50"])
    barrier()  # every file is complete before the folder becomes step-N
    if is_main:
        if final.exists():
            shutil.rmtree(final)  # a refresh redone after resuming from an earlier checkpoint
        tmp.replace(final)
    barrier()
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "rows": rows,
        "negatives": negatives,
        "short_rows": short,
        "negative_score_mean": round(neg_sum / negatives, 6) if negatives else None,
        "positive_score_mean": round(pos_sum / rows, 6) if rows else None,
        # The median over sources of each source's median margin (positive - best negative).
        "margin_p50": round(sorted(margins)[len(margins) // 2], 6) if margins else None,
    }


def apply_refresh(examples: list[Any], folder: Path, media: Any) -> list[Any]:
    """The training rows with the negatives (and teacher scores) of a refresh folder.

    Args:
        examples: The training rows as loaded (the order the refresh was mined in).
        folder: ``mined/step-N``.
        media: The run's media options (text caps apply to the mined items as to the rows).

    Returns:
        New rows: each row of ``examples`` with ``negatives`` and ``teacher_scores`` taken
        from its mined row; everything else (source, dataset, instructions) unchanged.

    Raises:
        vlm2emb.data.errors.DataError: A file missing, unreadable, or not matching the rows
            (named).
    """
    from vlm2emb.data.errors import DataError
    from vlm2emb.data.keys import item_keys
    from vlm2emb.data.schema import load_train_examples

    out = list(examples)
    for origin, idx in _by_source(examples).items():
        path = folder / f"{origin}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: missing (the refresh of data.train entry {origin})")
        mined = load_train_examples(
            [str(path)], verify_images=False, data_format="canonical", options=media, allow_empty=True
        )
        # The same rows in the same order, or this refresh belongs to other data.
        base_keys = item_keys([examples[i].positive for i in idx], [None] * len(idx)).tolist()
        mined_keys = item_keys([ex.positive for ex in mined], [None] * len(mined)).tolist()
        if len(mined) != len(idx) or base_keys != mined_keys:
            raise DataError(
                f"{path}: its {len(mined)} rows are not the {len(idx)} training rows of data.train "
                f"entry {origin} (did the data change since the run started?)"
            )
        for i, ex in zip(idx, mined):
            out[i] = dataclasses.replace(out[i], negatives=ex.negatives, teacher_scores=ex.teacher_scores)
    return out


def prune_refreshes(run_dir: Path, every: int, checkpoint_steps: list[int], newest: int) -> None:
    """Deletes refresh folders no checkpoint needs (the newest refresh is always kept)."""
    keep = {last_refresh(step, every) for step in checkpoint_steps} | {newest}
    for path in (run_dir / REFRESH_DIR).glob("step-*"):
        step = path.name.removeprefix("step-")
        if step.isdigit() and int(step) not in keep:
            shutil.rmtree(path, ignore_errors=True)
