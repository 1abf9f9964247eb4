"""Backbone adapters, one module per VLM family, looked up through the registry."""

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.registry import (
    available_families,
    get_adapter_class,
    register_backbone,
    unregister_backbone,
)

__all__ = [
    "BackboneAdapter",
    "available_families",
    "get_adapter_class",
    "register_backbone",
    "unregister_backbone",
]
