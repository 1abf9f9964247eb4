"""Row operations on what the model's forward returns, for the training step.

The step (:class:`vlm2emb.gradcache.ContrastiveStep`) concatenates the embeddings of
several chunks, puts rows back in order, turns them into GradCache leaves, groups hard
negatives per row and builds the surrogate ``sum(embedding * cached gradient)``. The
forward returns a plain ``[B, d]`` tensor for a single-vector model and a
:class:`vlm2emb.multivector.MultiVectorEmbeddings` when the model has a multi-vector head.

Each operation here is a :func:`functools.singledispatch` function: tensors are registered
below, and any other output type provides the matching methods (``cat_rows``,
``take_rows``, ``as_leaf``, ``grad_dot``, ``grouped``, ``dense_part``), so the step never branches on
what kind of embedding it holds.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_leaf", "cat_rows", "dense_part", "grad_dot", "grouped", "take_rows"]


def cat_rows(parts: Sequence[Any]) -> Any:
    """Concatenates chunks' embeddings along the rows (at least one part)."""
    return _cat(parts[0], parts)


@functools.singledispatch
def _cat(first: Any, parts: Sequence[Any]) -> Any:
    return type(first).cat_rows(parts)


@_cat.register
def _(first: Tensor, parts: Sequence[Tensor]) -> Tensor:
    return torch.cat(list(parts))  # [sum b, d]


@functools.singledispatch
def take_rows(x: Any, index: Tensor) -> Any:
    """The rows ``index`` (a [n] int64 tensor) of ``x``."""
    return x.take_rows(index)


@take_rows.register
def _(x: Tensor, index: Tensor) -> Tensor:
    return x[index.to(x.device)]


@functools.singledispatch
def as_leaf(x: Any) -> Any:
    """``x`` detached, its floating-point parts requiring grad (GradCache's leaves)."""
    return x.as_leaf()


@as_leaf.register
def _(x: Tensor) -> Tensor:
    return x.detach().requires_grad_()


@functools.singledispatch
def grad_dot(out: Any, leaf: Any) -> Tensor:
    """[] ``sum(out * leaf.grad)`` over every part of ``leaf`` that got a gradient.

    Its backward puts the cached gradient of ``leaf`` into the graph that produced ``out``.
    """
    return out.grad_dot(leaf)


@grad_dot.register
def _(out: Tensor, leaf: Tensor) -> Tensor:
    if leaf.grad is None:  # the loss did not read these rows
        return out.sum() * 0.0
    return (out * leaf.grad).sum()


@functools.singledispatch
def dense_part(x: Any) -> Any:
    """The single-vector embeddings inside ``x`` (what a loss over single vectors reads)."""
    return x.dense_part()


@dense_part.register
def _(x: Tensor) -> Tensor:
    return x


@dense_part.register(type(None))
def _(x: None) -> None:
    return None


@functools.singledispatch
def grouped(flat: Any, local_mask: Tensor, padded: bool) -> Any:
    """Hard negatives in row order -> grouped ``[b, K, ...]`` by the row they belong to.

    Args:
        flat: The real negatives only (``[n_real, ...]``, placed by ``local_mask``), or,
            when ``padded``, all ``b * K`` slots.
        local_mask: [b, K] bool, True = a real negative.
        padded: Whether ``flat`` holds every slot.
    """
    return flat.grouped(local_mask, padded)


@grouped.register
def _(flat: Tensor, local_mask: Tensor, padded: bool) -> Tensor:
    b, k = local_mask.shape
    if padded:
        return flat.view(b, k, flat.shape[-1])
    out = flat.new_zeros(b, k, flat.shape[-1])  # [b, K, d]
    out[local_mask.to(flat.device)] = flat
    return out
