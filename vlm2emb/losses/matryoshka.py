"""Matryoshka representation learning: a loss applied at several embedding prefixes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor

from vlm2emb.losses.base import ContrastiveLoss

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.items import ContrastiveBatch

__all__ = ["MatryoshkaLoss"]


class MatryoshkaLoss(ContrastiveLoss):
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
        loss: The loss applied at every prefix (any :class:`ContrastiveLoss`; the recipe's
            ``train.loss``). Recipe: ``train.matryoshka_dims`` wraps it.
        dims: Prefix sizes, e.g. ``[64, 128, 256]``.
        weights: One weight per entry of ``dims`` (default 1 each); the full size gets
            weight 1 unless it is listed in ``dims``.
        normalize: Re-normalise each prefix (match a model with ``normalize=True``).

    Raises:
        ValueError: Empty or non-positive dims, or weights of the wrong length.
    """

    def __init__(
        self,
        loss: ContrastiveLoss,
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
        if loss.takes_multivector:
            raise ValueError(
                "train.matryoshka_dims does not apply to a multi-vector loss (train.loss maxsim)"
            )
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
        self, fn: Any, query: Tensor, positive: Tensor, negatives: Tensor | None, *args: Any, **kw: Any
    ) -> Tensor:
        total = None
        for m, w in self._prefixes(query.shape[-1]):
            term = w * fn(
                self._trunc(query, m), self._trunc(positive, m), self._trunc(negatives, m), *args, **kw
            )
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

    def check_examples(self, examples: list[Any]) -> None:
        """The wrapped loss's check."""
        self.loss.check_examples(examples)

    def training_loss(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None,
        batch: ContrastiveBatch,
        temperature: float | Tensor,
    ) -> Tensor:
        """The inner loss's :meth:`ContrastiveLoss.training_loss` at every prefix."""
        return self._combine(self.loss.training_loss, query, positive, negatives, batch, temperature)

    def extra_repr(self) -> str:
        return f"dims={sorted(self.weights)}, weights={[self.weights[m] for m in sorted(self.weights)]}"
