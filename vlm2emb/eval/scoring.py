"""How evaluation scores a query against candidates: ``cosine`` (single vectors) or
``maxsim`` (late interaction over per-token vectors, :mod:`vlm2emb.multivector`).

A suite task picks one with its ``scoring`` key; :func:`vlm2emb.eval.evaluate` and the
corpus scorer take ``scoring=``. Each scoring encodes items into its own representation
and scores them; the runners never look at which one they hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from vlm2emb.multivector import DEFAULT_CHUNK_ELEMENTS, MultiVectorEmbeddings, maxsim, pad_token_sets

__all__ = ["SCORINGS", "CosineScoring", "MaxSimScoring", "Scoring", "get_scoring"]

# Upper bound on gathered candidate elements per block when scoring rows against their own
# candidates, so 1000 rows x 1000 candidates x 4096 dims is never materialised at once.
_ROW_BLOCK_ELEMENTS = 1 << 26


class Scoring:
    """Encodes items and scores queries against candidates."""

    name: ClassVar[str] = ""

    def encode(
        self, model: Any, items: list[Any], instruction: str | None, batch_size: int, **kwargs: Any
    ) -> Any:
        """The representation of ``items`` (``kwargs``: ``show_progress_bar``)."""
        raise NotImplementedError

    def concat(self, parts: Sequence[Any]) -> Any:
        """Rows of several encodings, in order."""
        raise NotImplementedError

    def take(self, encoded: Any, index: torch.Tensor) -> Any:
        """The rows ``index`` of an encoding."""
        raise NotImplementedError

    def score_all(self, queries: Any, docs: Any) -> torch.Tensor:
        """[Nq, Nd] scores of every query against every document (CPU float32)."""
        raise NotImplementedError

    def score_rows(
        self, queries: Any, docs: Any, query_idx: list[int], cand_idx: list[list[int]]
    ) -> torch.Tensor:
        """[R, C] scores of each row's query against its own candidates.

        Args:
            queries: The encoded distinct queries.
            docs: The encoded distinct candidates.
            query_idx: Per row, its query's index into ``queries``.
            cand_idx: Per row, its candidates' indices into ``docs`` (all rows: C of them).
        """
        raise NotImplementedError


class CosineScoring(Scoring):
    """Cosine similarity of single-vector embeddings (re-normalised here: an un-normalised
    model would otherwise favour long vectors)."""

    name = "cosine"

    def encode(
        self, model: Any, items: list[Any], instruction: str | None, batch_size: int, **kwargs: Any
    ) -> Any:
        emb = torch.as_tensor(model.encode(items, instruction=instruction, batch_size=batch_size, **kwargs))
        if emb.ndim != 2 or emb.shape[0] != len(items):
            raise ValueError(
                f"model.encode returned shape {tuple(emb.shape)} for {len(items)} items; expected [n, dim]"
            )
        # float32 keeps bf16/fp16 embeddings from losing precision in the dot products.
        return F.normalize(emb.float(), dim=-1)  # [n, d]

    def concat(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(parts), dim=0)

    def take(self, encoded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return encoded[index]

    @staticmethod
    def _check(queries: torch.Tensor, docs: torch.Tensor) -> None:
        if queries.shape[1] != docs.shape[1]:
            raise ValueError(
                f"query and candidate embeddings differ in size ({queries.shape[1]} vs {docs.shape[1]})"
            )

    def score_all(self, queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        self._check(queries, docs)
        return (queries @ docs.to(queries.device).T).cpu()  # [Nq, Nd]

    def score_rows(
        self, queries: torch.Tensor, docs: torch.Tensor, query_idx: list[int], cand_idx: list[list[int]]
    ) -> torch.Tensor:
        self._check(queries, docs)
        docs = docs.to(queries.device)
        q_idx = torch.as_tensor(query_idx, dtype=torch.long, device=queries.device)  # [R]
        c_idx = torch.as_tensor(cand_idx, dtype=torch.long, device=queries.device)  # [R, C]
        n_rows, n_cand = c_idx.shape
        chunk = max(1, _ROW_BLOCK_ELEMENTS // max(1, n_cand * queries.shape[1]))
        out = []
        for start in range(0, n_rows, chunk):
            q = queries[q_idx[start : start + chunk]]  # [r, d]
            c = docs[c_idx[start : start + chunk]]  # [r, C, d]
            out.append(torch.einsum("rd,rcd->rc", q, c).cpu())  # [r, C]
        return torch.cat(out, dim=0)


class MaxSimScoring(Scoring):
    """MaxSim over the multi-vector head's token vectors (``encode(output="multivector")``).

    Scores are raw MaxSim sums (not divided by the query's token count): a per-query
    constant that does not change any ranking.
    """

    name = "maxsim"

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        self.chunk_elements = chunk_elements

    def encode(
        self, model: Any, items: list[Any], instruction: str | None, batch_size: int, **kwargs: Any
    ) -> MultiVectorEmbeddings:
        sets = model.encode(
            items, instruction=instruction, batch_size=batch_size, output="multivector", **kwargs
        )
        if len(sets) != len(items):
            raise ValueError(f"model.encode returned {len(sets)} token sets for {len(items)} items")
        tokens, mask = pad_token_sets([torch.as_tensor(s).float() for s in sets])
        return MultiVectorEmbeddings(tokens, mask)  # [n, L, D]

    def concat(self, parts: Sequence[MultiVectorEmbeddings]) -> MultiVectorEmbeddings:
        return MultiVectorEmbeddings.cat_rows(parts)

    def take(self, encoded: MultiVectorEmbeddings, index: torch.Tensor) -> MultiVectorEmbeddings:
        return encoded.take_rows(index)

    def score_all(self, queries: MultiVectorEmbeddings, docs: MultiVectorEmbeddings) -> torch.Tensor:
        return maxsim(
            queries.tokens, docs.tokens, queries.mask, docs.mask, chunk_elements=self.chunk_elements
        ).cpu()  # [Nq, Nd]

    def score_rows(
        self,
        queries: MultiVectorEmbeddings,
        docs: MultiVectorEmbeddings,
        query_idx: list[int],
        cand_idx: list[list[int]],
    ) -> torch.Tensor:
        # Rows sharing a query and candidate list are common (MMEB pools); score each row's
        # own candidates rather than all pairs, which may be far more.
        out = []
        for q, cands in zip(query_idx, cand_idx):
            row = self.score_all(queries.take_rows(torch.tensor([q])), docs.take_rows(torch.tensor(cands)))
            out.append(row)  # [1, C]
        return torch.cat(out, dim=0)  # [R, C]


SCORINGS: dict[str, Scoring] = {s.name: s for s in (CosineScoring(), MaxSimScoring())}


def get_scoring(name: str) -> Scoring:
    """The scoring called ``name``.

    Raises:
        ValueError: Unknown name (the message lists the known ones).
    """
    if name not in SCORINGS:
        raise ValueError(f"unknown scoring {name!r}; choose one of {', '.join(SCORINGS)}")
    return SCORINGS[name]
