"""The reranker's training objective: listwise softmax cross-entropy over each query's group."""

from __future__ import annotations

import torch
from torch import Tensor


def listwise_softmax_loss(scores: Tensor, mask: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of the positive against its group: ``-log softmax(scores / t)[:, 0]``.

    Each query's group is its positive (column 0) followed by its negatives; the reranker's
    scores are already logits (``logit(yes) - logit(no)``), so the default temperature is 1.

    Args:
        scores: [Q, G] reranker scores, the positive in column 0.
        mask: [Q, G] bool, False where a query's group is shorter than G (those columns are
            left out of its softmax); column 0 must be True. None = every column counts.
        temperature: Scores are divided by it before the softmax.

    Returns:
        [] the mean loss over the Q queries (float32).

    Raises:
        ValueError: Wrong shapes, a non-positive temperature, or a masked-out positive.
    """
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [queries, group] with group >= 1, got {list(scores.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    logits = scores.float() / temperature  # [Q, G]
    if mask is not None:
        if mask.shape != scores.shape:
            raise ValueError(f"mask shape {list(mask.shape)} differs from scores shape {list(scores.shape)}")
        if not bool(mask[:, 0].all()):
            raise ValueError("mask: every query's positive (column 0) must be present")
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()
