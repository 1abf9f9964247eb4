"""Content ids for items: equal content, equal id, in every process and run.

The false-negative masks (:func:`vlm2emb.data.collate.false_negative_groups`) and the
sampler's duplicate-positive check compare items by these ids. An item is keyed together
with the instruction it is embedded with (:func:`item_keys`): the same text under another
instruction embeds differently, so it is another candidate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import torch
from torch import Tensor

__all__ = ["content_keys", "item_keys"]


def _json_default(obj: Any) -> Any:
    """Make common non-JSON types serializable in a process-independent way."""
    if isinstance(obj, PurePath):
        return {"__path__": obj.as_posix()}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": bytes(obj).hex()}
    if isinstance(obj, (set, frozenset)):
        # Set iteration order depends on the per-process string hash seed: sort the
        # canonical dumps of the members.
        return {"__set__": sorted(_canonical(x) for x in obj)}
    if type(obj).__repr__ is not object.__repr__:
        # A custom repr is assumed to describe the value (e.g. enums, dataclasses).
        return {"__repr__": f"{type(obj).__module__}.{type(obj).__qualname__}", "value": repr(obj)}
    # The default repr embeds a memory address, which would make the id differ per process.
    raise TypeError(
        f"content_keys cannot derive a stable id for an object of type {type(obj).__qualname__}; "
        "pass JSON-serializable data (e.g. the text and the image path) instead"
    )


def _canonical(item: Any) -> str:
    # sort_keys makes dict key order irrelevant; compact separators fix the spacing.
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def content_keys(items: Sequence[Any]) -> Tensor:
    """Map items to int64 content ids that are identical across processes and runs.

    Python's ``hash()`` of strings is salted per process, so it cannot be used to
    compare examples across data-loader workers or ranks. Instead each item is dumped
    to canonical JSON (sorted keys, no whitespace) and hashed with SHA-256; the first
    63 bits give a non-negative int64. Equal content, e.g. ``{"text": "a", "image":
    "x.jpg"}`` and ``{"image": "x.jpg", "text": "a"}``, gets the same id, which is what
    ``info_nce_loss(positive_keys=...)`` needs to spot duplicate positives.

    Note that JSON does not distinguish tuples from lists nor int dict keys from
    string ones. Paths, bytes and sets are supported; other objects must have a
    deterministic ``repr``.

    Args:
        items: A sequence of JSON-serializable (or otherwise supported) items.

    Returns:
        ``[len(items)]`` int64 tensor of ids in ``[0, 2**63)``.

    Raises:
        TypeError: If an item cannot be given a stable id.
    """
    ids = []
    for item in items:
        digest = hashlib.sha256(_canonical(item).encode("utf-8")).digest()
        # 63 bits so the value fits a signed int64 without wrapping negative.
        ids.append(int.from_bytes(digest[:8], "big") >> 1)
    return torch.tensor(ids, dtype=torch.int64)


def item_keys(items: Sequence[Any], instructions: Sequence[str | None]) -> Tensor:
    """[len(items)] content ids of items as embedded: each item keyed with its instruction.

    Args:
        items: Items (as stored in rows).
        instructions: The instruction each item is embedded with (already resolved, see
            :func:`vlm2emb.items.resolve_instruction`).
    """
    if len(items) != len(instructions):
        raise ValueError(f"got {len(instructions)} instructions for {len(items)} items")
    return content_keys([[item, instruction] for item, instruction in zip(items, instructions)])
