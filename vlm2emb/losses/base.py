"""The interface every training objective implements (:class:`ContrastiveLoss`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.data.schema import TrainExample
    from vlm2emb.items import ContrastiveBatch

__all__ = ["ContrastiveLoss"]


class ContrastiveLoss(nn.Module):
    """A training objective over one step's embeddings.

    The training step (:class:`vlm2emb.gradcache.ContrastiveStep`) embeds the batch, puts
    the embeddings back in row order, and calls :meth:`training_loss` once per step, with
    GradCache or without, in one process or many. A subclass registered with
    :func:`vlm2emb.losses.register_loss` is selected by the recipe key ``train.loss``.

    Distributed runs: ``query``, ``positive`` and ``negatives`` are this process's rows;
    the batch's keys and masks cover the global batch. A loss that uses other processes'
    embeddings gathers them itself (:func:`vlm2emb.distributed.gather_with_grad`) and
    returns the mean over its local queries, so that gradient averaging over N processes
    gives the one-process gradients (see :meth:`vlm2emb.losses.InfoNCELoss.gathered`).

    Multi-vector models: a loss with ``takes_multivector = True`` receives the forward's
    :class:`vlm2emb.multivector.MultiVectorEmbeddings` (token sets, masks and the dense
    embeddings of the same forward); any other loss receives the dense ``[b, d]`` part.
    """

    def check_examples(self, examples: list[TrainExample]) -> None:
        """Refuses training rows this objective cannot learn from, before the model loads.

        The trainer calls it once on the loaded rows (not when streaming). The default
        accepts everything; a loss that needs more than query and positive (teacher scores,
        say) raises a ``ValueError`` saying what is missing.
        """

    #: Whether :meth:`training_loss` reads per-token embeddings (else: dense tensors only).
    takes_multivector: ClassVar[bool] = False

    def training_loss(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None,
        batch: ContrastiveBatch,
        temperature: float | Tensor,
    ) -> Tensor:
        """The scalar loss of one step.

        Args:
            query: [b, d] this process's query embeddings, in row order.
            positive: [b, d] this process's positive embeddings, in row order.
            negatives: [b, K, d] this process's hard negatives (padding slots where
                ``batch.local_negative_mask`` is False), or None when the batch has none.
            batch: The collated batch (false-negative keys, negative masks).
            temperature: The model's temperature: a float, or a [] tensor with grad when the
                model learns it (``scale = 1 / temperature``).

        Returns:
            The scalar loss.
        """
        raise NotImplementedError
