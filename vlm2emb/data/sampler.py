"""The order of training rows: global batches that depend on the seed alone.

Every process builds the same plan of global batches for an epoch from ``seed + epoch``
and takes its own slice of each, so the union over processes is the same global batch
whatever the world size, and any property of a global batch (one dataset only, similar
lengths, no duplicate positives) holds on every process at once.

Plan of one epoch:

1. **Mixing**: with ``weights`` (one per source), source ``s`` contributes
   ``round(total * w_s / sum(w))`` rows, drawn without replacement, cycling through fresh
   permutations when it has fewer rows than that (upsampling).
2. **Shuffle**: one permutation of those rows (per dataset with ``homogeneous``).
3. **Length grouping** (optional): inside each window of ``mega_batches`` global batches,
   rows are sorted by a cheap length estimate, so a batch holds similar lengths and pads
   less.
4. **Batches**: consecutive rows form global batches; with ``dedup_keys`` a row whose
   positive already appears in the batch waits for the next batch instead (drop and
   replace). Incomplete batches are dropped.
5. The batch order is shuffled (when batches were built per dataset or sorted by length),
   so datasets and lengths alternate randomly through the epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class GlobalBatchSampler:
    """Yields this process's slice of each global batch; the order depends on the seed alone.

    Args:
        num_examples: Dataset size.
        batch_size: Global batch size (divisible by ``world_size``).
        seed: Data-order seed.
        rank: This process's index.
        world_size: Number of processes.
        start_step: Global batches to skip (resuming).
        datasets: [N] dataset name per row; with it every global batch comes from one
            dataset (``data.homogeneous``).
        sources: [N] source index per row, for ``weights``.
        weights: Mixing weight per source (None = every row once per epoch).
        lengths: [N] length estimates (numbers, or tuples compared in order, such as
            :func:`grouping_key`); with them batches are grouped by length.
        mega_batches: Global batches per length-sorting window.
        dedup_keys: [N] positive content ids; with them no global batch holds the same
            positive twice.
        graph: [N] adjacency lists of teacher links (:mod:`vlm2emb.data.teacher_batches`);
            with them each epoch's batches are cut from the graph (``data.batching:
            teacher``) instead of consecutive shuffled rows.
        partitioner: ``greedy`` or ``metis``, how the graph is cut.
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
        datasets: Sequence[str] | None = None,
        sources: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        lengths: Sequence[float] | Sequence[tuple[int, ...]] | None = None,
        mega_batches: int = 50,
        dedup_keys: Sequence[int] | None = None,
        graph: Sequence[Sequence[int]] | None = None,
        partitioner: str = "greedy",
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"train.batch_size {batch_size} is not divisible by {world_size} processes")
        if num_examples < batch_size:
            raise ValueError(
                f"train.batch_size {batch_size} is larger than the dataset ({num_examples} rows)"
            )
        for name, seq in (("datasets", datasets), ("sources", sources), ("lengths", lengths)):
            if seq is not None and len(seq) != num_examples:
                raise ValueError(f"{name} has {len(seq)} entries for {num_examples} rows")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.datasets = list(datasets) if datasets is not None else None
        self.sources = list(sources) if sources is not None else [0] * num_examples
        self.weights = list(weights) if weights else None
        self.lengths = list(lengths) if lengths is not None else None
        self.mega_batches = mega_batches
        self.dedup_keys = list(dedup_keys) if dedup_keys is not None else None
        if graph is not None:
            if len(graph) != num_examples:
                raise ValueError(f"graph has {len(graph)} entries for {num_examples} rows")
            clash = [name for name, v in (("data.weights", weights), ("data.group_by_length", lengths)) if v]
            if clash:
                # Each of these reorders rows by its own rule; the teacher's clusters would be lost.
                raise ValueError(f"data.batching=teacher cannot be combined with {', '.join(clash)}")
        self.graph = graph
        self.partitioner = partitioner
        self._simple = (
            datasets is None and not self.weights and lengths is None and dedup_keys is None and graph is None
        )
        self._cache: tuple[int, list[list[int]]] | None = None
        self._epoch_lengths: list[int] = []  # batches per epoch, filled as epochs are planned
        if self.weights is not None:
            n_sources = max(self.sources) + 1
            if len(self.weights) != n_sources:
                raise ValueError(f"data.weights has {len(self.weights)} values for {n_sources} sources")
            if any(w < 0 for w in self.weights) or not sum(self.weights):
                raise ValueError("data.weights must be >= 0 and not all 0")
        if self._simple:
            self.batches_per_epoch = num_examples // batch_size
        else:
            self.batches_per_epoch = len(self.epoch_plan(0))
            if not self.batches_per_epoch:
                raise ValueError(
                    f"no global batch of {batch_size} rows can be formed "
                    "(with data.homogeneous every batch needs one dataset with that many rows)"
                )

    # ------------------------------------------------------------------ plan
    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch``, in order (computed once per epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(self.seed + epoch)
        rows = self._mixed_rows(gen)
        if self.datasets is None:
            groups = [rows]
        else:
            by_name: dict[str, list[int]] = {}
            for i in rows:
                by_name.setdefault(self.datasets[i], []).append(i)
            groups = [by_name[name] for name in sorted(by_name)]  # sorted: same on every process
        batches: list[list[int]] = []
        for group in groups:
            if self.graph is not None:
                from vlm2emb.data.teacher_batches import partition

                batches.extend(
                    partition(
                        self.graph,
                        group,
                        self.batch_size,
                        self.seed + epoch,
                        self.partitioner,
                        self.dedup_keys,
                    )
                )
                continue
            order = [group[j] for j in torch.randperm(len(group), generator=gen).tolist()]
            if self.lengths is not None:
                window = self.batch_size * self.mega_batches
                order = [
                    i
                    for start in range(0, len(order), window)
                    for i in sorted(order[start : start + window], key=self.lengths.__getitem__, reverse=True)
                ]
            batches.extend(self._cut(order))
        if len(groups) > 1 or self.lengths is not None or self.graph is not None:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
        self._cache = (epoch, batches)
        return batches

    def _mixed_rows(self, gen: torch.Generator) -> list[int]:
        if self.weights is None:
            return list(range(self.num_examples))
        per_source: dict[int, list[int]] = {}
        for i, s in enumerate(self.sources):
            per_source.setdefault(s, []).append(i)
        total = self.num_examples
        weight_sum = sum(self.weights)
        rows: list[int] = []
        for s in sorted(per_source):
            members = per_source[s]
            want = round(total * self.weights[s] / weight_sum)
            while want > 0:
                take = min(want, len(members))
                perm = torch.randperm(len(members), generator=gen)[:take].tolist()
                rows.extend(members[j] for j in perm)
                want -= take
        return rows

    def _cut(self, order: list[int]) -> list[list[int]]:
        b = self.batch_size
        if self.dedup_keys is None:
            return [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
        # Drop and replace: a row whose positive is already in the batch waits for a later one.
        batches: list[list[int]] = []
        waiting: list[int] = []
        current: list[int] = []
        seen: set[int] = set()
        stream = iter(order)
        while True:
            row = None
            for k, cand in enumerate(waiting):
                if self.dedup_keys[cand] not in seen:
                    row = waiting.pop(k)
                    break
            if row is None:
                row = next(stream, None)
                if row is None:
                    break
                if self.dedup_keys[row] in seen:
                    waiting.append(row)
                    continue
            current.append(row)
            seen.add(self.dedup_keys[row])
            if len(current) == b:
                batches.append(current)
                current, seen = [], set()
        return batches

    # ------------------------------------------------------------------ access
    def global_batch(self, step: int) -> list[int]:
        """Indices of global batch ``step`` (0-based)."""
        if self._simple:
            epoch, within = divmod(step, self.batches_per_epoch)
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_examples, generator=gen)
            return perm[within * self.batch_size : (within + 1) * self.batch_size].tolist()
        # Epochs may differ in length (dedup leaves a varying remainder): walk their lengths.
        epoch, within = 0, step
        while True:
            if epoch == len(self._epoch_lengths):
                self._epoch_lengths.append(len(self.epoch_plan(epoch)))
            if within < self._epoch_lengths[epoch]:
                return list(self.epoch_plan(epoch)[within])
            within -= self._epoch_lengths[epoch]
            epoch += 1

    def starting_at(self, start_step: int) -> GlobalBatchSampler:
        """The same plan, yielding from global batch ``start_step`` on (shares the planned epochs)."""
        other = copy.copy(self)
        other.start_step = start_step
        return other

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world_size
        step = self.start_step
        while True:  # the training loop stops at max_steps
            batch = self.global_batch(step)
            yield batch[self.rank * local : (self.rank + 1) * local]
            step += 1


def grouping_keys(examples: Sequence[Any], tokenizer: Any = None) -> list[tuple[int, ...]]:
    """Sort keys of length grouping: the row's layout first, then its longest side.

    Queries and targets are padded separately, so what a row costs in a batch is set by its
    longer side, and rows of different layouts (an image query with a short caption, a text
    query with a long passage) pad each other's sides badly: rows with the same layout
    (image or not on each side, number of negatives) sort together first, then by the
    token count of their longest side, then by their total.

    Args:
        examples: Training rows (``TrainExample``).
        tokenizer: The backbone's tokenizer, for exact text token counts (a fast tokenizer
            counts about 10^5 texts per second). None = characters / 4.

    Returns:
        One key per row, compared as tuples (larger = longer).
    """

    def counts(texts: list[str]) -> list[int]:
        if tokenizer is None:
            return [len(t) // 4 for t in texts]
        from vlm2emb.inputs import token_counts

        return token_counts(texts, tokenizer)

    def side(items: list[dict[str, Any]]) -> list[int]:
        texts = counts([item.get("text") or "" for item in items])
        return [t + _IMAGE_TOKENS * len(item.get("images") or []) for t, item in zip(texts, items)]

    queries = side([ex.query for ex in examples])
    positives = side([ex.positive for ex in examples])
    keys = []
    for ex, q, p in zip(examples, queries, positives):
        layout = (int(bool(ex.query.get("images"))), int(bool(ex.positive.get("images"))), len(ex.negatives))
        keys.append((*layout, max(q, p), q + p))
    return keys


_IMAGE_TOKENS = 256  # a rough visual-token count per image, for sorting only


def sampler_for(
    examples: Sequence[Any],
    data: Any,
    batch_size: int,
    seed: int,
    *,
    start_step: int = 0,
    tokenizer: Any = None,
) -> GlobalBatchSampler:
    """The training sampler a recipe's ``data`` section asks for.

    Args:
        examples: The training examples (``TrainExample``).
        data: The recipe's ``DataConfig`` (``homogeneous``, ``weights``, ``group_by_length``,
            ``mega_batch``, ``dedup_positives``, ``batching``, ``batch_partitioner``,
            ``target_instruction``).
        batch_size: Global batch size.
        seed: Data-order seed.
        start_step: Global batches already done (resuming).
        tokenizer: For exact token counts in length grouping (see :func:`grouping_keys`).
    """
    dedup = None
    if data.dedup_positives or data.batching == "teacher":  # teacher clusters: distinct positives
        from vlm2emb.data.keys import item_keys
        from vlm2emb.items import resolve_instruction

        # The same key the collator's false-negative masking uses: item plus instruction.
        dedup = item_keys(
            [ex.positive for ex in examples],
            [resolve_instruction(ex.target_instruction, data.target_instruction) for ex in examples],
        ).tolist()
    graph = None
    if data.batching == "teacher":
        from vlm2emb.data.teacher_batches import teacher_graph

        graph = teacher_graph(examples, data.target_instruction)
    return GlobalBatchSampler(
        len(examples),
        batch_size,
        seed,
        start_step=start_step,
        datasets=[ex.dataset for ex in examples] if data.homogeneous else None,
        sources=[ex.origin for ex in examples],
        weights=data.weights or None,
        lengths=grouping_keys(examples, tokenizer) if data.group_by_length else None,
        mega_batches=data.mega_batch,
        dedup_keys=dedup,
        graph=graph,
        partitioner=data.batch_partitioner,
    )
