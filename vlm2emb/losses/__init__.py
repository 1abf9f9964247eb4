"""Training objectives: one file per loss, selected by the recipe key ``train.loss``.

Adding a loss is one new file (a :class:`ContrastiveLoss` subclass with a ``from_config``
factory) plus one line in ``_BUILTIN`` below; code outside the package calls
:func:`register_loss` instead. The training step calls the loss's
:meth:`~ContrastiveLoss.training_loss` with the model's temperature (the model owns it).

``train.matryoshka_dims`` wraps whichever loss is selected in :class:`MatryoshkaLoss`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vlm2emb.losses.base import ContrastiveLoss
from vlm2emb.losses.infonce import InfoNCELoss, info_nce_loss
from vlm2emb.losses.matryoshka import MatryoshkaLoss

__all__ = [
    "ContrastiveLoss",
    "InfoNCELoss",
    "MatryoshkaLoss",
    "available_losses",
    "build_loss",
    "content_keys",
    "get_loss",
    "info_nce_loss",
    "register_loss",
    "unregister_loss",
]

LossFactory = Callable[[Any], ContrastiveLoss]  # the recipe's ``train`` section -> the loss

# name -> "module:factory" of the losses shipped with vlm2emb, imported on first use.
_BUILTIN: dict[str, str] = {
    "infonce": "vlm2emb.losses.infonce:InfoNCELoss.from_config",
    "distill": "vlm2emb.losses.distill:DistillationLoss.from_config",
    "maxsim": "vlm2emb.losses.maxsim:MaxSimLoss.from_config",
}
_REGISTERED: dict[str, LossFactory] = {}


def register_loss(name: str, factory: LossFactory) -> LossFactory:
    """Makes a loss selectable as ``train.loss: NAME``.

    Args:
        name: The recipe name.
        factory: Builds the loss from the recipe's ``train`` section
            (:class:`vlm2emb.train.config.TrainConfig`; its ``loss_args`` mapping holds the
            loss's own settings). A ``ContrastiveLoss`` subclass with a ``from_config``
            classmethod passes ``MyLoss.from_config``.

    Returns:
        ``factory`` (so it can be used as a decorator on a factory function).

    Raises:
        ValueError: ``name`` is already registered (built-in or not).

    Example:
        >>> from vlm2emb.losses import InfoNCELoss, register_loss, unregister_loss
        >>> _ = register_loss("infonce_sym", lambda train: InfoNCELoss(symmetric=True))
        >>> unregister_loss("infonce_sym")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")
    if name in _BUILTIN or name in _REGISTERED:
        raise ValueError(f"loss {name!r} is already registered")
    if not callable(factory):
        raise ValueError(f"loss {name!r}: the factory must be callable, got {type(factory).__name__}")
    _REGISTERED[name] = factory
    return factory


def unregister_loss(name: str) -> None:
    """Removes a loss added with :func:`register_loss` (built-in losses stay).

    Raises:
        KeyError: ``name`` was not added with :func:`register_loss`.
    """
    if name not in _REGISTERED:
        raise KeyError(f"loss {name!r} was not registered with register_loss")
    del _REGISTERED[name]


def available_losses() -> list[str]:
    """Names ``train.loss`` accepts."""
    return sorted({*_BUILTIN, *_REGISTERED})


def get_loss(name: str) -> LossFactory:
    """The factory registered under ``name``.

    Raises:
        KeyError: With the list of known losses.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise KeyError(f"unknown loss {name!r}; choose one of {', '.join(available_losses())}")
    module, _, attr = _BUILTIN[name].partition(":")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def build_loss(train: Any, *, normalize: bool = True) -> ContrastiveLoss:
    """The objective a recipe's ``train`` section asks for.

    Args:
        train: The recipe's ``train`` section (``loss``, ``loss_args``, ``matryoshka_dims``...).
        normalize: Whether the model L2-normalises (Matryoshka prefixes are re-normalised).

    Raises:
        KeyError: Unknown ``train.loss``.
        TypeError: The factory did not return a :class:`ContrastiveLoss`.
    """
    loss = get_loss(train.loss)(train)
    if not isinstance(loss, ContrastiveLoss):
        raise TypeError(
            f"train.loss {train.loss!r}: the factory returned {type(loss).__name__}, not a ContrastiveLoss"
        )
    if train.matryoshka_dims:
        loss = MatryoshkaLoss(
            loss, train.matryoshka_dims, train.matryoshka_weights or None, normalize=normalize
        )
    return loss


def __getattr__(name: str) -> Any:
    # content_keys moved to vlm2emb.data.keys (a data job); the old import path still works.
    if name == "content_keys":
        from vlm2emb.data.keys import content_keys

        return content_keys
    raise AttributeError(f"module 'vlm2emb.losses' has no attribute {name!r}")
