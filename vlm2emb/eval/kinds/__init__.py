"""Eval task kinds: name -> :class:`TaskKind`, one module per built-in kind.

A kind owns its spec (the typed task keys), their value checks, loading and scoring,
including how the suite's default instructions apply to it. The suite loader and the
harness reach a kind only through :func:`get_task_kind`.

Built-in kinds are listed in :data:`_BUILTIN_MODULES` and imported on first lookup. Others
are added at run time with :func:`register_task_kind` (and removed with
:func:`unregister_task_kind`)::

    from vlm2emb.eval.kinds import TaskKind, register_task_kind

    register_task_kind(MyKind())   # suites may now say kind: my-kind
"""

from __future__ import annotations

import importlib

from vlm2emb.eval.kinds.base import (
    DEFAULT_KIND,
    FALLBACKS,
    PATH,
    InstructionDefaults,
    TaskKind,
    TaskSpec,
)

__all__ = [
    "DEFAULT_KIND",
    "FALLBACKS",
    "PATH",
    "InstructionDefaults",
    "TaskKind",
    "TaskSpec",
    "get_task_kind",
    "register_task_kind",
    "task_kind_names",
    "unregister_task_kind",
]

# Built-in kinds: one line each, kind name -> module defining ``KIND``.
_BUILTIN_MODULES: dict[str, str] = {
    "local": "vlm2emb.eval.kinds.local",
    "corpus": "vlm2emb.eval.kinds.corpus",
    "beir": "vlm2emb.eval.kinds.beir",
    "mmeb-video": "vlm2emb.eval.kinds.mmeb_video",
    "pending": "vlm2emb.eval.kinds.pending",
}

_registered: dict[str, TaskKind] = {}  # kinds added with register_task_kind
_loaded: dict[str, TaskKind] = {}  # built-in kinds imported so far


def task_kind_names() -> tuple[str, ...]:
    """Every known kind: the built-in ones, then the registered ones in order."""
    return (*_BUILTIN_MODULES, *_registered)


def get_task_kind(name: str) -> TaskKind:
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
    raise ValueError(f"unknown eval task kind {name!r}; known kinds: {', '.join(task_kind_names())}")


def register_task_kind(kind: TaskKind) -> TaskKind:
    """Adds ``kind`` under ``kind.name``; returns it.

    Raises:
        TypeError: ``kind`` is not a :class:`TaskKind` instance or its ``spec`` does not
            derive from :class:`TaskSpec`.
        ValueError: The name is empty or already taken (built-in or registered).
    """
    if not isinstance(kind, TaskKind):
        raise TypeError(f"register_task_kind: expected a TaskKind instance, got {type(kind).__name__}")
    if not isinstance(kind.spec, type) or not issubclass(kind.spec, TaskSpec):
        raise TypeError(f"register_task_kind: {type(kind).__name__}.spec must be a TaskSpec subclass")
    name = kind.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task_kind: {type(kind).__name__}.name must be a non-empty string")
    if name in _BUILTIN_MODULES or name in _registered:
        raise ValueError(f"eval task kind {name!r} is already registered")
    _registered[name] = kind
    return kind


def unregister_task_kind(name: str) -> None:
    """Removes a kind added with :func:`register_task_kind` (built-in kinds stay).

    Raises:
        ValueError: ``name`` is built in or was not registered.
    """
    if name in _BUILTIN_MODULES:
        raise ValueError(f"eval task kind {name!r} is built in and cannot be unregistered")
    if name not in _registered:
        raise ValueError(f"eval task kind {name!r} is not registered")
    del _registered[name]
