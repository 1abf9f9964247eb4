r"""Distillation from a teacher's scores beside InfoNCE (registered as ``distill``).

A teacher (a stronger embedding model, or a reranker) has scored each training row's
positive and hard negatives; ``vlm2emb mine --teacher-scores`` writes them into the rows
as ``teacher_scores: [s_pos, s_neg1, ..., s_negK]``. The student is pulled towards the
teacher's ranking *within* the row's group (positive plus its own hard negatives), where
the teacher knows how much worse each negative is, not only that it is worse.

The formula
-----------
For query :math:`q_i` with group :math:`G_i = \{t_i, n_{i,1}, \dots, n_{i,K_i}\}` and
teacher scores :math:`u_{i,g}`:

.. math::

    p^T_{i,g} = \operatorname{softmax}_g(u_{i,g} / T), \qquad
    \log p^S_{i,g} = \operatorname{log\,softmax}_g(s(q_i, g) / \tau_s)

.. math::

    \mathcal{L} = w_{nce} \cdot \mathcal{L}_{\text{InfoNCE}}
                + w_{kl} \cdot \frac{1}{|R|} \sum_{i \in R}
                  \sum_{g \in G_i} p^T_{i,g} (\log p^T_{i,g} - \log p^S_{i,g})

:math:`R` is the set of rows of the global batch that carry teacher scores (rows without
them add only the InfoNCE term), :math:`T` is ``teacher_temperature`` and
:math:`\tau_s` is ``student_temperature``, or the model's temperature when unset. The KL
term is the forward KL :math:`KL(p^T \| p^S)`, as in Qwen3-VL-Embedding's and
RocketQA-style score distillation; its gradient reaches the student only.

Recipe
------
.. code-block:: yaml

    train:
      loss: distill
      loss_args: {kl_weight: 1.0, teacher_temperature: 0.05}

``loss_args`` also accepts InfoNCE's options (``false_negative_margin``,
``hardness_alpha``) and ``contrastive_weight``.

Shapes
------
``training_loss`` receives ``query`` ``[b, d]``, ``positive`` ``[b, d]``, ``negatives``
``[b, K, d]`` and ``batch.teacher_scores`` ``[B, 1 + K]`` (NaN where a row or slot has no
score); the group scores are ``[b, 1 + K]``.

Example
-------
>>> import torch, torch.nn.functional as F
>>> from vlm2emb.losses.distill import distillation_kl
>>> q = F.normalize(torch.randn(2, 8), dim=-1)          # [b, d]
>>> groups = F.normalize(torch.randn(2, 3, 8), dim=-1)  # [b, 1 + K, d]: positive, negatives
>>> teacher = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, float("nan")]])  # [b, 1 + K]
>>> distillation_kl(q, groups, teacher, student_temperature=0.05, teacher_temperature=0.1).shape
torch.Size([2])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlm2emb.losses.base import ContrastiveLoss
from vlm2emb.losses.infonce import InfoNCELoss

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.data.schema import TrainExample
    from vlm2emb.items import ContrastiveBatch

__all__ = ["DistillationLoss", "distillation_kl"]


def distillation_kl(
    query: Tensor,
    groups: Tensor,
    teacher_scores: Tensor,
    *,
    student_temperature: float | Tensor,
    teacher_temperature: float,
) -> Tensor:
    """Per-row ``KL(teacher || student)`` over each query's own group.

    Args:
        query: ``[b, d]`` query embeddings.
        groups: ``[b, G, d]`` each row's positive (slot 0) and hard negatives.
        teacher_scores: ``[b, G]`` the teacher's scores; NaN marks a slot that does not
            exist (padding). Slot 0 must be finite.
        student_temperature: The student's softmax temperature.
        teacher_temperature: The teacher's softmax temperature.

    Returns:
        ``[b]`` float32 (or float64) KL divergences, zero for a one-slot group.
    """
    dtype = torch.promote_types(query.dtype, torch.float32)
    present = ~torch.isnan(teacher_scores)  # [b, G]
    student = torch.einsum("bd,bgd->bg", query.to(dtype), groups.to(dtype)) / student_temperature  # [b, G]
    student = student.masked_fill(~present, float("-inf"))
    teacher = (teacher_scores.to(dtype) / teacher_temperature).masked_fill(~present, float("-inf"))  # [b, G]
    log_p_t = torch.log_softmax(teacher, dim=-1)  # [b, G]
    log_p_s = torch.log_softmax(student, dim=-1)  # [b, G]
    # Absent slots have p_t = 0: zero them explicitly (0 * -inf would be NaN).
    terms = torch.where(present, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(log_p_s))
    return terms.sum(dim=-1)  # [b]


class DistillationLoss(ContrastiveLoss):
    """InfoNCE plus a KL term towards a teacher's scores of each row's group.

    Args:
        temperature: InfoNCE's standalone temperature (training passes the model's).
        symmetric: InfoNCE's symmetric term (``train.symmetric_loss``).
        kl_weight: Weight of the KL term, ``>= 0``.
        contrastive_weight: Weight of the InfoNCE term, ``>= 0``.
        teacher_temperature: Softmax temperature of the teacher's scores, ``> 0``.
        student_temperature: Softmax temperature of the student's group scores; ``None``
            uses the model's (learnable or fixed) temperature.
        **infonce_options: ``false_negative_margin`` / ``hardness_alpha`` of InfoNCE.

    Raises:
        ValueError: A weight or temperature out of range.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        symmetric: bool = False,
        *,
        kl_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        teacher_temperature: float = 1.0,
        student_temperature: float | None = None,
        **infonce_options: Any,
    ) -> None:
        super().__init__()
        for name, value in (("kl_weight", kl_weight), ("contrastive_weight", contrastive_weight)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, value in (
            ("teacher_temperature", teacher_temperature),
            ("student_temperature", student_temperature),
        ):
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        self.infonce = InfoNCELoss(temperature=temperature, symmetric=symmetric, **infonce_options)
        self.kl_weight = float(kl_weight)
        self.contrastive_weight = float(contrastive_weight)
        self.teacher_temperature = float(teacher_temperature)
        self.student_temperature = student_temperature

    @classmethod
    def from_config(cls, train: Any) -> DistillationLoss:
        """The loss of a recipe's ``train`` section (``train.loss_args`` are the keywords)."""
        return cls(temperature=train.temperature, symmetric=train.symmetric_loss, **train.loss_args)

    def check_examples(self, examples: list[TrainExample]) -> None:
        """Refuses training data in which no row carries ``teacher_scores``."""
        if examples and all(ex.teacher_scores is None for ex in examples):
            raise ValueError(
                "train.loss 'distill' needs rows with teacher_scores (write them with "
                "`vlm2emb mine ... --teacher-scores`); none of the training rows has them"
            )

    def training_loss(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None,
        batch: ContrastiveBatch,
        temperature: float | Tensor,
    ) -> Tensor:
        """InfoNCE over the global batch plus the KL term of this process's rows."""
        from vlm2emb.distributed import rank_and_world

        loss = self.infonce.training_loss(query, positive, negatives, batch, temperature)
        loss = self.contrastive_weight * loss
        scores = batch.teacher_scores  # [B, 1 + K] or None
        if scores is None or self.kl_weight == 0:
            return loss
        rank, world = rank_and_world()
        b = query.shape[0]
        local = scores[rank * b : (rank + 1) * b].to(query.device)  # [b, 1 + K]
        n_rows = int((~torch.isnan(scores[:, 0])).sum())  # rows with scores, global batch
        if n_rows == 0:
            return loss
        groups = positive.unsqueeze(1)  # [b, 1, d]
        if negatives is not None:
            groups = torch.cat([groups, negatives], dim=1)  # [b, 1 + K, d]
            mask = batch.local_negative_mask
            if mask is not None:
                # Padding slots (stand-in copies of the positive) never count.
                pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool), ~mask], dim=1).to(query.device)
                local = local.masked_fill(pad, float("nan"))
        local = local[:, : groups.shape[1]]  # [b, G]
        has = ~torch.isnan(local[:, 0])  # [b] rows of this process with scores
        student_t = self.student_temperature if self.student_temperature is not None else temperature
        kl = distillation_kl(
            query[has],
            groups[has],
            local[has],
            student_temperature=student_t,
            teacher_temperature=self.teacher_temperature,
        )  # [rows here]
        # Sum here, divided by the global count times the gradient averaging over `world`
        # processes: the mean over every row with scores, whatever the process count.
        return loss + self.kl_weight * kl.sum() * world / n_rows

    def extra_repr(self) -> str:
        return (
            f"kl_weight={self.kl_weight}, contrastive_weight={self.contrastive_weight}, "
            f"teacher_temperature={self.teacher_temperature}, student_temperature={self.student_temperature}"
        )
