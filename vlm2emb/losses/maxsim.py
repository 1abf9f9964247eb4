r"""InfoNCE over MaxSim scores, for multi-vector models (registered as ``maxsim``).

A query with token vectors :math:`q_1..q_n` is scored against a candidate :math:`c` by
MaxSim, :math:`s(q, c) = \sum_i \max_j q_i \cdot c_j` (:func:`vlm2emb.multivector.maxsim`),
divided by :math:`n` when ``normalize_scores`` (then the score is a mean of cosines, in
[-1, 1], and a temperature of 0.02 means what it means for single vectors; ColPali's
training loss divides the same way). The candidate pool and masking are InfoNCE's
(:func:`vlm2emb.losses.infonce.info_nce_from_logits`): every positive of the global batch
and every hard negative, padding and false negatives masked.

With ``dense_weight > 0`` and a model that has both heads, the single-vector InfoNCE of
the same forward is added: ``L = multivector_weight * L_maxsim + dense_weight * L_dense``.

Shapes (``MultiVectorEmbeddings``): ``query`` [b, Lq, D], ``positive`` [b, Lp, D],
``negatives`` [b, K, Ln, D], each with its token mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from torch import Tensor

from vlm2emb.losses.base import ContrastiveLoss
from vlm2emb.losses.infonce import InfoNCELoss, info_nce_from_logits
from vlm2emb.multivector import (
    DEFAULT_CHUNK_ELEMENTS,
    MultiVectorEmbeddings,
    gather_token_sets,
    maxsim,
)

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.items import ContrastiveBatch

__all__ = ["MaxSimLoss", "maxsim_info_nce_loss"]


def maxsim_info_nce_loss(
    query: MultiVectorEmbeddings,
    positive: MultiVectorEmbeddings,
    negatives: MultiVectorEmbeddings | None = None,
    *,
    temperature: float | Tensor = 0.02,
    normalize_scores: bool = True,
    positive_keys: Tensor | None = None,
    negative_keys: Tensor | None = None,
    negative_mask: Tensor | None = None,
    query_offset: int = 0,
    reduction: str = "mean",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """InfoNCE with in-batch and hard negatives over MaxSim scores.

    Args:
        query: [Bq, Lq, D] query token sets.
        positive: [Bt, Lp, D] target token sets, ``Bt >= query_offset + Bq``; query ``i``'s
            positive is row ``query_offset + i``, every other row an in-batch negative.
        negatives: [Bt, K, Ln, D] hard negatives (candidates for every query), or None.
        temperature: Divides the (normalised) scores; a float or a [] tensor.
        normalize_scores: Divide each query's scores by its number of real tokens.
        positive_keys: [Bt] false-negative ids (as :func:`~vlm2emb.losses.info_nce_loss`).
        negative_keys: [Bt, K] ids of the hard negatives.
        negative_mask: [Bt, K] bool, True = a real negative.
        query_offset: Row of ``positive`` paired with query 0.
        reduction: ``mean``, ``sum`` or ``none`` ([Bq]).
        chunk_elements: Most token dot products held at once (:func:`maxsim`).

    Returns:
        The loss (float32 at least).

    Raises:
        ValueError: Bad reduction, temperature or offset.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if not isinstance(temperature, Tensor) and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    bq, bt = len(query), len(positive)
    if bq == 0 or query_offset < 0 or query_offset + bq > bt:
        raise ValueError(f"query_offset={query_offset} with {bq} queries does not fit {bt} positives")
    candidates = positive
    if negatives is not None:
        candidates = MultiVectorEmbeddings.cat_rows([positive, negatives.flatten_rows()])  # [Bt + Bt*K]
    scores = maxsim(
        query.tokens,
        candidates.tokens,
        query.mask,
        candidates.mask,
        chunk_elements=chunk_elements,
    )  # [Bq, C]
    if normalize_scores:
        # A query without tokens would divide by zero; its scores are 0 anyway.
        scores = scores / query.num_tokens.clamp(min=1).unsqueeze(1).to(scores.dtype)
    if isinstance(temperature, Tensor):
        temperature = temperature.to(device=scores.device, dtype=scores.dtype).reshape(())
    loss = info_nce_from_logits(
        scores / temperature,
        bt,
        positive_keys=positive_keys,
        negative_keys=negative_keys if negatives is not None else None,
        negative_mask=negative_mask if negatives is not None else None,
        query_offset=query_offset,
    )  # [Bq]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class MaxSimLoss(ContrastiveLoss):
    """Late-interaction InfoNCE (``train.loss: maxsim``), optionally joint with the dense one.

    Recipe: ``train.loss: maxsim`` with ``train.loss_args`` keys ``dense_weight`` (default
    0), ``multivector_weight`` (default 1), ``normalize_scores`` (default true) and
    ``chunk_elements``. The model needs a multi-vector head (``multivector_dim``), and a
    single-vector head too when ``dense_weight > 0``.

    Args:
        temperature: The temperature of standalone calls (training passes the model's).
        dense_weight: Weight of the single-vector InfoNCE term (0 = none).
        multivector_weight: Weight of the MaxSim term.
        normalize_scores: Divide MaxSim by the query's token count.
        chunk_elements: Bound on token dot products held at once.
    """

    takes_multivector = True

    def __init__(
        self,
        temperature: float = 0.02,
        *,
        dense_weight: float = 0.0,
        multivector_weight: float = 1.0,
        normalize_scores: bool = True,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if dense_weight < 0 or multivector_weight < 0 or dense_weight + multivector_weight == 0:
            raise ValueError(
                f"maxsim loss weights must be >= 0 and not both 0, got dense_weight={dense_weight}, "
                f"multivector_weight={multivector_weight}"
            )
        self._temperature = float(temperature)
        self.dense_weight = float(dense_weight)
        self.multivector_weight = float(multivector_weight)
        self.normalize_scores = bool(normalize_scores)
        self.chunk_elements = int(chunk_elements)
        self.dense = InfoNCELoss(temperature)

    @classmethod
    def from_config(cls, train: Any) -> MaxSimLoss:
        """The loss a recipe's ``train`` section asks for (``train.loss_args`` holds its keys)."""
        known = {"dense_weight", "multivector_weight", "normalize_scores", "chunk_elements"}
        args = dict(getattr(train, "loss_args", None) or {})
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(
                f"train.loss_args: unknown key(s) {unknown} for loss maxsim; known: {sorted(known)}"
            )
        return cls(temperature=train.temperature, **args)

    @property
    def temperature(self) -> float:
        """The standalone temperature."""
        return self._temperature

    def forward(
        self,
        query: MultiVectorEmbeddings,
        positive: MultiVectorEmbeddings,
        negatives: MultiVectorEmbeddings | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The MaxSim term alone, at this module's temperature (keys, masks, offset in kwargs)."""
        kwargs.setdefault("normalize_scores", self.normalize_scores)
        kwargs.setdefault("chunk_elements", self.chunk_elements)
        return maxsim_info_nce_loss(query, positive, negatives, temperature=self._temperature, **kwargs)

    def training_loss(
        self,
        query: Any,
        positive: Any,
        negatives: Any,
        batch: ContrastiveBatch,
        temperature: float | Tensor,
    ) -> Tensor:
        """This process's queries against every process's positives and hard negatives.

        Token sets are gathered across processes (padded to the longest, with masks:
        :func:`vlm2emb.multivector.gather_token_sets`); the result is the mean over local
        queries, as for :meth:`InfoNCELoss.gathered`.

        Raises:
            TypeError: The model has no multi-vector head (its forward returned tensors).
        """
        if not isinstance(query, MultiVectorEmbeddings):
            raise TypeError(
                "train.loss maxsim needs a model with a multi-vector head: set model.multivector_dim "
                "(EmbeddingConfig.multivector_dim)"
            )
        from vlm2emb.distributed import rank_and_world

        device = query.tokens.device
        # Without real local negatives the step passes a placeholder tensor: none to score.
        negs = negatives if isinstance(negatives, MultiVectorEmbeddings) else None
        keys, mask = batch.negative_keys, batch.negative_mask
        total = query.tokens.new_zeros(())
        if self.multivector_weight:
            rank, _ = rank_and_world()
            term = maxsim_info_nce_loss(
                query,
                gather_token_sets(positive),
                gather_token_sets(negs) if negs is not None else None,
                temperature=temperature,
                normalize_scores=self.normalize_scores,
                positive_keys=batch.positive_keys.to(device),
                negative_keys=keys.to(device) if keys is not None else None,
                negative_mask=mask.to(device) if mask is not None else None,
                query_offset=rank * len(query),
                chunk_elements=self.chunk_elements,
            )
            total = total + self.multivector_weight * term
        if self.dense_weight:
            if query.dense is None:
                raise TypeError("maxsim loss with dense_weight > 0 needs the single-vector head (dense_head)")
            dense_negs = negs.dense if negs is not None else negatives
            term = self.dense.training_loss(query.dense, positive.dense, dense_negs, batch, temperature)
            total = total + self.dense_weight * term
        return total

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature:.4g}, dense_weight={self.dense_weight}, "
            f"multivector_weight={self.multivector_weight}, normalize_scores={self.normalize_scores}"
        )
