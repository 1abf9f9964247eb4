"""MMEB-V2's video tasks as VLM2Vec lays them out: a table of rows plus pre-extracted frames.

VLM2Vec (``src/data/eval_dataset/*``, commit 6e1e1d4) reads each video task from a Hugging
Face table (``VLM2Vec/MSR-VTT``, ``VLM2Vec/NExTQA``...) whose rows name a video, and from a
frame root holding one folder of frame images per video (``frame_root`` in
``experiments/public/eval/video.yaml``). This module reads the same two things; which row
fields make the query, the candidates and the answer is not coded per task here but given by
the suite (:class:`VideoLayout`, filled from the task's keys by
:mod:`vlm2emb.eval.kinds.mmeb_video`).

Frames are chosen as VLM2Vec's ``process_video_frames`` does: the folder's image files in
natural order (``frame_2`` before ``frame_10``), then, when the folder has at least
``num_frames`` of them, ``numpy.linspace(0, n - 1, num_frames)`` cast to int (first and last
frame included); a folder with fewer frames gives all of them. ``num_frames: null`` takes
every frame (VLM2Vec's MomentSeeker loader).

Templates (the ``query_text``, ``query_video``... keys) are :meth:`str.format` strings over
the row's fields, with a few format specs for what VLM2Vec does to a value: ``{f:stem}`` (the
file name without folder and extension), ``{f:lines}`` and ``{f:join}`` (a list joined by
newlines / spaces), ``{f:lettered}`` (a list as ``(A) x`` lines), ``{f:drop_letter}`` (an
``"A. text."`` option reduced to ``text``) and ``{f:flat}`` (a video path as VLM2Vec names its
frame folder: the part before ``.mp4`` with ``/`` turned into ``_``).

Two layouts go beyond "one query form, one candidate source" (both from VLM2Vec's
MomentSeeker loader, ``momentseeker_dataset.py``): ``query_media_field`` makes the query's
media depend on the row (a video path, an image file or nothing, by the value's suffix;
:data:`QUERY_MEDIA`), and ``positive_clips_field`` / ``negative_clips_field`` read the
candidate clips from lists of ``{clip_path_key: path}`` entries, positives first.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlm2emb.data.media import IMAGE_SUFFIXES
from vlm2emb.data.schema import DataError, _RowChecker
from vlm2emb.data.sources import resolve_source
from vlm2emb.eval.corpus import CorpusTask
from vlm2emb.eval.mmeb import records, row_checker

__all__ = [
    "ANSWER_TYPES",
    "QUERY_MEDIA",
    "SCOPES",
    "VideoLayout",
    "VideoTask",
    "drop_letter",
    "list_frames",
    "load_video_task",
    "sample_frames",
]

ANSWER_TYPES = ("index", "letter", "text")
SCOPES = ("local", "global")
# What a row's query holds besides its text (``query_media`` of a local row), under
# ``query_media_field``: the value's suffix decides (an empty or other value: text only).
QUERY_MEDIA = ("text", "image", "video")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")


def _natural_key(name: str) -> list[Any]:
    # Digits compare as numbers, the rest case-folded: VLM2Vec's load_frames order.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frames(folder: Path) -> list[Path]:
    """The image files of a frame folder in natural order (``2`` before ``10``)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def sample_frames(frames: list[Any], num_frames: int | None) -> list[Any]:
    """VLM2Vec's frame choice: ``num_frames`` evenly spaced indices from first to last.

    Args:
        frames: All frames in order.
        num_frames: How many to keep; ``None`` keeps all. Fewer frames than this: all of them
            (VLM2Vec samples only when ``num_frames <= len(frames)``).
    """
    if num_frames is None or num_frames > len(frames):
        return list(frames)
    picks = np.linspace(0, len(frames) - 1, num_frames, dtype=int)  # [num_frames]
    return [frames[i] for i in picks.tolist()]


def drop_letter(option: str) -> str:
    """``"A. Apple."`` -> ``"Apple"``: VLM2Vec's Video-MME / EgoSchema candidate text
    (``o[o.find('. '):].strip('. ')``); an option without ``". "`` only loses edge dots and
    spaces (where VLM2Vec's slice would keep its last character)."""
    cut = option.find(". ")
    return (option[cut:] if cut >= 0 else option).strip(". ")


def _lettered(values: list[Any]) -> str:
    return "\n".join(f"({chr(ord('A') + i)}) {v}" for i, v in enumerate(values))


_SPECS = {
    "stem": lambda v: Path(str(v)).stem,
    "lines": lambda v: "\n".join(str(x) for x in v),
    "join": lambda v: " ".join(str(x) for x in v),
    "lettered": _lettered,
    "drop_letter": lambda v: drop_letter(str(v)),
    # VLM2Vec's frame-folder name of a video (momentseeker_dataset.py): path.split(".mp4")[0]
    # with "/" replaced by "_".
    "flat": lambda v: str(v).split(".mp4")[0].replace("/", "_"),
}


class _RowFormatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        if format_spec in _SPECS:
            return _SPECS[format_spec](value)
        return super().format_field(value, format_spec)


_FORMATTER = _RowFormatter()


def render(template: str, values: dict[str, Any]) -> str:
    """``template`` filled from ``values``; KeyError/IndexError/TypeError/ValueError escape."""
    return _FORMATTER.format(template, **values)


@dataclass(kw_only=True)
class VideoLayout:
    """How one task's rows become a query, candidates and an answer (all from suite keys).

    Attributes:
        frame_root: Folder holding the frame folders (and clip folders).
        num_frames: Frames per video (VLM2Vec: 8); None = every frame.
        query_text: Template of the query text; None = no text.
        query_video: Template of the query's frame folder under ``frame_root``.
        target_video: Template of the row's own video (its positive candidate): retrieval.
        candidates_field: A row field holding the candidate list.
        candidate_fields: Row fields each holding one candidate (NExTQA's ``a0``..``a4``).
        candidate_values: A fixed candidate list (ActivityNetQA's ``yes``, ``no``).
        candidate_format: Template of a candidate's text over ``text`` and ``letter``.
        answer_field: Row field naming the answer.
        answer_type: ``index`` (0-based), ``letter`` (``A`` = 0) or ``text`` (equal to a raw
            candidate).
        labels: Lines of a label file: the global candidate set (video classification).
        clip_folders: Template of a folder under ``frame_root`` whose sub-folders are the
            candidate clips (moment retrieval); those starting with ``positive_prefix`` are
            relevant.
        positive_prefix: See ``clip_folders``.
        skip_clips: Sub-folder names that are not candidates (the query video's).
        scope: ``local`` (each row ranks its own candidates) or ``global`` (every row ranks
            the union of all rows' candidates, or ``labels``).
        query_media_field: A row field naming the query's media by its suffix: a video
            (frames from ``query_media_video``), an image (``query_media_image``) or neither
            (text only); each local row records which in ``query_media``.
        query_media_video: Template of the query's frame folder, over the row and ``value``.
        query_media_image: Template of the query's image file under ``frame_root``.
        positive_clips_field: A row field listing the positive clips (entries holding a
            path under ``clip_path_key``); candidates are these, then the negatives.
        negative_clips_field: Likewise for the negative clips (optional).
        clip_path_key: The key of a clip entry that holds its path.
        clip_video: Template of a clip's frame folder, over the row and ``path``.
    """

    frame_root: str
    num_frames: int | None = 8
    query_text: str | None = None
    query_video: str | None = None
    target_video: str | None = None
    candidates_field: str | None = None
    candidate_fields: list[str] = field(default_factory=list)
    candidate_values: list[str] = field(default_factory=list)
    candidate_format: str = "{text}"
    answer_field: str | None = None
    answer_type: str = "text"
    labels: list[str] | None = None
    clip_folders: str | None = None
    positive_prefix: str = "positive"
    skip_clips: list[str] = field(default_factory=lambda: ["query"])
    scope: str = "local"
    query_media_field: str | None = None
    query_media_video: str | None = None
    query_media_image: str | None = None
    positive_clips_field: str | None = None
    negative_clips_field: str | None = None
    clip_path_key: str = "output_path"
    clip_video: str | None = None


@dataclass
class VideoTask:
    """A loaded task: local rows (``scope: local``) or a corpus task (``scope: global``)."""

    rows: list[dict[str, Any]] | None = None
    corpus: CorpusTask | None = None


class _Reader:
    """Builds one file's rows; every problem is a DataError naming the file, row and key."""

    def __init__(self, layout: VideoLayout, check: _RowChecker) -> None:
        self.layout = layout
        self.check = check
        self.root = Path(layout.frame_root)

    def fill(self, lineno: int, key: str, template: str, rec: dict[str, Any], **extra: Any) -> str:
        try:
            return render(template, {**rec, **extra})
        except KeyError as exc:
            raise self.check.fail(
                lineno, f"{key} template {template!r} needs field {exc.args[0]!r}, absent from the row"
            ) from None
        except (IndexError, TypeError, ValueError, AttributeError) as exc:
            raise self.check.fail(lineno, f"{key} template {template!r}: {exc}") from None

    def frames(self, lineno: int, where: str, rel: str) -> list[str]:
        folder = self.root / rel
        if not folder.resolve().is_relative_to(self.root.resolve()):
            raise self.check.fail(lineno, f"{where} frame folder {rel!r} escapes the frame root {self.root}")
        if not folder.is_dir():
            raise self.check.fail(lineno, f"{where} frame folder not found: {folder}", "missing_file")
        found = list_frames(folder)
        if not found:
            raise self.check.fail(lineno, f"{where} frame folder {folder} holds no image files", "bad_media")
        return [str(p.relative_to(self.root)) for p in sample_frames(found, self.layout.num_frames)]

    def item(self, lineno: int, where: str, text: str | None, frames: list[str] | None) -> dict[str, Any]:
        raw: dict[str, Any] = {"text": text or None}
        if frames:
            raw["images"] = frames
        return self.check.item(lineno, where, raw)

    def query(self, lineno: int, rec: dict[str, Any]) -> dict[str, Any]:
        lay = self.layout
        text = self.fill(lineno, "query_text", lay.query_text, rec) if lay.query_text else None
        frames = None
        if lay.query_video:
            frames = self.frames(lineno, "query", self.fill(lineno, "query_video", lay.query_video, rec))
        if lay.query_media_field:
            media = self.query_media(lineno, rec)
            value = rec[lay.query_media_field]
            if media == "video":
                rel = self.fill(lineno, "query_media_video", lay.query_media_video or "", rec, value=value)
                frames = self.frames(lineno, "query", rel)
            elif media == "image":
                frames = [
                    self.fill(lineno, "query_media_image", lay.query_media_image or "", rec, value=value)
                ]
        return self.item(lineno, "query", text, frames)

    def query_media(self, lineno: int, rec: dict[str, Any]) -> str:
        """``video``, ``image`` or ``text``: what ``query_media_field`` names (one of
        :data:`QUERY_MEDIA`); ``text`` when the layout has no such field."""
        lay = self.layout
        if not lay.query_media_field:
            return "text"
        value = self.field(lineno, rec, lay.query_media_field)
        suffix = Path(str(value or "")).suffix.lower()
        if suffix in VIDEO_SUFFIXES and lay.query_media_video:
            return "video"
        if suffix in IMAGE_SUFFIXES and lay.query_media_image:
            return "image"
        if suffix in VIDEO_SUFFIXES or suffix in IMAGE_SUFFIXES:
            kind = "video" if suffix in VIDEO_SUFFIXES else "image"
            raise self.check.fail(
                lineno,
                f"field {lay.query_media_field!r} = {value!r} is a {kind} but query_media_{kind} is not set",
            )
        return "text"

    def field(self, lineno: int, rec: dict[str, Any], name: str) -> Any:
        if name not in rec:
            raise self.check.fail(lineno, f"missing field {name!r} (row fields: {', '.join(sorted(rec))})")
        return rec[name]

    def candidates(self, lineno: int, rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """The row's candidate items and the indices of its positives."""
        lay = self.layout
        if lay.target_video:
            rel = self.fill(lineno, "target_video", lay.target_video, rec)
            return [self.item(lineno, "target", None, self.frames(lineno, "target", rel))], [0]
        if lay.clip_folders:
            return self.clips(lineno, rec)
        if lay.positive_clips_field:
            return self.clip_lists(lineno, rec)
        raw = self.raw_candidates(lineno, rec)
        texts = [
            self.fill(lineno, "candidate_format", lay.candidate_format, rec, text=c, letter=chr(ord("A") + i))
            for i, c in enumerate(raw)
        ]
        items = [self.item(lineno, f"candidates[{i}]", t, None) for i, t in enumerate(texts)]
        return items, [self.answer(lineno, rec, raw)]

    def raw_candidates(self, lineno: int, rec: dict[str, Any]) -> list[Any]:
        lay = self.layout
        if lay.candidates_field:
            value = self.field(lineno, rec, lay.candidates_field)
            if isinstance(value, np.ndarray):  # Parquet list columns arrive as arrays
                value = value.tolist()
            if not isinstance(value, list) or not value:
                raise self.check.fail(lineno, f"field {lay.candidates_field!r} must be a non-empty list")
            return value
        if lay.candidate_fields:
            return [self.field(lineno, rec, name) for name in lay.candidate_fields]
        if lay.candidate_values:
            return list(lay.candidate_values)
        # Global classification: the row names its label, the corpus is the label set.
        return [self.field(lineno, rec, lay.answer_field)] if lay.answer_field else []

    def answer(self, lineno: int, rec: dict[str, Any], raw: list[Any]) -> int:
        lay = self.layout
        if lay.answer_field is None:
            return 0
        value = self.field(lineno, rec, lay.answer_field)
        try:
            if lay.answer_type == "index":
                index = int(value)
            elif lay.answer_type == "letter":
                index = ord(str(value).strip().upper()) - ord("A") if len(str(value).strip()) == 1 else -1
            else:
                index = [str(c) for c in raw].index(str(value))
        except (ValueError, TypeError):
            index = -1
        if not 0 <= index < len(raw):
            raise self.check.fail(
                lineno,
                f"field {lay.answer_field!r} = {value!r} names no candidate ({lay.answer_type} of {len(raw)})",
            )
        return index

    def clips(self, lineno: int, rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        lay = self.layout
        rel = self.fill(lineno, "clip_folders", lay.clip_folders or "", rec)
        folder = self.root / rel
        if not folder.is_dir():
            raise self.check.fail(lineno, f"clip folder not found: {folder}", "missing_file")
        # Sorted: VLM2Vec takes os.listdir's order, which only moves ties.
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in lay.skip_clips)
        positives = [i for i, n in enumerate(names) if n.startswith(lay.positive_prefix)]
        if not positives:
            raise self.check.fail(
                lineno, f"clip folder {folder} has no sub-folder starting with {lay.positive_prefix!r}"
            )
        items = [
            self.item(lineno, f"clip {n!r}", None, self.frames(lineno, f"clip {n!r}", f"{rel}/{n}"))
            for n in names
        ]
        return items, positives

    def clip_lists(self, lineno: int, rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
        """Candidates from lists of clip entries: the positives, then the negatives."""
        lay = self.layout
        paths: list[list[str]] = []
        for name in (lay.positive_clips_field, lay.negative_clips_field):
            if name is None:
                paths.append([])
                continue
            entries = self.field(lineno, rec, name)
            if isinstance(entries, np.ndarray):  # Parquet list columns arrive as arrays
                entries = entries.tolist()
            if not isinstance(entries, list):
                raise self.check.fail(lineno, f"field {name!r} must be a list of clip entries")
            found = []
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict) or not entry.get(lay.clip_path_key):
                    raise self.check.fail(lineno, f"{name}[{i}] has no {lay.clip_path_key!r}")
                found.append(str(entry[lay.clip_path_key]))
            paths.append(found)
        positives, negatives = paths
        if not positives:
            raise self.check.fail(lineno, f"field {lay.positive_clips_field!r} lists no clip")
        items = []
        for i, path in enumerate(positives + negatives):
            rel = self.fill(lineno, "clip_video", lay.clip_video or "", rec, path=path)
            items.append(self.item(lineno, f"clip {path!r}", None, self.frames(lineno, f"clip {i}", rel)))
        return items, list(range(len(positives)))


def _corpus_key(item: dict[str, Any]) -> tuple[Any, ...]:
    return (item.get("text"), tuple(str(p) for p in item.get("images", ())))


def load_video_task(
    files: list[str],
    layout: VideoLayout,
    *,
    verify_images: bool = True,
    work_dir: str | Path | None = None,
) -> VideoTask:
    """Reads one video task's table(s) and frames.

    Args:
        files: JSONL/Parquet tables (VLM2Vec's Hugging Face rows, exported).
        layout: Which fields make what (:class:`VideoLayout`).
        verify_images: Check every chosen frame's header now.
        work_dir: Unused (``demo:`` specs have no video tasks); kept for the loader signature.

    Returns:
        ``VideoTask(rows=...)`` for ``scope: local`` (rows for :func:`vlm2emb.eval.evaluate`)
        or ``VideoTask(corpus=...)`` for ``scope: global``.

    Raises:
        DataError: One line naming the file, the row and the field or folder at fault.
    """
    queries: list[dict[str, Any]] = []
    media: list[str] = []  # per query: QUERY_MEDIA
    row_cands: list[tuple[list[dict[str, Any]], list[int]]] = []
    for spec in files:
        source = resolve_source(spec, work_dir)
        check = row_checker(source, layout.frame_root, verify_images)
        reader = _Reader(layout, check)
        n_before = len(queries)
        for lineno, rec in records(source):
            if not isinstance(rec, dict):
                raise check.fail(lineno, f"a row must be an object, got {type(rec).__name__}")
            queries.append(reader.query(lineno, rec))
            media.append(reader.query_media(lineno, rec))
            row_cands.append(reader.candidates(lineno, rec))
        if len(queries) == n_before:
            raise DataError(f"{source.name}: no evaluation rows")
    if layout.scope == "local":
        rows = [
            {"query": q, "candidates": cands, "positive": pos, "instruction": None, "query_media": m}
            for q, m, (cands, pos) in zip(queries, media, row_cands, strict=True)
        ]
        return VideoTask(rows=rows)
    # Global: the corpus is the label file, else every row's candidates once each, in
    # first-seen order (VLM2Vec ranks against all distinct candidate names).
    corpus: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    if layout.labels is not None:
        for label in layout.labels:
            item = {"text": label}
            corpus.setdefault(_corpus_key(item), (f"c{len(corpus)}", item))
    # Query ids from the query's content (plus a counter for repeats), not its row number,
    # so a reordered table gives the same ids and the same report.
    seen: dict[str, int] = {}
    query_ids = []
    for query in queries:
        content = json.dumps(query, sort_keys=True, default=str)
        query_ids.append(f"{content}#{seen.get(content, 0)}")
        seen[content] = seen.get(content, 0) + 1
    qrels: dict[str, dict[str, float]] = {}
    for qi, (cands, pos) in enumerate(row_cands):
        for i, item in enumerate(cands):
            key = _corpus_key(item)
            if key not in corpus:
                if layout.labels is not None:
                    raise DataError(
                        f"{files[0]}: query {qi}'s label {item.get('text')!r} is not in the 'labels' file"
                    )
                corpus[key] = (f"c{len(corpus)}", item)
            if i in pos:
                qrels.setdefault(query_ids[qi], {})[corpus[key][0]] = 1.0
    ids = [cid for cid, _ in corpus.values()]
    items = [item for _, item in corpus.values()]
    task = CorpusTask(
        corpus_ids=ids,
        corpus_items=items,
        query_ids=query_ids,
        query_items=queries,
        query_instructions=[None] * len(queries),
        qrels=qrels,
    )
    return VideoTask(corpus=task)
