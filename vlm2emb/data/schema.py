"""The canonical data schema: reading and validating training and evaluation rows.

Training row (JSONL line, Parquet row)::

    {"query": {"text": ..., "image": ...}, "positive": {...}, "negatives": [{...}],
     "instruction": "...", "dataset": "..."}

Evaluation row::

    {"query": {...}, "candidates": [{...}, ...], "positive": 0, "task": "...", "instruction": "..."}

Items hold ``text`` and/or ``image`` / ``images``. Relative image paths resolve against the
data file's folder (or ``media_root``) and must stay inside it. Every problem is reported
as one :class:`DataError` line naming the file, the line (row) and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ITEM_KEYS = ("text", "image", "images", "video")
TRAIN_KEYS = ("query", "positive", "negatives", "instruction", "dataset", "target_instruction")
EVAL_KEYS = ("query", "candidates", "positive", "task", "instruction")


class DataError(ValueError):
    """A bad data file or row; the message is one line naming file, line and reason."""


@dataclass
class TrainExample:
    """One validated training row; image references are absolute paths (or raw values)."""

    query: dict[str, Any]
    positive: dict[str, Any]
    negatives: list[dict[str, Any]] = field(default_factory=list)
    instruction: str | None = None
    target_instruction: str | None = None
    dataset: str = "default"
    source: str = ""  # "file:line", for error messages


@dataclass
class EvalExample:
    """One validated evaluation row (local candidates)."""

    query: dict[str, Any]
    candidates: list[dict[str, Any]]
    positive: list[int]
    task: str = "default"
    instruction: str | None = None
    source: str = ""

    def as_row(self, default_instruction: str | None = None) -> dict[str, Any]:
        """The mapping :func:`vlm2emb.eval.evaluate` consumes.

        Args:
            default_instruction: Query instruction for rows that have none of their own.
        """
        return {
            "query": self.query,
            "candidates": self.candidates,
            "positive": self.positive,
            "task": self.task,
            "instruction": self.instruction or default_instruction,
        }


def _iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yields (line or row number starting at 1, parsed record) from JSONL or Parquet."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON ({exc.msg}); data files hold one JSON object per line"
                    ) from None
    elif suffix == ".parquet":
        from datasets import Dataset
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        ds = Dataset.from_parquet(str(path))
        for i, rec in enumerate(ds, start=1):
            yield i, _drop_nulls(rec)
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl or .parquet)")


def _drop_nulls(rec: Any) -> Any:
    # Arrow fills absent struct fields with None; the schema treats them as absent.
    if isinstance(rec, dict):
        return {k: _drop_nulls(v) for k, v in rec.items() if v is not None}
    if isinstance(rec, list):
        return [_drop_nulls(v) for v in rec]
    return rec


class _RowChecker:
    """Validates items of one file, resolving and confining media paths."""

    def __init__(self, path: Path, media_root: str | Path | None, verify_images: bool) -> None:
        self.path = path
        self.root = Path(media_root).resolve() if media_root else path.parent.resolve()
        self.verify_images = verify_images
        self._checked: set[Path] = set()

    def fail(self, lineno: int, reason: str) -> DataError:
        return DataError(f"{self.path}:{lineno}: {reason}")

    def item(self, lineno: int, where: str, raw: Any) -> dict[str, Any]:
        if isinstance(raw, str):
            raw = {"text": raw}
        if not isinstance(raw, dict):
            raise self.fail(
                lineno, f"{where} must be an object with text and/or image, got {type(raw).__name__}"
            )
        unknown = sorted(set(raw) - set(ITEM_KEYS))
        if unknown:
            raise self.fail(
                lineno, f"{where} has unknown key(s) {unknown}; items hold {', '.join(ITEM_KEYS)}"
            )
        if raw.get("video") is not None:
            raise self.fail(lineno, f"{where}.video: video items are not supported yet")
        text = raw.get("text")
        if text is not None and not isinstance(text, str):
            raise self.fail(lineno, f"{where}.text must be a string")
        refs: list[Any] = []
        if raw.get("image") is not None:
            refs.append(raw["image"])
        images = raw.get("images") or []
        if not isinstance(images, list):
            raise self.fail(lineno, f"{where}.images must be a list")
        refs.extend(images)
        resolved = [self.image(lineno, f"{where}.image", ref) for ref in refs]
        if not text and not resolved:
            raise self.fail(lineno, f"{where} is empty (needs text or an image)")
        out: dict[str, Any] = {"text": text}
        if resolved:
            out["images"] = resolved
        return out

    def image(self, lineno: int, where: str, ref: Any) -> Any:
        if isinstance(ref, (bytes, bytearray)):
            return bytes(ref)
        if isinstance(ref, dict) and ref.get("bytes") is not None:  # datasets' Image feature
            return bytes(ref["bytes"])
        if not isinstance(ref, str) or not ref:
            raise self.fail(lineno, f"{where} must be a path string")
        p = Path(ref)
        full = (p if p.is_absolute() else self.root / p).resolve()
        if not p.is_absolute() and not full.is_relative_to(self.root):
            raise self.fail(lineno, f"{where} path {ref!r} escapes the media root {self.root}")
        if not full.is_file():
            raise self.fail(lineno, f"{where} file not found: {full}")
        if self.verify_images and full not in self._checked:
            from PIL import Image

            try:
                with Image.open(full) as img:
                    img.verify()  # header and structure check, no full decode
            except Exception as exc:
                raise self.fail(lineno, f"{where} {full} is not a readable image ({exc})") from None
            self._checked.add(full)
        return str(full)

    @staticmethod
    def optional_str(rec: dict[str, Any], key: str) -> str | None:
        value = rec.get(key)
        return None if value is None else str(value)


def _resolve_path(spec: str, work_dir: str | Path | None) -> Path:
    if spec.startswith("demo:"):
        from vlm2emb.data.demo import resolve_demo

        return resolve_demo(spec, work_dir)
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {spec}")
    return p


def _rows(
    specs: list[str],
    kind: str,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
    media_root: str | Path | None,
    verify_images: bool,
    work_dir: str | Path | None,
) -> Iterator[tuple[Path, _RowChecker, int, dict[str, Any]]]:
    """Yields the object rows of every file, after the checks every row kind shares."""
    for spec in specs:
        path = _resolve_path(spec, work_dir)
        check = _RowChecker(path, media_root, verify_images)
        n_rows = 0
        for lineno, rec in _iter_records(path):
            if not isinstance(rec, dict):
                raise check.fail(lineno, f"a row must be a JSON object, got {type(rec).__name__}")
            unknown = sorted(set(rec) - set(allowed))
            if unknown:
                raise check.fail(lineno, f"unknown field(s) {unknown}; {kind} rows hold {', '.join(allowed)}")
            for key in required:
                if rec.get(key) is None:
                    raise check.fail(lineno, f"missing field {key!r}")
            n_rows += 1
            yield path, check, lineno, rec
        if not n_rows:
            raise DataError(f"{path}: no {kind} rows")


def load_train_examples(
    specs: list[str],
    *,
    media_root: str | Path | None = None,
    verify_images: bool = True,
    max_negatives: int | None = None,
    work_dir: str | Path | None = None,
) -> list[TrainExample]:
    """Reads and validates training rows from one or more files.

    Args:
        specs: Paths (``.jsonl`` / ``.parquet``) or ``demo:digits/train``.
        media_root: Folder for relative media paths (default: each file's folder).
        verify_images: Check every image header now, so a bad file stops the run before
            training instead of in the middle of it.
        max_negatives: Keep at most this many hard negatives per row.
        work_dir: Where ``demo:`` data is materialised.

    Raises:
        DataError: One line naming file, line and reason.
    """
    out: list[TrainExample] = []
    for path, check, lineno, rec in _rows(
        specs, "training", TRAIN_KEYS, ("query", "positive"), media_root, verify_images, work_dir
    ):
        negs_raw = rec.get("negatives") or []
        if not isinstance(negs_raw, list):
            raise check.fail(lineno, "negatives must be a list of items")
        if max_negatives is not None:
            negs_raw = negs_raw[:max_negatives]
        out.append(
            TrainExample(
                query=check.item(lineno, "query", rec["query"]),
                positive=check.item(lineno, "positive", rec["positive"]),
                negatives=[check.item(lineno, f"negatives[{i}]", n) for i, n in enumerate(negs_raw)],
                instruction=check.optional_str(rec, "instruction"),
                target_instruction=check.optional_str(rec, "target_instruction"),
                dataset=str(rec.get("dataset") or path.stem),
                source=f"{path}:{lineno}",
            )
        )
    return out


def load_eval_examples(
    specs: list[str],
    *,
    media_root: str | Path | None = None,
    verify_images: bool = True,
    work_dir: str | Path | None = None,
) -> list[EvalExample]:
    """Reads and validates evaluation rows (query + candidates + positive index).

    Raises:
        DataError: One line naming file, line and reason.
    """
    out: list[EvalExample] = []
    for path, check, lineno, rec in _rows(
        specs, "evaluation", EVAL_KEYS, ("query",), media_root, verify_images, work_dir
    ):
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise check.fail(lineno, "'candidates' must be a non-empty list of items")
        pos = rec.get("positive", 0)
        pos_list = pos if isinstance(pos, list) else [pos]
        if not pos_list or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos_list):
            raise check.fail(lineno, "'positive' must be a candidate index or a list of indices")
        bad = [p for p in pos_list if not 0 <= p < len(cands)]
        if bad:
            raise check.fail(lineno, f"'positive' index {bad[0]} is out of range for {len(cands)} candidates")
        out.append(
            EvalExample(
                query=check.item(lineno, "query", rec["query"]),
                candidates=[check.item(lineno, f"candidates[{i}]", c) for i, c in enumerate(cands)],
                positive=pos_list,
                task=str(rec.get("task") or path.stem),
                instruction=check.optional_str(rec, "instruction"),
                source=f"{path}:{lineno}",
            )
        )
    return out
