r"""Contrastive losses for training embedding models.

Every contrastive objective of vlm2emb lives in this module. The central one is
InfoNCE, also known as NT-Xent (SimCLR) or the multiple-negatives ranking loss
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
>>> criterion = InfoNCELoss(temperature=0.05, symmetric=True, learnable_temperature=True)
>>> criterion(q, t, neg).ndim
0
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InfoNCELoss", "MatryoshkaLoss", "content_keys", "info_nce_loss"]

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
            :func:`content_keys`). A candidate whose key equals query ``i``'s positive
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
    num_candidates = candidates.shape[0]

    if isinstance(temperature, Tensor):
        temp: Tensor | float = temperature.to(device=device, dtype=compute_dtype).reshape(())
    else:
        temp = float(temperature)

    logits = q @ candidates.T / temp  # [Bq, C]
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

    loss = F.cross_entropy(logits, targets, reduction="none")  # [Bq]

    if symmetric:
        local_p = p[query_offset : query_offset + bq]  # [Bq, d]
        t2q_logits = local_p @ q.T / temp  # [Bq (positives), Bq (queries)]
        if positive_keys is not None:
            local_keys = pkeys[query_offset : query_offset + bq]  # [Bq]
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


class InfoNCELoss(nn.Module):
    """Module wrapper around :func:`info_nce_loss`, optionally with a learnable temperature.

    With ``learnable_temperature=True`` the module stores ``logit_scale = log(1 /
    temperature)`` as a parameter, as CLIP does: optimizing the log keeps the scale
    positive and makes multiplicative updates. The scale is clamped to
    ``max_scale`` (100 by default, CLIP's bound) in the forward pass so the logits
    cannot blow up; while clamped the parameter gets no gradient.

    Args:
        temperature: Initial (or fixed) temperature.
        symmetric: Default for ``info_nce_loss(symmetric=...)``.
        learnable_temperature: Learn the temperature instead of fixing it.
        max_scale: Upper bound on ``1 / temperature`` for the learnable case.
        reduction: Default reduction, ``"mean"``, ``"sum"`` or ``"none"``.

    Raises:
        ValueError: If ``temperature`` is not positive or the initial scale exceeds
            ``max_scale`` for a learnable temperature.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        symmetric: bool = False,
        learnable_temperature: bool = False,
        max_scale: float = 100.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.symmetric = symmetric
        self.reduction = reduction
        self.learnable_temperature = learnable_temperature
        self.max_scale = float(max_scale)
        if learnable_temperature:
            if 1.0 / temperature > self.max_scale:
                raise ValueError(
                    f"initial scale 1/temperature = {1.0 / temperature:g} exceeds max_scale={self.max_scale:g}"
                )
            # float32 parameter: the loss runs in float32 anyway.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature), dtype=torch.float32))
            self._fixed_temperature: float | None = None
        else:
            self.logit_scale = None
            self._fixed_temperature = float(temperature)

    def _temperature(self) -> float | Tensor:
        """Temperature fed to the loss: a differentiable tensor if learnable, else a float."""
        if self.logit_scale is None:
            assert self._fixed_temperature is not None
            return self._fixed_temperature
        scale = self.logit_scale.float().exp().clamp(max=self.max_scale)  # []
        return 1.0 / scale

    @property
    def temperature(self) -> float:
        """Current temperature as a Python float (for logging; syncs the device if learnable)."""
        t = self._temperature()
        return float(t.detach()) if isinstance(t, Tensor) else t

    @property
    def scale(self) -> float:
        """Current ``1 / temperature`` as a Python float (for logging)."""
        return 1.0 / self.temperature

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
        return info_nce_loss(query, positive, negatives, temperature=self._temperature(), **kwargs)

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
            temperature: Overrides this module's temperature (a model that owns a learnable
                temperature passes it here).

        Returns:
            The scalar loss.
        """
        from vlm2emb.distributed import gather_with_grad, rank_and_world

        rank, _ = rank_and_world()
        offset = rank * query.shape[0]
        all_pos = gather_with_grad(positive)  # [B, d]
        all_neg = gather_with_grad(negatives) if negatives is not None else None  # [B, K, d]
        if temperature is None:
            temperature = self._temperature()
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

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable_temperature else "fixed"
        return (
            f"temperature={self.temperature:.4g} ({kind}), symmetric={self.symmetric}, "
            f"reduction={self.reduction!r}"
        )


class MatryoshkaLoss(nn.Module):
    r"""InfoNCE summed over embedding prefixes (Matryoshka representation learning).

    For prefix sizes :math:`m_1 < \dots < m_K` (the full size :math:`D` is always
    included) and weights :math:`w_k`:

    .. math::

        \mathcal{L} = \sum_k w_k \, \mathcal{L}_{\text{InfoNCE}}\big(
            \mathrm{trunc}_{m_k}(q), \mathrm{trunc}_{m_k}(t), \mathrm{trunc}_{m_k}(n)\big),
        \qquad \mathrm{trunc}_m(x) = \frac{x_{1:m}}{\lVert x_{1:m} \rVert}

    (without the division when ``normalize=False``). Each prefix is then a usable embedding
    on its own, which is what ``truncate_dim`` at inference relies on. The inner loss's
    temperature, symmetric term, masks and gathering apply at every prefix unchanged.

    Args:
        loss: The :class:`InfoNCELoss` applied at every prefix (owns the temperature).
        dims: Prefix sizes, e.g. ``[64, 128, 256]``.
        weights: One weight per entry of ``dims`` (default 1 each); the full size gets
            weight 1 unless it is listed in ``dims``.
        normalize: Re-normalise each prefix (match a model with ``normalize=True``).

    Raises:
        ValueError: Empty or non-positive dims, or weights of the wrong length.
    """

    def __init__(
        self,
        loss: InfoNCELoss,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        dims = [int(m) for m in dims]
        if not dims or any(m <= 0 for m in dims):
            raise ValueError(f"matryoshka dims must be positive integers, got {dims}")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"got {len(weights)} matryoshka weights for {len(dims)} dims")
        self.loss = loss
        self.weights = dict(
            zip(dims, [float(w) for w in weights] if weights is not None else [1.0] * len(dims))
        )
        self.normalize = normalize

    @property
    def temperature(self) -> float:
        return self.loss.temperature

    def _prefixes(self, d: int) -> list[tuple[int, float]]:
        too_big = [m for m in self.weights if m > d]
        if too_big:
            raise ValueError(f"train.matryoshka_dims: {too_big} exceed the embedding size {d}")
        return sorted({**{d: 1.0}, **self.weights}.items())

    def _trunc(self, x: Tensor | None, m: int) -> Tensor | None:
        if x is None:
            return None
        x = x[..., :m]  # [..., m]
        return F.normalize(x, dim=-1) if self.normalize else x

    def _combine(
        self, fn: Any, query: Tensor, positive: Tensor, negatives: Tensor | None, **kw: Any
    ) -> Tensor:
        total = None
        for m, w in self._prefixes(query.shape[-1]):
            term = w * fn(self._trunc(query, m), self._trunc(positive, m), self._trunc(negatives, m), **kw)
            total = term if total is None else total + term
        assert total is not None
        return total

    def forward(
        self, query: Tensor, positive: Tensor, negatives: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Same arguments as :meth:`InfoNCELoss.forward`; ``query`` [Bq, D], ``positive`` [Bt, D]."""
        return self._combine(self.loss, query, positive, negatives, **kwargs)

    def gathered(
        self, query: Tensor, positive: Tensor, negatives: Tensor | None = None, **kwargs: Any
    ) -> Tensor:
        """Same arguments as :meth:`InfoNCELoss.gathered` (one gather per prefix)."""
        return self._combine(self.loss.gathered, query, positive, negatives, **kwargs)

    def extra_repr(self) -> str:
        return f"dims={sorted(self.weights)}, weights={[self.weights[m] for m in sorted(self.weights)]}"


def _json_default(obj: Any) -> Any:
    """Make common non-JSON types serializable in a process-independent way."""
    if isinstance(obj, PurePath):
        return {"__path__": obj.as_posix()}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": bytes(obj).hex()}
    if isinstance(obj, (set, frozenset)):
        # Set iteration order depends on the per-process string hash seed: sort the
        # canonical dumps of the members.
        return {"__set__": sorted(_canonical(x) for x in obj)}
    if type(obj).__repr__ is not object.__repr__:
        # A custom repr is assumed to describe the value (e.g. enums, dataclasses).
        return {"__repr__": f"{type(obj).__module__}.{type(obj).__qualname__}", "value": repr(obj)}
    # The default repr embeds a memory address, which would make the id differ per process.
    raise TypeError(
        f"content_keys cannot derive a stable id for an object of type {type(obj).__qualname__}; "
        "pass JSON-serializable data (e.g. the text and the image path) instead"
    )


def _canonical(item: Any) -> str:
    # sort_keys makes dict key order irrelevant; compact separators fix the spacing.
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def content_keys(items: Sequence[Any]) -> Tensor:
    """Map items to int64 content ids that are identical across processes and runs.

    Python's ``hash()`` of strings is salted per process, so it cannot be used to
    compare examples across data-loader workers or ranks. Instead each item is dumped
    to canonical JSON (sorted keys, no whitespace) and hashed with SHA-256; the first
    63 bits give a non-negative int64. Equal content, e.g. ``{"text": "a", "image":
    "x.jpg"}`` and ``{"image": "x.jpg", "text": "a"}``, gets the same id, which is what
    ``info_nce_loss(positive_keys=...)`` needs to spot duplicate positives.

    Note that JSON does not distinguish tuples from lists nor int dict keys from
    string ones. Paths, bytes and sets are supported; other objects must have a
    deterministic ``repr``.

    Args:
        items: A sequence of JSON-serializable (or otherwise supported) items.

    Returns:
        ``[len(items)]`` int64 tensor of ids in ``[0, 2**63)``.

    Raises:
        TypeError: If an item cannot be given a stable id.
    """
    ids = []
    for item in items:
        digest = hashlib.sha256(_canonical(item).encode("utf-8")).digest()
        # 63 bits so the value fits a signed int64 without wrapping negative.
        ids.append(int.from_bytes(digest[:8], "big") >> 1)
    return torch.tensor(ids, dtype=torch.int64)
