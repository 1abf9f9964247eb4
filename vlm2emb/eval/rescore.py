"""A second ranking of the same scored candidates, reported next to the first.

:func:`vlm2emb.eval.evaluate` and :func:`vlm2emb.eval.corpus.evaluate_corpus` take an
optional ``rescore`` callable. Where they have scored a block of queries against their
candidates, they hand it the score matrix and the items behind it; it returns new scores of
the same shape (for example: the reranker's order over the embedder's best ``k``), and the
task's metrics of those scores are computed by the same code as the embedder's and
reported under ``"rescored"``. :func:`vlm2emb.rerank.evaluate_suite_pipeline` uses this to
report a reranker over any suite task kind without a second loader or metric path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = ["Rescorer"]


class Rescorer(Protocol):
    """New scores for a block of queries that the embedder has scored."""

    def __call__(
        self,
        scores: torch.Tensor,
        queries: Sequence[Any],
        instructions: Sequence[str | None],
        candidates: Sequence[Sequence[Any]],
    ) -> torch.Tensor:
        """Re-scores one block.

        Args:
            scores: ``[b, m]`` the embedder's scores of each query against its candidates.
            queries: ``b`` query items.
            instructions: ``b`` instructions, as the embedder's query side used them.
            candidates: ``b`` sequences of ``m`` candidate items (a corpus task passes the
                same corpus list for every query).

        Returns:
            ``[b, m]`` scores; higher is better, and the metrics rank them with the same tie
            rule as the embedder's.
        """
        ...
