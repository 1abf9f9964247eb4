"""Batching for training: a seed-determined global batch order and the contrastive collator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.data.schema import TrainExample
    from vlm2emb.model import EmbeddingModel


class GlobalBatchSampler:
    """Yields this process's slice of each global batch; the order depends on the seed alone.

    Every process computes the same permutation per epoch (``seed + epoch``) and takes rows
    ``[rank * B/N, (rank + 1) * B/N)`` of each global batch of size B, so the union over
    processes is the same global batch whatever the world size. Incomplete last batches of
    an epoch are dropped (a contrastive batch size change would change the loss).

    Args:
        num_examples: Dataset size.
        batch_size: Global batch size (divisible by ``world_size``).
        seed: Data-order seed.
        rank: This process's index.
        world_size: Number of processes.
        start_step: Global batches to skip (resuming).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"train.batch_size {batch_size} is not divisible by {world_size} processes")
        if num_examples < batch_size:
            raise ValueError(
                f"train.batch_size {batch_size} is larger than the dataset ({num_examples} rows)"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.batches_per_epoch = num_examples // batch_size

    def global_batch(self, step: int) -> list[int]:
        """Indices of global batch ``step`` (0-based)."""
        epoch, within = divmod(step, self.batches_per_epoch)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.num_examples, generator=gen)
        return perm[within * self.batch_size : (within + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world_size
        step = self.start_step
        while True:  # the training loop stops at max_steps
            batch = self.global_batch(step)
            yield batch[self.rank * local : (self.rank + 1) * local]
            step += 1


class ContrastiveCollator:
    """Turns training examples into query / positive / negative backbone batches.

    The output holds CPU tensors:
        ``query``, ``positive``: backbone inputs for B items each.
        ``negatives``: backbone inputs for the flattened hard negatives, or None.
        ``negative_mask``: [B, K] bool, False where a row has fewer than K negatives.
        ``positive_keys`` [B], ``negative_keys`` [B, K]: ids that the loss uses to mask
        in-batch false negatives (see :func:`false_negative_groups`).
    """

    def __init__(
        self,
        model: EmbeddingModel,
        *,
        query_instruction: str | None = None,
        target_instruction: str | None = None,
    ) -> None:
        self.model = model
        self.query_instruction = query_instruction
        self.target_instruction = target_instruction

    def __call__(self, examples: Sequence[TrainExample]) -> dict[str, Any]:
        from vlm2emb.losses import content_keys

        q_instr = [ex.instruction or self.query_instruction for ex in examples]
        t_instr = [ex.target_instruction or self.target_instruction for ex in examples]
        # Keys include the instruction: the same text under another instruction embeds differently.
        pos_content = content_keys([[ex.positive, t] for ex, t in zip(examples, t_instr)])  # [B]
        query_content = content_keys([[ex.query, i] for ex, i in zip(examples, q_instr)])  # [B]
        groups = false_negative_groups(query_content.tolist(), pos_content.tolist())
        batch: dict[str, Any] = {
            "query": self._collate([ex.query for ex in examples], q_instr, examples),
            "positive": self._collate([ex.positive for ex in examples], t_instr, examples),
            "positive_keys": torch.tensor(groups, dtype=torch.int64),
            "negatives": None,
        }
        group_of_content = dict(zip(pos_content.tolist(), groups))
        k = max(len(ex.negatives) for ex in examples)
        if k:
            flat, flat_instr, keys = [], [], []
            mask = torch.zeros(len(examples), k, dtype=torch.bool)
            for row, (ex, t) in enumerate(zip(examples, t_instr)):
                mask[row, : len(ex.negatives)] = True
                for neg in ex.negatives:
                    flat.append(neg)
                    flat_instr.append(t)
                    keys.append([neg, t])
            key_tensor = torch.full((len(examples), k), -1, dtype=torch.int64)
            # A hard negative equal to some row's positive belongs to that row's group.
            key_tensor[mask] = torch.tensor(
                [group_of_content.get(key, key) for key in content_keys(keys).tolist()], dtype=torch.int64
            )
            batch["negatives"] = self._collate(flat, flat_instr, examples)
            batch["negative_mask"] = mask
            batch["negative_keys"] = key_tensor
        return batch

    def _collate(
        self, items: list[Any], instructions: list[str | None], examples: Sequence[TrainExample]
    ) -> Any:
        try:
            return self.model.collate(items, instructions)
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
