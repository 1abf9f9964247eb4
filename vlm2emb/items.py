"""Typed items and batches: what one input is, and what one training step receives.

Every layer that reads an item (the schema checker, :class:`vlm2emb.inputs.InputBuilder`,
media decoding, length sorting) takes its keys and media order from here, so an item means
the same thing everywhere:

* An **item** is a string (text), a ``PIL.Image.Image``, or a dict with ``text`` and any of
  ``image``, ``images``, ``video``, ``pdf`` (+ ``page``). Its media, in this order: ``image``,
  then ``images``, then ``video``, then the ``pdf`` page (:func:`media_refs`).
* An **instruction** is the row's own, else the default of its side
  (:func:`resolve_instruction`), the one rule training, checking and evaluation share.
* The instructions a model was trained with are recorded per task (the rows' ``dataset``)
  by :func:`instruction_record` and read back by :func:`task_instruction`.
* A :class:`ContrastiveBatch` is what the collator hands a training step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ITEM_KEYS",
    "ContrastiveBatch",
    "Item",
    "ItemError",
    "PdfPageRef",
    "VideoRef",
    "instruction_record",
    "media_refs",
    "resolve_instruction",
    "task_instruction",
]

# Distinct instructions recorded per task and side (the most frequent first): a task whose
# rows each carry their own (VQA-style questions as instructions) would otherwise fill the
# saved config with every row.
INSTRUCTION_CAP = 8
INSTRUCTION_SIDES = ("query", "target")

# The keys an item dict may hold; anything else is refused (a typo would otherwise drop media).
ITEM_KEYS = ("text", "image", "images", "video", "pdf", "page")


@dataclass(frozen=True)
class VideoRef:
    """A video: a video file (decoded with PyAV) or a folder of frame images.

    The dataclass repr is stable, so :func:`vlm2emb.data.keys.content_keys` can hash it.
    """

    path: str


@dataclass(frozen=True)
class PdfPageRef:
    """One page of a PDF file; ``page`` is 0-based (0 = the first page)."""

    path: str
    page: int = 0


class ItemError(ValueError):
    """An item that is not one; ``key`` names the offending part, ``kind`` the problem class
    (the data report's categories: ``wrong_type``, ``unknown_field``, ``empty_item``)."""

    def __init__(self, message: str, key: str = "", kind: str = "invalid") -> None:
        super().__init__(message)
        self.key = key
        self.kind = kind


def resolve_instruction(own: str | None, default: str | None) -> str | None:
    """The instruction an item is embedded with: the row's own, else its side's default.

    An empty string counts as none, so a row can fall back by leaving the field blank.
    """
    return own or default


def instruction_record(
    rows: Iterable[tuple[str, str | None, str | None]], cap: int = INSTRUCTION_CAP
) -> dict[str, dict[str, Any]]:
    """The instructions training rows were embedded with, per task.

    Args:
        rows: ``(task, query instruction, target instruction)`` per row, each instruction
            already resolved (:func:`resolve_instruction`: the row's own, else the default).
        cap: At most this many distinct instructions are kept per task and side.

    Returns:
        ``{task: {"rows": n, "query": [...], "query_distinct": k, "target": [...],
        "target_distinct": k}}``, tasks in order of first appearance; each list holds the
        distinct instructions (None = no instruction), most frequent first (ties: first
        seen), cut at ``cap``. One entry and ``*_distinct == 1`` means every row of the task
        used that instruction.
    """
    counts: dict[str, list[Counter[str | None]]] = {}
    for task, query, target in rows:
        sides = counts.setdefault(task, [Counter(), Counter()])
        sides[0][query or None] += 1
        sides[1][target or None] += 1
    record: dict[str, dict[str, Any]] = {}
    for task, sides in counts.items():
        entry: dict[str, Any] = {"rows": sum(sides[0].values())}
        for name, counter in zip(INSTRUCTION_SIDES, sides):
            entry[name] = [text for text, _ in counter.most_common(cap)]  # stable for ties
            entry[f"{name}_distinct"] = len(counter)
        record[task] = entry
    return record


def task_instruction(record: dict[str, dict[str, Any]] | None, task: str, side: str) -> str | None:
    """The one instruction every training row of ``task`` used on ``side``.

    Args:
        record: An :func:`instruction_record` (``EmbeddingConfig.instructions``).
        task: A task (the rows' ``dataset``) of the record.
        side: ``"query"`` or ``"target"``.

    Raises:
        ValueError: No record, an unknown task (the known ones are listed), or a task whose
            rows had several instructions on that side (pass ``instruction=`` instead).
    """
    if side not in INSTRUCTION_SIDES:
        raise ValueError(f"side must be one of {', '.join(INSTRUCTION_SIDES)}, got {side!r}")
    if not record:
        raise ValueError(f"task {task!r}: this model records no training instructions per task")
    if task not in record:
        raise ValueError(f"unknown task {task!r}; the model was trained on: {', '.join(record)}")
    entry = record[task]
    if entry.get(f"{side}_distinct", 1) != 1:
        shown = "; ".join(repr(t) for t in entry[side][:3])
        raise ValueError(
            f"task {task!r}: its rows had {entry[f'{side}_distinct']} different {side} instructions "
            f"(per row, e.g. {shown}); pass instruction= instead"
        )
    return entry[side][0]


def media_refs(raw: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """An item dict's media in their canonical order, unvalidated.

    Args:
        raw: An item dict (keys from :data:`ITEM_KEYS`).

    Returns:
        ``(key, kind, ref)`` triples: ``key`` as written in the row (``image``,
        ``images[2]``, ``video``, ``pdf``), ``kind`` one of ``image``, ``video``, ``pdf``,
        and the reference as given (for ``pdf``: ``(path, page)``).

    Raises:
        ItemError: Unknown keys, ``images`` not a list, or ``page`` without ``pdf``.
    """
    unknown = sorted(set(raw) - set(ITEM_KEYS))
    if unknown:
        raise ItemError(
            f"unknown item key(s) {unknown}; an item has text, image, images, video or pdf (and page)",
            str(unknown[0]),
            "unknown_field",
        )
    out: list[tuple[str, str, Any]] = []
    if raw.get("image") is not None:
        out.append(("image", "image", raw["image"]))
    images = raw.get("images") or []
    if not isinstance(images, (list, tuple)):
        raise ItemError("images must be a list", "images", "wrong_type")
    out.extend(
        (f"images[{i}]", "video" if isinstance(r, VideoRef) else "image", r) for i, r in enumerate(images)
    )
    if raw.get("video") is not None:
        out.append(("video", "video", raw["video"]))
    if raw.get("pdf") is not None:
        out.append(("pdf", "pdf", (raw["pdf"], raw.get("page") or 0)))
    elif raw.get("page") is not None:
        raise ItemError("page is given without a pdf", "page", "wrong_type")
    return out


@dataclass(frozen=True)
class Item:
    """One input, parsed: its text and its media references in order.

    Attributes:
        text: The text, or None.
        media: Image references (path, bytes or ``PIL.Image.Image``), :class:`VideoRef` and
            :class:`PdfPageRef`, in the order the backbone sees them.
    """

    text: str | None = None
    media: tuple[Any, ...] = ()

    @classmethod
    def parse(cls, x: Any) -> Item:
        """Parses a string, a PIL image, an item dict or an :class:`Item`.

        Raises:
            ItemError: Another type, unknown keys, non-string text, or an empty item.
        """
        if isinstance(x, Item):
            return x
        if isinstance(x, str):
            return cls(text=x)
        if not isinstance(x, dict):
            from PIL import Image

            if isinstance(x, Image.Image):
                return cls(media=(x,))
            raise ItemError(
                f"an item must be a str, a PIL image or a dict, got {type(x).__name__}", "", "wrong_type"
            )
        text = x.get("text")
        if text is not None and not isinstance(text, str):
            raise ItemError(f"item text must be a string, got {type(text).__name__}", "text", "wrong_type")
        media: list[Any] = []
        for _, kind, ref in media_refs(x):
            if kind == "video" and not isinstance(ref, VideoRef):
                ref = VideoRef(str(ref))
            elif kind == "pdf":
                ref = PdfPageRef(str(ref[0]), int(ref[1]))
            media.append(ref)
        if not text and not media:
            raise ItemError("an item needs text or at least one image", "", "empty_item")
        return cls(text=text, media=tuple(media))

    def as_dict(self) -> dict[str, Any]:
        """``{"text": ..., "images": [refs]}``, the form rows are stored in."""
        return {"text": self.text, "images": list(self.media)}


@dataclass
class ContrastiveBatch:
    """This process's share of one global training batch (CPU tensors).

    Built by :class:`vlm2emb.data.collate.ContrastiveCollator`; read by the training step
    (:class:`vlm2emb.gradcache.ContrastiveStep`) and the objectives. ``B`` is the global
    batch, ``b`` this process's rows, ``K`` the most hard negatives of any global row.

    Attributes:
        query: Backbone-input chunks covering the b local queries.
        positive: Backbone-input chunks covering the b local positives.
        positive_keys: [B] false-negative group ids of the global batch
            (:func:`vlm2emb.data.collate.false_negative_groups`).
        query_order: [b] the local row of each query in chunk order, or None when the
            chunks are in row order.
        positive_order: [b] likewise for the positives.
        negatives: Chunks of the local rows' hard negatives, flattened in row order
            (empty when the batch has none).
        negative_keys: [B, K] ids of the global batch's hard negatives, or None.
        negative_mask: [B, K] bool, the global batch's real-negative mask, or None.
        local_negative_mask: [b, K] this process's rows of ``negative_mask``, or None.
        negatives_padded: True when ``negatives`` holds all b * K slots (multi-process runs),
            padding included; else only the real negatives.
        teacher_scores: [B, 1 + K] a teacher's scores of each global row's positive
            (column 0) and hard negatives, NaN where a row or slot has none; None when no
            row of the batch has ``teacher_scores`` (distillation targets).
    """

    query: list[dict[str, Any]]
    positive: list[dict[str, Any]]
    positive_keys: torch.Tensor
    query_order: torch.Tensor | None = None
    positive_order: torch.Tensor | None = None
    negatives: list[dict[str, Any]] = field(default_factory=list)
    negative_keys: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    local_negative_mask: torch.Tensor | None = None
    negatives_padded: bool = False
    teacher_scores: torch.Tensor | None = None

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """Every backbone-input chunk: queries, then positives, then negatives."""
        return [*self.query, *self.positive, *self.negatives]

    def real_tokens(self) -> int:
        """Non-padding tokens over all chunks (for tokens/s)."""
        total = 0
        for chunk in self.chunks:
            mask = chunk.get("attention_mask")
            total += int(mask.sum()) if mask is not None else int(chunk["input_ids"].numel())
        return total
