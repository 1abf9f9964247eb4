r"""InfoNCE, the default training objective (registered as ``infonce``).

Also known as NT-Xent (SimCLR) or the multiple-negatives ranking loss
(sentence-transformers).

The formula
-----------
For query embedding :math:`q_i`, its positive (target) embedding :math:`t_i` and a
pool of candidates :math:`\mathcal{C}` (all targets of the batch plus any hard
negatives), the per-query loss is

.. math::

    \ell_i = -\log \frac{\exp(s(q_i, t_i) / \tau)}
                        {\sum_{c \in \mathcal{C}} \exp(s(q_i, c) / \tau)}

where :math:`s` is the dot product and :math:`\tau` the temperature. This is a
cross-entropy over the candidates whose correct class is the query's own positive,
so the implementation builds ``logits = query @ candidates.T / temperature`` and
calls :func:`torch.nn.functional.cross_entropy`.

Temperature versus scale
------------------------
The loss never normalizes: if the embeddings are L2-normalized beforehand (the usual
case) the dot product is the cosine similarity and ``logits = cos_sim / temperature``.
Some code bases write the same thing with a multiplicative ``scale``
(sentence-transformers) or ``logit_scale`` (CLIP) instead: ``scale = 1 / temperature``.
So ``temperature=0.02`` is ``scale=50``, the default of VLM2Vec, and
``temperature=0.05`` is ``scale=20``, the sentence-transformers default.

Shapes
------
* ``query``: ``[Bq, d]``, this process's query embeddings.
* ``positive``: ``[Bt, d]`` with ``Bt >= Bq``, the target embeddings; query ``i`` is
  paired with row ``query_offset + i``. Extra rows only act as in-batch negatives.
* ``negatives``: ``[Bt, K, d]`` (optional), ``K`` hard negatives per target row. They
  are shared by every query, as in the multiple-negatives ranking loss, so the
  candidate pool has ``Bt + Bt * K`` entries.

Example
-------
>>> import torch
>>> import torch.nn.functional as F
>>> from vlm2emb.losses import InfoNCELoss, info_nce_loss
>>> q = F.normalize(torch.randn(4, 8), dim=-1)        # [Bq, d]
>>> t = F.normalize(torch.randn(4, 8), dim=-1)        # [Bt, d]
>>> neg = F.normalize(torch.randn(4, 2, 8), dim=-1)   # [Bt, K, d]
>>> loss = info_nce_loss(q, t, neg, temperature=0.02)
>>> loss.shape
torch.Size([])
>>> criterion = InfoNCELoss(temperature=0.05, symmetric=True)
>>> criterion(q, t, neg).ndim
0
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlm2emb.losses.base import ContrastiveLoss

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.items import ContrastiveBatch

__all__ = ["InfoNCELoss", "info_nce_from_logits", "info_nce_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _describe(t: Tensor) -> str:
    return f"shape {list(t.shape)}"


def _check_int_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int64 content ids), got dtype {t.dtype}")


def _validate(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None,
    positive_keys: Tensor | None,
    negative_keys: Tensor | None,
    negative_mask: Tensor | None,
    query_offset: int,
    reduction: str,
    temperature: float | Tensor,
) -> None:
    """Raise a ``ValueError`` naming the offending argument for any inconsistent input."""
    for name, t in (("query", query), ("positive", positive)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape [B, d], got {_describe(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    bq, d = query.shape
    bt = positive.shape[0]
    if bq == 0:
        # An empty batch would make the mean NaN; fail loudly instead.
        raise ValueError("query must contain at least one row, got an empty batch")
    if positive.shape[1] != d:
        raise ValueError(
            f"query and positive must share the embedding size: query has d={d}, "
            f"positive has {_describe(positive)}"
        )
    if isinstance(query_offset, bool) or not isinstance(query_offset, int):
        raise ValueError(f"query_offset must be an int, got {type(query_offset).__name__}")
    if query_offset < 0 or query_offset + bq > bt:
        raise ValueError(
            f"query_offset={query_offset} with Bq={bq} queries needs rows "
            f"[{query_offset}, {query_offset + bq}) of positive, but positive has only Bt={bt} rows"
        )
    if negatives is not None:
        if not isinstance(negatives, Tensor):
            raise ValueError(f"negatives must be a torch.Tensor or None, got {type(negatives).__name__}")
        if negatives.ndim != 3:
            raise ValueError(f"negatives must have shape [Bt, K, d], got {_describe(negatives)}")
        if not negatives.is_floating_point():
            raise ValueError(f"negatives must be a floating point tensor, got dtype {negatives.dtype}")
        if negatives.shape[0] != bt or negatives.shape[2] != d:
            raise ValueError(
                f"negatives must have shape [Bt, K, d] = [{bt}, K, {d}] (one group of hard negatives "
                f"per positive row), got {_describe(negatives)}"
            )
    elif negative_keys is not None or negative_mask is not None:
        raise ValueError("negative_keys / negative_mask were given but negatives is None")
    if positive_keys is not None:
        _check_int_tensor("positive_keys", positive_keys)
        if positive_keys.shape != (bt,):
            raise ValueError(f"positive_keys must have shape [Bt] = [{bt}], got {_describe(positive_keys)}")
    if negative_keys is not None:
        assert negatives is not None  # checked above
        _check_int_tensor("negative_keys", negative_keys)
        if positive_keys is None:
            # False negatives are defined relative to the query's positive key.
            raise ValueError("negative_keys requires positive_keys (the keys they are compared against)")
        if negative_keys.shape != negatives.shape[:2]:
            raise ValueError(
                f"negative_keys must have shape [Bt, K] = {list(negatives.shape[:2])}, "
                f"got {_describe(negative_keys)}"
            )
    if negative_mask is not None:
        assert negatives is not None  # checked above
        if not isinstance(negative_mask, Tensor) or negative_mask.dtype != torch.bool:
            raise ValueError("negative_mask must be a bool tensor (True = real negative, False = padding)")
        if negative_mask.shape != negatives.shape[:2]:
            raise ValueError(
                f"negative_mask must have shape [Bt, K] = {list(negatives.shape[:2])}, "
                f"got {_describe(negative_mask)}"
            )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature tensor must hold a single value, got {_describe(temperature)}")
        # Positivity of a tensor temperature is not checked: it would force a device sync.
    elif not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _check_options(false_negative_margin: float | None, hardness_alpha: float) -> None:
    """Raise a ``ValueError`` for a non-finite or negative option value."""
    if false_negative_margin is not None and not (
        isinstance(false_negative_margin, (int, float)) and math.isfinite(false_negative_margin)
    ):
        raise ValueError(
            f"false_negative_margin must be a finite number or None, got {false_negative_margin!r}"
        )
    if not (
        isinstance(hardness_alpha, (int, float)) and math.isfinite(hardness_alpha) and hardness_alpha >= 0
    ):
        raise ValueError(f"hardness_alpha must be a finite number >= 0, got {hardness_alpha!r}")


def info_nce_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    temperature: float | Tensor = 0.02,
    symmetric: bool = False,
    positive_keys: Tensor | None = None,
    negative_keys: Tensor | None = None,
    negative_mask: Tensor | None = None,
    query_offset: int = 0,
    reduction: str = "mean",
    false_negative_margin: float | None = None,
    hardness_alpha: float = 0.0,
) -> Tensor:
    """InfoNCE / multiple-negatives ranking loss with in-batch and hard negatives.

    Every query is scored against the same candidate pool: all ``Bt`` rows of
    ``positive`` followed by all ``Bt * K`` hard negatives. Its correct class is row
    ``query_offset + i`` of ``positive``. The embeddings are used as given (no
    normalization); the computation runs in at least float32 even for bf16/fp16 inputs,
    because a softmax over logits of magnitude ``1 / temperature`` is too coarse in
    half precision.

    Args:
        query: ``[Bq, d]`` query embeddings.
        positive: ``[Bt, d]`` target embeddings, ``Bt >= query_offset + Bq``. Rows
            outside the local block act only as in-batch negatives.
        negatives: ``[Bt, K, d]`` hard negatives grouped by the target row (example)
            they were mined for, or ``None``. They are candidates for every query.
        temperature: Softmax temperature, a positive float or a one-element tensor
            (e.g. a learnable one). ``scale = 1 / temperature``.
        symmetric: Also add the target-to-query direction (each local positive must
            retrieve its query among the ``Bq`` local queries; hard negatives are not
            used there) and average the two directions. With ``query_offset`` the
            target-to-query term only sees this process's queries, so in a
            distributed setting it is exact for the local block only.
        positive_keys: ``[Bt]`` integer content ids of the positives (see
            :func:`vlm2emb.data.keys.content_keys`). A candidate whose key equals query ``i``'s positive
            key, other than that positive itself, is a false negative and is masked.
        negative_keys: ``[Bt, K]`` integer content ids of the hard negatives, masked
            the same way. Requires ``positive_keys``.
        negative_mask: ``[Bt, K]`` bool, ``True`` for a real negative and ``False``
            for padding (ragged numbers of negatives per example).
        query_offset: Index of the first positive belonging to ``query``; lets the
            caller pass local queries and globally gathered targets.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-query losses ``[Bq]``; with
            ``symmetric`` entry ``i`` is the average of query ``i``'s and its
            positive's losses).
        false_negative_margin: Score-based false-negative filter: a candidate ``c``
            other than the target with ``s(q_i, c) > s(q_i, t_i) + margin`` is removed
            from query ``i``'s softmax (scores compared without gradient). ``None``
            (default) filters nothing. Only the query-to-target direction is filtered.
        hardness_alpha: Hardness weighting: every candidate other than the target gets
            the weight ``exp(alpha * s(q_i, c))`` (no gradient through the weight) in
            the denominator, so harder negatives count more. ``0`` (default) is plain
            InfoNCE. Only the query-to-target direction is weighted.

    Returns:
        A scalar loss, or a ``[Bq]`` tensor for ``reduction="none"``. The dtype is
        float32, or float64 when any input is float64.

    Raises:
        ValueError: If shapes, dtypes, ``query_offset``, ``reduction`` or
            ``temperature`` are inconsistent.
    """
    _validate(
        query,
        positive,
        negatives,
        positive_keys,
        negative_keys,
        negative_mask,
        query_offset,
        reduction,
        temperature,
    )
    _check_options(false_negative_margin, hardness_alpha)
    bq, d = query.shape
    bt = positive.shape[0]
    device = query.device

    # float32 at least; float64 stays float64 so gradcheck and exact tests work.
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    compute_dtype = torch.promote_types(compute_dtype, positive.dtype)
    if negatives is not None:
        compute_dtype = torch.promote_types(compute_dtype, negatives.dtype)

    q = query.to(compute_dtype)  # [Bq, d]
    p = positive.to(compute_dtype)  # [Bt, d]
    if negatives is not None:
        n = negatives.to(compute_dtype).reshape(-1, d)  # [Bt*K, d]
        candidates = torch.cat([p, n], dim=0)  # [C, d], C = Bt + Bt*K
    else:
        candidates = p  # [C, d], C = Bt

    if isinstance(temperature, Tensor):
        temp: Tensor | float = temperature.to(device=device, dtype=compute_dtype).reshape(())
    else:
        temp = float(temperature)

    scores = q @ candidates.T  # [Bq, C]
    logits = scores / temp  # [Bq, C]
    rows = torch.arange(bq, device=device)  # [Bq]
    targets = rows + query_offset  # [Bq]
    if hardness_alpha:
        # log(w * exp(s / tau)) = s / tau + alpha * s: the weight enters as a logit offset,
        # detached so that it only reweights and never pushes the scores itself.
        bonus = hardness_alpha * scores.detach()  # [Bq, C]
        bonus[rows, targets] = 0.0
        logits = logits + bonus
    if false_negative_margin is not None:
        detached = scores.detach()  # [Bq, C]
        pos_score = detached[rows, targets]  # [Bq]
        too_close = detached > (pos_score + false_negative_margin).unsqueeze(1)  # [Bq, C]
        too_close[rows, targets] = False
        # -inf removes it from the softmax exactly (zero probability, zero gradient).
        logits = logits.masked_fill(too_close, float("-inf"))
    loss = info_nce_from_logits(
        logits,
        bt,
        positive_keys=positive_keys,
        negative_keys=negative_keys,
        negative_mask=negative_mask,
        query_offset=query_offset,
    )  # [Bq]

    if symmetric:
        local_p = p[query_offset : query_offset + bq]  # [Bq, d]
        t2q_logits = local_p @ q.T / temp  # [Bq (positives), Bq (queries)]
        if positive_keys is not None:
            local_keys = positive_keys.to(device=device, dtype=torch.int64)[query_offset : query_offset + bq]
            dup = local_keys.unsqueeze(1) == local_keys.unsqueeze(0)  # [Bq, Bq]
            dup[rows, rows] = False  # keep the matching query as the target
            t2q_logits = t2q_logits.masked_fill(dup, float("-inf"))
        t2q = F.cross_entropy(t2q_logits, rows, reduction="none")  # [Bq]
        # Averaging per pair keeps mean/sum/none consistent with (q2t + t2q) / 2.
        loss = (loss + t2q) / 2

    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def info_nce_from_logits(
    logits: Tensor,
    num_positives: int,
    *,
    positive_keys: Tensor | None = None,
    negative_keys: Tensor | None = None,
    negative_mask: Tensor | None = None,
    query_offset: int = 0,
) -> Tensor:
    """Per-query InfoNCE terms from a score matrix already divided by the temperature.

    The candidate columns are laid out as in :func:`info_nce_loss`: the ``Bt`` positives,
    then the ``Bt * K`` hard negatives; query ``i``'s target is column ``query_offset + i``.
    Padding negatives and false negatives (same key as the query's positive) are masked
    with ``-inf``. Shared by every loss that scores queries against that pool (InfoNCE over
    dot products, :mod:`vlm2emb.losses.maxsim` over MaxSim scores).

    Args:
        logits: [Bq, C] scores / temperature, ``C = Bt`` or ``Bt + Bt * K``.
        num_positives: ``Bt``.
        positive_keys: [Bt] content ids, or None.
        negative_keys: [Bt, K] content ids of the hard negatives, or None.
        negative_mask: [Bt, K] bool (True = real negative), or None.
        query_offset: Column of query 0's positive.

    Returns:
        [Bq] per-query losses.
    """
    bq, num_candidates = logits.shape
    bt = num_positives
    device = logits.device
    targets = torch.arange(bq, device=device) + query_offset  # [Bq]
    rows = torch.arange(bq, device=device)  # [Bq]

    # `invalid[i, c]` is True where candidate c must not compete for query i.
    invalid: Tensor | None = None
    if negative_mask is not None:
        # Padding columns are invalid for every query; positives are never padding.
        pad = torch.cat(
            [
                torch.zeros(bt, dtype=torch.bool, device=device),
                ~negative_mask.to(device).reshape(-1),
            ]
        )  # [C]
        invalid = pad.unsqueeze(0).expand(bq, num_candidates)
    if positive_keys is not None:
        pkeys = positive_keys.to(device=device, dtype=torch.int64)  # [Bt]
        anchor = pkeys[query_offset : query_offset + bq]  # [Bq]
        if negative_keys is not None:
            cand_keys = torch.cat([pkeys, negative_keys.to(device=device, dtype=torch.int64).reshape(-1)])
        else:
            cand_keys = pkeys  # [Bt]; un-keyed hard negatives are never treated as duplicates
        same = anchor.unsqueeze(1) == cand_keys.unsqueeze(0)  # [Bq, Bt] or [Bq, C]
        # The query's own positive trivially shares its key; it must stay the target.
        same[rows, targets] = False
        if same.shape[1] < num_candidates:
            same = F.pad(same, (0, num_candidates - same.shape[1]), value=False)  # [Bq, C]
        invalid = same if invalid is None else invalid | same
    if invalid is not None:
        # -inf removes a candidate from the softmax exactly (zero probability, zero
        # gradient); the target column is never masked, so every row stays finite.
        logits = logits.masked_fill(invalid, float("-inf"))

    return F.cross_entropy(logits, targets, reduction="none")  # [Bq]


class InfoNCELoss(ContrastiveLoss):
    """Module wrapper around :func:`info_nce_loss`; the registered loss ``infonce``.

    Recipe: ``train.loss: infonce`` (the default), with ``train.symmetric_loss`` and
    ``train.temperature``.

    The temperature given here is the one a standalone call uses. In training the model
    owns the temperature (``EmbeddingModel.temperature()``: the recorded value, or the
    learnable logit scale of ``enable_learnable_temperature``) and the training step passes
    it into :meth:`training_loss`, as open_clip passes the model's ``logit_scale`` into its
    loss: one owner, however the temperature is set.

    Args:
        temperature: The temperature of standalone calls (``scale = 1 / temperature``).
        symmetric: Default for ``info_nce_loss(symmetric=...)``.
        reduction: Default reduction, ``"mean"``, ``"sum"`` or ``"none"``.
        false_negative_margin: Drop candidates scoring more than this above the query's
            positive (``info_nce_loss``); recipe ``train.loss_args.false_negative_margin``.
        hardness_alpha: Weight candidates by ``exp(alpha * score)``; recipe
            ``train.loss_args.hardness_alpha``.

    Raises:
        ValueError: If ``temperature`` is not positive, the reduction unknown or an
            option out of range.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        symmetric: bool = False,
        reduction: str = "mean",
        false_negative_margin: float | None = None,
        hardness_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        _check_options(false_negative_margin, hardness_alpha)
        self.symmetric = symmetric
        self.reduction = reduction
        self.false_negative_margin = false_negative_margin
        self.hardness_alpha = float(hardness_alpha)
        self._temperature = float(temperature)

    @classmethod
    def from_config(cls, train: Any) -> InfoNCELoss:
        """The loss a recipe's ``train`` section asks for (the registry's factory).

        ``train.loss_args`` may hold ``false_negative_margin`` and ``hardness_alpha``; any
        other key is a ``TypeError`` naming it.
        """
        return cls(temperature=train.temperature, symmetric=train.symmetric_loss, **train.loss_args)

    @property
    def temperature(self) -> float:
        """The standalone temperature."""
        return self._temperature

    @property
    def scale(self) -> float:
        """``1 / temperature``."""
        return 1.0 / self._temperature

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Compute the loss; ``kwargs`` go to :func:`info_nce_loss` (keys, masks, offset...).

        Args:
            query: ``[Bq, d]`` query embeddings.
            positive: ``[Bt, d]`` target embeddings.
            negatives: ``[Bt, K, d]`` hard negatives or ``None``.
            **kwargs: Any keyword of :func:`info_nce_loss` except ``temperature``;
                ``symmetric`` and ``reduction`` override the module defaults.

        Returns:
            The loss tensor.
        """
        if "temperature" in kwargs:
            raise TypeError("InfoNCELoss owns the temperature; do not pass it to forward()")
        kwargs.setdefault("symmetric", self.symmetric)
        kwargs.setdefault("reduction", self.reduction)
        kwargs.setdefault("false_negative_margin", self.false_negative_margin)
        kwargs.setdefault("hardness_alpha", self.hardness_alpha)
        return info_nce_loss(query, positive, negatives, temperature=self._temperature, **kwargs)

    def gathered(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        *,
        positive_keys: Tensor | None = None,
        negative_keys: Tensor | None = None,
        negative_mask: Tensor | None = None,
        temperature: float | Tensor | None = None,
    ) -> Tensor:
        """The loss of this process's queries against the targets of all processes.

        Local query, positive and negative embeddings are gathered across processes with
        :func:`vlm2emb.distributed.gather_with_grad`; each query is scored against every
        process's positives and hard negatives, and the symmetric term scores each local
        positive against every process's queries. The result is the mean over local
        queries, so with DDP/DeepSpeed gradient averaging N processes at B/N rows each give
        the gradients of one process at B rows. Logits per process are [b, B(1 + K)], never
        [B, B]. Outside distributed runs this equals :meth:`forward`.

        Args:
            query: [b, d] local query embeddings (b equal on every process).
            positive: [b, d] local positive embeddings.
            negatives: [b, K, d] local hard negatives (K equal on every process) or None.
            positive_keys: [B] false-negative ids of the GLOBAL batch, rank order.
            negative_keys: [B, K] ids of the global batch's hard negatives.
            negative_mask: [B, K] bool, the global batch's real-negative mask.
            temperature: Overrides this module's temperature (training passes the model's).

        Returns:
            The scalar loss.
        """
        from vlm2emb.distributed import gather_with_grad, rank_and_world

        rank, _ = rank_and_world()
        offset = rank * query.shape[0]
        all_pos = gather_with_grad(positive)  # [B, d]
        all_neg = gather_with_grad(negatives) if negatives is not None else None  # [B, K, d]
        if temperature is None:
            temperature = self._temperature
        loss = info_nce_loss(
            query,
            all_pos,
            all_neg,
            temperature=temperature,
            positive_keys=positive_keys,
            negative_keys=negative_keys,
            negative_mask=negative_mask,
            query_offset=offset,
            reduction=self.reduction,
            false_negative_margin=self.false_negative_margin,
            hardness_alpha=self.hardness_alpha,
        )
        if self.symmetric:
            # Target -> query: local positives retrieve their query among ALL queries
            # (hard negatives are not candidates in this direction).
            reverse = info_nce_loss(
                positive,
                gather_with_grad(query),
                temperature=temperature,
                positive_keys=positive_keys,
                query_offset=offset,
                reduction=self.reduction,
            )
            loss = 0.5 * (loss + reverse)
        return loss

    def training_loss(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None,
        batch: ContrastiveBatch,
        temperature: float | Tensor,
    ) -> Tensor:
        """:meth:`gathered` with the batch's false-negative keys and negative masks."""
        device = query.device
        keys, mask = batch.negative_keys, batch.negative_mask
        return self.gathered(
            query,
            positive,
            negatives,
            positive_keys=batch.positive_keys.to(device),
            negative_keys=keys.to(device) if keys is not None else None,
            negative_mask=mask.to(device) if mask is not None else None,
            temperature=temperature,
        )

    def extra_repr(self) -> str:
        extra = (
            f"temperature={self.temperature:.4g}, symmetric={self.symmetric}, reduction={self.reduction!r}"
        )
        if self.false_negative_margin is not None:
            extra += f", false_negative_margin={self.false_negative_margin}"
        if self.hardness_alpha:
            extra += f", hardness_alpha={self.hardness_alpha}"
        return extra
