"""Local-candidate task rows from canonical eval files or VLM2Vec's MMEB-eval layout.

An MMEB-eval row (one per query) reads::

    {"qry_text": "<|image_1|>\\nRepresent the given image for classification",
     "qry_img_path": "images/ImageNet-1K/val/0001.jpg",
     "tgt_text": ["tench", "goldfish", ...],          # candidates; the first is the positive
     "tgt_img_path": ["", "", ...]}                   # "" = no image for that candidate

The ``<|image_1|>`` placeholder (VLM2Vec's Phi-3-V image marker) stays in the item text; the
model's prompt style handles it when the prompt is rendered (:mod:`vlm2emb.prompts`): the
``vlm2emb`` style removes it (the backbone adapter places images itself), the ``vlm2vec``
style puts the backbone's bare image token in its place, as VLM2Vec does. The text keeps
MMEB's instruction wording, so such rows get no separate instruction unless the task sets
``query_instruction`` (the model's saved instructions only with
``instruction_fallback: always``; see :mod:`vlm2emb.eval.harness`).

Rows read from this layout carry ``"layout": "mmeb"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm2emb.data.media import MediaOptions
from vlm2emb.data.schema import DataError, _RowChecker, load_eval_examples
from vlm2emb.data.sources import Source, iter_records, resolve_source
from vlm2emb.items import resolve_instruction
from vlm2emb.prompts import count_image_markers, strip_image_markers

__all__ = ["MMEB_KEYS", "MMEB_LAYOUT", "load_local_rows", "strip_image_placeholder"]

MMEB_KEYS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
MMEB_LAYOUT = "mmeb"  # the "layout" value of rows read from MMEB-eval files


def strip_image_placeholder(text: str | None) -> str | None:
    """Removes ``<|image_N|>`` markers and surrounding whitespace; empty text becomes None.

    What the ``vlm2emb`` prompt style does with an MMEB text (:func:`vlm2emb.prompts.strip_image_markers`).
    """
    return strip_image_markers(text)


def resolve_path(spec: str, work_dir: str | Path | None = None) -> Path:
    """A data file's path (``demo:`` specs are written under ``work_dir`` first).

    Raises:
        DataError: The file does not exist.
    """
    if spec.startswith("demo:"):
        from vlm2emb.data.demo import resolve_demo

        return resolve_demo(spec, work_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {spec}")
    return path


def records(source: Source) -> Any:
    """``(line, record)`` pairs of a JSONL/Parquet source; a broken line is a DataError."""
    for lineno, rec, problem in iter_records(source):
        if problem is not None:
            raise DataError(f"{source.name}:{lineno}: {problem}", "malformed_json")
        yield lineno, rec


def row_checker(source: Source, media_root: str | None, verify_images: bool) -> _RowChecker:
    """The training data's item checker (path confinement, media verification)."""
    return _RowChecker(source, media_root, verify_images, MediaOptions())


def _is_mmeb(source: Source) -> bool:
    for _, rec in records(source):
        return isinstance(rec, dict) and any(k in rec for k in MMEB_KEYS)
    return False


def _mmeb_rows(source: Source, media_root: str | None, verify_images: bool) -> list[dict[str, Any]]:
    check = row_checker(source, media_root, verify_images)
    rows: list[dict[str, Any]] = []
    for lineno, rec in records(source):
        if not isinstance(rec, dict):
            raise check.fail(lineno, f"a row must be a JSON object, got {type(rec).__name__}")
        unknown = sorted(set(rec) - set(MMEB_KEYS))
        if unknown:
            raise check.fail(
                lineno, f"unknown field(s) {unknown}; MMEB-eval rows hold {', '.join(MMEB_KEYS)}"
            )
        missing = [k for k in ("tgt_text", "tgt_img_path") if k not in rec]
        if missing:
            raise check.fail(lineno, f"missing field {missing[0]!r}")
        texts, images = rec["tgt_text"], rec["tgt_img_path"]
        if not isinstance(texts, list) or not isinstance(images, list):
            raise check.fail(lineno, "'tgt_text' and 'tgt_img_path' must be lists")
        if not texts and not images:
            raise check.fail(lineno, "no candidates ('tgt_text' and 'tgt_img_path' are empty)")
        # VLM2Vec pads the shorter list: a text-only task may carry [""] * n image paths.
        n = max(len(texts), len(images))
        if len(texts) not in (0, n) or len(images) not in (0, n):
            raise check.fail(
                lineno, f"'tgt_text' has {len(texts)} entries but 'tgt_img_path' has {len(images)}"
            )

        def item(where: str, text: Any, image: Any, lineno: int = lineno) -> dict[str, Any]:
            if isinstance(text, str):
                if count_image_markers(text) and not image:
                    raise check.fail(lineno, f"{where}: the text has an <|image_N|> marker but no image path")
                # The marker stays (the prompt style handles it); a text that is nothing
                # but whitespace is no text.
                text = text if strip_image_markers(text) or count_image_markers(text) else None
            raw: dict[str, Any] = {"text": text}
            if image:
                raw["image"] = image
            return check.item(lineno, where, raw)

        rows.append(
            {
                "query": item("query", rec.get("qry_text"), rec.get("qry_img_path")),
                "candidates": [
                    item(f"candidates[{i}]", texts[i] if texts else None, images[i] if images else None)
                    for i in range(n)
                ],
                "positive": [0],
                "instruction": None,
                "layout": MMEB_LAYOUT,
            }
        )
    if not rows:
        raise DataError(f"{source.name}: no evaluation rows")
    return rows


def load_local_rows(
    files: list[str],
    *,
    fmt: str = "auto",
    media_root: str | None = None,
    query_instruction: str | None = None,
    verify_images: bool = True,
    work_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Reads local-candidate rows (canonical or MMEB) as :func:`~vlm2emb.eval.evaluate` rows.

    Args:
        files: JSONL/Parquet paths (or ``demo:digits/eval``).
        fmt: ``auto``, ``vlm2emb`` or ``mmeb``.
        media_root: Folder for relative image paths (default: each file's folder).
        query_instruction: Instruction for rows without their own.
        verify_images: Check image headers now.
        work_dir: Where ``demo:`` data is written.

    Returns:
        Rows with ``query``, ``candidates``, ``positive``, ``instruction`` (no ``task``).

    Raises:
        DataError: One line naming the file, the row and the reason.
    """
    rows: list[dict[str, Any]] = []
    for spec in files:
        source = resolve_source(spec, work_dir)
        if fmt == "mmeb" or (fmt == "auto" and _is_mmeb(source)):
            part = _mmeb_rows(source, media_root, verify_images)
        else:
            examples = load_eval_examples(
                [spec], media_root=media_root, verify_images=verify_images, work_dir=work_dir
            )
            part = [ex.as_row() for ex in examples]
        for row in part:
            row["instruction"] = resolve_instruction(row.get("instruction"), query_instruction)
            row.pop("task", None)
        rows.extend(part)
    return rows
