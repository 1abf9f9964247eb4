"""The model-kind protocol: what the training loop asks of the kind of model it trains.

The loop (:mod:`vlm2emb.train.loop`) owns everything a run shares whatever it trains:
processes (DDP, DeepSpeed), the batch plan, the optimizer and schedule, checkpoints and
resume, logging, trackers, callbacks, the bad-row policy. A kind owns the rest: which
recipe keys apply, how the model loads, how a global batch of rows becomes this process's
inputs, the step's loss, and how the model is written. ``model.kind`` in the recipe picks
one from the registry (:mod:`vlm2emb.train.kinds`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.train.config import RecipeConfig

__all__ = ["ModelKind", "TrainingStep", "refuse_non_default"]

SyncContext = Callable[[bool], Any]
BackwardFn = Callable[[torch.Tensor, bool], None]


class TrainingStep(ABC):
    """One optimizer step's loss and backward, as the loop drives it.

    Attributes:
        last_accuracy: [] share of this process's queries ranked first by the last
            :meth:`forward_loss` (None: the kind has no such number).
    """

    last_accuracy: torch.Tensor | None = None

    @abstractmethod
    def forward_loss(self, batch: Any, sync_context: SyncContext | None = None) -> torch.Tensor:
        """The [] loss of this process's part of the global batch, with a graph."""

    def backward(
        self, loss: torch.Tensor, backward: BackwardFn, sync_context: SyncContext | None = None
    ) -> None:
        """Gradients into the parameters: ``backward(tensor, sync)`` backpropagates once."""
        backward(loss, True)

    def discard(self) -> None:
        """Drops what :meth:`forward_loss` kept for a step that is not backpropagated."""
        return None  # a step that keeps nothing between its two phases has nothing to drop


class ModelKind(ABC):
    """What ``model.kind`` selects. Methods get the running trainer for the run's context
    (``trainer.cfg``, ``trainer.accelerator``, ``trainer.train_examples``, ``trainer.media``).

    Attributes:
        name: The ``model.kind`` value.
    """

    name: str = ""

    @abstractmethod
    def check_recipe(self, cfg: RecipeConfig) -> None:
        """Refuses recipe keys that do not apply to this kind.

        Raises:
            ConfigError: One line naming the key.
        """

    @abstractmethod
    def prepare_rows(self, trainer: Any) -> None:
        """Called once the rows are loaded, before the model: builds the objective
        (``trainer.loss_fn``) and refuses rows it cannot learn from (``ConfigError``)."""

    @abstractmethod
    def load_model(self, trainer: Any, name_or_path: str) -> torch.nn.Module:
        """The model to train, on the accelerator's device (``name_or_path`` already
        resolves a ``tiny:`` name to a folder when several processes share it)."""

    @abstractmethod
    def preflight_prepare(
        self, model: torch.nn.Module
    ) -> Callable[[list[dict[str, Any]], list[str | None]], Any]:
        """``prepare(items, instructions)`` for :func:`vlm2emb.data.check.preflight_filter`:
        the processing a training batch applies to items, raising on what it cannot take."""

    @abstractmethod
    def collator(self, trainer: Any, model: torch.nn.Module) -> Callable[[Sequence[Any]], Any]:
        """rows of a global batch -> this process's batch (runs in DataLoader workers, so it
        holds no weights). The batch has ``chunks`` (a list of input dicts) and
        ``real_tokens()``, read for throughput."""

    @abstractmethod
    def training_step(self, trainer: Any, model: torch.nn.Module, *, probe: bool = False) -> TrainingStep:
        """The step over ``model`` (prepared, i.e. DDP/DeepSpeed-wrapped, or bare).

        With ``probe`` the loop only runs :meth:`TrainingStep.forward_loss` to find which
        parameters a step reaches (DDP's unused-parameter search), so the loss must have a
        graph to the weights (no cached-gradient form). Any object with
        :class:`TrainingStep`'s methods will do.
        """

    @abstractmethod
    def evaluate(self, trainer: Any, model: torch.nn.Module, examples: list[Any]) -> dict[str, Any]:
        """Scores ``data.eval``'s local-candidate rows (:class:`~vlm2emb.data.schema.EvalExample`)
        with the unwrapped model, on every process.

        Returns:
            ``{"tasks": {task: {metric: value, ..., "n": queries}}, "average": {metric: value,
            ..., "n_tasks": n}}``, the form of :func:`vlm2emb.eval.evaluate` (metric names of
            :func:`vlm2emb.eval.metrics.metric_names` for k in 1, 5, 10).
        """

    @abstractmethod
    def save_model(
        self, model: torch.nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None
    ) -> None:
        """Writes the (unwrapped) model to ``directory`` (main process only). ``state_dict``
        is the gathered full state (the weights themselves may be ZeRO-3 partitions)."""


def refuse_non_default(cfg: Any, keys: Sequence[str], why: str) -> None:
    """Raises a ConfigError for the first dotted key of ``keys`` set away from its default.

    Args:
        cfg: The recipe (a dataclass tree).
        keys: Dotted names, e.g. ``train.loss``.
        why: The end of the message (which kind, what to do instead).

    Raises:
        ConfigError: Naming the key and its value.
    """
    from vlm2emb._typed_config import ConfigError

    for key in keys:
        *path, last = key.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        default_section = type(section)()
        value, default = getattr(section, last), getattr(default_section, last)
        if value != default:
            raise ConfigError(f"{key}: {value!r} {why}")


def section_keys(section: Any, prefix: str) -> list[str]:
    """Every dotted key of a dataclass section (for :func:`refuse_non_default`)."""
    return [f"{prefix}.{f.name}" for f in dataclasses.fields(section)]
