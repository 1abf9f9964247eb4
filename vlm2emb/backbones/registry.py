"""Registry mapping transformers ``model_type`` values and family names to adapters."""

from __future__ import annotations

import importlib

from vlm2emb.backbones.base import BackboneAdapter

# family name -> module that defines (and registers) its adapter. Adding a family is one
# new file under vlm2emb/backbones/ plus one line here; modules import lazily on lookup.
_FAMILY_MODULES: dict[str, str] = {
    "qwen2_vl": "vlm2emb.backbones.qwen2_vl",
    "diffusion_gemma": "vlm2emb.backbones.diffusion_gemma",
    "masked_diffusion": "vlm2emb.backbones.masked_diffusion",
    "qwen2_5_vl": "vlm2emb.backbones.qwen2_5_vl",
    "qwen3_vl": "vlm2emb.backbones.qwen3_vl",
    "llava": "vlm2emb.backbones.llava",
    "llava_next": "vlm2emb.backbones.llava_next",
    "llava_onevision": "vlm2emb.backbones.llava_onevision",
    "idefics3": "vlm2emb.backbones.idefics3",
    "smolvlm": "vlm2emb.backbones.smolvlm",
    "paligemma": "vlm2emb.backbones.paligemma",
    "gemma3": "vlm2emb.backbones.gemma3",
    "internvl": "vlm2emb.backbones.internvl",
}

_ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register_backbone(adapter_cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    """Class decorator: registers an adapter under its family and every model_type it serves."""
    for key in (adapter_cls.family, *adapter_cls.model_types):
        _ADAPTERS[key] = adapter_cls
    return adapter_cls


def _load_all() -> None:
    for module in _FAMILY_MODULES.values():
        importlib.import_module(module)


def get_adapter_class(name: str) -> type[BackboneAdapter]:
    """Returns the adapter for a family name or transformers ``model_type``.

    Raises:
        KeyError: With the list of supported names when ``name`` is unknown.
    """
    if name not in _ADAPTERS:
        if name in _FAMILY_MODULES:
            importlib.import_module(_FAMILY_MODULES[name])
        else:
            _load_all()
    if name not in _ADAPTERS:
        raise KeyError(
            f"no vlm2emb backbone adapter for model type {name!r}; supported: {', '.join(available_families())}"
        )
    return _ADAPTERS[name]


def available_families() -> list[str]:
    """Names of all registered backbone families."""
    return sorted(_FAMILY_MODULES)


def packing_families() -> list[str]:
    """Names of the families whose adapters run packed batches (``supports_packing``)."""
    _load_all()
    return sorted(family for family in _FAMILY_MODULES if _ADAPTERS[family].supports_packing)
