"""Model kinds the trainer trains: ``model.kind`` -> :class:`ModelKind`.

Built-in kinds are listed in :data:`_BUILTIN_MODULES` (one line each) and imported on first
lookup, so the embedder's trainer never imports the reranker and the other way round.
Others are added with :func:`register_model_kind` and removed with
:func:`unregister_model_kind`::

    from vlm2emb.train.kinds import ModelKind, register_model_kind

    register_model_kind(MyKind())   # recipes may now say model.kind: my-kind
"""

from __future__ import annotations

import importlib

from vlm2emb.train.kinds.base import ModelKind, TrainingStep, refuse_non_default

__all__ = [
    "DEFAULT_MODEL_KIND",
    "ModelKind",
    "TrainingStep",
    "get_model_kind",
    "model_kind_names",
    "refuse_non_default",
    "register_model_kind",
    "unregister_model_kind",
]

DEFAULT_MODEL_KIND = "embedder"

# Built-in kinds: kind name -> module defining ``KIND``.
_BUILTIN_MODULES: dict[str, str] = {
    "embedder": "vlm2emb.train.kinds.embedder",
    "reranker": "vlm2emb.rerank.kind",
}

_registered: dict[str, ModelKind] = {}
_loaded: dict[str, ModelKind] = {}


def model_kind_names() -> tuple[str, ...]:
    """Every known kind: the built-in ones, then the registered ones in order."""
    return (*_BUILTIN_MODULES, *_registered)


def get_model_kind(name: str) -> ModelKind:
    """The kind registered as ``name``.

    Raises:
        ValueError: Unknown name; the one-line message lists the known kinds.
    """
    if name in _registered:
        return _registered[name]
    if name in _BUILTIN_MODULES:
        if name not in _loaded:
            kind = importlib.import_module(_BUILTIN_MODULES[name]).KIND
            if kind.name != name:  # pragma: no cover - a mistake in the table above
                raise ValueError(f"{_BUILTIN_MODULES[name]} defines kind {kind.name!r}, not {name!r}")
            _loaded[name] = kind
        return _loaded[name]
    raise ValueError(f"unknown model kind {name!r}; known kinds: {', '.join(model_kind_names())}")


def register_model_kind(kind: ModelKind) -> ModelKind:
    """Adds ``kind`` under ``kind.name``; returns it.

    Raises:
        TypeError: ``kind`` is not a :class:`ModelKind` instance.
        ValueError: The name is empty or already taken (built-in or registered).
    """
    if not isinstance(kind, ModelKind):
        raise TypeError(f"register_model_kind: expected a ModelKind instance, got {type(kind).__name__}")
    name = kind.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model_kind: {type(kind).__name__}.name must be a non-empty string")
    if name in _BUILTIN_MODULES or name in _registered:
        raise ValueError(f"model kind {name!r} is already registered")
    _registered[name] = kind
    return kind


def unregister_model_kind(name: str) -> None:
    """Removes a kind added with :func:`register_model_kind` (built-in kinds stay).

    Raises:
        ValueError: ``name`` is built in or was not registered.
    """
    if name in _BUILTIN_MODULES:
        raise ValueError(f"model kind {name!r} is built in and cannot be unregistered")
    if name not in _registered:
        raise ValueError(f"model kind {name!r} is not registered")
    del _registered[name]
