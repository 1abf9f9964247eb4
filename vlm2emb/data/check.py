"""Bad-input policy and ``vlm2emb data check``: count, report and optionally skip bad rows.

With ``data.on_bad_example: error`` (the default) the first bad row stops the run with one
line naming file, line and reason. With ``skip`` every bad row is left out, counted by
reason, and the run writes ``{output_dir}/data_report.json``::

    {"rows": 120, "used": 117, "skipped": 3,
     "reasons": {"missing_file": 2, "malformed_json": 1},
     "examples": ["train.jsonl:4: query.image file not found: /data/x.png", ...]}

Before the first step, :func:`preflight` runs every row through the batch preprocessing
(full media decode, then the model's ``collate`` with its processor's limits), so a row a
batch would choke on is found then, not halfway through training; ``vlm2emb data check
FILE...`` runs the same checks on files before a run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlm2emb.data.errors import DataError, DataReport
from vlm2emb.data.errors import DataWarning as DataWarning
from vlm2emb.data.media import MediaOptions, decode_item
from vlm2emb.data.schema import load_eval_examples, load_train_examples


def check_files(
    specs: list[str],
    *,
    kind: str = "train",
    media_root: str | Path | None = None,
    data_format: str = "auto",
    options: Any = None,
    prepare: Prepare | None = None,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    print_fn: Any = print,
) -> DataReport:
    """Validates data files and runs the training path's preprocessing; prints every bad row.

    Args:
        specs: Data sources (files, dataset folders, ``hf:`` ids).
        kind: ``train`` or ``eval`` rows.
        media_root: Folder for relative media paths (default: each file's folder).
        data_format: ``auto`` | ``canonical`` | ``mmeb`` (training rows).
        options: :class:`vlm2emb.data.media.MediaOptions` for limits, frames and the text cap.
        prepare: The model's preprocessing (``EmbeddingModel.collate`` or
            :func:`load_preparer`); None = decode media only, no processor limits.
        query_instruction: Default query instruction, as training would use it.
        target_instruction: Default target instruction.
        print_fn: Where each bad row's line goes.

    Returns:
        The report; ``report.skipped`` is the number of bad rows.
    """
    opts = options or MediaOptions()
    report = DataReport(listener=print_fn)
    common: dict[str, Any] = dict(
        media_root=media_root, verify_images=True, on_bad_example="skip", report=report, options=opts
    )
    if kind == "eval":
        examples: list[Any] = load_eval_examples(specs, **common)
    else:
        examples = load_train_examples(specs, data_format=data_format, allow_empty=True, **common)
    found = preflight(
        examples,
        prepare if prepare is not None else _no_processor,
        media=opts,
        query_instruction=query_instruction,
        target_instruction=target_instruction,
    )
    for _, error in found:
        report.used -= 1
        report.add_bad(error)
    return report


def _no_processor(items: list[dict[str, Any]], instructions: list[str | None]) -> None:
    """The preparer when no model is given: decoding (done before it is called) only."""


def load_preparer(
    name_or_path: str, *, trust_remote_code: bool = False, prompt_style: str | None = None
) -> Prepare:
    """The preprocessing a model's training run applies, without loading its weights.

    ``data check`` needs the processor (its image size and aspect-ratio limits, its
    tokenizer), not the weights: a 7B checkpoint's processor loads in a second.

    Args:
        name_or_path: What ``model.name_or_path`` names: a local folder, a hub id or
            ``tiny:FAMILY``.
        prompt_style: The recipe's ``model.prompt_style`` (default: the saved model's,
            else ``vlm2emb``).

    Raises:
        FileNotFoundError: A local path that does not exist.
    """
    import tempfile

    from vlm2emb.backbones.registry import get_adapter_class
    from vlm2emb.model import TINY_PREFIX, check_model_path, saved_config_and_family
    from vlm2emb.prompts import render_prompt

    name = str(name_or_path)
    saved: dict[str, Any] = {}
    if name.startswith(TINY_PREFIX):
        from vlm2emb.testing import tiny_backbone

        family = name[len(TINY_PREFIX) :]
        adapter_cls = get_adapter_class(family)
        with tempfile.TemporaryDirectory(prefix="vlm2emb-tiny-") as tmp:
            tiny_backbone(family, tmp)
            processor = adapter_cls.load_processor(tmp)
    else:
        path = check_model_path(name)
        saved, family = saved_config_and_family(path, trust_remote_code=trust_remote_code)
        adapter_cls = get_adapter_class(family)
        processor = adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)
    adapter = adapter_cls(processor)
    style = prompt_style or saved.get("prompt_style") or "vlm2emb"
    adapter.check_prompt_style(style)

    def prepare(items: list[dict[str, Any]], instructions: list[str | None]) -> Any:
        # What EmbeddingModel.collate does with decoded items (less the pooling suffix token).
        prompts = [
            render_prompt(adapter, style, it.get("text"), len(it["images"]), ins)
            for it, ins in zip(items, instructions)
        ]
        return adapter.build_inputs(prompts, [it["images"] for it in items])

    return prepare


# ---------------------------------------------------------------------- preflight
# A preparer turns decoded items and their instructions into backbone inputs: the training
# path's own ``EmbeddingModel.collate`` (the adapter's processor, with its limits).
Prepare = Callable[[list[dict[str, Any]], list[str | None]], Any]
# Distinct items checked per processor call; a failing chunk is re-checked item by item.
PREFLIGHT_ITEMS = 32


def example_items(
    example: Any, query_instruction: str | None = None, target_instruction: str | None = None
) -> list[tuple[str, Any, str | None]]:
    """``(where, item, instruction)`` for every item the training path embeds for a row.

    Training rows give the query, the positive and the hard negatives; evaluation rows the
    query and the candidates. Instructions follow the collator's rule: the row's own, else
    the default.
    """
    from vlm2emb.items import resolve_instruction

    q = resolve_instruction(example.instruction, query_instruction)
    if hasattr(example, "candidates"):  # an EvalExample
        return [("query", example.query, q)] + [
            (f"candidates[{i}]", c, target_instruction) for i, c in enumerate(example.candidates)
        ]
    t = resolve_instruction(example.target_instruction, target_instruction)
    return [("query", example.query, q), ("positive", example.positive, t)] + [
        (f"negatives[{i}]", n, t) for i, n in enumerate(example.negatives)
    ]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _item_key(item: Any, instruction: str | None) -> str:
    # Items are plain data (text, resolved paths, bytes, media refs): their repr identifies
    # them, so an item many rows share (a class caption, an image used twice) is checked once.
    return repr((sorted(item.items()) if isinstance(item, dict) else item, instruction))


def _check_items(
    pending: list[tuple[str, Any, str | None]], prepare: Prepare, media: Any
) -> dict[str, tuple[str, str] | None]:
    """``key -> None`` for items the preprocessing accepts, else ``(kind, problem)``."""
    verdict: dict[str, tuple[str, str] | None] = {}
    decoded: list[tuple[str, dict[str, Any], str | None]] = []
    for key, item, instruction in pending:
        try:
            decoded.append((key, decode_item(item, media), instruction))
        except Exception as exc:  # any decoder failure is this item's problem, whatever its type
            message = _one_line(exc)
            kind = "image_too_large" if "data.max_image_pixels" in message else "bad_media"
            verdict[key] = (kind, message)
    try:
        prepare([d for _, d, _ in decoded], [i for _, _, i in decoded])
        verdict.update((key, None) for key, _, _ in decoded)
        return verdict
    except Exception:  # some item of the chunk is refused: find which, one at a time
        pass
    for key, item, instruction in decoded:
        try:
            prepare([item], [instruction])
            verdict[key] = None
        except Exception as exc:  # processors raise ValueError, TypeError, IndexError, ...
            verdict[key] = ("unprocessable", f"the model's processor refuses it ({_one_line(exc)})")
    return verdict


def preflight(
    examples: list[Any],
    prepare: Prepare,
    *,
    media: Any = None,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    indices: list[int] | None = None,
    stop_at_first: bool = False,
) -> list[tuple[int, DataError]]:
    """Runs the training path's preprocessing on rows and returns the ones it fails on.

    Every item is decoded fully with ``media`` (the ``data.*`` media options) and passed
    through ``prepare``, the same ``EmbeddingModel.collate`` training calls, so anything
    a batch would choke on later (a JPEG cut inside its data, an image whose aspect ratio
    the processor refuses, text the tokenizer cannot encode) is found here, before the
    first step. Each distinct item (with its instruction) is checked once, a chunk of
    items per processor call; a chunk that fails is prepared again item by item to name
    the item at fault.

    Args:
        examples: Validated :class:`~vlm2emb.data.schema.TrainExample` or
            :class:`~vlm2emb.data.schema.EvalExample` rows.
        prepare: ``prepare(decoded_items, instructions)``; raises on input it cannot take.
        media: :class:`vlm2emb.data.media.MediaOptions`.
        query_instruction: Default query instruction (``data.query_instruction``).
        target_instruction: Default target instruction (``data.target_instruction``).
        indices: Only check these rows (a process's share); default all.
        stop_at_first: Return only the first bad row (the ``error`` policy).

    Returns:
        ``(row index, DataError)`` for every bad row (its first bad item), in row order.
    """
    todo = list(range(len(examples))) if indices is None else sorted(indices)
    rows: list[tuple[int, list[tuple[str, str]]]] = []  # row -> [(where, key)]
    distinct: dict[str, tuple[Any, str | None]] = {}
    for i in todo:
        keys = []
        for where, item, instruction in example_items(examples[i], query_instruction, target_instruction):
            key = _item_key(item, instruction)
            distinct.setdefault(key, (item, instruction))
            keys.append((where, key))
        rows.append((i, keys))
    verdict: dict[str, tuple[str, str] | None] = {}
    pending = [(key, item, instruction) for key, (item, instruction) in distinct.items()]
    for start in range(0, len(pending), PREFLIGHT_ITEMS):
        verdict.update(_check_items(pending[start : start + PREFLIGHT_ITEMS], prepare, media))
    bad: list[tuple[int, DataError]] = []
    for i, keys in rows:
        problem = next(((where, verdict[key]) for where, key in keys if verdict[key] is not None), None)
        if problem is None:
            continue
        where, (kind, message) = problem
        bad.append((i, DataError(f"{examples[i].source}: {where}: {message}", kind)))
        if stop_at_first:
            break
    return bad


def preflight_filter(
    examples: list[Any],
    prepare: Prepare,
    *,
    on_bad_example: str,
    report: DataReport,
    media: Any = None,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list[Any]], list[Any]] | None = None,
) -> list[Any]:
    """:func:`preflight` with the bad-row policy applied: the rows to keep.

    With several processes each checks every ``world_size``-th row and ``gather`` (an
    all-gather of Python lists, e.g. accelerate's ``gather_object``) shares the results,
    so every process keeps the same rows and takes the same decision.

    Raises:
        DataError: ``on_bad_example="error"`` and a row is bad (the first one, by row
            order), or every row is bad.
    """
    if not examples:
        return examples
    mine = list(range(rank, len(examples), world_size))
    stop = on_bad_example == "error"
    found = preflight(
        examples,
        prepare,
        media=media,
        query_instruction=query_instruction,
        target_instruction=target_instruction,
        indices=mine,
        stop_at_first=stop,
    )
    shared = [(i, str(e), e.kind) for i, e in found]
    if world_size > 1 and gather is not None:
        shared = gather(shared)
    shared.sort(key=lambda b: b[0])
    if not shared:
        return examples
    if stop:
        _, message, kind = shared[0]
        raise DataError(message, kind)
    drop = {i for i, _, _ in shared}
    for _, message, kind in shared:
        report.used -= 1
        report.add_bad(DataError(message, kind))
    kept = [ex for i, ex in enumerate(examples) if i not in drop]
    if not kept:
        raise DataError(
            f"no usable rows: all {len(examples)} rows fail preprocessing (first: {shared[0][1]})"
        )
    return kept
