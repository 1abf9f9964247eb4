"""The canonical data schema: reading and validating training and evaluation rows.

Training row (JSONL line, Parquet row)::

    {"query": {"text": ..., "image": ...}, "positive": {...}, "negatives": [{...}],
     "instruction": "...", "dataset": "..."}

Evaluation row::

    {"query": {...}, "candidates": [{...}, ...], "positive": 0, "task": "...", "instruction": "..."}

Items hold ``text`` and/or ``image`` / ``images`` / ``video`` / ``pdf`` + ``page``. Relative
media paths resolve against the data file's folder (or ``media_root``) and must stay inside
it; videos and PDF pages become :class:`~vlm2emb.data.media.VideoRef` and
:class:`~vlm2emb.data.media.PdfPageRef` references, decoded per batch. Every problem is a
one-line :class:`DataError` naming the file, the line (row) and the reason; with
``on_bad_example="skip"`` bad rows are counted in a
:class:`~vlm2emb.data.errors.DataReport` instead. Sources (JSONL, Parquet, ``datasets``
folders, hub ids, MMEB-train rows) are read by :mod:`vlm2emb.data.sources`.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm2emb.data.errors import ON_BAD_EXAMPLE, DataError, DataReport
from vlm2emb.data.media import (
    MediaError,
    MediaOptions,
    frame_files,
    pdf_page_count,
    probe_image,
    video_frame_count,
)
from vlm2emb.data.sources import (
    DATA_FORMATS,
    ENCODING_PROBLEM,
    Source,
    convert_mmeb,
    is_mmeb,
    iter_records,
    resolve_source,
)
from vlm2emb.items import ITEM_KEYS, ItemError, PdfPageRef, VideoRef, media_refs, resolve_instruction

TRAIN_KEYS = (
    "query",
    "positive",
    "positives",
    "negatives",
    "instruction",
    "dataset",
    "target_instruction",
    "teacher_scores",
)
EVAL_KEYS = ("query", "candidates", "positive", "task", "instruction")


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
    origin: int = 0  # index of the data.train entry it came from (mixing weights)
    # A teacher's scores of [positive, *negatives] for this query (distillation targets).
    teacher_scores: list[float] | None = None


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
            "instruction": resolve_instruction(self.instruction, default_instruction),
        }


class _RowChecker:
    """Validates items of one source, resolving and confining media paths."""

    def __init__(
        self, source: Source, media_root: str | Path | None, verify_images: bool, options: MediaOptions
    ) -> None:
        self.name = source.name
        # Resolved: confinement compares resolved paths, and a relative root (a relative
        # output_dir holding the demo data) would make every media path look outside it.
        self.root = Path(media_root).resolve() if media_root else source.root.resolve()
        self.verify_images = verify_images
        self.options = options
        self._checked: dict[Any, str | None] = {}  # media already verified -> its problem

    def fail(self, lineno: int, reason: str, kind: str = "invalid") -> DataError:
        return DataError(f"{self.name}:{lineno}: {reason}", kind)

    def item(self, lineno: int, where: str, raw: Any) -> dict[str, Any]:
        if isinstance(raw, str):
            raw = {"text": raw}
        if not isinstance(raw, dict):
            raise self.fail(
                lineno,
                f"{where} must be an object with text and/or image, got {type(raw).__name__}",
                "wrong_type",
            )
        try:
            parts = media_refs(raw)  # unknown keys and the media order: one rule (vlm2emb.items)
        except ItemError as exc:
            if exc.kind == "unknown_field":
                unknown = sorted(set(raw) - set(ITEM_KEYS))
                reason = f"{where} has unknown key(s) {unknown}; items hold {', '.join(ITEM_KEYS)}"
            else:
                reason = f"{where}.{exc}"
            raise self.fail(lineno, reason, exc.kind) from None
        text = raw.get("text")
        if text is not None and not isinstance(text, str):
            raise self.fail(lineno, f"{where}.text must be a string", "wrong_type")
        if text is not None:
            self.check_unicode(lineno, f"{where}.text", text)
            cap = self.options.max_text_chars
            if cap is not None and len(text) > cap:
                # One very long text pads every item of its batch to its length (a 50k
                # character row made a whole run 9x slower): cut it to the cap.
                text = text[:cap]
        check = {"image": self.image, "video": self.video}
        refs: list[Any] = []
        for key, kind, ref in parts:
            if kind == "pdf":
                refs.append(self.pdf(lineno, f"{where}.pdf", ref[0], raw.get("page", 0)))
            else:
                refs.append(check[kind](lineno, f"{where}.{key}", ref))
        if not text and not refs:
            raise self.fail(lineno, f"{where} is empty (needs text or an image)", "empty_item")
        out: dict[str, Any] = {"text": text}
        if refs:
            out["images"] = refs
        return out

    def path(self, lineno: int, where: str, ref: Any) -> Path:
        """Resolves a media path, confined to the media root when relative."""
        if not isinstance(ref, str) or not ref:
            raise self.fail(lineno, f"{where} must be a path string, got {type(ref).__name__}", "wrong_type")
        p = Path(ref)
        full = (p if p.is_absolute() else self.root / p).resolve()
        if not p.is_absolute() and not full.is_relative_to(self.root):
            raise self.fail(
                lineno, f"{where} path {ref!r} escapes the media root {self.root}", "escapes_root"
            )
        if not full.exists():
            raise self.fail(lineno, f"{where} file not found: {full}", "missing_file")
        return full

    def _verified(self, lineno: int, where: str, key: Any, probe: Any) -> None:
        # Each media file is verified once, however many rows use it.
        if not self.verify_images:
            return
        if key not in self._checked:
            try:
                probe()
                self._checked[key] = None
            except MediaError as exc:
                self._checked[key] = str(exc)
        problem = self._checked[key]
        if problem is not None:
            kind = "image_too_large" if "data.max_image_pixels" in problem else "bad_media"
            raise self.fail(lineno, f"{where}: {problem}", kind)

    def image(self, lineno: int, where: str, ref: Any) -> Any:
        from PIL import Image

        if isinstance(ref, Image.Image):
            # In-memory images become PNG bytes: picklable, and hashable for the keys.
            buf = io.BytesIO()
            ref.save(buf, format="PNG")
            ref = buf.getvalue()
        if isinstance(ref, dict) and ref.get("bytes") is not None:  # datasets' Image feature
            ref = ref["bytes"]
        elif isinstance(ref, dict) and ref.get("path"):  # an undecoded Image holding a path
            ref = ref["path"]
        if isinstance(ref, (bytes, bytearray)):
            data = bytes(ref)
            if not data:
                raise self.fail(lineno, f"{where} holds empty image bytes", "bad_media")
            limit = self.options.max_image_pixels
            self._verified(lineno, where, hash(data), lambda: probe_image(data, "image bytes", limit))
            return data
        full = self.path(lineno, where, ref)
        if not full.is_file():
            raise self.fail(lineno, f"{where} {full} is not a file", "bad_media")
        limit = self.options.max_image_pixels
        self._verified(lineno, where, full, lambda: probe_image(full, str(full), limit))
        return str(full)

    def video(self, lineno: int, where: str, ref: Any) -> VideoRef:
        full = self.path(lineno, where, ref)
        if full.is_dir():
            self._verified(
                lineno,
                where,
                full,
                lambda: frame_files(full) or _raise(f"frame folder {full} holds no images"),
            )
        else:
            self._verified(lineno, where, full, lambda: video_frame_count(full))
        return VideoRef(str(full))

    def pdf(self, lineno: int, where: str, ref: Any, page: Any) -> PdfPageRef:
        if not isinstance(page, int) or isinstance(page, bool) or page < 0:
            raise self.fail(lineno, f"{where}: page must be an integer >= 0 (0 = first page)", "wrong_type")
        full = self.path(lineno, where, ref)

        def probe() -> None:
            n = pdf_page_count(full)
            if page >= n:
                raise MediaError(f"PDF {full} has {n} page(s); page {page} does not exist")

        self._verified(lineno, where, (full, page), probe)
        return PdfPageRef(str(full), page)

    def check_unicode(self, lineno: int, where: str, text: str) -> None:
        """Refuses text that cannot be encoded as UTF-8 (a lone surrogate such as ``\\ud800``).

        JSON allows ``"\\ud800"`` escapes that decode to half a character; every tokenizer
        fails on it later, in the middle of training, without naming the row.
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise self.fail(
                lineno,
                f"{where} holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
                "(not valid Unicode; fix the \\uXXXX escape in the file)",
                "bad_text",
            ) from None

    def optional_str(self, rec: dict[str, Any], key: str, lineno: int = 0) -> str | None:
        """The string field ``key`` of a row, or None when absent.

        Raises:
            DataError: The value is not a string (a number or a list given as an
                instruction is a mistake in the file, not something to stringify).
        """
        value = rec.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(lineno, f"{key} must be a string, got {type(value).__name__}", "wrong_type")
        self.check_unicode(lineno, key, value)
        return value


def _raise(message: str) -> None:
    raise MediaError(message)


def iter_source(
    index: int,
    spec: str,
    kind: str,
    build: Callable[[_RowChecker, int, dict[str, Any], int, Source], Any],
    *,
    media_root: str | Path | None = None,
    verify_images: bool = True,
    options: MediaOptions | None = None,
    work_dir: str | Path | None = None,
    on_bad_example: str = "error",
    report: DataReport | None = None,
    cap: int | None = None,
    allow_empty: bool = False,
) -> Iterator[Any]:
    """Yields the examples of one source lazily, applying the bad-row policy.

    Args:
        index: Position of the source in ``data.train`` (stored as ``origin``).
        spec: The source (see :func:`vlm2emb.data.sources.resolve_source`).
        kind: ``training`` or ``evaluation``, for messages.
        build: Turns an object row into an example, or raises :class:`DataError`.
        cap: Stop after this many good rows (None = all).
        Other arguments: see :func:`load_train_examples`.
    """
    if on_bad_example not in ON_BAD_EXAMPLE:
        raise ValueError(f"data.on_bad_example: {on_bad_example!r} is not one of error, skip")
    report = report if report is not None else DataReport()
    source = resolve_source(spec, work_dir)
    check = _RowChecker(source, media_root, verify_images, options or MediaOptions())
    n_rows = n_used = 0
    first: Any = None  # the first good row, without its position
    all_same = True
    for lineno, rec, problem in iter_records(source):
        if cap is not None and n_used >= cap:
            break
        n_rows += 1
        report.rows += 1
        try:
            if problem is not None:
                reason = "bad_encoding" if problem.startswith(ENCODING_PROBLEM) else "malformed_json"
                raise check.fail(lineno, problem, reason)
            if not isinstance(rec, dict):
                raise check.fail(
                    lineno, f"a row must be a JSON object, got {type(rec).__name__}", "not_an_object"
                )
            built = build(check, lineno, rec, index, source)
        except DataError as err:
            if on_bad_example == "error":
                raise
            report.add_bad(err)
            continue
        n_used += 1
        report.used += 1
        # A row with several positives yields one example per positive.
        for example in built if isinstance(built, list) else [built]:
            content = dataclasses.replace(example, source="")
            if first is None:
                first = content
            elif all_same and content != first:
                all_same = False
            yield example
    if not n_rows and not allow_empty:
        raise DataError(f"{source.name}: no {kind} rows", "empty_file")
    if n_used > 1 and all_same:
        # Every query then has only copies of its own positive as candidates: all are
        # masked as false negatives and the loss is 0 at every step, so nothing trains.
        report.warn(
            f"{source.name}: all {n_used} {kind} rows are identical; a batch of them has nothing "
            "to contrast (the loss is 0 at every step)"
        )


def _load(
    specs: list[str],
    kind: str,
    build: Callable[[_RowChecker, int, dict[str, Any], int, Source], Any],
    *,
    max_rows: list[int] | None,
    allow_empty: bool,
    report: DataReport | None,
    **kwargs: Any,
) -> list[Any]:
    """Reads every source into a list (see :func:`iter_source`)."""
    report = report if report is not None else DataReport()
    out: list[Any] = []
    for index, spec in enumerate(specs):
        out.extend(
            iter_source(
                index,
                spec,
                kind,
                build,
                cap=_cap(max_rows, index),
                allow_empty=allow_empty,
                report=report,
                **kwargs,
            )
        )
    if not out and not allow_empty:
        first = f" (first: {report.examples[0]})" if report.examples else ""
        raise DataError(f"no usable {kind} rows: all {report.rows} rows were bad{first}")
    return out


def _cap(max_rows: list[int] | None, index: int) -> int | None:
    # One value caps every source; a list gives one cap per source; 0 = no cap.
    if not max_rows:
        return None
    value = max_rows[0] if len(max_rows) == 1 else max_rows[index]
    return value or None


def _check_fields(
    check: _RowChecker,
    lineno: int,
    rec: dict[str, Any],
    kind: str,
    allowed: tuple[str, ...],
    required: tuple[str, ...],
) -> None:
    unknown = sorted(set(rec) - set(allowed))
    if unknown:
        raise check.fail(
            lineno, f"unknown field(s) {unknown}; {kind} rows hold {', '.join(allowed)}", "unknown_field"
        )
    for key in required:
        if rec.get(key) is None:
            raise check.fail(lineno, f"missing field {key!r}", "missing_field")


def train_row_builder(
    data_format: str = "auto", max_negatives: int | None = None, mmeb_negatives: bool = True
) -> Callable[[_RowChecker, int, dict[str, Any], int, Source], TrainExample | list[TrainExample]]:
    """The function that validates one training row (canonical or MMEB layout).

    A row with ``positives: [...]`` gives one :class:`TrainExample` per positive (a list).

    ``mmeb_negatives`` False leaves out MMEB-train rows' ``neg_text`` / ``neg_image_path``
    (as VLM2Vec's collators do); canonical rows' ``negatives`` are not affected.

    Raises:
        ValueError: Unknown ``data_format``.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data.format: {data_format!r} is not one of {', '.join(DATA_FORMATS)}")

    def build(
        check: _RowChecker, lineno: int, rec: dict[str, Any], index: int, source: Source
    ) -> TrainExample | list[TrainExample]:
        if data_format == "mmeb" or (data_format == "auto" and is_mmeb(rec)):
            try:
                rec = convert_mmeb(rec, negatives=mmeb_negatives)
            except ValueError as exc:
                raise check.fail(lineno, f"MMEB row: {exc}", "invalid") from None
        _check_fields(check, lineno, rec, "training", TRAIN_KEYS, ("query",))
        positives = _positives(check, lineno, rec)
        # Only an absent field (or null) means "no negatives": "" or 0 is a mistake in the
        # file, and reading it as an empty list would hide it.
        negs_raw = rec.get("negatives")
        if negs_raw is None:
            negs_raw = []
        if not isinstance(negs_raw, list):
            raise check.fail(
                lineno, f"negatives must be a list of items, got {type(negs_raw).__name__}", "wrong_type"
            )
        if len(positives) > 1 and rec.get("teacher_scores") is not None:
            raise check.fail(
                lineno, "teacher_scores cannot be combined with several positives (one query, one score list)"
            )
        scores = _teacher_scores(check, lineno, rec.get("teacher_scores"), len(negs_raw))
        if max_negatives is not None:
            negs_raw = negs_raw[:max_negatives]
            scores = scores[: 1 + max_negatives] if scores is not None else None
        negatives = [check.item(lineno, f"negatives[{i}]", n) for i, n in enumerate(negs_raw)]
        for i, neg in enumerate(negatives):
            if neg in positives:
                # It would be trained as both answer and non-answer of the same query.
                raise check.fail(lineno, f"negatives[{i}] is also a positive of this row")
        common = {
            "query": check.item(lineno, "query", rec["query"]),
            "negatives": negatives,
            "instruction": check.optional_str(rec, "instruction", lineno),
            "target_instruction": check.optional_str(rec, "target_instruction", lineno),
            "dataset": check.optional_str(rec, "dataset", lineno) or source.stem,
            "source": f"{source.name}:{lineno}",
            "origin": index,
            "teacher_scores": scores,
        }
        # Several positives: one training pair per positive, sharing query and negatives.
        # Pairs with the same query fall in one false-negative group, so in a batch each
        # positive is a target and the query's other positives are masked from its negatives.
        pairs = [TrainExample(positive=p, **common) for p in positives]
        return pairs[0] if len(pairs) == 1 else pairs

    return build


def _positives(check: _RowChecker, lineno: int, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """A row's positive items: ``positive`` (one) or ``positives`` (a non-empty list)."""
    one, many = rec.get("positive"), rec.get("positives")
    if one is not None and many is not None:
        raise check.fail(lineno, "give either positive or positives, not both")
    if one is None and many is None:
        raise check.fail(lineno, "missing field 'positive'", "missing_field")
    if one is not None:
        return [check.item(lineno, "positive", one)]
    if not isinstance(many, list) or not many:
        raise check.fail(lineno, "positives must be a non-empty list of items", "wrong_type")
    items = [check.item(lineno, f"positives[{i}]", p) for i, p in enumerate(many)]
    for i, item in enumerate(items):
        if item in items[:i]:
            raise check.fail(lineno, f"positives[{i}] repeats an earlier positive")
    return items


def _teacher_scores(check: _RowChecker, lineno: int, raw: Any, num_negatives: int) -> list[float] | None:
    """A row's ``teacher_scores``: finite numbers, one for the positive and one per negative."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw
    ):
        raise check.fail(lineno, "teacher_scores must be a list of numbers", "wrong_type")
    if len(raw) != 1 + num_negatives:
        raise check.fail(
            lineno,
            f"teacher_scores has {len(raw)} values; it needs {1 + num_negatives} "
            f"(the positive's, then one per negative)",
            "invalid",
        )
    if not all(math.isfinite(v) for v in raw):
        raise check.fail(lineno, "teacher_scores must be finite numbers", "invalid")
    return [float(v) for v in raw]


def load_train_examples(
    specs: list[str],
    *,
    media_root: str | Path | None = None,
    verify_images: bool = True,
    max_negatives: int | None = None,
    work_dir: str | Path | None = None,
    data_format: str = "auto",
    mmeb_negatives: bool = True,
    on_bad_example: str = "error",
    report: DataReport | None = None,
    max_rows: list[int] | None = None,
    options: MediaOptions | None = None,
    allow_empty: bool = False,
) -> list[TrainExample]:
    """Reads and validates training rows from one or more sources.

    Args:
        specs: Sources: ``.jsonl`` / ``.parquet`` files, ``datasets`` folders, ``hf:`` ids
            or ``demo:digits/train`` (see :mod:`vlm2emb.data.sources`).
        media_root: Folder for relative media paths (default: each file's folder).
        verify_images: Check every media file's header now, so a bad file stops the run
            (or is skipped) before training instead of in the middle of it.
        max_negatives: Keep at most this many hard negatives per row.
        work_dir: Where ``demo:`` data is materialised.
        data_format: ``auto`` (MMEB-train rows detected by their columns), ``canonical``
            or ``mmeb``.
        mmeb_negatives: Train on MMEB-train rows' ``neg_text`` / ``neg_image_path``
            (recipe key ``data.mmeb_negatives``; VLM2Vec does not).
        on_bad_example: ``error`` stops at the first bad row; ``skip`` leaves it out and
            counts it in ``report``.
        report: Collects row counts and skip reasons (a new one when None).
        max_rows: Keep at most this many good rows per source: one value for all, or one
            per source (0 = all).
        options: Media limits (the decompression-bomb guard is checked at load time).
        allow_empty: Return an empty list instead of raising when no row is usable.

    Raises:
        DataError: One line naming file, line and reason.
    """
    build = train_row_builder(data_format, max_negatives, mmeb_negatives)
    return _load(
        specs,
        "training",
        build,
        media_root=media_root,
        verify_images=verify_images,
        options=options,
        work_dir=work_dir,
        on_bad_example=on_bad_example,
        report=report,
        max_rows=max_rows,
        allow_empty=allow_empty,
    )


def load_eval_examples(
    specs: list[str],
    *,
    media_root: str | Path | None = None,
    verify_images: bool = True,
    work_dir: str | Path | None = None,
    on_bad_example: str = "error",
    report: DataReport | None = None,
    options: MediaOptions | None = None,
    allow_empty: bool = False,
) -> list[EvalExample]:
    """Reads and validates evaluation rows (query + candidates + positive index).

    Arguments are those of :func:`load_train_examples`.

    Raises:
        DataError: One line naming file, line and reason.
    """

    def build(
        check: _RowChecker, lineno: int, rec: dict[str, Any], index: int, source: Source
    ) -> EvalExample:
        _check_fields(check, lineno, rec, "evaluation", EVAL_KEYS, ("query",))
        cands = rec.get("candidates")
        if not isinstance(cands, list) or not cands:
            raise check.fail(lineno, "'candidates' must be a non-empty list of items", "wrong_type")
        pos = rec.get("positive", 0)
        pos_list = pos if isinstance(pos, list) else [pos]
        if not pos_list or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos_list):
            raise check.fail(
                lineno, "'positive' must be a candidate index or a list of indices", "wrong_type"
            )
        bad = [p for p in pos_list if not 0 <= p < len(cands)]
        if bad:
            raise check.fail(lineno, f"'positive' index {bad[0]} is out of range for {len(cands)} candidates")
        return EvalExample(
            query=check.item(lineno, "query", rec["query"]),
            candidates=[check.item(lineno, f"candidates[{i}]", c) for i, c in enumerate(cands)],
            positive=pos_list,
            task=check.optional_str(rec, "task", lineno) or source.stem,
            instruction=check.optional_str(rec, "instruction", lineno),
            source=f"{source.name}:{lineno}",
        )

    return _load(
        specs,
        "evaluation",
        build,
        media_root=media_root,
        verify_images=verify_images,
        options=options,
        work_dir=work_dir,
        on_bad_example=on_bad_example,
        report=report,
        max_rows=None,
        allow_empty=allow_empty,
    )
