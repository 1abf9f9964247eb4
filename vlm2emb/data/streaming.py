"""Streaming training data (``data.streaming: true``) for corpora larger than memory.

Rows are read lazily from every source (JSONL line by line, Parquet and ``datasets``
folders from their Arrow files), validated one at a time, shuffled through a seeded buffer
of ``data.shuffle_buffer`` rows, and grouped into global batches. Only the rows in the
buffer and the batch being built are in memory.

Across processes: every process reads the same stream (row metadata: text and media
references, cheap) and so forms the same global batches, the way
:class:`vlm2emb.data.sampler.GlobalBatchSampler` does in memory; the expensive work, media
decoding, preprocessing and the forward pass, is split: each process decodes and embeds
only its slice (the collator's ``rank`` rows). With DataLoader workers, worker ``w`` of
``n`` builds global batches ``w, w + n, ...``, which the DataLoader returns in order.

Mixing: with ``data.weights`` every next row comes from a source drawn with probability
proportional to its weight (a source that runs out starts over); without weights the
sources are read one after the other. ``data.homogeneous`` fills one pending batch per
dataset and emits whichever is full first. Each pass over the data (an epoch) reshuffles
with ``seed + epoch``. Length grouping needs the whole epoch and is not available here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlm2emb.data.errors import DataReport
from vlm2emb.data.media import MediaOptions
from vlm2emb.data.schema import DataError, TrainExample, iter_source, train_row_builder


class StreamingTrainData(torch.utils.data.IterableDataset):
    """An endless stream of global batches (lists of :class:`TrainExample`).

    Args:
        specs: The ``data.train`` sources.
        batch_size: Global batch size.
        seed: Data-order seed.
        start_step: Global batches to skip (resuming re-reads the stream up to there).
        weights: Mixing weight per source (None = sources in order).
        homogeneous: Every global batch from one dataset.
        shuffle_buffer: Rows held for shuffling (1 = stream order).
        max_rows: Cap per source, as in :func:`vlm2emb.data.schema.load_train_examples`.
        report: Counts rows and skipped rows (complete with ``num_workers=0``).
        prepare: The model's batch preprocessing (``EmbeddingModel.collate``); when given,
            each row goes through it as it streams in (see
            :func:`vlm2emb.data.check.preflight`), so a row a batch would fail on is
            stopped at (``error``) or skipped before it joins a batch.
        query_instruction: Default query instruction, for ``prepare``.
        target_instruction: Default target instruction, for ``prepare``.
        Other arguments: see :func:`vlm2emb.data.schema.load_train_examples`.
    """

    def __init__(
        self,
        specs: list[str],
        batch_size: int,
        seed: int,
        *,
        start_step: int = 0,
        weights: list[float] | None = None,
        homogeneous: bool = False,
        shuffle_buffer: int = 10_000,
        max_rows: list[int] | None = None,
        media_root: str | Path | None = None,
        verify_images: bool = True,
        max_negatives: int | None = None,
        work_dir: str | Path | None = None,
        data_format: str = "auto",
        on_bad_example: str = "error",
        options: MediaOptions | None = None,
        report: DataReport | None = None,
        mmeb_negatives: bool = True,
        prepare: Any = None,
        query_instruction: str | None = None,
        target_instruction: str | None = None,
    ) -> None:
        super().__init__()
        from vlm2emb.data.sources import resolve_source

        for spec in specs:  # a missing file fails now, not at the first batch
            resolve_source(spec, work_dir)
        self.specs = list(specs)
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.weights = list(weights) if weights else None
        self.homogeneous = homogeneous
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.max_rows = max_rows
        self.report = report if report is not None else DataReport()
        self.build = train_row_builder(data_format, max_negatives, mmeb_negatives)
        self.prepare = prepare
        self.instructions = (query_instruction, target_instruction)
        self.on_bad_example = on_bad_example
        self.read_kwargs: dict[str, Any] = dict(
            media_root=media_root,
            verify_images=verify_images,
            options=options,
            work_dir=work_dir,
            on_bad_example=on_bad_example,
        )

    def _source(self, index: int) -> Iterator[TrainExample]:
        from vlm2emb.data.schema import _cap

        rows = iter_source(
            index,
            self.specs[index],
            "training",
            self.build,
            cap=_cap(self.max_rows, index),
            report=self.report,
            **self.read_kwargs,
        )
        return rows if self.prepare is None else self._prepared(rows)

    def _prepared(self, rows: Iterator[TrainExample]) -> Iterator[TrainExample]:
        """The rows that the batch preprocessing accepts (every process decides alike)."""
        from vlm2emb.data.check import preflight

        for row in rows:
            bad = preflight(
                [row],
                self.prepare,
                media=self.read_kwargs["options"],
                query_instruction=self.instructions[0],
                target_instruction=self.instructions[1],
            )
            if not bad:
                yield row
                continue
            if self.on_bad_example == "error":
                raise bad[0][1]
            self.report.used -= 1
            self.report.add_bad(bad[0][1])

    def _rows(self, epoch: int, rng: random.Random) -> Iterator[TrainExample]:
        """One epoch's rows, before shuffling."""
        if self.weights is None:
            for index in range(len(self.specs)):
                yield from self._source(index)
            return
        # Weighted interleave; the epoch ends when every source with weight > 0 ran out once.
        streams = {i: self._source(i) for i, w in enumerate(self.weights) if w > 0}
        finished: set[int] = set()
        while len(finished) < len(streams):
            index = rng.choices(list(streams), weights=[self.weights[i] for i in streams])[0]
            row = next(streams[index], None)
            if row is None:
                finished.add(index)
                streams[index] = self._source(index)  # start over (upsampling)
                row = next(streams[index], None)
                if row is None:
                    raise DataError(f"{self.specs[index]}: no usable training rows")
            yield row

    def _shuffled(self, epoch: int) -> Iterator[TrainExample]:
        rng = random.Random(self.seed + epoch)
        buffer: list[TrainExample] = []
        for row in self._rows(epoch, rng):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(row)
                continue
            # Emit a random buffered row and keep the new one in its place.
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = row
        rng.shuffle(buffer)
        yield from buffer

    def global_batches(self) -> Iterator[list[TrainExample]]:
        """Every global batch from step 0, endlessly (epoch after epoch)."""
        epoch = 0
        while True:
            pending: dict[str, list[TrainExample]] = {}
            emitted = 0
            for row in self._shuffled(epoch):
                key = row.dataset if self.homogeneous else ""
                group = pending.setdefault(key, [])
                group.append(row)
                if len(group) == self.batch_size:
                    yield group
                    emitted += 1
                    pending[key] = []
            if not emitted:
                raise DataError(
                    f"the training stream holds no full global batch of {self.batch_size} rows"
                    + (" from a single dataset (data.homogeneous)" if self.homogeneous else "")
                )
            epoch += 1  # incomplete batches are dropped, as in memory

    def __iter__(self) -> Iterator[list[TrainExample]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step, batch in enumerate(self.global_batches()):
            if step < self.start_step:
                continue
            if (step - self.start_step) % n_workers == worker:
                yield batch


def streaming_for(
    cfg: Any,
    start_step: int,
    options: MediaOptions,
    report: DataReport,
    work_dir: str | Path,
    prepare: Any = None,
) -> StreamingTrainData:
    """The stream a recipe asks for (``cfg`` is a ``RecipeConfig`` with ``data.streaming``).

    ``prepare`` (the model's ``collate``) checks each row as it streams in when
    ``data.verify_images`` is on.
    """
    data = cfg.data
    return StreamingTrainData(
        data.train,
        cfg.train.batch_size,
        cfg.seed,
        start_step=start_step,
        weights=data.weights or None,
        homogeneous=data.homogeneous,
        shuffle_buffer=data.shuffle_buffer,
        max_rows=data.max_rows,
        media_root=data.media_root,
        verify_images=data.verify_images,
        max_negatives=data.max_negatives,
        work_dir=work_dir,
        data_format=data.format,
        on_bad_example=data.on_bad_example,
        options=options,
        report=report,
        mmeb_negatives=data.mmeb_negatives,
        prepare=prepare if data.verify_images else None,
        query_instruction=data.query_instruction,
        target_instruction=data.target_instruction,
    )
