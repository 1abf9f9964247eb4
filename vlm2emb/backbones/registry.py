"""Registry mapping backbone family names and transformers ``model_type`` values to adapters.

Each family is registered once. The families that ship with vlm2emb are the lines of
:data:`_FAMILIES` (family name -> ``"module:AdapterClass"``): adding one is one new file under
``vlm2emb/backbones/`` plus one line there. Modules are imported lazily: looking up a family
name imports that family's module only; looking up a ``model_type`` (or listing what the
families can do) imports all of them. Families defined outside the package are added with
:func:`register_backbone` (and removed with :func:`unregister_backbone`).

Family names and ``model_type`` values share one namespace: a family may serve the
``model_type`` that equals its own name, but no name may mean two families. Every clash is a
``ValueError`` naming both sides.

This module imports no adapter code at import time (``BackboneAdapter`` only for type
checking), so :mod:`vlm2emb.backbones.base` may use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.backbones.base import BackboneAdapter

# family name -> "module:AdapterClass". The one list of the built-in families: adding a
# family is one new file under vlm2emb/backbones/ plus one line here.
_FAMILIES: dict[str, str] = {
    "qwen2_vl": "vlm2emb.backbones.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "vlm2emb.backbones.qwen2_5_vl:Qwen2_5VLAdapter",
    "qwen3_vl": "vlm2emb.backbones.qwen3_vl:Qwen3VLAdapter",
    "llava": "vlm2emb.backbones.llava:LlavaAdapter",
    "llava_next": "vlm2emb.backbones.llava_next:LlavaNextAdapter",
    "llava_onevision": "vlm2emb.backbones.llava_onevision:LlavaOnevisionAdapter",
    "idefics3": "vlm2emb.backbones.idefics3:Idefics3Adapter",
    "smolvlm": "vlm2emb.backbones.smolvlm:SmolVLMAdapter",
    "paligemma": "vlm2emb.backbones.paligemma:PaliGemmaAdapter",
    "gemma3": "vlm2emb.backbones.gemma3:Gemma3Adapter",
    "internvl": "vlm2emb.backbones.internvl:InternVLAdapter",
    "diffusion_gemma": "vlm2emb.backbones.diffusion_gemma:DiffusionGemmaAdapter",
    "masked_diffusion": "vlm2emb.backbones.masked_diffusion:MaskedDiffusionAdapter",
}

_ADAPTERS: dict[str, type[BackboneAdapter]] = {}  # family -> adapter class (loaded or registered)
_MODEL_TYPES: dict[str, str] = {}  # model_type -> family, for the loaded and registered families


def _check_names(adapter_cls: type[BackboneAdapter]) -> tuple[str, tuple[str, ...]]:
    """The class's ``(family, model_types)``, refusing anything the registry cannot index."""
    family = getattr(adapter_cls, "family", None)
    model_types = getattr(adapter_cls, "model_types", None)
    if not isinstance(adapter_cls, type) or not isinstance(family, str) or not family:
        raise ValueError(f"register_backbone: {adapter_cls!r} is not an adapter class with a family name")
    if not isinstance(model_types, tuple) or not all(isinstance(t, str) and t for t in model_types):
        raise ValueError(
            f"register_backbone: {adapter_cls.__qualname__}.model_types must be a tuple of strings, "
            f"got {model_types!r}"
        )
    return family, model_types


def _index(adapter_cls: type[BackboneAdapter], family: str, model_types: tuple[str, ...]) -> None:
    """Adds a family's class and model types, refusing any name another family already has."""
    for model_type in model_types:
        owner = _MODEL_TYPES.get(model_type)
        if owner is not None and owner != family:
            raise ValueError(
                f"backbone families {owner!r} and {family!r} both serve model_type {model_type!r}"
            )
        if model_type != family and (model_type in _FAMILIES or model_type in _ADAPTERS):
            raise ValueError(
                f"backbone family {family!r} serves model_type {model_type!r}, "
                f"which is the name of another family"
            )
    _ADAPTERS[family] = adapter_cls
    _MODEL_TYPES.update(dict.fromkeys(model_types, family))


def _load_family(family: str) -> type[BackboneAdapter]:
    """Imports a built-in family's module and indexes its adapter class (once)."""
    if family in _ADAPTERS:
        return _ADAPTERS[family]
    module_name, _, class_name = _FAMILIES[family].partition(":")
    adapter_cls = getattr(importlib.import_module(module_name), class_name)
    found, model_types = _check_names(adapter_cls)
    if found != family:
        raise ValueError(
            f"backbone registry: {_FAMILIES[family]} is listed as family {family!r} "
            f"but its family is {found!r}"
        )
    _index(adapter_cls, family, model_types)
    return adapter_cls


def _load_all() -> None:
    for family in _FAMILIES:
        _load_family(family)


def register_backbone(adapter_cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Registers an adapter class defined outside vlm2emb (usable as a class decorator).

    The class is found under its ``family`` and under every ``model_type`` it serves, by
    :func:`get_adapter_class`, ``EmbeddingModel.from_pretrained`` (a saved model's
    ``vlm2emb_config.json`` names the family) and ``tiny:FAMILY``. Built-in families are
    not registered this way: they are the lines of this module's table.

    Raises:
        ValueError: The family name is taken (built-in or registered), or one of its
            ``model_types`` is served by, or is the name of, another family.
    """
    family, model_types = _check_names(adapter_cls)
    if family in _FAMILIES or family in _ADAPTERS:
        where = (
            "a built-in family" if family in _FAMILIES else f"registered by {_ADAPTERS[family].__qualname__}"
        )
        raise ValueError(f"register_backbone: family {family!r} is already {where}")
    _load_all()  # the built-in families' model types, to refuse a clash with them
    _index(adapter_cls, family, model_types)
    return adapter_cls


def unregister_backbone(family: str) -> None:
    """Removes a family added with :func:`register_backbone`.

    Raises:
        ValueError: ``family`` is a built-in family.
        KeyError: No family of that name is registered.
    """
    if family in _FAMILIES:
        raise ValueError(f"unregister_backbone: {family!r} is a built-in family")
    if family not in _ADAPTERS:
        raise KeyError(f"unregister_backbone: no registered backbone family {family!r}")
    del _ADAPTERS[family]
    for model_type in [t for t, owner in _MODEL_TYPES.items() if owner == family]:
        del _MODEL_TYPES[model_type]


def get_adapter_class(name: str) -> type[BackboneAdapter]:
    """Returns the adapter for a family name or transformers ``model_type``.

    A family name imports that family's module only; any other name imports every family
    to find the one that serves it.

    Raises:
        KeyError: With the list of supported names when ``name`` is unknown.
    """
    if name in _ADAPTERS:
        return _ADAPTERS[name]
    if name in _FAMILIES:
        return _load_family(name)
    _load_all()
    if name not in _MODEL_TYPES:
        raise KeyError(
            f"no vlm2emb backbone adapter for model type {name!r}; supported: {', '.join(available_families())}"
        )
    return _ADAPTERS[_MODEL_TYPES[name]]


def available_families() -> list[str]:
    """Names of all backbone families, built-in and registered (imports none of them)."""
    return sorted({*_FAMILIES, *_ADAPTERS})


def packing_families() -> list[str]:
    """Names of the families whose adapters run packed batches (``supports_packing``)."""
    _load_all()
    return sorted(family for family, cls in _ADAPTERS.items() if cls.supports_packing)
