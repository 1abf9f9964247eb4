"""Typed dataclasses filled from YAML mappings: the one configuration mechanism.

Recipes (:mod:`vlm2emb.train.config`) and eval suites (:mod:`vlm2emb.eval.suite`) both
declare every key they accept as a dataclass field and build their values with
:func:`build_dataclass`:

- every value is converted to the field's declared type (``int``, ``float``, ``bool``,
  ``str``, ``list[...]``, ``X | None``, a nested dataclass), or the error names the key;
- an unknown key is an error that names it and lists the valid ones, so a typo never
  silently falls back to a default;
- a field without a default is required;
- a field with ``metadata={"key": False}`` is filled by the program, not read from the file.

Value checks that the types alone do not express (ranges, choices) stay with the owner of
each dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

import yaml

__all__ = ["ConfigError", "build_dataclass", "config_keys", "required_keys"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file at fault."""


def config_keys(cls: type) -> list[str]:
    """The keys a file may hold for ``cls``: its fields, less those marked ``key: False``."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def required_keys(cls: type) -> list[str]:
    """The keys of ``cls`` without a default, in field order."""
    return [
        f.name
        for f in dataclasses.fields(cls)
        if f.metadata.get("key", True)
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return Union[tuple(args)], optional  # noqa: UP007 - a runtime-built union
    return tp, False


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Converts a YAML (or override-string) value to the field's declared type."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    if dataclasses.is_dataclass(inner):
        # A nested section given as true/false (model.lora: true) means defaults / off.
        if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
            on = value if isinstance(value, bool) else value.lower() == "true"
            if not optional and not on:
                raise ConfigError(f"{key}: cannot be disabled")
            return inner() if on else None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(inner, value, key)
    if typing.get_origin(inner) in (Union, types.UnionType):
        # str | list[str]: a list stays a list, anything else is the string form.
        if isinstance(value, list):
            return coerce(key, list[str], value)
        return coerce(key, str, value)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # YAML reads an override "=1" as int
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if inner is float:
        # PyYAML reads "1e-4" (no dot) as a string, so strings are parsed here too.
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        if isinstance(value, bool):
            # YAML 1.1 reads yes/no/on/off/true/false as booleans; "True" is rarely meant.
            raise ConfigError(
                f"{key}: expected a string, got the boolean {str(value).lower()} (quote it in YAML)"
            )
        return str(value)
    if typing.get_origin(inner) is dict:
        if isinstance(value, str) and value.startswith("{"):
            value = yaml.safe_load(value)  # an override: train.loss_args={margin: 0.2}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): v for k, v in value.items()}
    if typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner)
        if isinstance(value, str):
            # Overrides pass lists as "a,b" or "[a, b]".
            parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
            value = parsed
        if not isinstance(value, list):
            value = [value]
        return [coerce(f"{key}[{i}]", elem, v) for i, v in enumerate(value)]
    raise ConfigError(f"{key}: unsupported field type {tp}")  # pragma: no cover


def build_dataclass(
    cls: type,
    data: Mapping[str, Any],
    prefix: str = "",
    *,
    converters: Mapping[str, Callable[[str, Any], Any]] | None = None,
) -> Any:
    """Builds ``cls`` from a mapping, converting every value to its field's type.

    Args:
        cls: The dataclass.
        data: Raw values (from YAML).
        prefix: Dotted name of this section, for messages (``model.lora``).
        converters: Field name -> ``fn(full_key, value)`` for fields whose value is built
            by the caller instead of by type (a list of differently typed entries).

    Raises:
        ConfigError: Unknown key, missing required key or a value of the wrong type; the
            message names the (dotted) key.
    """
    hints = _field_types(cls)
    names = config_keys(cls)
    converters = converters or {}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {full!r}; valid keys here: {', '.join(names)}")
        convert = converters.get(key)
        kwargs[key] = convert(full, value) if convert else coerce(full, hints[key], value)
    for key in required_keys(cls):
        if key not in kwargs:
            full = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"missing key {full!r}")
    return cls(**kwargs)
