"""Teacher-built batches (B3-style): batch-sized clusters of rows that are each other's hard negatives.

B3 (Thirukovalluru et al., 2025) ranks the training set with a teacher, links rows whose
targets the teacher confuses, and cuts that graph into batch-sized clusters, so that the
in-batch negatives of every batch are hard ones. Here the teacher's ranking is the hard
negatives a teacher mined into the rows (``vlm2emb mine --model TEACHER``): row ``i`` is
linked to row ``j`` when one of ``i``'s negatives is ``j``'s positive (same content id:
item plus instruction). Batches are then cut from that graph each epoch
(``data.batching: teacher``):

* ``greedy`` (default, no dependency): from a seeded random unassigned row, breadth-first
  through its links (its hard negatives' rows first, then theirs) until the batch is full;
  when the component runs out, from the next random unassigned row. Every batch is exactly
  ``batch_size`` rows; the last incomplete one is dropped, as the random sampler drops its
  remainder. Linear in rows plus links.
* ``metis`` (``pip install 'vlm2emb[metis]'``): METIS minimises the links cut between
  ``N / batch_size`` balanced parts, a better partition for dense graphs; its parts are
  near, not exactly, ``batch_size``, so each part is cut into whole batches and the
  leftovers of all parts are shuffled into further batches. METIS is seeded (``seed + epoch``).

Both keep positives distinct within a batch (``keys``), and the other sampler rules: with
``data.homogeneous`` the graph is cut per dataset;
the plan depends on the seed and the epoch only, so every process builds the same batches
and a resumed run continues the same order.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import Any

__all__ = ["PARTITIONERS", "partition", "teacher_graph"]

PARTITIONERS = ("greedy", "metis")


def teacher_graph(examples: Sequence[Any], target_instruction: str | None) -> list[list[int]]:
    """Adjacency lists: ``i`` and ``j`` are linked when a negative of one is the other's positive.

    Args:
        examples: Training rows (``TrainExample``), with mined negatives.
        target_instruction: The recipe's default target instruction (content ids include it).

    Returns:
        [N] sorted neighbour lists (undirected, no self links).
    """
    from vlm2emb.data.keys import item_keys
    from vlm2emb.items import resolve_instruction

    instr = [resolve_instruction(ex.target_instruction, target_instruction) for ex in examples]
    pos_keys = item_keys([ex.positive for ex in examples], instr).tolist()
    rows_of: dict[int, list[int]] = {}
    for i, key in enumerate(pos_keys):
        rows_of.setdefault(key, []).append(i)
    flat = [(i, neg) for i, ex in enumerate(examples) for neg in ex.negatives]
    neg_keys = item_keys([neg for _, neg in flat], [instr[i] for i, _ in flat]).tolist() if flat else []
    links: list[set[int]] = [set() for _ in examples]
    for (i, _), key in zip(flat, neg_keys):
        for j in rows_of.get(key, ()):
            if j != i:
                links[i].add(j)
                links[j].add(i)
    return [sorted(s) for s in links]


def partition(
    graph: Sequence[Sequence[int]],
    rows: Sequence[int],
    batch_size: int,
    seed: int,
    method: str = "greedy",
    keys: Sequence[int] | None = None,
) -> list[list[int]]:
    """Cuts the rows ``rows`` of ``graph`` into batches of exactly ``batch_size`` rows.

    Args:
        graph: Adjacency lists over all rows (:func:`teacher_graph`).
        rows: The rows to place (one dataset's, or all).
        batch_size: Rows per batch.
        seed: Seed of the random choices (``seed + epoch`` in the sampler).
        method: ``greedy`` or ``metis``.
        keys: [N] positive content ids; with them no batch holds the same positive twice
            (a duplicate would only add a masked row, and on data with many rows per target
            the clusters would otherwise fill up with copies of a few targets).

    Returns:
        Batches (lists of row indices); rows that do not fill a last batch are left out.

    Raises:
        ValueError: Unknown method.
        ImportError: ``metis`` without pymetis installed.
    """
    keys = list(keys) if keys is not None else list(range(len(graph)))
    if method == "greedy":
        return _greedy(graph, rows, batch_size, seed, keys)
    if method == "metis":
        return _metis(graph, rows, batch_size, seed, keys)
    raise ValueError(f"data.batch_partitioner: {method!r} is not one of {', '.join(PARTITIONERS)}")


def _greedy(
    graph: Sequence[Sequence[int]], rows: Sequence[int], batch_size: int, seed: int, keys: Sequence[int]
) -> list[list[int]]:
    rng = random.Random(seed)
    order = list(rows)
    rng.shuffle(order)
    member = set(order)
    assigned: set[int] = set()
    batches: list[list[int]] = []
    current: list[int] = []
    taken: set[int] = set()  # positive keys of the batch being filled
    while order:
        placed_before = len(assigned)
        waiting: list[int] = []  # rows whose positive the current batch already holds
        for start in order:
            if start in assigned:
                continue
            if keys[start] in taken:
                waiting.append(start)
                continue
            queue: deque[int] = deque([start])
            while queue:
                row = queue.popleft()
                if row in assigned or keys[row] in taken:
                    continue
                assigned.add(row)
                current.append(row)
                taken.add(keys[row])
                if len(current) == batch_size:
                    batches.append(current)
                    current, taken = [], set()
                    queue.clear()  # the next batch starts from a fresh random row
                    break
                neighbours = [
                    j for j in graph[row] if j in member and j not in assigned and keys[j] not in taken
                ]
                rng.shuffle(neighbours)  # ties between equally linked rows: no index bias
                queue.extend(neighbours)
        # Waiting rows get another pass while passes still place rows; the rest cannot
        # complete a batch of distinct positives and sit this epoch out.
        order = [row for row in waiting if row not in assigned]
        if len(assigned) == placed_before:
            break
    return batches


def _cut_distinct(
    order: list[int], keys: Sequence[int], batch_size: int
) -> tuple[list[list[int]], list[int]]:
    """Consecutive batches of distinct positives from ``order``; the rows left over."""
    batches: list[list[int]] = []
    current: list[int] = []
    taken: set[int] = set()
    left: list[int] = []
    for row in order:
        if keys[row] in taken:
            left.append(row)
            continue
        current.append(row)
        taken.add(keys[row])
        if len(current) == batch_size:
            batches.append(current)
            current, taken = [], set()
    return batches, left + current


def _metis(
    graph: Sequence[Sequence[int]], rows: Sequence[int], batch_size: int, seed: int, keys: Sequence[int]
) -> list[list[int]]:
    try:
        import pymetis
    except ImportError as exc:
        raise ImportError("data.batch_partitioner=metis needs pymetis: pip install 'vlm2emb[metis]'") from exc
    rows = list(rows)
    n_parts = len(rows) // batch_size
    if n_parts <= 1:
        return _greedy(graph, rows, batch_size, seed, keys)
    local = {row: k for k, row in enumerate(rows)}
    adjacency = [[local[j] for j in graph[row] if j in local] for row in rows]
    _, parts = pymetis.part_graph(n_parts, adjacency=adjacency, options=pymetis.Options(seed=seed))
    by_part: dict[int, list[int]] = {}
    for k, p in enumerate(parts):
        by_part.setdefault(int(p), []).append(rows[k])
    rng = random.Random(seed)
    batches: list[list[int]] = []
    leftover: list[int] = []
    for p in sorted(by_part):
        members = by_part[p]
        rng.shuffle(members)
        whole, left = _cut_distinct(members, keys, batch_size)
        batches.extend(whole)
        leftover.extend(left)
    # The parts' remainders, shuffled together, make further batches of distinct positives.
    while leftover:
        rng.shuffle(leftover)
        more, rest = _cut_distinct(leftover, keys, batch_size)
        if not more:
            break
        batches.extend(more)
        leftover = rest
    return batches
