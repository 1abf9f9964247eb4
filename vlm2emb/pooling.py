"""Pooling: from per-token hidden states to one vector per sequence.

All poolers take ``hidden`` [B, L, H] and ``mask`` [B, L] (1 = real token, 0 = padding)
and are correct for left and right padding alike, because they locate tokens through the
mask instead of assuming a padding side (VLM2Vec's pooling broke when the padding side
changed).

Methods:
    last: the hidden state of the last real token (VLM2Vec's choice).
    eos: the last token after appending the tokenizer's EOS token to every input.
    embed_token: the last token after appending a dedicated pooling token.
    mean: the mask-weighted average over real tokens.

``eos`` and ``embed_token`` differ from ``last`` only in the input (the appended token),
which :class:`vlm2emb.EmbeddingModel` adds; here they pool like ``last``.
"""

from __future__ import annotations

import torch

POOLING_METHODS = ("last", "eos", "embed_token", "mean")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for any padding side.

    Args:
        mask: [B, L] attention mask (nonzero = real token).

    Returns:
        [B] int64 positions.
    """
    seq_len = mask.shape[1]
    # argmax returns the first maximum; on the flipped mask that is the last real token.
    return seq_len - 1 - mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pools hidden states into one embedding per row.

    Args:
        hidden: [B, L, H] last hidden states.
        mask: [B, L] attention mask.
        method: One of :data:`POOLING_METHODS`.

    Returns:
        [B, H] pooled embeddings in ``hidden``'s dtype.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLING_METHODS)}")
    if method == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    idx = last_token_index(mask)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx.to(hidden.device)]


def pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, method: str) -> torch.Tensor:
    """Pools a packed batch: the same vectors :func:`pool` gives for the padded batch.

    Args:
        hidden: [T, H] hidden states of the rows' real tokens, rows concatenated.
        cu_seqlens: [B + 1] cumulative row lengths (row ``i`` is ``hidden[cu[i]:cu[i + 1]]``).
        method: One of :data:`POOLING_METHODS`.

    Returns:
        [B, H] pooled embeddings in ``hidden``'s dtype.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLING_METHODS)}")
    cu_seqlens = cu_seqlens.to(hidden.device)
    if method != "mean":
        return hidden[cu_seqlens[1:] - 1]  # each row's last token
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # [B]
    rows = torch.arange(lengths.numel(), device=hidden.device)
    # output_size: known from hidden, so no device sync to size the result.
    row_of_token = torch.repeat_interleave(rows, lengths, output_size=hidden.shape[0])  # [T]
    sums = hidden.new_zeros(lengths.numel(), hidden.shape[1]).index_add(0, row_of_token, hidden)  # [B, H]
    return sums / lengths.clamp(min=1).unsqueeze(-1).to(hidden.dtype)
