"""The contrastive collator (the global batch order lives in :mod:`vlm2emb.data.sampler`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vlm2emb.data.keys import item_keys
from vlm2emb.data.sampler import GlobalBatchSampler
from vlm2emb.items import ContrastiveBatch, resolve_instruction

__all__ = ["ContrastiveCollator", "GlobalBatchSampler", "false_negative_groups"]

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.data.media import MediaOptions
    from vlm2emb.data.schema import TrainExample
    from vlm2emb.inputs import InputBuilder


class ContrastiveCollator:
    """Turns a global batch of training examples into this process's :class:`ContrastiveBatch`.

    It receives the whole global batch (every process sees the same one) so that the
    false-negative ids and the hard-negative layout are computed over the global batch, and
    builds backbone inputs only for this process's rows ``[rank * b, (rank + 1) * b)``.
    Inputs come in chunks of at most ``chunk_size`` items (GradCache re-runs them one chunk
    at a time; 0 = ``length_buckets`` chunks). Where a side needs several chunks, its items
    are sorted by length first, so each chunk pads only to lengths like its own; the order
    comes back in ``query_order`` / ``positive_order`` and the training step puts the
    embeddings back in row order. Media references (paths, bytes, videos, PDF pages) are
    decoded here with ``media`` (pixel bounds, frames per video), only for the local rows.

    It holds the model's :class:`~vlm2emb.inputs.InputBuilder` (processor and settings),
    never the weights, so DataLoader workers get no copy of the model.

    Args:
        inputs: ``model.inputs``.
        query_instruction: Instruction for queries of rows without their own.
        target_instruction: Instruction for positives and negatives of rows without their own.
        rank: This process's rank.
        world_size: Processes sharing the global batch.
        chunk_size: Items per chunk (0 = ``length_buckets`` chunks per side).
        length_buckets: Length-sorted chunks per side when ``chunk_size`` is 0.
        media: How media are decoded.
    """

    def __init__(
        self,
        inputs: InputBuilder,
        *,
        query_instruction: str | None = None,
        target_instruction: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        chunk_size: int = 0,
        length_buckets: int = 1,
        media: MediaOptions | None = None,
    ) -> None:
        if length_buckets < 1:
            raise ValueError(f"length_buckets must be >= 1, got {length_buckets}")
        if not callable(inputs) or not hasattr(inputs, "length_keys"):
            raise TypeError(
                f"ContrastiveCollator takes model.inputs (an InputBuilder), got {type(inputs).__name__}"
            )
        self.length_buckets = length_buckets
        self.inputs = inputs
        self.media = media
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction
        self.rank = rank
        self.world_size = world_size
        self.chunk_size = chunk_size

    def __call__(self, examples: Sequence[TrainExample]) -> ContrastiveBatch:
        if len(examples) % self.world_size:
            raise ValueError(
                f"a global batch of {len(examples)} rows does not split over {self.world_size} processes"
            )
        q_instr = [resolve_instruction(ex.instruction, self.query_instruction) for ex in examples]
        t_instr = [resolve_instruction(ex.target_instruction, self.target_instruction) for ex in examples]
        pos_content = item_keys([ex.positive for ex in examples], t_instr)  # [B]
        query_content = item_keys([ex.query for ex in examples], q_instr)  # [B]
        groups = false_negative_groups(query_content.tolist(), pos_content.tolist())
        b = len(examples) // self.world_size
        lo, hi = self.rank * b, (self.rank + 1) * b
        local = examples[lo:hi]
        query_chunks, query_order = self._sorted_chunks([ex.query for ex in local], q_instr[lo:hi], local)
        pos_chunks, pos_order = self._sorted_chunks([ex.positive for ex in local], t_instr[lo:hi], local)
        batch = ContrastiveBatch(
            query=query_chunks,
            query_order=query_order,
            positive=pos_chunks,
            positive_order=pos_order,
            positive_keys=torch.tensor(groups, dtype=torch.int64),
        )
        k = max(len(ex.negatives) for ex in examples)
        if k:
            group_of_content = dict(zip(pos_content.tolist(), groups))
            mask = torch.zeros(len(examples), k, dtype=torch.bool)
            neg_items: list[Any] = []
            neg_instr: list[str | None] = []
            for row, (ex, t) in enumerate(zip(examples, t_instr)):
                mask[row, : len(ex.negatives)] = True
                neg_items.extend(ex.negatives)
                neg_instr.extend([t] * len(ex.negatives))
            key_tensor = torch.full((len(examples), k), -1, dtype=torch.int64)
            # A hard negative equal to some row's positive belongs to that row's group.
            key_tensor[mask] = torch.tensor(
                [group_of_content.get(key, key) for key in item_keys(neg_items, neg_instr).tolist()],
                dtype=torch.int64,
            )
            if self.world_size > 1:
                # Every process must run the backbone equally often (ZeRO-3 gathers weights
                # collectively per forward): fill each row to K negatives with its own
                # positive as a stand-in, embedded but masked out of the loss.
                flat = [
                    neg for ex in local for neg in [*ex.negatives, *[ex.positive] * (k - len(ex.negatives))]
                ]
                flat_instr = [t for t in t_instr[lo:hi] for _ in range(k)]
                batch.negatives_padded = True
            else:
                flat = [neg for ex in local for neg in ex.negatives]
                flat_instr = [t for ex, t in zip(local, t_instr[lo:hi]) for _ in ex.negatives]
            batch.negatives = self._chunks(flat, flat_instr, local) if flat else []
            batch.negative_keys = key_tensor
            batch.negative_mask = mask
            batch.local_negative_mask = mask[lo:hi]
        if any(ex.teacher_scores is not None for ex in examples):
            # NaN marks "no teacher score" (a row without them, or a padding slot).
            scores = torch.full((len(examples), 1 + k), float("nan"))  # [B, 1 + K]
            for row, ex in enumerate(examples):
                if ex.teacher_scores is not None:
                    scores[row, : len(ex.teacher_scores)] = torch.tensor(ex.teacher_scores)
            batch.teacher_scores = scores
        return batch

    def _chunk_size(self, n: int) -> int:
        return self.chunk_size or max(1, -(-n // self.length_buckets))

    def _chunks(
        self, items: list[Any], instructions: list[str | None], examples: Sequence[TrainExample]
    ) -> list[dict[str, Any]]:
        size = self._chunk_size(len(items))
        return [
            self._collate(items[i : i + size], instructions[i : i + size], examples)
            for i in range(0, len(items), size)
        ]

    def _sorted_chunks(
        self, items: list[Any], instructions: list[str | None], examples: Sequence[TrainExample]
    ) -> tuple[list[dict[str, Any]], torch.Tensor | None]:
        """Chunks of items sorted longest first, and the order ([b] local rows), when a
        side takes more than one chunk; else the row-order chunks and None."""
        if len(items) <= self._chunk_size(len(items)):
            return self._chunks(items, instructions, examples), None
        keys = self.inputs.length_keys(items)
        order = sorted(range(len(items)), key=keys.__getitem__, reverse=True)
        chunks = self._chunks([items[i] for i in order], [instructions[i] for i in order], examples)
        return chunks, torch.tensor(order, dtype=torch.int64)

    def _collate(
        self, items: list[Any], instructions: list[str | None], examples: Sequence[TrainExample]
    ) -> dict[str, Any]:
        from vlm2emb.data.media import decode_item

        try:
            decoded = [decode_item(item, self.media) for item in items]
            return self.inputs(decoded, instructions)
        except (OSError, ValueError) as exc:
            sources = ", ".join(ex.source for ex in examples[:3])
            raise ValueError(f"cannot build a batch from rows {sources}...: {exc}") from exc


def false_negative_groups(query_keys: list[int], positive_keys: list[int]) -> list[int]:
    """Groups rows whose positives are interchangeable, for false-negative masking.

    Two rows belong together when they share a positive (the same caption for two images)
    or a query (the same caption asking for two different images): then row j's positive is
    a correct answer for row i's query too, and must not be scored as its negative. Groups
    are the connected components of those links; each is named by the smallest positive
    content key in it, so every process that sees the same rows derives the same ids.

    Args:
        query_keys: [B] content ids of the queries.
        positive_keys: [B] content ids of the positives.

    Returns:
        [B] group ids; the loss masks candidate j for query i when their ids are equal.
    """
    n = len(positive_keys)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for keys in (query_keys, positive_keys):
        first: dict[int, int] = {}
        for i, key in enumerate(keys):
            if key in first:
                parent[find(i)] = find(first[key])
            else:
                first[key] = i
    name: dict[int, int] = {}
    for i in range(n):
        root = find(i)
        name[root] = min(name.get(root, positive_keys[i]), positive_keys[i])
    return [name[find(i)] for i in range(n)]
