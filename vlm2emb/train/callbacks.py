"""Hooks into a training run for research code (``vlm2emb.train(..., callbacks=[...])``).

A callback is any object with some of the methods of :class:`TrainerCallback`; a missing
method is simply not called. Hooks run on every process (a multi-process run calls each
process's callbacks), right after the event, inside the training loop: keep them cheap, and
write files only where ``state.is_main_process``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainerState:
    """What a hook sees.

    Attributes:
        step: The optimizer step just finished (0 before training).
        max_steps: The run's last step.
        steps_per_epoch: Global batches in one pass over the training rows (None when
            streaming).
        loss: This process's loss of ``step`` (None in ``on_evaluate`` / ``on_save``, and
            for a skipped non-finite step).
        record: The ``metrics.jsonl`` record written at ``step``, or None (not a log step).
        is_main_process: True on the process that writes the run's files.
        model: The (unwrapped) :class:`vlm2emb.EmbeddingModel` being trained.
        output_dir: The run's output folder.
    """

    step: int
    max_steps: int
    steps_per_epoch: int | None
    is_main_process: bool
    model: Any
    output_dir: Path
    loss: float | None = None
    record: dict[str, Any] | None = field(default=None)

    @property
    def epoch(self) -> float | None:
        """Passes over the training rows so far (None when streaming)."""
        return self.step / self.steps_per_epoch if self.steps_per_epoch else None


class TrainerCallback:
    """Base class with every hook as a no-op; override the ones you need."""

    def on_step_end(self, state: TrainerState) -> None:
        """After every optimizer step (skipped non-finite steps included, ``loss`` None)."""

    def on_evaluate(self, state: TrainerState, report: dict[str, Any]) -> None:
        """After each evaluation on ``data.eval``: before training (step 0), every
        ``train.eval_steps`` and after the last step. ``report`` is the eval report
        (``report["average"]["hit@1"]``, ``report["tasks"][name]``)."""

    def on_save(self, state: TrainerState, path: Path) -> None:
        """After a checkpoint, ``best/`` or ``final/`` is complete on disk at ``path``."""


def call(callbacks: list[Any], hook: str, *args: Any) -> None:
    """Calls ``hook`` on every callback that has it, in order."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)
